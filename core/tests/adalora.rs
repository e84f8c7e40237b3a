//! AdaLoRA through `graft train`, against HF PEFT's own AdaLoRA training recorded by the
//! fixture generator (models/references/adalora-*): every step's loss and orthogonality term,
//! the ranks PEFT kept at every pruning step, the final tensors, PEFT's files in (full rank,
//! and truncated to a rank pattern) and out, and an exact merge. This is the end-to-end proof of the SDK's training participation: a loss
//! term, a step hook that sets tensors and keeps state, and a delta fold.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The recorded per-step values (`losses.json`'s `key`).
fn recorded_series(recording: &Path, key: &str) -> Vec<f64> {
    json(&recording.join("losses.json"))[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// Kept ranks as the hook's bit masks, from a recorded `kept` map.
fn masks(kept: &serde_json::Value) -> BTreeMap<String, u64> {
    kept.as_object()
        .unwrap()
        .iter()
        .map(|(label, ranks)| {
            let mask = ranks
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
                .filter(|(_, k)| k.as_bool().unwrap())
                .map(|(i, _)| 1u64 << i)
                .sum();
            (label.clone(), mask)
        })
        .collect()
}

fn check_parity(fixture: &str, recording: &str, task: &str, batch_size: &str) {
    let recorded = reference(recording);
    let recipe = json(&recorded.join("recipe.json"));
    let settings = &recipe["adalora_config"];
    let targets = match settings["target_modules"][0].as_str().unwrap() {
        "query" | "q_proj" => "q,v",
        other => panic!("unexpected target {other}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("patched.onnx");
    let run = dir.path().join("run");
    let setting = |key: &str, graft_key: &str| format!("{graft_key}={}", settings[key]);
    apply_method(
        fixture,
        "adalora",
        &[
            &format!("targets={targets}"),
            &setting("init_r", "init_r"),
            &setting("target_r", "target_r"),
            &setting("tinit", "tinit"),
            &setting("tfinal", "tfinal"),
            &setting("deltaT", "deltaT"),
            &setting("beta1", "beta1"),
            &setting("beta2", "beta2"),
            &setting("orth_reg_weight", "orth_reg_weight"),
            &setting("lora_alpha", "alpha"),
            &setting("total_step", "total_step"),
        ],
        &patched,
    );
    let steps = settings["total_step"].to_string();
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
        &steps,
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

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses = recorded_series(&recorded, "loss");
    let regularizer = recorded_series(&recorded, "orth_reg");
    assert_eq!(lines.len(), losses.len());
    for (step, line) in lines.iter().enumerate() {
        // float32 forward/backward in two runtimes agree to ~1e-6; 1e-4 is the bar.
        for (got, want, what) in [
            (line["loss"].as_f64().unwrap(), losses[step], "loss"),
            (
                line["loss_terms"]["adalora.orthogonality"]
                    .as_f64()
                    .unwrap(),
                regularizer[step],
                "orthogonality term",
            ),
        ] {
            let relative = (got - want).abs() / want.abs();
            assert!(
                relative <= 1e-4,
                "{fixture} step {}: {what} {got} vs PEFT {want}",
                step + 1
            );
        }
    }

    // The same ranks kept at every pruning step (and re-applied after the final one).
    let schedule = json(&recorded.join("schedule.json"));
    let mut pruning_steps = 0;
    for entry in schedule.as_array().unwrap() {
        let step = entry["step"].as_u64().unwrap() as usize;
        let metrics = &lines[step]["plugin"];
        assert_eq!(
            metrics["adalora.budget"].as_f64().unwrap() as u64,
            entry["budget"].as_u64().unwrap(),
            "{fixture} step {}: budget",
            step + 1
        );
        if entry["kept"].is_null() {
            continue;
        }
        pruning_steps += 1;
        for (label, mask) in masks(&entry["kept"]) {
            let got = metrics[format!("adalora.kept.{label}")].as_f64();
            assert_eq!(
                got.map(|m| m as u64),
                Some(mask),
                "{fixture} step {}: ranks kept in {label}",
                step + 1
            );
        }
    }
    assert!(
        pruning_steps >= 6,
        "{fixture}: only {pruning_steps} pruning steps recorded"
    );

    // Final tensors, written as PEFT files at full rank, equal PEFT's.
    let ours: BTreeMap<String, (Vec<usize>, Vec<f32>)> =
        read_tensors(&run.join("adapter_model.safetensors"))
            .into_iter()
            .map(|(k, s, v)| (k.trim_start_matches("base_model.model.").to_owned(), (s, v)))
            .collect();
    let peft: BTreeMap<String, (Vec<usize>, Vec<f32>)> =
        read_tensors(&recorded.join("final_full.safetensors"))
            .into_iter()
            .map(|(k, s, v)| (k, (s, v)))
            .collect();
    assert_eq!(
        ours.iter().map(|(k, (s, _))| (k, s)).collect::<Vec<_>>(),
        peft.iter().map(|(k, (s, _))| (k, s)).collect::<Vec<_>>(),
        "{fixture}: PEFT tensor keys and shapes"
    );
    for (key, (_, want)) in &peft {
        let got = &ours[key].1;
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst <= 1e-4,
            "{fixture} {key}: final values differ by {worst}"
        );
        // Pruned ranks are exactly zero in both.
        if key.ends_with("lora_E") {
            for (a, b) in got.iter().zip(want) {
                assert_eq!(*a == 0.0, *b == 0.0, "{fixture} {key}: pruned ranks differ");
            }
        }
    }
    let config = json(&run.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "ADALORA");
    assert_eq!(config["init_r"], settings["init_r"]);

    // The trained model equals PEFT's trained model, and merging is exact.
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
    assert_eq!(
        op_types(&merged),
        op_types(&base),
        "{fixture}: merged topology"
    );
    let inputs = fixture_inputs(fixture);
    let peft_outputs =
        graft::runtime::read_npz(&recorded.join("merged_outputs_final.npz")).unwrap();
    let merged_outputs = run_model(&merged, &inputs);
    let diff = max_diff(&merged_outputs, &peft_outputs);
    assert!(diff <= 1e-4, "{fixture}: merged vs PEFT merged {diff}");

    // PEFT's files in: the run's PEFT export loads back into a fresh patched model, which
    // then computes what the merged model computes.
    let mut reloaded = graft::onnx::load(&patched).unwrap();
    let n = graft::peft::load_values(&mut reloaded, &run).unwrap();
    assert_eq!(n, peft.len());
    let diff = max_diff(&run_model(&reloaded, &inputs), &merged_outputs);
    assert!(
        diff <= 1e-5,
        "{fixture}: reloaded PEFT files vs merged {diff}"
    );
}

#[test]
fn bert_adalora_matches_peft_step_for_step() {
    check_parity("bert-legacy", "adalora-bert", "seq-cls", "4");
}

#[test]
fn llama_adalora_matches_peft_step_for_step() {
    check_parity("llama-dynamo", "adalora-llama", "causal-lm", "2");
}
