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
///
/// Weights that qlora stores in 4 bits merge into float (their own type) by default. With
/// --requantize they stay 4-bit: each merged weight is written back into NF4 codes and block
/// scales in the same layout, and the error against the float merge is printed per weight.
///
/// Example: graft merge patched.onnx --adapter run/adapter.safetensors -o merged.onnx
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model written by `graft apply`.
    patched: PathBuf,
    /// Trained adapter tensors (safetensors, as `graft train` writes them) to merge instead of
    /// the values stored in the patched model.
    #[arg(long, value_name = "FILE")]
    adapter: Option<PathBuf>,
    /// Keep quantized base weights (qlora's NF4) quantized: requantize each merged weight in
    /// its block layout and report the error against merging into float.
    #[arg(long)]
    requantize: bool,
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
    let options = graft::merge::MergeOptions {
        requantize: args.requantize,
    };
    let report = graft::merge::merge_with(&mut model, &options)?;
    onnx::save(&model, &args.output, &SaveOptions::default())
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "merged into {} weights ({:.1} MB rewritten), removed {} nodes and {} parameters",
        report.updated_weights.len(),
        report.bytes_touched as f64 / 1e6,
        report.removed_nodes,
        report.removed_parameters
    );
    for weight in &report.requantized {
        println!(
            "requantized {} ({} elements): max |error| {:.3e}, relative RMS error {:.3e} against the float merge",
            weight.value, weight.elements, weight.max_abs_error, weight.relative_rms_error
        );
    }
    println!("wrote {}", args.output.display());
    Ok(())
}
