//! Running ONNX models: the ONNX Runtime environment (loaded dynamically from the provisioned
//! library), sessions on the CPU or CUDA execution provider, tract sessions as the second
//! runtime, and host tensors to feed them.

mod host_tensor;
pub(crate) mod provision;
mod session;
mod tract;

pub use host_tensor::{read_npz, write_npz, HostTensor};
pub use provision::{
    cache_dir, library_path, openvino_plugin_path, OPENVINO_EP_VERSION, ORT_VERSION,
};
pub use session::{environment, Device, OrtAdapter, OrtSession, Precision, SessionOptions};
pub use tract::TractSession;
