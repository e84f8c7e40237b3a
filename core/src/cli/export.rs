//! `graft export`: write a patched model's adapter in another tool's format.

use std::path::PathBuf;

/// Export the adapter of a model written by `graft apply` (or trained by `graft train`).
///
/// `--format peft` writes `adapter_config.json` and `adapter_model.safetensors` that HF PEFT
/// loads with `PeftModel.from_pretrained(model, DIR)`: keys
/// `base_model.model.<module path>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]), the
/// module paths being the site labels `graft inspect` shows.
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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut model = graft::onnx::load(&args.patched)?;
    if let Some(adapter) = &args.adapter {
        graft::adapter::load_into(&mut model, adapter)?;
    }
    match args.format {
        Format::Peft => graft::peft::export(&model, &args.output)?,
    }
    println!(
        "wrote {}/adapter_config.json and adapter_model.safetensors",
        args.output.display()
    );
    Ok(())
}
