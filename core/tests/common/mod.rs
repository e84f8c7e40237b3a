//! Shared helpers for the core's integration tests: fixture paths and running models in ONNX Runtime.
#![allow(dead_code)]

use std::path::PathBuf;

use graft::ir::Model;
use graft::runtime::{read_npz, HostTensor, OrtSession, SessionOptions};

/// The 20 committed fixtures: 10 model variants, each from both exporters.
pub const FIXTURES: &[&str] = &[
    "bert-legacy",
    "bert-dynamo",
    "roberta-legacy",
    "roberta-dynamo",
    "gpt2-legacy",
    "gpt2-dynamo",
    "gpt2-past-legacy",
    "gpt2-past-dynamo",
    "llama-legacy",
    "llama-dynamo",
    "llama-past-legacy",
    "llama-past-dynamo",
    "phi3-legacy",
    "phi3-dynamo",
    "t5-legacy",
    "t5-dynamo",
    "clip-legacy",
    "clip-dynamo",
    "vit-legacy",
    "vit-dynamo",
];

/// The folder of a fixture.
/// `models/references/<name>`: what the fixture generator recorded with PyTorch and PEFT.
pub fn reference(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/references")
        .join(name)
}

/// A path inside the repository.
pub fn repository(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

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

/// Runs a model held in memory through ONNX Runtime on the CPU: one thread and no graph
/// rewrites, so that two graphs computing the same arithmetic give bit-identical outputs.
pub fn run_model(model: &Model, inputs: &[(String, HostTensor)]) -> Vec<(String, HostTensor)> {
    try_run_model(model, inputs).expect("ORT run")
}

/// [`run_model`], returning ONNX Runtime's error instead of panicking.
pub fn try_run_model(
    model: &Model,
    inputs: &[(String, HostTensor)],
) -> graft::Result<Vec<(String, HostTensor)>> {
    run_bytes(&graft::onnx::to_bytes(model)?, inputs)
}

/// [`try_run_model`] for a serialized model; `inputs` the model does not take (as an input or
/// an overridable initializer) are left out.
pub fn run_bytes(
    bytes: &[u8],
    inputs: &[(String, HostTensor)],
) -> graft::Result<Vec<(String, HostTensor)>> {
    let options = SessionOptions {
        threads: 1,
        exact: true,
        ..Default::default()
    };
    let mut session = OrtSession::from_bytes(bytes, options)?;
    let wanted: Vec<_> = inputs
        .iter()
        .filter(|(name, _)| session.accepts(name))
        .cloned()
        .collect();
    session.run(&wanted)
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

/// Builds the workspace's plugin libraries (cargo test does not produce cdylibs) once per test
/// process and returns the folder holding them.
pub fn plugin_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .current_dir(&workspace)
                .args(["build", "--quiet"])
                .args(PLUGIN_PACKAGES.iter().flat_map(|p| ["-p", p]))
                .status()
                .expect("run cargo build for the plugins");
            assert!(status.success(), "building the plugins failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace.join("target"));
            target.join("debug")
        })
        .clone()
}

/// The plugin crates the tests load.
pub const PLUGIN_PACKAGES: &[&str] = &[
    "graft-plugin-lora",
    "graft-plugin-bitfit",
    "graft-plugin-ia3",
    "graft-plugin-adalora",
    "graft-plugin-adapter",
    "graft-plugin-prompt",
    "graft-plugin-lycoris",
    "graft-test-plugin-wrong-abi",
    "graft-test-plugin-panics",
    "graft-test-plugin-invalid-patch",
];

/// The path of a plugin library built by [`plugin_dir`], e.g. `plugin_library("graft_plugin_lora")`.
pub fn plugin_library(lib_name: &str) -> PathBuf {
    plugin_dir().join(format!("lib{lib_name}.so"))
}

/// The `graft` binary under test, with the plugins built beside it.
pub fn graft_command() -> std::process::Command {
    plugin_dir();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_graft"));
    command.env_remove("GRAFT_PLUGIN_PATH");
    command
}

/// Runs `graft` with `args` and returns (exit code, stdout, stderr).
pub fn run_graft(args: &[&str]) -> (i32, String, String) {
    let output = graft_command().args(args).output().expect("run graft");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `graft apply FIXTURE -m lora --set S… -o OUT` for each `settings` entry `S` (`key=value`),
/// asserting success.
pub fn apply_lora(fixture: &str, settings: &[&str], out: &std::path::Path) {
    apply_method(fixture, "lora", settings, out)
}

/// `graft apply FIXTURE -m METHOD --set S… -o OUT` for each `settings` entry `S`
/// (`key=value`), asserting success.
pub fn apply_method(fixture: &str, method: &str, settings: &[&str], out: &std::path::Path) {
    let model = fixture_model(fixture);
    let mut args = vec!["apply", model.to_str().unwrap(), "-m", method];
    for setting in settings {
        args.extend(["--set", setting]);
    }
    args.extend(["-o", out.to_str().unwrap()]);
    let (code, stdout, stderr) = run_graft(&args);
    assert_eq!(code, 0, "graft {}: {stdout}{stderr}", args.join(" "));
}

/// Fills every trainable tensor of a patched model with small deterministic non-zero values
/// (around 1 for tensors that start at one, such as IA3 scales), so that a branch changes
/// the outputs.
pub fn randomize_trainable(model: &mut Model) {
    let record = graft::patch::read_record(model).unwrap();
    let trainable: Vec<String> = record.trainable().map(str::to_owned).collect();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for tensor in model.graph.initializers.iter_mut() {
        if !trainable.contains(&tensor.name) {
            continue;
        }
        let old = tensor.to_f32().expect("float32 trainable tensor");
        let values: Vec<f32> = old
            .iter()
            .map(|&v| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
                if v == 1.0 {
                    1.0 + noise
                } else {
                    v + noise
                }
            })
            .collect();
        *tensor = graft::ir::Tensor::from_f32(&tensor.name, tensor.dims.clone(), &values);
    }
}

/// The graph's op types, sorted: equal for two graphs of the same topology.
pub fn op_types(model: &Model) -> Vec<String> {
    let mut ops: Vec<String> = model
        .graph
        .nodes
        .iter()
        .map(|n| n.op_type.clone())
        .collect();
    ops.sort();
    ops
}

/// Every tensor of an f32 safetensors file, sorted by key: (key, shape, values).
pub fn read_tensors(path: &std::path::Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, view.shape().to_vec(), values)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// The feeds of `training` (a training graph of `model`, a bert-legacy patch) for one batch:
/// the fixture's inputs, every label 0, and the trainable values of `model` unless `overrides`
/// gives others; only the inputs `session` takes.
pub fn bert_training_feeds(
    model: &Model,
    training: &graft::train::TrainingGraph,
    session: &graft::runtime::OrtSession,
    overrides: &[(String, Vec<f32>)],
) -> Vec<(String, HostTensor)> {
    let mut feeds = fixture_inputs("bert-legacy");
    let batch = feeds
        .iter()
        .find(|(n, _)| n == "input_ids")
        .unwrap()
        .1
        .shape()[0];
    feeds.push((
        "labels".into(),
        HostTensor::I64(ndarray::ArrayD::zeros(ndarray::IxDyn(&[batch]))),
    ));
    for (name, _) in &training.gradients {
        let tensor = model.graph.initializer(name).unwrap();
        let dims: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
        let values = overrides
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| tensor.to_f32().unwrap());
        let array = ndarray::ArrayD::from_shape_vec(dims, values).unwrap();
        feeds.push((name.clone(), HostTensor::F32(array)));
    }
    feeds
        .into_iter()
        .filter(|(name, _)| session.input_names.contains(name))
        .collect()
}

/// A one-thread ONNX Runtime session of `training`'s graph (`exact`: no graph rewrites).
pub fn training_session(
    training: &graft::train::TrainingGraph,
    exact: bool,
) -> graft::runtime::OrtSession {
    let bytes = graft::onnx::to_bytes(&training.model).unwrap();
    let options = graft::runtime::SessionOptions {
        threads: 1,
        exact,
        ..Default::default()
    };
    graft::runtime::OrtSession::from_bytes(&bytes, options).unwrap()
}

/// The loss and gradients of `model`'s training graph (`task`) for the fixture's inputs, the
/// methods' host inputs as a first training step feeds them, labels all 0 (seq-cls) or the
/// input ids (causal LM), and `overrides` replacing trainable values.
pub fn loss_and_gradients(
    model: &Model,
    fixture: &str,
    task: graft::train::Task,
    overrides: &[(String, Vec<f32>)],
) -> (f64, Vec<(String, Vec<f64>)>) {
    let training = graft::train::training_graph(model, task).unwrap();
    let mut session = training_session(&training, true);
    let mut feeds = fixture_inputs(fixture);
    let ids = feeds
        .iter()
        .find(|(n, _)| n == "input_ids")
        .unwrap()
        .1
        .clone();
    let labels = match task {
        graft::train::Task::SeqCls => {
            HostTensor::I64(ndarray::ArrayD::zeros(ndarray::IxDyn(&[ids.shape()[0]])))
        }
        _ => ids,
    };
    feeds.push(("labels".into(), labels));
    let record = graft::patch::read_record(model).unwrap();
    let participation =
        graft::train::participation::Participation::new(model, &record, &[], 0).unwrap();
    feeds.extend(participation.feeds(true, 1, 1, 0).unwrap());
    for (name, _) in &training.gradients {
        let tensor = model.graph.initializer(name).unwrap();
        let dims: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
        let values = overrides
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| tensor.to_f32().unwrap());
        feeds.push((
            name.clone(),
            HostTensor::F32(ndarray::ArrayD::from_shape_vec(dims, values).unwrap()),
        ));
    }
    feeds.retain(|(name, _)| session.input_names.contains(name));
    let outputs = session.run(&feeds).unwrap();
    let get = |name: &str| outputs.iter().find(|(n, _)| n == name).unwrap().1.to_f64();
    let gradients = training
        .gradients
        .iter()
        .map(|(tensor, gradient)| (tensor.clone(), get(gradient)))
        .collect();
    (get(&training.loss)[0], gradients)
}

/// `graft train PATCHED --task seq-cls` on `data` (a path in the repository) with the bert
/// fixture's tokenizer, batch 8, lr 0.01 and `steps` steps into `out`, plus `extra` flags;
/// returns the exit status, stdout and stderr.
pub fn train_seq_cls(
    patched: &std::path::Path,
    data: &str,
    steps: usize,
    out: &std::path::Path,
    extra: &[&str],
) -> (i32, String, String) {
    let data = repository(data);
    let tokenizer = repository("models/tokenizers/bert/tokenizer.json");
    let steps = steps.to_string();
    let mut args = vec![
        "train",
        patched.to_str().unwrap(),
        "--task",
        "seq-cls",
        "--data",
        data.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--steps",
        &steps,
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_graft(&args)
}

/// The lines of the run folder's `metrics.jsonl`.
pub fn metrics(run: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Asserts that the mean loss of a run's last five steps is below that of its first five.
pub fn assert_loss_falls(lines: &[serde_json::Value]) {
    let losses: Vec<f64> = lines.iter().filter_map(|v| v["loss"].as_f64()).collect();
    assert!(losses.len() >= 10, "{} steps logged", losses.len());
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[losses.len() - 5..]));
    assert!(last < first, "loss did not fall: {first} → {last}");
}

/// With `GRAFT_ADAPTERHUB_EXPORTS` set to a folder, keeps graft's AdapterHub export folder
/// `exported` in `<folder>/<name>/`, with graft's `logits` beside it as `graft_outputs.npz`, for
/// `models/record_adapterhub.py --check-graft <folder>` to load into the `adapters` library and
/// compare. Does nothing when the variable is not set.
pub fn keep_for_the_adapters_check(name: &str, exported: &std::path::Path, logits: &HostTensor) {
    fn copy_folder(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                copy_folder(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }
    let Some(root) = std::env::var_os("GRAFT_ADAPTERHUB_EXPORTS") else {
        return;
    };
    let target = std::path::Path::new(&root).join(name);
    if target.exists() {
        std::fs::remove_dir_all(&target).unwrap();
    }
    copy_folder(exported, &target);
    graft::runtime::write_npz(
        &target.join("graft_outputs.npz"),
        &[("logits".to_owned(), logits.clone())],
    )
    .unwrap();
}

/// A path as the `&str` a command line takes (the tests' paths are UTF-8).
pub fn text(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

/// The `logits` output among `outputs`.
pub fn logits(outputs: &[(String, HostTensor)]) -> &HostTensor {
    &outputs.iter().find(|(n, _)| n == "logits").unwrap().1
}

/// The JSON file at `path`.
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `model` run in tract (the second runtime) on those of `inputs` it takes.
pub fn run_tract(
    model: &Model,
    inputs: &[(String, HostTensor)],
) -> graft::Result<Vec<(String, HostTensor)>> {
    let mut session = graft::runtime::TractSession::from_bytes(&graft::onnx::to_bytes(model)?)?;
    let fed: Vec<_> = inputs
        .iter()
        .filter(|(name, _)| session.input_names.contains(name))
        .cloned()
        .collect();
    session.run(&fed)
}
