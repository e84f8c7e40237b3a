//! `graft convert`: rewrite a model through the IR, moving tensor data inline or external.

use std::path::PathBuf;

use anyhow::Context;
use graft::onnx::{self, DataPlacement, SaveOptions};

/// Rewrite a model through graft's IR.
///
/// Loads MODEL and writes it to OUT unchanged in meaning: every node, attribute, initializer,
/// metadata entry and function is kept. Use it to move weights between inline and external data,
/// or to check that a model round-trips. By default tensors already stored in an external file in
/// OUT's folder stay there untouched, others go inline (or to OUT.data above protobuf's limit).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX model to read.
    model: PathBuf,
    /// Where to write the result.
    #[arg(short, long)]
    output: PathBuf,
    /// Write tensors of 1 KiB or more to this file beside OUT (a plain file name).
    #[arg(long, value_name = "FILE", conflicts_with = "inline")]
    external_data: Option<String>,
    /// Write every tensor inline (fails above protobuf's 2 GiB limit).
    #[arg(long)]
    inline: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = onnx::load(&args.model)?;
    let placement = match (args.external_data, args.inline) {
        (Some(file), _) => DataPlacement::External(file),
        (None, true) => DataPlacement::Inline,
        (None, false) => DataPlacement::Auto,
    };
    onnx::save(&model, &args.output, &SaveOptions { placement })
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "wrote {} ({} nodes, {} initializers)",
        args.output.display(),
        model.graph.nodes.len(),
        model.graph.initializers.len()
    );
    Ok(())
}
