//! `graft run`: run a model on inputs from an `.npz` file.

use std::path::PathBuf;

use anyhow::{bail, Context};
use graft::runtime::{read_npz, write_npz, Device, HostTensor, OrtSession, SessionOptions};

/// Run a model on named inputs and print or save its outputs.
///
/// Inputs are read from an `.npz` file whose array names are the model's input names (extra
/// arrays are ignored). With `--compare REF.npz` the outputs are checked against reference
/// outputs and the largest difference is printed; the command fails (exit 2) above `--tolerance`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX model to run.
    model: PathBuf,
    /// An `.npz` file of inputs, keyed by input name.
    #[arg(long, value_name = "FILE.npz")]
    inputs: PathBuf,
    /// Trained adapter tensors (safetensors from `graft train`) to run the patched model with.
    #[arg(long, value_name = "FILE")]
    adapter: Option<PathBuf>,
    /// Write the outputs to this `.npz` file.
    #[arg(short, long, value_name = "OUT.npz")]
    output: Option<PathBuf>,
    /// Compare the outputs with these reference outputs (matched by name).
    #[arg(long, value_name = "REF.npz")]
    compare: Option<PathBuf>,
    /// Largest absolute difference accepted by --compare.
    #[arg(long, default_value_t = 1e-5)]
    tolerance: f64,
    /// Execution provider.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Intra-op threads (0: ONNX Runtime's choice).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let inputs = read_npz(&args.inputs)?;
    let options = SessionOptions {
        device: args.device,
        threads: args.threads,
        exact: false,
    };
    let mut session = match &args.adapter {
        None => OrtSession::from_file(&args.model, options),
        Some(adapter) => {
            let mut model = graft::onnx::load(&args.model)?;
            graft::adapter::load_into(&mut model, adapter)?;
            OrtSession::from_bytes(&graft::onnx::to_bytes(&model)?, options)
        }
    }
    .with_context(|| format!("{}", args.model.display()))?;
    let fed: Vec<(String, HostTensor)> = inputs
        .into_iter()
        .filter(|(name, _)| session.input_names.contains(name))
        .collect();
    let outputs = session.run(&fed)?;
    for (name, tensor) in &outputs {
        let values = tensor.to_f64();
        let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
        println!("{name}: shape {:?}, mean {mean:.6}", tensor.shape());
    }
    if let Some(path) = &args.output {
        write_npz(path, &outputs)?;
        println!("wrote {}", path.display());
    }
    if let Some(reference) = &args.compare {
        let expected = read_npz(reference)?;
        let mut worst: f64 = 0.0;
        for (name, tensor) in &outputs {
            let Some((_, other)) = expected.iter().find(|(n, _)| n == name) else {
                continue;
            };
            worst = worst.max(tensor.max_abs_diff(other));
        }
        println!(
            "max |difference| versus {}: {worst:.3e}",
            reference.display()
        );
        if worst > args.tolerance {
            bail!(
                "outputs differ from {} by {worst:.3e} (tolerance {:.1e})",
                reference.display(),
                args.tolerance
            );
        }
    }
    Ok(())
}
