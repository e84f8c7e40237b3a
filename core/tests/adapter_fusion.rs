//! AdapterFusion (the `adapter_fusion` method): AdapterHub's fusions (dynamic and static,
//! recorded with the `adapters` library by models/record_adapterhub.py) import and compute what
//! the library computed, on both exporters, and export back to the same files; the fusion's
//! gradients agree with central differences; and the two stages train through `graft train`:
//! one adapter per task, then the fusion over the frozen adapters.

mod common;

use common::*;
use graft::plugins::{apply_method as apply_in_process, PluginRegistry};
use serde_json::json;

/// The `adapters` library computes in float32 in another operation order.
const PARITY_TOLERANCE: f64 = 1e-5;

/// A fusion folder imports with the adapters beside it, reproduces the `adapters` library's
/// logits, and exports to folders holding the same tensors and settings.
#[test]
fn adapterhub_fusions_reproduce_the_adapters_library_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    for variant in ["dynamic", "static"] {
        let recording = reference(&format!("adapterhub-fusion-bert-{variant}"));
        let want = graft::runtime::read_npz(&recording.join("outputs.npz")).unwrap();
        for exporter in ["legacy", "dynamo"] {
            let fixture = format!("bert-{exporter}");
            let patched = dir.path().join(format!("{fixture}-{variant}.onnx"));
            let (code, stdout, stderr) = run_graft(&[
                "apply",
                fixture_model(&fixture).to_str().unwrap(),
                "--from-adapterhub",
                recording.join("fusion").to_str().unwrap(),
                "-o",
                patched.to_str().unwrap(),
            ]);
            assert_eq!(code, 0, "{fixture} {variant}: {stdout}{stderr}");
            let model = graft::onnx::load(&patched).unwrap();
            let got = run_model(&model, &fixture_inputs(&fixture));
            let diff = logits(&got).max_abs_diff(logits(&want));
            assert!(
                diff <= PARITY_TOLERANCE,
                "{fixture} {variant}: graft vs adapters {diff}"
            );
            let record = graft::patch::read_record(&model).unwrap();
            let fusion = &record.methods[0];
            assert!(
                fusion
                    .trainable
                    .iter()
                    .all(|t| t.starts_with("adapter_fusion.")),
                "{fixture} {variant}: the fused adapters train: {:?}",
                fusion.trainable
            );

            let exported = dir.path().join(format!("{fixture}-{variant}-export"));
            let (code, stdout, stderr) = run_graft(&[
                "export",
                patched.to_str().unwrap(),
                "--format",
                "adapterhub",
                "-o",
                exported.to_str().unwrap(),
            ]);
            assert_eq!(code, 0, "{fixture} {variant} export: {stdout}{stderr}");
            if exporter == "legacy" {
                keep_for_the_adapters_check(
                    &format!("bert-fusion-{variant}"),
                    &exported,
                    logits(&got),
                );
            }
            for (folder, weights, config) in [
                ("fusion_a", "adapter.safetensors", "adapter_config.json"),
                ("fusion_b", "adapter.safetensors", "adapter_config.json"),
                (
                    "fusion_a,fusion_b",
                    "model_adapter_fusion.safetensors",
                    "adapter_fusion_config.json",
                ),
            ] {
                let original = if folder.contains(',') {
                    "fusion"
                } else {
                    folder
                };
                let theirs = read_tensors(&recording.join(original).join(weights));
                let ours = read_tensors(&exported.join(folder).join(weights));
                assert_eq!(theirs, ours, "{fixture} {variant} {folder}: tensors differ");
                let (theirs, ours) = (
                    read_json(&recording.join(original).join(config)),
                    read_json(&exported.join(folder).join(config)),
                );
                for key in ["name", "hidden_size", "model_type", "adapter_names"] {
                    assert_eq!(
                        theirs[key], ours[key],
                        "{fixture} {variant} {folder}: {key}"
                    );
                }
                for (key, value) in ours["config"].as_object().unwrap() {
                    let same = match (value.as_f64(), theirs["config"][key].as_f64()) {
                        (Some(a), Some(b)) => a == b,
                        _ => value == &theirs["config"][key],
                    };
                    assert!(
                        same,
                        "{fixture} {variant} {folder}: config.{key} {value} vs {}",
                        theirs["config"][key]
                    );
                }
            }
        }
    }
}

/// The fusion's query, key and value gradients agree with central differences (the adapters
/// are frozen, so they have none), and the dynamic fusion's regularizer is `Σ ‖I − Wv‖²`.
#[test]
fn fusion_gradients_match_central_differences() {
    let registry = PluginRegistry::discover(&[plugin_library("graft_plugin_adapter")]).unwrap();
    let mut model = graft::onnx::load(&fixture_model("bert-legacy")).unwrap();
    let settings = json!({
        "adapters": "a,b", "fusion": "dynamic", "reduction_factor": 4, "dropout_prob": 0.0
    });
    apply_in_process(&registry, &mut model, "adapter_fusion", &settings).unwrap();
    // Non-zero adapters and a fusion away from its start, so every path carries gradient.
    let record = graft::patch::read_record(&model).unwrap();
    let parameters: Vec<String> = record.parameters().map(str::to_owned).collect();
    for (i, tensor) in model
        .graph
        .initializers
        .iter_mut()
        .filter(|t| parameters.contains(&t.name))
        .enumerate()
    {
        let values: Vec<f32> = (0..tensor.n_elements())
            .map(|j| (((i * 31 + j * 17) % 23) as f32 - 11.0) * 0.03)
            .collect();
        *tensor = graft::ir::Tensor::from_f32(&tensor.name, tensor.dims.clone(), &values);
    }
    assert!(
        record.trainable().all(|t| t.starts_with("adapter_fusion.")),
        "only the fusion trains"
    );
    let task = graft::train::Task::SeqCls;
    let (_, gradients) = loss_and_gradients(&model, "bert-legacy", task, &[]);
    let checked: Vec<_> = gradients
        .iter()
        .filter(|(n, _)| n.contains(".encoder.1."))
        .collect();
    assert_eq!(
        checked.len(),
        5,
        "query, key, their biases and value: {gradients:?}"
    );
    for (name, analytic) in checked {
        let values = model.graph.initializer(name).unwrap().to_f32().unwrap();
        let h = 1e-3f32;
        for index in [0, values.len() / 2, values.len() - 1] {
            let shifted = |delta: f32| {
                let mut v = values.clone();
                v[index] += delta;
                loss_and_gradients(&model, "bert-legacy", task, &[(name.clone(), v)]).0
            };
            let numeric = (shifted(h) - shifted(-h)) / (2.0 * h as f64);
            let got = analytic[index];
            assert!(
                (got - numeric).abs() <= 2e-3 + 1e-2 * numeric.abs(),
                "{name}[{index}]: gradient {got} vs central difference {numeric}"
            );
        }
    }
    // The regularizer, from the loss with and without its weight.
    let term = &record.methods[0].training.loss_terms[0];
    assert_eq!((term.name.as_str(), term.weight), ("regularization", 0.01));
    let expected: f64 = record
        .trainable()
        .filter(|t| t.ends_with(".value"))
        .map(|t| {
            let tensor = model.graph.initializer(t).unwrap();
            let n = tensor.dims[0] as usize;
            let values = tensor.to_f32().unwrap();
            (0..n * n)
                .map(|k| {
                    let eye = if k / n == k % n { 1.0 } else { 0.0 };
                    (eye - values[k] as f64).powi(2)
                })
                .sum::<f64>()
        })
        .sum();
    let training = graft::train::training_graph(&model, task).unwrap();
    let mut session = training_session(&training, true);
    let mut feeds = bert_training_feeds(&model, &training, &session, &[]);
    let participation =
        graft::train::participation::Participation::new(&model, &record, &[], 0).unwrap();
    feeds.extend(participation.feeds(true, 1, 1, 0).unwrap());
    feeds.retain(|(n, _)| session.input_names.contains(n));
    let outputs = session.run(&feeds).unwrap();
    let logged = outputs.last().unwrap().1.to_f64()[0];
    assert!(
        (logged - expected).abs() <= 1e-4 * expected,
        "regularizer {logged} vs Σ‖I − Wv‖² {expected}"
    );
}

/// AdapterFusion's two stages through the command line: an adapter trained per task, then a
/// fusion over both, loaded with `--values`, trains with the adapters byte-for-byte frozen;
/// the loss falls and the regularizer is logged at every step.
#[test]
fn fusion_trains_in_two_stages() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture_model("bert-legacy");
    let train = |patched: &std::path::Path, data: &str, out: &std::path::Path, steps| {
        let (code, stdout, stderr) = train_seq_cls(patched, data, steps, out, &[]);
        assert_eq!(code, 0, "train {}: {stdout}{stderr}", patched.display());
    };
    // Stage 1: one adapter per task.
    let mut stage_one = Vec::new();
    for (name, data) in [
        ("sentiment", "examples/data/sentiment.jsonl"),
        ("held_out", "examples/data/sentiment_eval.jsonl"),
    ] {
        let patched = dir.path().join(format!("{name}.onnx"));
        apply_method(
            "bert-legacy",
            "adapter",
            &[&format!("name={name}"), "reduction_factor=4"],
            &patched,
        );
        let run = dir.path().join(format!("run-{name}"));
        train(&patched, data, &run, 10);
        stage_one.push(run.join("adapter.safetensors"));
    }
    // Stage 2: the fusion, over the trained adapters.
    let fused = dir.path().join("fused.onnx");
    let (code, stdout, stderr) = run_graft(&[
        "apply",
        fixture.to_str().unwrap(),
        "-m",
        "adapter_fusion",
        "--set",
        "adapters=sentiment,held_out",
        "--set",
        "reduction_factor=4",
        "--values",
        stage_one[0].to_str().unwrap(),
        "--values",
        stage_one[1].to_str().unwrap(),
        "-o",
        fused.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "apply fusion: {stdout}{stderr}");
    let before = graft::onnx::load(&fused).unwrap();
    for file in &stage_one {
        for (name, _, values) in read_tensors(file) {
            let loaded = before.graph.initializer(&name).unwrap().to_f32().unwrap();
            assert_eq!(loaded, values, "{name} was not loaded");
        }
    }
    let run = dir.path().join("run-fused");
    train(&fused, "examples/data/sentiment.jsonl", &run, 30);
    let lines = metrics(&run);
    assert_loss_falls(&lines);
    assert!(
        lines
            .iter()
            .filter(|v| v.get("loss").is_some())
            .all(|v| v["loss_terms"]["adapter_fusion.regularization"]
                .as_f64()
                .is_some()),
        "the regularizer is not logged"
    );
    let trained = read_tensors(&run.join("adapter.safetensors"));
    assert!(
        trained
            .iter()
            .all(|(n, ..)| n.starts_with("adapter_fusion.")),
        "the run saved more than the fusion"
    );
    let start = read_tensors(&{
        let p = dir.path().join("start.safetensors");
        graft::adapter::save(&before, &p).unwrap();
        p
    });
    assert_ne!(start, trained, "the fusion did not change");

    // HF PEFT has no equivalent: the export says so and points to the formats that exist.
    let (code, stdout, stderr) = run_graft(&[
        "export",
        fused.to_str().unwrap(),
        "--format",
        "peft",
        "-o",
        dir.path().join("peft").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("no bottleneck-adapter or AdapterFusion type")
            && stderr.contains("adapterhub"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("peft").exists(),
        "a refused export left a folder"
    );
}

/// Settings a fusion cannot have are refused by name.
#[test]
fn fusion_settings_are_checked() {
    let registry = PluginRegistry::discover(&[plugin_library("graft_plugin_adapter")]).unwrap();
    for (settings, needle) in [
        (json!({"adapters": "a"}), "at least two"),
        (json!({"adapters": "a,a"}), "named twice"),
        (
            json!({"adapters": "a,b", "fusion": "soft"}),
            "dynamic, static",
        ),
        (
            json!({"adapters": "a,b", "temperature": true}),
            "temperature",
        ),
        (json!({"adapters": "a,b", "config": "par_bn"}), "parallel"),
        (
            json!({"adapters": "a,b", "query": false, "key": false, "value": false}),
            "dense",
        ),
    ] {
        let mut model = graft::onnx::load(&fixture_model("bert-legacy")).unwrap();
        let error = apply_in_process(&registry, &mut model, "adapter_fusion", &settings)
            .unwrap_err()
            .to_string();
        assert!(error.contains(needle), "{settings}: {error}");
    }
}
