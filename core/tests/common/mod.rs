//! Shared helpers for the core's integration tests: fixture paths and running models in ONNX Runtime.
#![allow(dead_code)]

use std::path::PathBuf;

use graft::ir::Model;
use graft::runtime::{read_npz, HostTensor, OrtSession, SessionOptions};

/// The 16 committed fixtures: 8 model variants, each from both exporters.
pub const FIXTURES: &[&str] = &[
    "bert-legacy",
    "bert-dynamo",
    "gpt2-legacy",
    "gpt2-dynamo",
    "gpt2-past-legacy",
    "gpt2-past-dynamo",
    "llama-legacy",
    "llama-dynamo",
    "llama-past-legacy",
    "llama-past-dynamo",
    "t5-legacy",
    "t5-dynamo",
    "clip-legacy",
    "clip-dynamo",
    "vit-legacy",
    "vit-dynamo",
];

/// The folder of a fixture.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/fixtures")
        .join(name)
}

/// The fixture's model file.
pub fn fixture_model(name: &str) -> PathBuf {
    fixture_dir(name).join("model.onnx")
}

/// The fixture's recorded inputs.
pub fn fixture_inputs(name: &str) -> Vec<(String, HostTensor)> {
    read_npz(&fixture_dir(name).join("inputs.npz")).expect("fixture inputs")
}

/// The fixture's PyTorch reference outputs.
pub fn fixture_outputs(name: &str) -> Vec<(String, HostTensor)> {
    read_npz(&fixture_dir(name).join("outputs.npz")).expect("fixture outputs")
}

/// Runs a model held in memory through ONNX Runtime on the CPU (one thread, for determinism).
pub fn run_model(model: &Model, inputs: &[(String, HostTensor)]) -> Vec<(String, HostTensor)> {
    let bytes = graft::onnx::to_bytes(model).expect("serialize model");
    let mut session = OrtSession::from_bytes(
        &bytes,
        SessionOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .expect("ORT session");
    let wanted: Vec<_> = inputs
        .iter()
        .filter(|(name, _)| session.input_names.contains(name))
        .cloned()
        .collect();
    session.run(&wanted).expect("ORT run")
}

/// Largest absolute difference between two sets of named outputs (matched by name).
pub fn max_diff(a: &[(String, HostTensor)], b: &[(String, HostTensor)]) -> f64 {
    let mut worst: f64 = 0.0;
    for (name, tensor) in a {
        let other = b
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("output {name:?} missing"));
        worst = worst.max(tensor.max_abs_diff(&other.1));
    }
    worst
}
