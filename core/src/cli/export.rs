//! `graft export`: write a patched model's adapter in another tool's format.

use std::path::PathBuf;

/// Export the adapter of a model written by `graft apply` (or trained by `graft train`).
///
/// `--format peft` writes `adapter_config.json` and `adapter_model.safetensors` that HF PEFT
/// loads with `PeftModel.from_pretrained(model, DIR)`: keys
/// `base_model.model.<module path>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]), the
/// module paths being the site labels `graft inspect` shows. The config lists those paths as
/// `target_modules` (PEFT matches each exactly) with per-path `rank_pattern` / `alpha_pattern`
/// where ranks or alphas differ; `graft apply --from-peft DIR` reads the folder back. Base
/// tensors that an import replaced (`modules_to_save`) are not written.
///
/// `--format onnx-adapter` writes `model.onnx` and `adapter.onnx_adapter` for ONNX Runtime's
/// adapter API: the graph reads every trainable tensor as an overridable input whose default
/// leaves the base model unchanged (low-rank factors zero, scales one), and the adapter file
/// holds the trained values, which `RunOptions::add_adapter` (or `graft run --adapter`) feeds
/// by name. One loaded graph serves any number of adapters trained from the same patch.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model written by `graft apply`.
    patched: PathBuf,
    /// The adapter format.
    #[arg(long, value_enum, default_value_t = Format::Peft)]
    format: Format,
    /// Trained adapter tensors (safetensors) to export instead of the values in the model.
    #[arg(long, value_name = "FILE")]
    adapter: Option<PathBuf>,
    /// The output folder.
    #[arg(short, long)]
    output: PathBuf,
}

/// Adapter formats.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Format {
    /// Hugging Face PEFT (LoRA).
    Peft,
    /// ONNX Runtime's `.onnx_adapter`, with the graph that reads it.
    OnnxAdapter,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut model = graft::onnx::load(&args.patched)?;
    if let Some(adapter) = &args.adapter {
        graft::adapter::load_into(&mut model, adapter)?;
    }
    match args.format {
        Format::Peft => {
            graft::peft::export(&model, &args.output)?;
            println!(
                "wrote {}/adapter_config.json and adapter_model.safetensors",
                args.output.display()
            );
        }
        Format::OnnxAdapter => {
            let report = graft::onnx_adapter::export(&model, &args.output)?;
            println!(
                "wrote {dir}/{} and {dir}/{} ({} tensors, {:.1} kB)",
                graft::onnx_adapter::MODEL_FILE,
                graft::onnx_adapter::ADAPTER_FILE,
                report.n_parameters,
                report.adapter_bytes as f64 / 1e3,
                dir = args.output.display(),
            );
        }
    }
    Ok(())
}
