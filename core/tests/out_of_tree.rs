//! Plugins built outside graft's workspace: the Rust crate in `examples/plugin-rust` (its own
//! cargo workspace, depending on the SDK alone) and the C plugin in `examples/plugin-c`
//! (compiled here with the system C compiler against `graft_plugin.h`). Each is loaded with
//! `--plugin` and taken through `graft apply`, `graft run` and `graft merge` on BERT.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use graft::onnx;

const FIXTURE: &str = "bert-legacy";

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds `examples/plugin-rust` with cargo, as its author would, into graft's target folder
/// (so that dependencies graft already built are reused), and returns the library.
fn rust_plugin() -> PathBuf {
    let target = plugin_dir()
        .parent()
        .expect("the plugin folder is <target>/debug")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(repository().join("examples/plugin-rust/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("run cargo build for examples/plugin-rust");
    assert!(status.success(), "building examples/plugin-rust failed");
    target.join("debug/libgraft_plugin_lora_scaled.so")
}

/// Compiles `examples/plugin-c/graft_example.c` into a shared library in `dir` with `$CC`
/// (default `cc`), warnings as errors.
fn c_plugin(dir: &Path) -> PathBuf {
    let library = dir.join("libgraft_example_c.so");
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let output = Command::new(&compiler)
        .args([
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-O1",
        ])
        .args(["-shared", "-fPIC", "-I"])
        .arg(repository().join("plugins/sdk/include"))
        .arg("-o")
        .arg(&library)
        .arg(repository().join("examples/plugin-c/graft_example.c"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {compiler:?}: {e}"));
    assert!(
        output.status.success(),
        "compiling the C plugin failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    library
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `graft apply` with `plugin`, then run (unchanged outputs), randomize the new parameters,
/// `graft merge`, and check the merged model against the patched one.
fn apply_run_merge(dir: &Path, plugin: &Path, method: &str, settings: &[&str]) {
    let patched_path = dir.join(format!("{method}.onnx"));
    let base_path = fixture_model(FIXTURE);
    let mut args = vec![
        "apply",
        path(&base_path),
        "--plugin",
        path(plugin),
        "-m",
        method,
        "-o",
        path(&patched_path),
    ];
    for setting in settings {
        args.extend(["--set", setting]);
    }
    let (code, stdout, stderr) = run_graft(&args);
    assert_eq!(code, 0, "{method}: {stdout}{stderr}");
    assert!(stdout.contains("trainable parameters:"), "{stdout}");

    let base = onnx::load(&fixture_model(FIXTURE)).unwrap();
    let mut patched = onnx::load(&patched_path).unwrap();
    let inputs = fixture_inputs(FIXTURE);
    let base_outputs = run_model(&base, &inputs);
    assert_eq!(
        max_diff(&base_outputs, &run_model(&patched, &inputs)),
        0.0,
        "{method}: not a no-op at init"
    );
    let inputs_path = fixture_dir(FIXTURE).join("inputs.npz");
    let reference = fixture_dir(FIXTURE).join("outputs.npz");
    let (code, stdout, stderr) = run_graft(&[
        "run",
        path(&patched_path),
        "--inputs",
        path(&inputs_path),
        "--compare",
        path(&reference),
    ]);
    assert_eq!(code, 0, "{method}: {stdout}{stderr}");

    randomize_trainable(&mut patched);
    onnx::save(&patched, &patched_path, &Default::default()).unwrap();
    let trained = run_model(&patched, &inputs);
    let change = max_diff(&base_outputs, &trained);
    assert!(
        change > 1e-4,
        "{method}: training changed the outputs by {change}"
    );
    let merged_path = dir.join(format!("{method}-merged.onnx"));
    let (code, stdout, stderr) =
        run_graft(&["merge", path(&patched_path), "-o", path(&merged_path)]);
    assert_eq!(code, 0, "{method}: {stdout}{stderr}");
    let merged = onnx::load(&merged_path).unwrap();
    assert_eq!(
        op_types(&merged),
        op_types(&base),
        "{method}: merged topology"
    );
    // Folding changes float32 summation order (x·W + x·A·B versus x·(W + A·B)).
    let diff = max_diff(&trained, &run_model(&merged, &inputs));
    assert!(
        diff <= 1e-5,
        "{method}: merged differs from unmerged by {diff}"
    );
    println!(
        "{method}: trained changes outputs by {change:.2e}; merged versus unmerged {diff:.2e}"
    );

    let trained_path = dir.join(format!("{method}-trained.npz"));
    graft::runtime::write_npz(&trained_path, &trained).unwrap();
    let (code, stdout, stderr) = run_graft(&[
        "run",
        path(&merged_path),
        "--inputs",
        path(&inputs_path),
        "--compare",
        path(&trained_path),
    ]);
    assert_eq!(code, 0, "{method}: {stdout}{stderr}");
}

#[test]
fn the_rust_example_plugin_applies_runs_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = rust_plugin();
    apply_run_merge(dir.path(), &plugin, "lora_scaled", &["r=4", "targets=q,v"]);
    let patched = onnx::load(&dir.path().join("lora_scaled.onnx")).unwrap();
    let record = graft::patch::read_record(&patched).unwrap();
    assert_eq!(record.methods[0].plugin, "lora-scaled");
    assert_eq!(
        record.methods[0].trainable.len(),
        3 * 4,
        "A, e, B on q and v of 2 layers"
    );
}

/// The Rust example's step hook runs after every optimizer step of `graft train`: the rank
/// scales it clips stay within the limit, and its figures and state reach `metrics.jsonl`.
#[test]
fn the_rust_example_plugin_s_step_hook_clips_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = rust_plugin();
    let patched = dir.path().join("patched.onnx");
    let (code, stdout, stderr) = run_graft(&[
        "apply",
        path(&fixture_model("bert-legacy")),
        "--plugin",
        path(&plugin),
        "-m",
        "lora_scaled",
        "--set",
        "r=4",
        "--set",
        "clip_e=0.001",
        "-o",
        path(&patched),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let run = dir.path().join("run");
    let (code, stdout, stderr) = run_graft(&[
        "train",
        path(&patched),
        "--plugin",
        path(&plugin),
        "--task",
        "seq-cls",
        "--data",
        path(&repository().join("examples/data/sentiment.jsonl")),
        "--tokenizer",
        path(&repository().join("models/tokenizers/bert/tokenizer.json")),
        "--steps",
        "4",
        "--lr",
        "1e-2",
        "--out",
        path(&run),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let mut so_far = 0.0;
    for line in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let metrics: serde_json::Value = serde_json::from_str(line).unwrap();
        let Some(clipped) = metrics["plugin"]["lora_scaled.clipped"].as_f64() else {
            continue;
        };
        so_far += clipped;
        assert_eq!(
            metrics["plugin"]["lora_scaled.clipped_so_far"].as_f64(),
            Some(so_far)
        );
    }
    assert!(
        so_far > 0.0,
        "the hook never clipped (lr 1e-2 moves e past 1e-3)"
    );
    let scales: Vec<_> = read_tensors(&run.join("adapter.safetensors"))
        .into_iter()
        .filter(|(name, _, _)| name.ends_with(".E"))
        .collect();
    assert_eq!(scales.len(), 4);
    for (name, _, values) in scales {
        assert!(
            values.iter().all(|v| v.abs() <= 0.001),
            "{name}: {values:?}"
        );
    }
}

#[test]
fn the_c_example_plugin_applies_runs_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = c_plugin(dir.path());
    apply_run_merge(dir.path(), &plugin, "scale_v", &[]);

    let (code, _, stderr) = run_graft(&[
        "apply",
        path(&fixture_model(FIXTURE)),
        "--plugin",
        path(&plugin),
        "-m",
        "scale_v",
        "--set",
        "r=4",
        "-o",
        path(&dir.path().join("never.onnx")),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unknown config key \"r\""), "{stderr}");
    assert!(!dir.path().join("never.onnx").exists());
}

#[test]
fn both_example_plugins_stack() {
    let dir = tempfile::tempdir().unwrap();
    let (rust, c) = (rust_plugin(), c_plugin(dir.path()));
    let patched = dir.path().join("stacked.onnx");
    let (code, stdout, stderr) = run_graft(&[
        "apply",
        path(&fixture_model(FIXTURE)),
        "--plugin",
        path(&rust),
        "--plugin",
        path(&c),
        "-m",
        "lora_scaled",
        "-m",
        "scale_v",
        "--set",
        "lora_scaled.targets=q",
        "-o",
        path(&patched),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let mut model = onnx::load(&patched).unwrap();
    randomize_trainable(&mut model);
    let inputs = fixture_inputs(FIXTURE);
    let trained = run_model(&model, &inputs);
    let base = onnx::load(&fixture_model(FIXTURE)).unwrap();
    let change = max_diff(&run_model(&base, &inputs), &trained);
    assert!(
        change > 1e-4,
        "both plugins together change the outputs by only {change}"
    );
    let mut merged = model.clone();
    graft::merge::merge(&mut merged).unwrap();
    let diff = max_diff(&trained, &run_model(&merged, &inputs));
    assert!(diff <= 1e-5, "merged differs from unmerged by {diff}");
    assert_eq!(op_types(&merged), op_types(&base));
}
