//! Subcommand definitions and dispatch. Each subcommand lives in its own file; every error is
//! reported by `main` with exit status 2.

mod apply;
mod combine;
mod convert;
mod export;
mod import_hf;
mod inspect;
mod merge;
mod plugins;
mod run;
mod train;
mod verify;

use clap::{Parser, Subcommand};

/// graft — parameter-efficient fine-tuning for ONNX transformers.
///
/// graft reads a model that a standard exporter produced, finds its transformer structure,
/// grafts PEFT methods (LoRA, IA3, BitFit, ...) onto the graph through plugins, trains only the
/// new parameters through ONNX Runtime, and merges or exports the result.
#[derive(Parser, Debug)]
#[command(name = "graft", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Inspect(inspect::Args),
    Apply(apply::Args),
    Train(Box<train::Args>),
    Merge(merge::Args),
    Export(export::Args),
    Combine(combine::Args),
    Plugins(plugins::Args),
    Run(run::Args),
    Convert(convert::Args),
    ImportHf(import_hf::Args),
    Verify(verify::Args),
    /// Serves one plugin library to a graft process over standard input and output (started
    /// by graft itself; see `graft::plugins::worker`).
    #[command(hide = true)]
    PluginWorker(PluginWorkerArgs),
}

#[derive(clap::Args, Debug)]
struct PluginWorkerArgs {
    /// The plugin library to load.
    library: std::path::PathBuf,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Apply(args) => apply::run(args),
        Command::Train(args) => train::run(*args),
        Command::Merge(args) => merge::run(args),
        Command::Export(args) => export::run(args),
        Command::Combine(args) => combine::run(args),
        Command::Plugins(args) => plugins::run(args),
        Command::Run(args) => run::run(args),
        Command::Convert(args) => convert::run(args),
        Command::ImportHf(args) => import_hf::run(args),
        Command::Verify(args) => verify::run(args),
        Command::PluginWorker(args) => {
            std::process::exit(graft::plugins::worker::serve(&args.library))
        }
    }
}
