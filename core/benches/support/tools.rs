//! Small helpers shared by the benchmark programs.
#![allow(dead_code)] // each benchmark uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variable `key` parsed as a `T`, or `default` when it is unset or unparsable.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `values` (the upper one of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The median wall-clock seconds of `runs` calls of `f`, after `warmup` calls that are not timed.
pub fn median_seconds(warmup: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    median(
        (0..runs)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// A large model a benchmark runs on: `GRAFT_BENCH_MODEL`, or `relative` under the workspace
/// (`models/out-large/…`, made on demand by a script). Exits with status 2, saying which
/// command makes it, when the file is missing.
pub fn large_model(relative: &str, make_it: &str) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = std::env::var_os("GRAFT_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join(relative));
    if !model.is_file() {
        eprintln!(
            "{} is missing: run `{make_it}` first (see models/README.md)",
            model.display()
        );
        std::process::exit(2);
    }
    model
}

/// The build of the lora plugin; see [`plugin`].
pub fn lora_plugin() -> PathBuf {
    plugin("graft-plugin-lora")
}

/// The build of the plugin crate `package` in the benchmark's own profile (release, or dev
/// with `cargo bench --profile dev`): `cargo bench` builds no cdylibs, so this builds it (a
/// no-op when it is up to date) and returns its path, honouring `CARGO_TARGET_DIR`.
pub fn plugin(package: &str) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let release = !cfg!(debug_assertions);
    let mut command = Command::new(cargo);
    command
        .current_dir(&workspace)
        .args(["build", "--quiet", "-p", package]);
    if release {
        command.arg("--release");
    }
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("run cargo build for {package}: {e}"));
    assert!(status.success(), "building {package} failed");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join(if release { "release" } else { "debug" })
        .join(format!("lib{}.so", package.replace('-', "_")))
}
