//! Training parity with PyTorch + HF PEFT: `graft train` reproduces, step for step, the 20 AdamW
//! steps the fixture generator recorded (models/references/train-*), and its output merges; LoRA
//! dropout acts in training graphs only.

mod common;

use common::*;
use graft::runtime::HostTensor;

/// Applies LoRA to a fixture, trains it from the recorded initial adapter with the recorded
/// recipe, and compares every step's loss and the final adapter with PyTorch's.
fn check_parity(fixture: &str, recording: &str, task: &str, targets: &str, batch_size: &str) {
    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("patched.onnx");
    let run = dir.path().join("run");
    apply_lora(
        fixture,
        &["r=4", "alpha=8", &format!("targets={targets}")],
        &patched,
    );
    let recorded = reference(recording);
    let (code, stdout, stderr) = run_graft(&[
        "train",
        patched.to_str().unwrap(),
        "--task",
        task,
        "--data",
        recorded.join("data.jsonl").to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--init-adapter",
        recorded.join("initial_adapter").to_str().unwrap(),
        "--no-shuffle",
        "--steps",
        "20",
        "--batch-size",
        batch_size,
        "--lr",
        "1e-3",
        "--weight-decay",
        "0.01",
        "--threads",
        "1",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");

    let expected: Vec<f64> =
        serde_json::from_str(&std::fs::read_to_string(recorded.join("losses.json")).unwrap())
            .unwrap();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), expected.len());
    for (step, (got, want)) in losses.iter().zip(&expected).enumerate() {
        // float32 forward/backward in two runtimes: agreement to ~1e-6 is typical, 1e-4 is the bar.
        let relative = (got - want).abs() / want.abs();
        assert!(
            relative <= 1e-4,
            "{fixture} step {}: loss {got} vs PyTorch {want}",
            step + 1
        );
    }

    let ours = read_tensors(&run.join("adapter_model.safetensors"));
    let torch = read_tensors(&recorded.join("final_adapter/adapter_model.safetensors"));
    assert_eq!(
        ours.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>(),
        torch.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>(),
        "{fixture}: adapter keys and shapes differ from PEFT's"
    );
    for ((name, _, got), (_, _, want)) in ours.iter().zip(&torch) {
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-4,
            "{fixture} {name}: final values differ by {worst}"
        );
    }

    // The trained adapter merges: graft merge with the run's adapter gives a model of the
    // base's topology whose outputs are those of the patched model holding the trained values.
    let merged = dir.path().join("merged.onnx");
    let (code, stdout, stderr) = run_graft(&[
        "merge",
        patched.to_str().unwrap(),
        "--adapter",
        run.join("adapter.safetensors").to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let merged = graft::onnx::load(&merged).unwrap();
    let base = graft::onnx::load(&fixture_model(fixture)).unwrap();
    assert_eq!(op_types(&merged), op_types(&base), "{fixture}");
    let mut trained = graft::onnx::load(&patched).unwrap();
    let inputs = fixture_inputs(fixture);
    let at_init = run_model(&trained, &inputs);
    for (name, dims, values) in read_tensors(&run.join("adapter.safetensors")) {
        let tensor = trained
            .graph
            .initializers
            .iter_mut()
            .find(|t| t.name == name);
        let tensor = tensor.unwrap_or_else(|| panic!("{fixture}: no tensor {name} to train"));
        let dims = dims.iter().map(|&d| d as i64).collect();
        *tensor = graft::ir::Tensor::from_f32(name, dims, &values);
    }
    let trained_outputs = run_model(&trained, &inputs);
    let change = max_diff(&at_init, &trained_outputs);
    assert!(
        change > 1e-6,
        "{fixture}: training changed the outputs by only {change}"
    );
    let diff = max_diff(&trained_outputs, &run_model(&merged, &inputs));
    assert!(
        diff <= 1e-5,
        "{fixture}: merged differs from trained by {diff}"
    );
}

#[test]
fn bert_sequence_classification_matches_pytorch_step_for_step() {
    check_parity("bert-legacy", "train-bert", "seq-cls", "q,v", "4");
}

#[test]
fn llama_causal_lm_matches_pytorch_step_for_step() {
    check_parity("llama-dynamo", "train-llama", "causal-lm", "q,v", "2");
}

/// Applies LoRA r=4 on q and v of bert-legacy with `dropout`, and fills the branch with the
/// shared deterministic non-zero values.
fn bert_lora_with_dropout(dir: &std::path::Path, dropout: &str) -> graft::ir::Model {
    let patched = dir.join(format!("patched-dropout-{dropout}.onnx"));
    apply_lora(
        "bert-legacy",
        &["r=4", "targets=q,v", &format!("dropout={dropout}")],
        &patched,
    );
    let mut model = graft::onnx::load(&patched).unwrap();
    randomize_trainable(&mut model);
    model
}

/// The gradient outputs of `model`'s training graph, in one session, on the same batch (the
/// fixture's inputs, every label 0) and the same trainable values, with the dropout masks
/// graft draws for (seed, step) at each of `steps`.
fn gradient_runs(model: &graft::ir::Model, steps: &[(u64, u64)]) -> Vec<Vec<(String, HostTensor)>> {
    let training = graft::train::training_graph(model, graft::train::Task::SeqCls).unwrap();
    let mut session = training_session(&training, false);
    let wanted = bert_training_feeds(model, &training, &session, &[]);
    steps
        .iter()
        .map(|&(seed, step)| {
            let mut run_feeds = wanted.clone();
            run_feeds.extend(training.dropout_feeds(&wanted, seed, step, 0).unwrap());
            let gradients: Vec<_> = session
                .run(&run_feeds)
                .unwrap()
                .into_iter()
                .filter(|(name, _)| training.gradients.iter().any(|(_, g)| g == name))
                .collect();
            assert_eq!(gradients.len(), training.gradients.len());
            gradients
        })
        .collect()
}

/// LoRA's `dropout` acts in training graphs only: the patched graph (inference) gives the
/// outputs of the same branch without dropout, while the training graph multiplies by masks
/// graft draws per (seed, step), so two steps on one batch give different gradients (and the
/// same step the same ones again, in a new session too) — and without dropout the same
/// gradients at every step.
#[test]
fn lora_dropout_acts_in_training_graphs_only() {
    let dir = tempfile::tempdir().unwrap();
    let with_dropout = bert_lora_with_dropout(dir.path(), "0.5");
    let without = bert_lora_with_dropout(dir.path(), "0");
    assert!(with_dropout.graph.nodes.iter().any(|n| n.is("Dropout")));
    assert!(!without.graph.nodes.iter().any(|n| n.is("Dropout")));

    let inputs = fixture_inputs("bert-legacy");
    let inference = run_model(&with_dropout, &inputs);
    let change = max_diff(
        &inference,
        &run_model(
            &graft::onnx::load(&fixture_model("bert-legacy")).unwrap(),
            &inputs,
        ),
    );
    assert!(
        change > 1e-4,
        "the randomized branches change the outputs by only {change}"
    );
    let diff = max_diff(&inference, &run_model(&without, &inputs));
    assert!(
        diff == 0.0,
        "inference with dropout 0.5 differs from dropout 0 by {diff}"
    );

    // Masks come from graft's generator: another step draws other masks, the same (seed,
    // step) the same ones again, in any session and after a resume.
    let runs = gradient_runs(&with_dropout, &[(0, 1), (0, 2), (0, 1), (1, 1)]);
    let diff = max_diff(&runs[0], &runs[1]);
    assert!(
        diff > 1e-6,
        "dropout 0.5: two steps' gradients differ by only {diff}"
    );
    let diff = max_diff(&runs[0], &runs[3]);
    assert!(
        diff > 1e-6,
        "dropout 0.5: two seeds' gradients differ by only {diff}"
    );
    let diff = max_diff(&runs[0], &runs[2]);
    assert!(
        diff == 0.0,
        "dropout 0.5, same seed and step: gradients differ by {diff}"
    );
    let again = gradient_runs(&with_dropout, &[(0, 1)]);
    let diff = max_diff(&runs[0], &again[0]);
    assert!(
        diff == 0.0,
        "dropout 0.5, same seed and step: a new session's gradients differ by {diff}"
    );
    let runs = gradient_runs(&without, &[(0, 1), (0, 2)]);
    let diff = max_diff(&runs[0], &runs[1]);
    assert!(
        diff == 0.0,
        "no dropout: two steps' gradients differ by {diff}"
    );
}
