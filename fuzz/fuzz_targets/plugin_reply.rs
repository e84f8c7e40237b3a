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
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use graft::ir::Model;
use graft_plugin_sdk::{
    decode_frame, MethodConfig, PatchReply, PluginDescription, StepReply,
};
use libfuzzer_sys::fuzz_target;

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| graft_fuzz::fixture("bert-legacy"))
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
        if reply.check_payloads().is_ok() {
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
