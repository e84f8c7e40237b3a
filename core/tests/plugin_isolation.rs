//! Plugins run in worker processes: a plugin that segfaults, aborts, runs out of memory, hangs
//! or ends the process is reported naming the plugin, graft exits with status 2 and writes
//! nothing; a broken library on the plugin path is skipped without breaking the other methods;
//! two plugins offering one method are reported, not silently shadowed. The broken plugin is
//! `plugins/testing/broken-c/broken.c`, built here with the system C compiler.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;

const FIXTURE: &str = "bert-legacy";

/// The broken C plugin, compiled once per test process.
fn broken_plugin() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("graft-broken-{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        let library = out.join("libbroken.so");
        let status = std::process::Command::new(std::env::var("CC").unwrap_or("cc".into()))
            .args(["-std=c99", "-D_GNU_SOURCE", "-shared", "-fPIC", "-I"])
            .arg(repository("plugins/sdk/include"))
            .arg("-o")
            .arg(&library)
            .arg(repository("plugins/testing/broken-c/broken.c"))
            .status()
            .expect("run the C compiler");
        assert!(status.success(), "compiling broken.c failed");
        library
    })
}

/// Runs `graft ARGS` with `env` set; returns (exit code, stdout, stderr).
fn run_with(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let output = graft_command()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Item 14: each way a plugin can fail during its call becomes exit 2 and a message naming
/// the plugin and what happened; no output is written.
#[test]
fn a_crashing_hanging_or_exiting_plugin_is_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = fixture_model(FIXTURE);
    let library = broken_plugin();
    let args = [
        "apply",
        text(&model),
        "--plugin",
        text(library),
        "-m",
        "broken",
        "-o",
        text(&out),
    ];
    for (mode, needle) in [
        ("segfault", "crashed (signal 11, SIGSEGV"),
        ("abort", "crashed (signal 6, SIGABRT"),
        ("alloc", "the limit is 256 MiB"),
        ("exit", "ended its process (exit status 0) before replying"),
        ("hang", "did not reply within 2 s"),
    ] {
        let env = [
            ("GRAFT_TEST_BROKEN", mode),
            ("GRAFT_PLUGIN_TIMEOUT", "2"),
            ("GRAFT_PLUGIN_MEMORY_MB", "256"),
        ];
        let (code, stdout, stderr) = run_with(&env, &args);
        assert_eq!(code, 2, "{mode}: {stdout}{stderr}");
        assert!(
            stderr.contains(&format!("plugin broken ({})", library.display())),
            "{mode}: {stderr}"
        );
        assert!(stderr.contains(needle), "{mode}: {stderr}");
        assert!(!out.exists(), "{mode}: an output was written");
    }
}

/// Item 14: a library on GRAFT_PLUGIN_PATH that crashes while describing itself is listed as
/// skipped, and every other method still works.
#[test]
fn a_broken_library_on_the_path_breaks_no_other_method() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let library = broken_plugin();
    let env = [
        ("GRAFT_TEST_BROKEN", "segfault"),
        ("GRAFT_TEST_BROKEN_AT", "describe"),
        ("GRAFT_PLUGIN_PATH", text(library)),
    ];
    let (code, stdout, stderr) = run_with(
        &env,
        &[
            "apply",
            text(&fixture_model(FIXTURE)),
            "-m",
            "lora",
            "-o",
            text(&out),
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(out.is_file());
    let (code, _, stderr) = run_with(&env, &["plugins"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!("skipped plugin {}", library.display()))
            && stderr.contains("SIGSEGV"),
        "{stderr}"
    );
}

/// Item 14: two libraries offering one method name are both named, and neither is used.
#[test]
fn two_plugins_offering_one_method_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("libgraft_plugin_lora_copy.so");
    std::fs::copy(plugin_library("graft_plugin_lora"), &copy).unwrap();
    let out = dir.path().join("out.onnx");
    let (code, stdout, stderr) = run_with(
        &[("GRAFT_PLUGIN_PATH", text(&copy))],
        &[
            "apply",
            text(&fixture_model(FIXTURE)),
            "-m",
            "lora",
            "-o",
            text(&out),
        ],
    );
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("method \"lora\" is offered by 2 plugins") && stderr.contains(text(&copy)),
        "{stderr}"
    );
    assert!(!out.exists());
}
