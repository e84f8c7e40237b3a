//! Fuzz target: `onnx::load_from_bytes` refuses or accepts any bytes without panicking, and every
//! model it accepts serializes with `onnx::to_bytes` and loads again.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// The folder external data resolves against. It holds `w.data` (256 KiB), the file the seed
/// model with external data refers to, so that mutated references reach the range checks.
fn data_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        std::fs::write(dir.path().join("w.data"), vec![0x3c; 256 << 10]).expect("w.data");
        dir
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    let dir = data_dir();
    let path = Path::new("fuzz-input.onnx");
    if let Ok(model) = graft::onnx::load_from_bytes(data, Some(dir), path) {
        let bytes = graft::onnx::to_bytes(&model).expect("a loaded model serializes");
        graft::onnx::load_from_bytes(&bytes, Some(dir), path)
            .expect("a serialized model loads again");
    }
});
