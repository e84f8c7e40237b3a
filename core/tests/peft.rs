//! HF PEFT interchange: `graft apply --from-peft` reproduces the outputs of the adapters HF PEFT
//! saved (models/references/peft-*), before and after `graft merge`, on both exporters'
//! fixtures; `graft export --format peft` writes the same LoRA tensors back; bad adapter folders
//! are refused with a message and no output.
//!
//! Tolerance: 1e-5 absolute on outputs of magnitude ≤ 3.7. PEFT's own merged and unmerged
//! outputs differ by up to 5.7e-6 (references README), which bounds what float32 summation order
//! alone does to these models; the fixtures themselves match PyTorch to ≤ 3e-6 in ORT.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use graft::runtime::{read_npz, HostTensor};

const TOLERANCE: f64 = 1e-5;

fn outputs_of(path: &Path, fixture: &str) -> Vec<(String, HostTensor)> {
    run_model(&graft::onnx::load(path).unwrap(), &fixture_inputs(fixture))
}

/// `graft apply FIXTURE --from-peft ADAPTER -o OUT`, asserting success; returns stderr.
fn import(fixture: &str, adapter: &Path, out: &Path) -> String {
    let (code, stdout, stderr) = run_graft(&[
        "apply",
        fixture_model(fixture).to_str().unwrap(),
        "--from-peft",
        adapter.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    stderr
}

fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

fn is_lora_key(key: &str) -> bool {
    key.ends_with(".lora_A.weight") || key.ends_with(".lora_B.weight")
}

/// A copy of a recorded adapter folder in `dir`.
fn copy_adapter(recording: &str, dir: &Path) -> PathBuf {
    let copy = dir.join(recording);
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(reference(recording).join(file), copy.join(file)).unwrap();
    }
    copy
}

fn edit_config(adapter: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = adapter.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

/// Imports the recorded adapter onto the fixture and compares with PEFT's outputs, unmerged and
/// merged.
fn check_import(fixture: &str, recording: &str) {
    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("patched.onnx");
    let merged = dir.path().join("merged.onnx");
    import(fixture, &reference(recording), &patched);
    let unmerged_outputs = outputs_of(&patched, fixture);
    let peft_outputs = read_npz(&reference(recording).join("outputs.npz")).unwrap();
    let unmerged_diff = max_diff(&peft_outputs, &unmerged_outputs);

    let (code, stdout, stderr) = run_graft(&[
        "merge",
        patched.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let merged_outputs = outputs_of(&merged, fixture);
    let peft_merged = read_npz(&reference(recording).join("merged_outputs.npz")).unwrap();
    let merged_diff = max_diff(&peft_merged, &merged_outputs);
    let merge_drift = max_diff(&unmerged_outputs, &merged_outputs);
    let base_diff = max_diff(&peft_outputs, &fixture_outputs(fixture));

    println!(
        "{fixture} + {recording}: imported vs PEFT {unmerged_diff:.3e}, merged vs PEFT merged {merged_diff:.3e}, merged vs imported {merge_drift:.3e} (base model vs PEFT {base_diff:.3e})"
    );
    assert!(base_diff > 1e-2, "the adapter should change the outputs");
    assert!(
        unmerged_diff <= TOLERANCE,
        "imported vs PEFT: {unmerged_diff}"
    );
    assert!(
        merged_diff <= TOLERANCE,
        "merged vs PEFT merged: {merged_diff}"
    );
    assert!(
        merge_drift <= TOLERANCE,
        "merged vs imported: {merge_drift}"
    );
}

#[test]
fn bert_legacy_import_matches_peft() {
    check_import("bert-legacy", "peft-bert");
}

#[test]
fn bert_dynamo_import_matches_peft() {
    check_import("bert-dynamo", "peft-bert");
}

#[test]
fn llama_legacy_import_matches_peft() {
    check_import("llama-legacy", "peft-llama");
}

#[test]
fn llama_dynamo_import_matches_peft() {
    check_import("llama-dynamo", "peft-llama");
}

#[test]
fn gpt2_legacy_import_matches_peft() {
    check_import("gpt2-legacy", "peft-gpt2");
}

#[test]
fn gpt2_dynamo_import_matches_peft() {
    check_import("gpt2-dynamo", "peft-gpt2");
}

/// The branches carry PEFT's per-module rank and scale: rsLoRA, `rank_pattern` and
/// `alpha_pattern` (llama), `layers_to_transform` (gpt2), and `modules_to_save` replacing the
/// classifier (bert).
#[test]
fn import_reports_peft_ranks_scales_and_replacements() {
    let registry =
        graft::plugins::PluginRegistry::discover(&[plugin_library("graft_plugin_lora")]).unwrap();

    let mut llama = graft::onnx::load(&fixture_model("llama-legacy")).unwrap();
    let report = graft::peft::import(&registry, &mut llama, &reference("peft-llama")).unwrap();
    let mut seen: Vec<(String, usize, f64, f64)> = report
        .branches
        .iter()
        .map(|b| (b.module.clone(), b.r, b.alpha, b.scale))
        .collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    // What PEFT itself built for this adapter, as the reference generator recorded it.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference("manifest.json")).unwrap())
            .unwrap();
    let layers = manifest["recordings"]["peft-llama"]["lora_layers"]
        .as_object()
        .unwrap();
    let mut expected: Vec<(String, usize, f64, f64)> = layers
        .iter()
        .map(|(module, layer)| {
            let number = |key: &str| layer[key].as_f64().unwrap();
            let (r, alpha, scale) = (number("r"), number("lora_alpha"), number("scaling"));
            (module.clone(), r as usize, alpha, scale)
        })
        .collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen.len(), expected.len(), "{seen:?}");
    for ((module, r, alpha, scale), (want_module, want_r, want_alpha, want_scale)) in
        seen.iter().zip(&expected)
    {
        assert_eq!((module, r, alpha), (want_module, want_r, want_alpha));
        assert!(
            (scale - want_scale).abs() < 1e-12,
            "{module}: scale {scale}, PEFT's {want_scale}"
        );
    }
    assert!(report.branches.iter().all(|b| b.loaded));
    assert!(report.replaced.is_empty() && report.ignored_fields.is_empty());

    let mut gpt2 = graft::onnx::load(&fixture_model("gpt2-legacy")).unwrap();
    let report = graft::peft::import(&registry, &mut gpt2, &reference("peft-gpt2")).unwrap();
    let modules: Vec<&str> = report.branches.iter().map(|b| b.module.as_str()).collect();
    assert_eq!(modules, ["transformer.h.1.attn.c_attn"]);

    let mut bert = graft::onnx::load(&fixture_model("bert-legacy")).unwrap();
    let report = graft::peft::import(&registry, &mut bert, &reference("peft-bert")).unwrap();
    assert_eq!(report.branches.len(), 4);
    let mut replaced: Vec<(&str, &str)> = report
        .replaced
        .iter()
        .map(|r| (r.key.as_str(), r.initializer.as_str()))
        .collect();
    replaced.sort_unstable();
    assert_eq!(replaced.len(), 2, "{replaced:?}");
    assert_eq!(replaced[0].0, "base_model.model.classifier.bias");
    assert_eq!(replaced[1].0, "base_model.model.classifier.weight");
    let saved = read_tensors(&reference("peft-bert").join("adapter_model.safetensors"));
    let head_bias = &saved
        .iter()
        .find(|t| t.0 == "base_model.model.classifier.bias")
        .unwrap()
        .2;
    let stored = bert
        .graph
        .initializer(replaced[0].1)
        .unwrap()
        .to_f32()
        .unwrap();
    assert_eq!(&stored, head_bias);
}

/// Imports `adapter` onto `fixture` (`dir/patched.onnx`) and exports it again with
/// `graft export --format peft` (`dir/exported`); returns both paths.
fn import_and_export(fixture: &str, adapter: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let patched = dir.join("patched.onnx");
    import(fixture, adapter, &patched);
    let exported = dir.join("exported");
    let (code, stdout, stderr) = run_graft(&[
        "export",
        patched.to_str().unwrap(),
        "--format",
        "peft",
        "-o",
        exported.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    (patched, exported)
}

/// `graft export --format peft` of an imported model writes the original LoRA tensors (keys,
/// shapes, values), a config PEFT reads the same way, and re-importing gives the same outputs.
fn check_round_trip(fixture: &str, recording: &str) {
    let dir = tempfile::tempdir().unwrap();
    let original = reference(recording);
    let (_patched, exported) = import_and_export(fixture, &original, dir.path());
    let written = read_tensors(&exported.join("adapter_model.safetensors"));
    let lora_only: Vec<_> = read_tensors(&original.join("adapter_model.safetensors"))
        .into_iter()
        .filter(|(key, _, _)| is_lora_key(key))
        .collect();
    assert_eq!(
        written.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>(),
        lora_only.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>()
    );
    for (a, b) in written.iter().zip(&lora_only) {
        assert_eq!(a.2, b.2, "values of {}", a.0);
    }

    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(exported.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let mut modules: Vec<String> = lora_only
        .iter()
        .filter_map(|(key, _, _)| {
            key.strip_prefix("base_model.model.")?
                .strip_suffix(".lora_A.weight")
                .map(str::to_owned)
        })
        .collect();
    modules.sort();
    assert_eq!(config["target_modules"], serde_json::json!(modules));
    assert_eq!(config["peft_type"], "LORA");

    let lora_only_adapter = copy_adapter(recording, dir.path());
    write_tensors(
        &lora_only_adapter.join("adapter_model.safetensors"),
        &lora_only,
    );
    let from_original = dir.path().join("from-original.onnx");
    let from_export = dir.path().join("from-export.onnx");
    import(fixture, &lora_only_adapter, &from_original);
    import(fixture, &exported, &from_export);
    let diff = max_diff(
        &outputs_of(&from_original, fixture),
        &outputs_of(&from_export, fixture),
    );
    println!("{fixture} + {recording}: re-imported export vs import {diff:.3e}");
    assert!(diff <= 1e-6, "re-imported export differs by {diff}");
}

#[test]
fn bert_round_trip_through_export() {
    check_round_trip("bert-legacy", "peft-bert");
}

#[test]
fn llama_round_trip_through_export() {
    check_round_trip("llama-dynamo", "peft-llama");
}

#[test]
fn gpt2_round_trip_through_export() {
    check_round_trip("gpt2-legacy", "peft-gpt2");
}

/// Runs an import expected to fail: exit status 2, every needle in stderr, no output file.
fn assert_import_rejected(adapter: &Path, needles: &[&str]) {
    let out = adapter.with_file_name("rejected.onnx");
    let (code, stdout, stderr) = run_graft(&[
        "apply",
        fixture_model("bert-legacy").to_str().unwrap(),
        "--from-peft",
        adapter.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
    assert!(!out.exists(), "a rejected import wrote {}", out.display());
}

#[test]
fn module_matching_no_site_is_refused_with_site_labels() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = copy_adapter("peft-bert", dir.path());
    let file = adapter.join("adapter_model.safetensors");
    let renamed: Vec<_> = read_tensors(&file)
        .into_iter()
        .map(|(key, shape, values)| {
            (
                key.replace(
                    "layer.1.attention.self.query",
                    "layer.1.attention.self.querry",
                ),
                shape,
                values,
            )
        })
        .collect();
    write_tensors(&file, &renamed);
    assert_import_rejected(
        &adapter,
        &[
            "bert.encoder.layer.1.attention.self.querry",
            "matches no linear site",
            "bert.encoder.layer.0.attention.self.query",
        ],
    );
}

#[test]
fn target_modules_matching_nothing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = copy_adapter("peft-gpt2", dir.path());
    edit_config(&adapter, |config| {
        config.insert("layers_to_transform".into(), serde_json::json!([0]));
    });
    let out = dir.path().join("rejected.onnx");
    let (code, _, stderr) = run_graft(&[
        "apply",
        fixture_model("gpt2-legacy").to_str().unwrap(),
        "--from-peft",
        adapter.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("transformer.h.1.attn.c_attn") && stderr.contains("do not select it"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn other_peft_types_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = copy_adapter("peft-bert", dir.path());
    edit_config(&adapter, |config| {
        config.insert("peft_type".into(), "VERA".into());
    });
    assert_import_rejected(
        &adapter,
        &["adapter_config.json", "\"VERA\"", "LORA", "LOHA"],
    );
}

#[test]
fn unsupported_lora_variants_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = copy_adapter("peft-bert", dir.path());
    edit_config(&adapter, |config| {
        config.insert("lora_bias".into(), true.into());
    });
    assert_import_rejected(&adapter, &["lora_bias", "a bias on lora_B"]);
    // A DoRA config without the magnitudes DoRA files carry.
    let adapter = copy_adapter("peft-bert", &dir.path().join("dora"));
    edit_config(&adapter, |config| {
        config.insert("use_dora".into(), true.into());
    });
    assert_import_rejected(&adapter, &["lora_magnitude_vector", "use_dora"]);
}

#[test]
fn unknown_config_fields_are_ignored_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = copy_adapter("peft-bert", dir.path());
    edit_config(&adapter, |config| {
        config.insert("future_knob".into(), serde_json::json!({"depth": 3}));
        config.insert("another_new_field".into(), serde_json::Value::Null);
    });
    let patched = dir.path().join("patched.onnx");
    let stderr = import("bert-legacy", &adapter, &patched);
    assert!(
        stderr.contains("warning")
            && stderr.contains("future_knob")
            && stderr.contains("another_new_field"),
        "{stderr}"
    );
    let peft_outputs = read_npz(&reference("peft-bert").join("outputs.npz")).unwrap();
    let diff = max_diff(&peft_outputs, &outputs_of(&patched, "bert-legacy"));
    assert!(diff <= TOLERANCE, "{diff}");
}

#[test]
fn missing_adapter_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = copy_adapter("peft-bert", dir.path());
    std::fs::remove_file(adapter.join("adapter_model.safetensors")).unwrap();
    assert_import_rejected(&adapter, &["missing", "adapter_model.safetensors"]);
    std::fs::remove_file(adapter.join("adapter_config.json")).unwrap();
    assert_import_rejected(
        &adapter,
        &["adapter_config.json", "adapter_model.safetensors"],
    );
}

/// A failed import leaves the model as it was.
#[test]
fn failed_import_leaves_the_model_unchanged() {
    let registry =
        graft::plugins::PluginRegistry::discover(&[plugin_library("graft_plugin_lora")]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let adapter = copy_adapter("peft-bert", dir.path());
    let file = adapter.join("adapter_model.safetensors");
    let broken: Vec<_> = read_tensors(&file)
        .into_iter()
        .map(|(key, shape, values)| {
            if key == "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight" {
                (key, vec![shape[0] / 2, shape[1] * 2], values)
            } else {
                (key, shape, values)
            }
        })
        .collect();
    write_tensors(&file, &broken);
    let mut model = graft::onnx::load(&fixture_model("bert-legacy")).unwrap();
    let before = graft::onnx::to_bytes(&model).unwrap();
    let error = graft::peft::import(&registry, &mut model, &adapter).unwrap_err();
    assert!(error.to_string().contains("value.lora_B.weight"), "{error}");
    assert_eq!(graft::onnx::to_bytes(&model).unwrap(), before);
}

/// HF PEFT itself loaded graft's export (models/check_graft_export.py recorded its outputs):
/// graft's export of an imported adapter is still the same file, and graft's patched graph
/// computes what PEFT computes with that file.
fn check_export_loads_in_peft(fixture: &str, arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (patched, exported) =
        import_and_export(fixture, &reference(&format!("peft-{arch}")), dir.path());
    let recorded = reference(&format!("graft-export-{arch}"));
    assert_eq!(
        read_tensors(&exported.join("adapter_model.safetensors")),
        read_tensors(&recorded.join("adapter_model.safetensors")),
        "{fixture}: the export changed since PEFT loaded it"
    );
    let config = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    assert_eq!(
        config(&exported),
        config(&recorded),
        "{fixture}: adapter_config.json changed"
    );
    let peft_outputs = graft::runtime::read_npz(&recorded.join("outputs.npz")).unwrap();
    // float32 PyTorch versus ONNX Runtime over the whole model, as for the fixtures themselves.
    let diff = max_diff(&peft_outputs, &outputs_of(&patched, fixture));
    assert!(
        diff <= 1e-5,
        "{fixture}: graft differs from PEFT on graft's export by {diff}"
    );
}

#[test]
fn llama_export_loads_in_peft_with_the_same_outputs() {
    check_export_loads_in_peft("llama-legacy", "llama");
}

#[test]
fn gpt2_export_loads_in_peft_with_the_same_outputs() {
    check_export_loads_in_peft("gpt2-legacy", "gpt2");
}
