//! ONNX Runtime adapter files end to end: `graft export --format onnx-adapter` writes a graph and
//! an `.onnx_adapter` file; one ONNX Runtime session of that graph serves two trained variants
//! through `RunOptions::add_adapter` and, without an adapter, computes the base model;
//! `graft run --adapter` reads both adapter formats and refuses adapters of another model.

mod common;

use std::path::Path;

use common::*;
use graft::ir::{DataType, Model};
use graft::onnx;
use graft::onnx_adapter::{AdapterParameter, OnnxAdapter, ADAPTER_FILE, MODEL_FILE};
use graft::plugins::{apply_method, PluginRegistry};
use graft::runtime::{read_npz, OrtAdapter, OrtSession, SessionOptions};
use serde_json::json;

/// Both runs execute the same kernels in the same order on the same values (adapter tensors
/// are fed where the patched model has initializers), so outputs should agree exactly; the
/// bound allows for ONNX Runtime treating fed inputs and constant initializers differently.
const TOLERANCE: f64 = 1e-6;

/// LoRA on q and v, then IA3 on k and v: the graph's defaults must be neutral for both kinds
/// of branch (zero factors, unit scales).
fn patch(fixture: &str) -> Model {
    let registry = PluginRegistry::discover(&[
        plugin_library("graft_plugin_lora"),
        plugin_library("graft_plugin_ia3"),
    ])
    .unwrap();
    let mut model = onnx::load(&fixture_model(fixture)).unwrap();
    let (lora, ia3) = if fixture.starts_with("gpt2") {
        ("qkv", "qkv")
    } else {
        ("q,v", "k,v")
    };
    apply_method(
        &registry,
        &mut model,
        "lora",
        &json!({"r": 4, "targets": lora}),
    )
    .unwrap();
    apply_method(&registry, &mut model, "ia3", &json!({ "targets": ia3 })).unwrap();
    model
}

fn export(model: &Model, dir: &Path, name: &str) -> std::path::PathBuf {
    let patched = dir.join(format!("{name}.onnx"));
    onnx::save(model, &patched, &Default::default()).unwrap();
    let out = dir.join(name);
    let (code, stdout, stderr) = run_graft(&[
        "export",
        patched.to_str().unwrap(),
        "--format",
        "onnx-adapter",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains(ADAPTER_FILE), "{stdout}");
    out
}

#[test]
fn one_session_serves_two_adapters_and_the_base_model() {
    let dir = tempfile::tempdir().unwrap();
    for fixture in ["bert-legacy", "gpt2-dynamo", "llama-legacy"] {
        let inputs = fixture_inputs(fixture);
        let base = onnx::load(&fixture_model(fixture)).unwrap();
        let mut first = patch(fixture);
        randomize_trainable(&mut first);
        let mut second = first.clone();
        randomize_trainable(&mut second);
        let first_dir = export(&first, dir.path(), &format!("{fixture}-first"));
        let second_dir = export(&second, dir.path(), &format!("{fixture}-second"));
        assert_eq!(
            std::fs::read(first_dir.join(MODEL_FILE)).unwrap(),
            std::fs::read(second_dir.join(MODEL_FILE)).unwrap(),
            "{fixture}: the graph must not depend on the trained values"
        );

        let mut session = OrtSession::from_file(
            &first_dir.join(MODEL_FILE),
            SessionOptions {
                threads: 1,
                exact: true,
                ..Default::default()
            },
        )
        .unwrap();
        let fed: Vec<_> = inputs
            .iter()
            .filter(|(name, _)| session.input_names.contains(name))
            .cloned()
            .collect();
        let without = session.run_with_adapter(&fed, None).unwrap();
        let diff = max_diff(&run_model(&base, &inputs), &without);
        assert!(
            diff <= TOLERANCE,
            "{fixture}: no adapter differs from base by {diff}"
        );
        println!("{fixture}: without an adapter versus base {diff:.2e}");
        let mut changes = Vec::new();
        for (variant, variant_dir) in [(&first, &first_dir), (&second, &second_dir)] {
            let adapter = OrtAdapter::from_file(&variant_dir.join(ADAPTER_FILE)).unwrap();
            let outputs = session.run_with_adapter(&fed, Some(&adapter)).unwrap();
            let expected = run_model(variant, &inputs);
            let diff = max_diff(&expected, &outputs);
            assert!(
                diff <= TOLERANCE,
                "{fixture}: adapter run differs by {diff}"
            );
            println!("{fixture}: adapter versus its patched model {diff:.2e}");
            changes.push(max_diff(&without, &outputs));
        }
        assert!(
            changes.iter().all(|&c| c > 1e-4),
            "{fixture}: adapters changed the outputs by only {changes:?}"
        );
    }
}

#[test]
fn graft_run_reads_onnx_adapters_on_both_runtimes() {
    let fixture = "bert-legacy";
    let dir = tempfile::tempdir().unwrap();
    let mut trained = patch(fixture);
    randomize_trainable(&mut trained);
    let exported = export(&trained, dir.path(), "exported");
    let expected = run_model(&trained, &fixture_inputs(fixture));
    let inputs = fixture_dir(fixture).join("inputs.npz");
    for runtime in ["ort", "tract"] {
        let out = dir.path().join(format!("{runtime}.npz"));
        let (code, stdout, stderr) = run_graft(&[
            "run",
            exported.join(MODEL_FILE).to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--adapter",
            exported.join(ADAPTER_FILE).to_str().unwrap(),
            "--runtime",
            runtime,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{runtime}: {stdout}{stderr}");
        // `graft run` lets ONNX Runtime fuse ops, and tract orders float sums its own way
        // (see tests/tract.rs), so this compares to float32 rounding, not bit for bit.
        let diff = max_diff(&expected, &read_npz(&out).unwrap());
        assert!(diff <= 1e-5, "{runtime}: differs by {diff}");
        println!("graft run --runtime {runtime} with the adapter: {diff:.2e}");
    }
}

#[test]
fn adapters_that_do_not_fit_the_model_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let exported = export(&patch("bert-legacy"), dir.path(), "bert");
    let other = export(&patch("gpt2-legacy"), dir.path(), "gpt2");
    let model = exported.join(MODEL_FILE);
    let inputs = fixture_dir("bert-legacy").join("inputs.npz");

    let adapter = OnnxAdapter::read(&exported.join(ADAPTER_FILE)).unwrap();
    let first = &adapter.parameters[0];
    let wrong_shape = dir.path().join("wrong-shape.onnx_adapter");
    OnnxAdapter {
        parameters: vec![AdapterParameter {
            dims: vec![first.dims[0] + 1, first.dims[1]],
            raw_data: vec![0; (first.dims[0] as usize + 1) * first.dims[1] as usize * 4],
            ..first.clone()
        }],
        ..OnnxAdapter::default()
    }
    .write(&wrong_shape)
    .unwrap();
    let wrong_name = dir.path().join("wrong-name.onnx_adapter");
    OnnxAdapter {
        parameters: vec![AdapterParameter {
            name: "nowhere".into(),
            dims: vec![1],
            dtype: DataType::Float,
            raw_data: vec![0; 4],
        }],
        ..OnnxAdapter::default()
    }
    .write(&wrong_name)
    .unwrap();
    let truncated = dir.path().join("truncated.onnx_adapter");
    let bytes = std::fs::read(exported.join(ADAPTER_FILE)).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();

    let other_adapter = other.join(ADAPTER_FILE);
    let cases = [
        (
            &other_adapter,
            "is not an overridable initializer of the model",
        ),
        (&wrong_shape, &format!("tensor {:?} is float [", first.name)),
        (
            &wrong_name,
            "tensor \"nowhere\" is not an overridable initializer",
        ),
        (&truncated, "not a valid ONNX Runtime adapter file"),
    ];
    for (adapter, expected) in cases {
        for runtime in ["ort", "tract"] {
            let out = dir.path().join("out.npz");
            let (code, stdout, stderr) = run_graft(&[
                "run",
                model.to_str().unwrap(),
                "--inputs",
                inputs.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--runtime",
                runtime,
                "-o",
                out.to_str().unwrap(),
            ]);
            assert_eq!(code, 2, "{}: {stdout}{stderr}", adapter.display());
            assert!(
                stderr.contains(expected) && stderr.contains(adapter.to_str().unwrap()),
                "{runtime}: {stderr}"
            );
            assert!(!out.exists());
        }
    }
}

#[test]
fn export_of_an_unpatched_model_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    let (code, _, stderr) = run_graft(&[
        "export",
        fixture_model("bert-legacy").to_str().unwrap(),
        "--format",
        "onnx-adapter",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no trainable tensors"), "{stderr}");
    assert!(!out.exists());
}
