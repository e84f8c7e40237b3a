//! ONNX Runtime sessions: one process-wide environment, sessions on a chosen execution provider,
//! and runs that take and return [`HostTensor`]s by name.

use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::{Adapter, RunOptions, Session};
use ort::value::{DynValue, Tensor as OrtTensor, ValueType};

use super::{library_path, HostTensor};
use crate::{Error, Result};

/// Where a session runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider; fails clearly where it cannot be used.
    Cuda,
    /// The OpenVINO execution provider (a plugin graft fetches from the Python package index),
    /// on the CPU; with `--precision bf16` it computes in bfloat16 (AMX / AVX-512 BF16).
    Openvino,
}

/// The precision an execution provider computes in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 throughout: the reference arithmetic.
    #[default]
    F32,
    /// bfloat16 matrix products with float32 accumulation (OpenVINO only); the host keeps
    /// float32 master weights and optimizer state.
    Bf16,
}

impl Precision {
    /// Whether this CPU multiplies bfloat16 natively (`avx512_bf16` or `amx_bf16` in
    /// /proc/cpuinfo); `None` where that cannot be read.
    pub fn cpu_has_bf16() -> Option<bool> {
        let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        Some(info.lines().filter(|l| l.starts_with("flags")).any(|l| {
            l.split_whitespace()
                .any(|flag| flag == "avx512_bf16" || flag == "amx_bf16")
        }))
    }
}

/// Options for a session.
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionOptions {
    /// The execution provider.
    pub device: Device,
    /// Intra-op threads; 0 lets ONNX Runtime decide.
    pub threads: usize,
    /// Run the graph exactly as written, without ONNX Runtime's graph rewrites (fusions change
    /// float rounding, so bit-for-bit comparisons between two graphs need this).
    pub exact: bool,
    /// The compute precision (bf16 only on [`Device::Openvino`]).
    pub precision: Precision,
}

impl SessionOptions {
    /// Fails with [`Error::Config`] when `threads` exceeds the machine's logical CPUs: more
    /// intra-op threads only contend for them, and ONNX Runtime crashes when it cannot create
    /// the threads it was asked for.
    pub fn check(&self) -> Result<()> {
        if self.precision == Precision::Bf16 && self.device != Device::Openvino {
            return Err(Error::Config(
                "--precision bf16 needs --device openvino (ONNX Runtime's CPU and CUDA providers \
                 run graft's graphs in float32)"
                    .into(),
            ));
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if self.threads > cpus {
            return Err(Error::Config(format!(
                "--threads {}: this machine has {cpus} logical CPUs; use at most {cpus} \
                 (0 lets ONNX Runtime choose)",
                self.threads
            )));
        }
        Ok(())
    }
}

static ENVIRONMENT: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the provisioned library on first use.
pub fn environment() -> Result<&'static Environment> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = library_path().map_err(|e| e.to_string())?;
            let builder = ort::init_from(&path)
                .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            builder
                .with_name("graft")
                .build()
                .map_err(|e| format!("cannot create the environment: {e}"))
        })
        .as_ref()
        .map_err(|e| Error::Runtime(e.clone()))
}

static OPENVINO: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// The OpenVINO execution provider's name among the environment's devices.
const OPENVINO_EP: &str = "OpenVINOExecutionProvider";

/// `builder` placing the graph on the OpenVINO execution provider's CPU device, with the
/// precision and thread count in its `load_config` (the only way its options reach it; without
/// a precision hint it picks bfloat16 on its own where the CPU has it).
fn with_openvino(
    builder: ort::session::builder::SessionBuilder,
    environment: &'static Environment,
    options: &SessionOptions,
) -> Result<ort::session::builder::SessionBuilder> {
    OPENVINO
        .get_or_init(|| {
            let path = super::provision::openvino_plugin_path().map_err(|e| e.to_string())?;
            environment
                .register_ep_library("OpenVINO", &path)
                .map_err(|e| format!("cannot load {}: {e}", path.display()))
        })
        .clone()
        .map_err(Error::Runtime)?;
    let devices: Vec<_> = environment
        .devices()
        .filter(|d| d.ep().is_ok_and(|ep| ep == OPENVINO_EP))
        .filter(|d| d.hardware_device().ty() == ort::memory::DeviceType::CPU)
        .collect();
    if devices.is_empty() {
        let offered: Vec<String> = environment
            .devices()
            .map(|d| {
                let hardware = d.hardware_device();
                let vendor = hardware.vendor().unwrap_or("?");
                format!(
                    "{} ({:?} by {vendor})",
                    d.ep().unwrap_or("?"),
                    hardware.ty()
                )
            })
            .collect();
        return Err(Error::Runtime(format!(
            "the OpenVINO execution provider loaded but offers no CPU device here (ONNX Runtime \
             lists: {}; OpenVINO's plugin offers Intel devices only); use --device cpu",
            offered.join(", ")
        )));
    }
    let precision = match options.precision {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16",
    };
    let mut cpu = serde_json::json!({ "INFERENCE_PRECISION_HINT": precision });
    if options.threads > 0 {
        cpu["INFERENCE_NUM_THREADS"] = options.threads.to_string().into();
    }
    let config = serde_json::json!({ "CPU": cpu }).to_string();
    let ep_options = vec![(format!("{OPENVINO_EP}.load_config"), config)];
    builder
        .with_devices(devices, Some(&ep_options))
        .map_err(|e| Error::Runtime(format!("the OpenVINO execution provider: {e}")))
}

fn runtime_error(context: &str) -> impl Fn(ort::Error) -> Error + '_ {
    move |e| Error::Runtime(format!("{context}: {e}"))
}

/// An ONNX Runtime adapter file (`.onnx_adapter`) loaded once and usable with any session
/// whose graph has inputs of its tensors' names (see [`OrtSession::run_with_adapter`]).
pub struct OrtAdapter {
    adapter: Adapter,
}

impl OrtAdapter {
    /// Loads an adapter file onto the CPU.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        environment()?;
        let adapter = Adapter::from_file(path, None)
            .map_err(|e| Error::Runtime(format!("cannot load adapter {}: {e}", path.display())))?;
        Ok(OrtAdapter { adapter })
    }
}

/// A loaded model, ready to run.
pub struct OrtSession {
    session: Session,
    /// The graph's input names, in order (without initializers that are also inputs).
    pub input_names: Vec<String>,
    /// Initializers that are also graph inputs: fed when given, their stored value otherwise
    /// (methods' switches and other host inputs in exported graphs).
    pub overridable_names: Vec<String>,
    /// The graph's output names, in order.
    pub output_names: Vec<String>,
}

impl OrtSession {
    /// Builds a session from a serialized model (all tensor data inline).
    pub fn from_bytes(model_bytes: &[u8], options: SessionOptions) -> Result<Self> {
        Self::build(options, |builder| builder.commit_from_memory(model_bytes))
    }

    /// Builds a session from a model file (external data is resolved next to it).
    pub fn from_file(path: &std::path::Path, options: SessionOptions) -> Result<Self> {
        Self::build(options, |builder| builder.commit_from_file(path))
    }

    fn build(
        options: SessionOptions,
        commit: impl FnOnce(&mut ort::session::builder::SessionBuilder) -> ort::Result<Session>,
    ) -> Result<Self> {
        options.check()?;
        let environment = environment()?;
        let mut builder =
            Session::builder(environment).map_err(runtime_error("session options"))?;
        if options.threads > 0 {
            builder = builder
                .with_intra_threads(options.threads)
                .map_err(|e| Error::Runtime(format!("thread count: {e}")))?;
        }
        if let Some(prefix) = std::env::var_os("GRAFT_ORT_PROFILE") {
            // Diagnosis aid: ONNX Runtime writes a per-op timing trace to `<prefix>_<date>.json`.
            builder = builder
                .with_profiling(prefix)
                .map_err(|e| Error::Runtime(format!("profiling: {e}")))?;
        }
        if options.exact {
            builder = builder
                .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)
                .map_err(|e| Error::Runtime(format!("optimization level: {e}")))?;
        }
        if options.device == Device::Cuda {
            let cuda = ort::ep::CUDA::default().build().error_on_failure();
            builder = builder.with_execution_providers([cuda]).map_err(|e| {
                Error::Runtime(format!(
                    "the CUDA execution provider is not available ({e}); graft needs the \
                     onnxruntime-gpu build of ONNX Runtime (set ORT_DYLIB_PATH to it), CUDA and \
                     cuDNN libraries, and a GPU. Use --device cpu to run on the CPU."
                ))
            })?;
        }
        if options.device == Device::Openvino {
            builder = with_openvino(builder, environment, &options)?;
        }
        let session = commit(&mut builder).map_err(runtime_error("cannot load the model"))?;
        let input_names = session
            .inputs()
            .iter()
            .map(|i| i.name().to_owned())
            .collect();
        let overridable_names = session
            .overridable_initializers()
            .iter()
            .map(|i| i.name().to_owned())
            .collect();
        let output_names = session
            .outputs()
            .iter()
            .map(|o| o.name().to_owned())
            .collect();
        Ok(OrtSession {
            session,
            input_names,
            overridable_names,
            output_names,
        })
    }

    /// Whether the model reads a feed named `name`: an input, or an overridable initializer.
    pub fn accepts(&self, name: &str) -> bool {
        self.input_names
            .iter()
            .chain(&self.overridable_names)
            .any(|n| n == name)
    }

    /// Runs the model on named inputs and returns every output, in graph order.
    pub fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        self.run_with_adapter(inputs, None)
    }

    /// Runs the model with an adapter's tensors fed as inputs by name, as ONNX Runtime's
    /// `RunOptions::add_adapter` does; without an adapter, like [`OrtSession::run`].
    pub fn run_with_adapter(
        &mut self,
        inputs: &[(String, HostTensor)],
        adapter: Option<&OrtAdapter>,
    ) -> Result<Vec<(String, HostTensor)>> {
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            values.push((name.clone(), to_ort_value(tensor)?));
        }
        let run_options = adapter
            .map(|adapter| -> Result<RunOptions> {
                let mut options = RunOptions::new().map_err(runtime_error("run options"))?;
                options
                    .add_adapter(&adapter.adapter)
                    .map_err(runtime_error("adapter"))?;
                Ok(options)
            })
            .transpose()?;
        let outputs = match &run_options {
            None => self.session.run(values),
            Some(options) => self.session.run_with_options(values, options),
        }
        .map_err(runtime_error("run failed"))?;
        let mut results = Vec::with_capacity(self.output_names.len());
        for (name, value) in outputs.iter() {
            results.push((name.to_owned(), from_ort_value(name, &value)?));
        }
        Ok(results)
    }
}

fn to_ort_value(tensor: &HostTensor) -> Result<DynValue> {
    let err = runtime_error("input tensor");
    Ok(match tensor {
        HostTensor::F32(a) => OrtTensor::from_array(a.clone()).map_err(err)?.into_dyn(),
        HostTensor::F64(a) => OrtTensor::from_array(a.clone()).map_err(err)?.into_dyn(),
        HostTensor::I64(a) => OrtTensor::from_array(a.clone()).map_err(err)?.into_dyn(),
        HostTensor::I32(a) => OrtTensor::from_array(a.clone()).map_err(err)?.into_dyn(),
        HostTensor::Bool(a) => OrtTensor::from_array(a.clone()).map_err(err)?.into_dyn(),
    })
}

fn from_ort_value(name: &str, value: &ort::value::DynValueRef<'_>) -> Result<HostTensor> {
    use ort::value::TensorElementType as T;
    let fail = |e: ort::Error| Error::Runtime(format!("output {name:?}: {e}"));
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(Error::Runtime(format!("output {name:?} is not a tensor")));
    };
    Ok(match ty {
        T::Float32 => HostTensor::F32(value.try_extract_array::<f32>().map_err(fail)?.to_owned()),
        T::Float64 => HostTensor::F64(value.try_extract_array::<f64>().map_err(fail)?.to_owned()),
        T::Int64 => HostTensor::I64(value.try_extract_array::<i64>().map_err(fail)?.to_owned()),
        T::Int32 => HostTensor::I32(value.try_extract_array::<i32>().map_err(fail)?.to_owned()),
        T::Bool => HostTensor::Bool(value.try_extract_array::<bool>().map_err(fail)?.to_owned()),
        other => {
            return Err(Error::Runtime(format!(
                "output {name:?} has element type {other:?}, which graft does not read back"
            )))
        }
    })
}
