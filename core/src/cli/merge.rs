//! `graft merge`: fold grafted branches into the base weights.

use std::path::PathBuf;

use anyhow::Context;
use graft::onnx::{self, SaveOptions};

/// Fold LoRA, IA3 and BitFit back into the base weights.
///
/// Reads a model written by `graft apply` (optionally with trained values from `--adapter`), adds
/// each low-rank update into its weight in the weight's own layout, multiplies IA3 scales into
/// their weights, keeps BitFit's trained biases, and removes the branches. The merged model has
/// the base model's nodes and op types; only the targeted weights are rewritten.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model written by `graft apply`.
    patched: PathBuf,
    /// Trained adapter tensors (safetensors, as `graft train` writes them) to merge instead of
    /// the values stored in the patched model.
    #[arg(long, value_name = "FILE")]
    adapter: Option<PathBuf>,
    /// Where to write the merged model.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut model = onnx::load(&args.patched)?;
    if let Some(adapter) = &args.adapter {
        let n = graft::adapter::load_into(&mut model, adapter)?;
        println!("loaded {n} tensors from {}", adapter.display());
    }
    let report = graft::merge::merge(&mut model)?;
    onnx::save(&model, &args.output, &SaveOptions::default())
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "merged into {} weights ({:.1} MB rewritten), removed {} nodes and {} parameters",
        report.updated_weights.len(),
        report.bytes_touched as f64 / 1e6,
        report.removed_nodes,
        report.removed_parameters
    );
    println!("wrote {}", args.output.display());
    Ok(())
}
