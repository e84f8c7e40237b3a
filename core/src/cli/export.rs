//! `graft export`: write a patched model's adapter in another tool's format.

use std::path::PathBuf;

use anyhow::Context;
use graft::staged_folder::StagedFolder;

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
///
/// `--format adapterhub` writes AdapterHub's `adapter_config.json` and `adapter.safetensors`
/// for bottleneck adapters (`graft apply -m adapter`), which the `adapters` library loads with
/// `model.load_adapter(DIR)`; a model with several named adapters gets one subfolder per
/// adapter (or `--name` picks one). An AdapterFusion (`-m adapter_fusion`) writes its fused
/// adapters' folders and the fusion's (`a,b/`: `adapter_fusion_config.json`,
/// `model_adapter_fusion.safetensors`, for `model.load_adapter_fusion(DIR)`). `graft apply
/// --from-adapterhub DIR` reads such folders back. HF PEFT has no bottleneck adapter or
/// fusion, so `--format peft` refuses them.
///
/// `--format onnx` writes `model.onnx`: the patched graph with the trained values stored in
/// it, which any ONNX runtime runs as is — the export for methods that cannot be merged
/// (adapters are not linear).
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
    /// With `--format adapterhub`: the adapter to write (default: all of them).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
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
    /// AdapterHub (the `adapters` library): bottleneck adapters.
    Adapterhub,
    /// The patched graph with the trained values in it (`model.onnx`).
    Onnx,
}

/// The file `--format onnx` writes in the output folder.
const GRAPH_FILE: &str = "model.onnx";

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut model = graft::onnx::load(&args.patched)?;
    if let Some(adapter) = &args.adapter {
        graft::adapter::load_into(&mut model, adapter)?;
    }
    if matches!(args.format, Format::Peft) {
        refuse_methods_without_peft_type(&model)?;
    }
    // Every format writes its files into a staging folder that replaces the output's files
    // as one set, so a failed or killed export leaves the previous export whole.
    let staged = StagedFolder::create(&args.output)?;
    let dir = staged.path().to_path_buf();
    let shown = args.output.display();
    let lines = match args.format {
        Format::Peft => {
            graft::peft::export(&model, &dir)?;
            vec![format!(
                "wrote {shown}/adapter_config.json and adapter_model.safetensors"
            )]
        }
        Format::OnnxAdapter => {
            let report = graft::onnx_adapter::export(&model, &dir)?;
            vec![format!(
                "wrote {shown}/{} and {shown}/{} ({} tensors, {:.1} kB)",
                graft::onnx_adapter::MODEL_FILE,
                graft::onnx_adapter::ADAPTER_FILE,
                report.n_parameters,
                report.adapter_bytes as f64 / 1e3,
            )]
        }
        Format::Adapterhub => {
            let report = graft::adapterhub::export(&model, &dir, args.name.as_deref())?;
            for note in &report.not_carried {
                eprintln!("warning: {note}");
            }
            report
                .adapters
                .iter()
                .zip(report.files.chunks(2))
                .map(|((name, _), files)| {
                    format!(
                        "wrote {name}: {} and {}",
                        staged.final_path(&files[0]).display(),
                        staged.final_path(&files[1]).display()
                    )
                })
                .collect()
        }
        Format::Onnx => {
            let path = dir.join(GRAPH_FILE);
            graft::onnx::save(&model, &path, &graft::onnx::SaveOptions::default())
                .with_context(|| format!("cannot write {shown}/{GRAPH_FILE}"))?;
            vec![format!("wrote {shown}/{GRAPH_FILE}")]
        }
    };
    staged
        .commit()
        .with_context(|| format!("cannot write {shown}"))?;
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// Errors for methods HF PEFT has no type for (bottleneck adapters), pointing to the format
/// that holds them.
fn refuse_methods_without_peft_type(model: &graft::ir::Model) -> anyhow::Result<()> {
    let record = graft::patch::read_record(model)?;
    if let Some(method) = record.methods.iter().find(|m| {
        (m.training.adapterhub.is_some() || !m.training.adapterhub_folders.is_empty())
            && m.training.peft.is_none()
    }) {
        anyhow::bail!(
            "HF PEFT has no bottleneck-adapter or AdapterFusion type, so method {} cannot be \
             written as PEFT files; use --format adapterhub (the adapters library) or --format \
             onnx (the patched graph)",
            method.method
        );
    }
    Ok(())
}
