//! `graft run`: run a model on inputs from an `.npz` file.

use std::path::PathBuf;

use anyhow::{bail, Context};
use graft::onnx_adapter::{is_onnx_adapter, OnnxAdapter};
use graft::runtime::{
    read_npz, write_npz, Device, HostTensor, OrtAdapter, OrtSession, Precision, SessionOptions,
    TractSession,
};

/// Run a model on named inputs and print or save its outputs.
///
/// Inputs are read from an `.npz` file whose array names are the model's input names (extra
/// arrays are ignored). An array may also replace an overridable initializer by name — a
/// method's input such as an adapter's switch `adapter.NAME.active` (bool scalar) or robust
/// AdapterDrop's `adapter.NAME.dropped_layers` (float scalar). With `--compare REF.npz` the outputs are checked against reference
/// outputs and the largest difference is printed; the command fails (exit 2) above `--tolerance`.
///
/// `--runtime tract` runs the model in tract instead of ONNX Runtime (CPU only), to check that
/// an exported graph is portable.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX model to run.
    model: PathBuf,
    /// An `.npz` file of inputs, keyed by input name.
    #[arg(long, value_name = "FILE.npz")]
    inputs: PathBuf,
    /// Adapter tensors to run the patched model with: safetensors (as `graft train` writes
    /// them) or an ONNX Runtime `.onnx_adapter` file (as `graft export --format onnx-adapter`
    /// writes them, fed through ONNX Runtime's adapter API); the format is read from the file.
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
    /// Compute precision: f32, or bf16 on --device openvino (bfloat16 products where the CPU
    /// has AVX-512 BF16 or AMX; float32 master weights and optimizer state stay on the host).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Intra-op threads of ONNX Runtime (0: its choice).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The runtime that runs the model.
    #[arg(long, value_enum, default_value_t = Runtime::Ort)]
    runtime: Runtime,
}

/// The runtimes `graft run` can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Runtime {
    /// ONNX Runtime, on the `--device` execution provider.
    Ort,
    /// tract, on the CPU.
    Tract,
}

/// Adapter tensors given with `--adapter`, by file format.
enum AdapterFile {
    Safetensors(PathBuf),
    OnnxAdapter(PathBuf, OnnxAdapter),
}

impl AdapterFile {
    fn read(path: &std::path::Path) -> anyhow::Result<Self> {
        let bytes = graft::input_file::read(path)?;
        Ok(if is_onnx_adapter(&bytes) {
            AdapterFile::OnnxAdapter(path.to_owned(), OnnxAdapter::from_bytes(&bytes, path)?)
        } else {
            AdapterFile::Safetensors(path.to_owned())
        })
    }

    /// Loads the tensors into the model's initializers.
    fn load_into(&self, model: &mut graft::ir::Model) -> anyhow::Result<()> {
        match self {
            AdapterFile::Safetensors(path) => graft::adapter::load_into(model, path).map(drop)?,
            AdapterFile::OnnxAdapter(path, adapter) => adapter.load_into(model, path).map(drop)?,
        }
        Ok(())
    }
}

/// A session of either runtime.
enum Session {
    Ort(OrtSession, Option<OrtAdapter>),
    Tract(TractSession),
}

impl Session {
    fn open(args: &Args) -> anyhow::Result<Self> {
        let adapter = args.adapter.as_deref().map(AdapterFile::read).transpose()?;
        if args.runtime == Runtime::Tract {
            if args.device != Device::Cpu {
                bail!("tract runs on the CPU only; --device cuda needs --runtime ort");
            }
            let session = match &adapter {
                None => TractSession::from_file(&args.model)?,
                Some(adapter) => {
                    let mut model = graft::onnx::load(&args.model)?;
                    adapter.load_into(&mut model)?;
                    TractSession::from_bytes(&graft::onnx::to_bytes(&model)?)?
                }
            };
            return Ok(Session::Tract(session));
        }
        let options = SessionOptions {
            device: args.device,
            threads: args.threads,
            exact: false,
            precision: args.precision,
        };
        Ok(match adapter {
            None => Session::Ort(OrtSession::from_file(&args.model, options)?, None),
            Some(AdapterFile::OnnxAdapter(path, adapter)) => {
                adapter.check_against(&graft::onnx::load(&args.model)?, &path)?;
                let session = OrtSession::from_file(&args.model, options)?;
                Session::Ort(session, Some(OrtAdapter::from_file(&path)?))
            }
            Some(adapter @ AdapterFile::Safetensors(_)) => {
                let mut model = graft::onnx::load(&args.model)?;
                adapter.load_into(&mut model)?;
                let bytes = graft::onnx::to_bytes(&model)?;
                Session::Ort(OrtSession::from_bytes(&bytes, options)?, None)
            }
        })
    }

    /// Whether the model reads a feed of this name (ONNX Runtime also takes overridable
    /// initializers, such as a method's switch).
    fn accepts(&self, name: &str) -> bool {
        match self {
            Session::Ort(session, _) => session.accepts(name),
            Session::Tract(session) => session.input_names.iter().any(|n| n == name),
        }
    }

    fn run(&mut self, inputs: &[(String, HostTensor)]) -> graft::Result<Vec<(String, HostTensor)>> {
        match self {
            Session::Ort(session, adapter) => session.run_with_adapter(inputs, adapter.as_ref()),
            Session::Tract(session) => session.run(inputs),
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let inputs = read_npz(&args.inputs)?;
    let mut session = Session::open(&args).with_context(|| format!("{}", args.model.display()))?;
    let fed: Vec<(String, HostTensor)> = inputs
        .into_iter()
        .filter(|(name, _)| session.accepts(name))
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
