//! Fuzz target: the bytes a method plugin answers with, decoded and checked as the host does.
//!
//! The same bytes are read as each reply the host takes from a plugin, whether they came
//! through the C ABI (`PluginClient`) or a worker's pipe (`plugins::worker`):
//!
//! * a patch reply: `PatchReply::from_frame` (8-byte JSON length, the patch JSON, a safetensors
//!   blob of payloads) and `check_payloads`; a reply that passes is applied to `bert-legacy` by
//!   `patch::apply_patch`, which validates it against the graph, and a model it patches must
//!   serialize and load again;
//! * a step-hook reply: `StepReply::from_frame`;
//! * a description: the plain JSON a worker sends and the frame the ABI carries, each method's
//!   declared defaults then checked with `MethodConfig::new` as `graft apply` checks a config.
//!
//! Any of them may be refused; none may panic.
//!
//! graft allocates the parameters a patch declares (fallibly: a shape that overflows, or that
//! no memory can be reserved for, is refused by name). A reply declaring a generated parameter
//! of more than [`MAX_ELEMENTS`] elements that could still be reserved is not applied, since
//! the allocation would be attempted and libFuzzer's 2 GB limit would report it; overflowing
//! and unreservable shapes are applied, and must be refused without allocating.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use graft::ir::Model;
use graft_plugin_sdk::{decode_frame, Init, MethodConfig, PatchReply, PluginDescription, StepReply};
use libfuzzer_sys::fuzz_target;

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| graft_fuzz::fixture("bert-legacy"))
}

/// The most elements of one generated parameter (or host input) a reply may declare to be
/// applied here: 16 Mi, at most 192 MB of staging and tensor bytes.
const MAX_ELEMENTS: usize = 1 << 24;

/// Whether `reply` declares a generated tensor large enough for graft to try to allocate it
/// beyond the fuzzer's memory budget (see the module documentation).
fn too_large_to_apply(reply: &PatchReply) -> bool {
    let shapes = reply
        .patch
        .parameters
        .iter()
        .filter(|p| !matches!(p.init, Init::Data { .. }))
        .map(|p| &p.shape)
        .chain(reply.patch.training.host_inputs.iter().map(|h| &h.shape));
    for shape in shapes {
        let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let reservable = (isize::MAX as usize) / std::mem::size_of::<f64>();
        if elements.is_some_and(|n| n > MAX_ELEMENTS && n <= reservable) {
            return true;
        }
    }
    false
}

fn check_description(json: &[u8]) {
    let Ok(description) = serde_json::from_slice::<PluginDescription>(json) else {
        return;
    };
    for method in &description.methods {
        let defaults: serde_json::Map<String, serde_json::Value> = method
            .config
            .iter()
            .map(|key| (key.key.clone(), key.default.clone()))
            .collect();
        let _ = MethodConfig::new(method, &serde_json::Value::Object(defaults));
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(reply) = PatchReply::from_frame(data) {
        if reply.check_payloads().is_ok() && !too_large_to_apply(&reply) {
            let mut patched = model().clone();
            let method = graft::patch::AppliedMethod {
                method: "fuzz".into(),
                plugin: "graft-fuzz".into(),
                plugin_version: "0".into(),
                ..Default::default()
            };
            if graft::patch::apply_patch(&mut patched, &reply, method).is_ok() {
                let bytes = graft::onnx::to_bytes(&patched).expect("a patched model serializes");
                graft::onnx::load_from_bytes(&bytes, None, Path::new("patched.onnx"))
                    .expect("a patched model loads again");
            }
        }
    }
    let _ = StepReply::from_frame(data);
    check_description(data);
    if let Ok((json, _)) = decode_frame(data) {
        check_description(json);
    }
});
