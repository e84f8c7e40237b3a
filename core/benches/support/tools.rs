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

/// The release build of the lora plugin: `cargo bench` builds no cdylibs, so this builds it
/// (a no-op when it is up to date) and returns its path, honouring `CARGO_TARGET_DIR`.
pub fn lora_plugin() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args(["build", "--release", "--quiet", "-p", "graft-plugin-lora"])
        .status()
        .expect("run cargo build for the lora plugin");
    assert!(status.success(), "building the lora plugin failed");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("release/libgraft_plugin_lora.so")
}
