//! Fuzz target: ONNX Runtime adapter files (`.onnx_adapter`, a FlatBuffer), read as
//! `graft run --adapter FILE.onnx_adapter` reads them.
//!
//! `OnnxAdapter::from_bytes` (what `OnnxAdapter::read` calls on the file's bytes) verifies and
//! decodes the bytes; an adapter it accepts must encode with `to_bytes` and decode to the same
//! adapter, and is then checked against and loaded into `bert-legacy` with LoRA branches,
//! whose trainable tensors are overridable initializers. Any panic is a finding.
#![no_main]

use std::path::Path;

use graft::onnx_adapter::OnnxAdapter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let source = Path::new("fuzz.onnx_adapter");
    let Ok(adapter) = OnnxAdapter::from_bytes(data, source) else {
        return;
    };
    let encoded = adapter.to_bytes();
    let decoded = OnnxAdapter::from_bytes(&encoded, source).expect("an encoded adapter decodes");
    assert_eq!(decoded, adapter, "the adapter changed in a round trip");
    let mut model = graft_fuzz::patched_bert().clone();
    let _ = adapter.load_into(&mut model, source);
});
