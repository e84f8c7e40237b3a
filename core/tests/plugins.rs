//! The plugin system end to end: discovery, the LoRA/IA3/BitFit plugins on every fixture
//! (no-op at init, exact merge), stacking, bad configurations, and deliberately broken plugins.

mod common;

use common::*;
use graft::onnx;
use graft::plugins::{apply_method, PluginRegistry};
use serde_json::json;

fn registry() -> PluginRegistry {
    let plugins: Vec<_> = [
        "graft_plugin_lora",
        "graft_plugin_bitfit",
        "graft_plugin_ia3",
    ]
    .iter()
    .map(|name| plugin_library(name))
    .collect();
    PluginRegistry::discover(&plugins).unwrap()
}

/// Whether the architecture fuses q, k and v into one projection (GPT-2's `c_attn`, Phi-3's
/// `qkv_proj`).
fn fused_qkv(fixture: &str) -> bool {
    fixture.starts_with("gpt2") || fixture.starts_with("phi3")
}

/// LoRA targets each architecture has.
fn lora_targets(fixture: &str) -> &'static str {
    if fused_qkv(fixture) {
        "qkv,ffn_down"
    } else {
        "q,v,ffn_down"
    }
}

#[test]
fn every_method_is_a_no_op_at_init_and_merges_exactly_on_every_fixture() {
    let registry = registry();
    for fixture in FIXTURES {
        let base = onnx::load(&fixture_model(fixture)).unwrap();
        let inputs = fixture_inputs(fixture);
        let base_outputs = run_model(&base, &inputs);
        let mut methods = vec![
            (
                "lora",
                json!({"r": 4, "alpha": 8, "targets": lora_targets(fixture)}),
            ),
            (
                "ia3",
                json!({"targets": if fused_qkv(fixture) { "qkv,ffn_down" } else { "k,v,ffn_down" }}),
            ),
        ];
        let unbiased = ["llama", "t5", "phi3"];
        if !unbiased.iter().any(|arch| fixture.starts_with(arch)) {
            // LLaMA, T5 and Phi-3 have no bias terms.
            methods.push(("bitfit", json!({})));
        }
        for (method, config) in methods {
            let mut patched = base.clone();
            apply_method(&registry, &mut patched, method, &config)
                .unwrap_or_else(|e| panic!("{fixture} {method}: {e}"));
            let at_init = run_model(&patched, &inputs);
            assert_eq!(
                max_diff(&base_outputs, &at_init),
                0.0,
                "{fixture} {method}: not a no-op at init"
            );

            randomize_trainable(&mut patched);
            let trained = run_model(&patched, &inputs);
            let change = max_diff(&base_outputs, &trained);
            assert!(
                change > 1e-4 && change.is_finite(),
                "{fixture} {method}: outputs changed by {change}"
            );

            let mut merged = patched.clone();
            graft::merge::merge(&mut merged).unwrap();
            assert_eq!(
                op_types(&merged),
                op_types(&base),
                "{fixture} {method}: merged topology differs"
            );
            assert_eq!(
                merged.graph.inputs.len(),
                base.graph.inputs.len(),
                "{fixture} {method}"
            );
            let merged_outputs = run_model(&merged, &inputs);
            // Folding changes float32 summation order (x·W + x·A·B versus x·(W + A·B)).
            let diff = max_diff(&trained, &merged_outputs);
            assert!(
                diff <= 1e-5,
                "{fixture} {method}: merged differs from unmerged by {diff}"
            );
        }
    }
}

#[test]
fn methods_stack_and_merge_together() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = "bert-legacy";
    let patched_path = dir.path().join("patched.onnx");
    let (code, stdout, stderr) = run_graft(&[
        "apply",
        fixture_model(fixture).to_str().unwrap(),
        "-m",
        "lora",
        "-m",
        "bitfit",
        "--set",
        "r=4",
        "--set",
        "lora.targets=q,v",
        "--set",
        "subset=paper",
        "-o",
        patched_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("trainable parameters:"), "{stdout}");
    let mut patched = onnx::load(&patched_path).unwrap();
    let record = graft::patch::read_record(&patched).unwrap();
    assert_eq!(record.methods.len(), 2);
    assert_eq!(record.methods[0].config["r"], json!("4"));
    assert_eq!(
        record.methods[1].trainable.len(),
        4,
        "paper subset: query + intermediate biases of 2 layers"
    );
    let inputs = fixture_inputs(fixture);
    let base = onnx::load(&fixture_model(fixture)).unwrap();
    let base_outputs = run_model(&base, &inputs);
    assert_eq!(max_diff(&base_outputs, &run_model(&patched, &inputs)), 0.0);

    randomize_trainable(&mut patched);
    let change = max_diff(&base_outputs, &run_model(&patched, &inputs));
    assert!(
        change > 1e-4,
        "the stacked methods change the outputs by only {change}"
    );
    onnx::save(&patched, &patched_path, &Default::default()).unwrap();
    let merged_path = dir.path().join("merged.onnx");
    let (code, stdout, stderr) = run_graft(&[
        "merge",
        patched_path.to_str().unwrap(),
        "-o",
        merged_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let merged = onnx::load(&merged_path).unwrap();
    assert_eq!(op_types(&merged), op_types(&base));
    let diff = max_diff(&run_model(&patched, &inputs), &run_model(&merged, &inputs));
    assert!(diff <= 1e-5, "merged differs by {diff}");
}

#[test]
fn plugins_command_lists_methods_and_schemas() {
    let (code, stdout, stderr) = run_graft(&["plugins", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let listing: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let methods: Vec<&str> = listing["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["methods"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["name"].as_str().unwrap())
        })
        .collect();
    for method in ["lora", "bitfit", "ia3"] {
        assert!(
            methods.contains(&method),
            "{method} missing from {methods:?}"
        );
    }
    let lora = listing["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["methods"].as_array().unwrap())
        .find(|m| m["name"] == "lora")
        .unwrap();
    let r = lora["config"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == "r")
        .unwrap();
    assert_eq!(r["default"], json!(8));
    assert!(listing["plugins"][0]["path"]
        .as_str()
        .unwrap()
        .ends_with(".so"));
}

fn assert_refused(args: &[&str], expected: &[&str], output: &std::path::Path) {
    let (code, stdout, stderr) = run_graft(args);
    assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
    for text in expected {
        assert!(
            stderr.contains(text),
            "{args:?}: stderr lacks {text:?}: {stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!output.exists(), "{args:?} left {}", output.display());
    let leftovers: Vec<_> = std::fs::read_dir(output.parent().unwrap())
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{args:?} left files: {leftovers:?}");
}

#[test]
fn bad_configurations_are_refused_with_the_valid_choices() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = fixture_model("bert-legacy");
    let model = model.to_str().unwrap();
    let out_str = out.to_str().unwrap();
    assert_refused(
        &["apply", model, "-m", "lora", "--set", "rr=8", "-o", out_str],
        &["\"rr\"", "valid keys", "alpha"],
        &out,
    );
    assert_refused(
        &[
            "apply", model, "-m", "lora", "--set", "r=eight", "-o", out_str,
        ],
        &["r", "eight"],
        &out,
    );
    assert_refused(
        &[
            "apply",
            model,
            "-m",
            "lora",
            "--set",
            "targets=ffn_gate",
            "-o",
            out_str,
        ],
        &["match no site", "q", "ffn_up"],
        &out,
    );
    assert_refused(
        &["apply", model, "-m", "nosuch", "-o", out_str],
        &["unknown method", "lora", "bitfit", "ia3"],
        &out,
    );
    let llama = fixture_model("llama-legacy");
    assert_refused(
        &[
            "apply",
            llama.to_str().unwrap(),
            "-m",
            "bitfit",
            "-o",
            out_str,
        ],
        &["bias"],
        &out,
    );
}

#[test]
fn broken_plugins_are_rejected_by_name_and_the_host_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = fixture_model("bert-legacy");
    let cases = [
        (
            "graft_test_plugin_wrong_abi",
            "wrong-abi",
            &["ABI version 999"][..],
        ),
        (
            "graft_test_plugin_panics",
            "panics",
            &["panics", "deliberate panic"][..],
        ),
        (
            "graft_test_plugin_invalid_patch",
            "invalid-patch",
            &["invalid-patch", "no_such_value"][..],
        ),
    ];
    for (library, method, expected) in cases {
        let path = plugin_library(library);
        let (code, stdout, stderr) = run_graft(&[
            "apply",
            model.to_str().unwrap(),
            "--plugin",
            path.to_str().unwrap(),
            "-m",
            method,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{library}: {stdout}{stderr}");
        for text in expected {
            assert!(
                stderr.contains(text),
                "{library}: stderr lacks {text:?}: {stderr}"
            );
        }
        // Exit status 2 is graft reporting an error; a panic in graft itself exits with 101.
        assert!(!out.exists());
    }
    // Discovered through GRAFT_PLUGIN_PATH by `graft`, the broken libraries are skipped (and the
    // invalid patch rejected) while the good plugins keep working in the same process.
    let broken: Vec<_> = cases
        .iter()
        .map(|(lib, _, _)| plugin_library(lib))
        .collect();
    let joined = std::env::join_paths(&broken).unwrap();
    let output = graft_command()
        .env("GRAFT_PLUGIN_PATH", &joined)
        .args([
            "apply",
            model.to_str().unwrap(),
            "-m",
            "lora",
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // In this process the broken libraries are given explicitly: setting GRAFT_PLUGIN_PATH here
    // would leak into the other tests of this binary, which discover plugins concurrently.
    let listed = graft_command()
        .env("GRAFT_PLUGIN_PATH", &joined)
        .args(["plugins", "--json"])
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let rejected = listed["rejected"].to_string();
    assert!(
        rejected.contains("999"),
        "discovered, the wrong ABI is listed as skipped: {rejected}"
    );
    // Named explicitly, a library with the wrong ABI is an error, not a skip.
    let wrong_abi = plugin_library("graft_test_plugin_wrong_abi");
    let Err(error) = PluginRegistry::discover(&[wrong_abi]) else {
        panic!("a plugin with the wrong ABI was loaded")
    };
    assert!(error.to_string().contains("999"), "{error}");
    let libraries: Vec<_> = [
        "graft_plugin_lora",
        "graft_test_plugin_invalid_patch",
        "graft_test_plugin_panics",
    ]
    .iter()
    .map(|name| plugin_library(name))
    .collect();
    let registry = PluginRegistry::discover(&libraries).unwrap();
    let mut model = onnx::load(&fixture_model("bert-legacy")).unwrap();
    let before = onnx::to_bytes(&model).unwrap();
    let error = apply_method(&registry, &mut model, "invalid-patch", &json!({})).unwrap_err();
    assert!(error.to_string().contains("invalid-patch"), "{error}");
    assert_eq!(
        onnx::to_bytes(&model).unwrap(),
        before,
        "a rejected patch changed the model"
    );
    let error = apply_method(&registry, &mut model, "panics", &json!({})).unwrap_err();
    assert!(error.to_string().contains("deliberate panic"), "{error}");
    apply_method(&registry, &mut model, "lora", &json!({})).unwrap();
}

#[test]
fn methods_stacked_on_the_same_site_merge_exactly() {
    let registry = registry();
    for fixture in ["bert-legacy", "llama-dynamo"] {
        let base = onnx::load(&fixture_model(fixture)).unwrap();
        let mut patched = base.clone();
        apply_method(
            &registry,
            &mut patched,
            "lora",
            &json!({"targets": "v,ffn_down"}),
        )
        .unwrap();
        apply_method(
            &registry,
            &mut patched,
            "ia3",
            &json!({"targets": "v,ffn_down"}),
        )
        .unwrap();
        apply_method(
            &registry,
            &mut patched,
            "lora",
            &json!({"targets": "v", "seed": 3}),
        )
        .unwrap();
        randomize_trainable(&mut patched);
        let inputs = fixture_inputs(fixture);
        let unmerged = run_model(&patched, &inputs);
        let change = max_diff(&run_model(&base, &inputs), &unmerged);
        assert!(
            change > 1e-4,
            "{fixture}: the stack changes the outputs by only {change}"
        );
        let mut merged = patched.clone();
        graft::merge::merge(&mut merged).unwrap();
        assert_eq!(op_types(&merged), op_types(&base), "{fixture}");
        let diff = max_diff(&unmerged, &run_model(&merged, &inputs));
        assert!(
            diff <= 1e-5,
            "{fixture}: stacked LoRA + IA3 merged differs by {diff}"
        );
    }
}
