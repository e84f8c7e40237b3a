//! Scale benchmark: load, structure detection and save of a LLaMA-7B-shaped graph whose 13 GB of
//! float16 weights live in a sparse external-data file, in-process and through the `graft` binary.
//!
//! Run with `cargo bench -p graft --bench scale_7b`. Prints wall time and peak resident memory of
//! each phase; the target is load + detect + save under 2 s and peak RSS under 300 MB.

#[path = "support/child.rs"]
mod child;
mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    generate, mib, peak_rss_kib, reset_peak_rss, timed, DATA_FILE, FFN, HIDDEN, N_HEADS, N_LAYERS,
    VOCAB,
};
use graft::ir::Tensor;
use graft::onnx::{self, DataPlacement, SaveOptions};

/// Runs the `graft` binary and returns its wall time and peak RSS in KiB (from `wait4`).
fn run_graft(args: &[&std::ffi::OsStr]) -> (Duration, u64) {
    let command = &mut Command::new(env!("CARGO_BIN_EXE_graft"));
    let (measured, elapsed) = timed(|| child::run_measured(command.args(args)));
    (elapsed, measured.peak_rss_kib)
}

fn main() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let (generated, generate_time) = timed(|| generate(dir.path()));
    let (model_path, data_len) = generated;
    let data_path = dir.path().join(DATA_FILE);
    let resaved = dir.path().join("model-resaved.onnx");
    println!(
        "LLaMA-7B-shaped graph: {N_LAYERS} layers, hidden {HIDDEN}, FFN {FFN}, {N_HEADS} heads, vocab {VOCAB}"
    );
    println!(
        "generated in {:.0} ms: model.onnx {} KiB, sparse {DATA_FILE} {:.2} GB of float16 ({} blocks allocated)",
        generate_time.as_secs_f64() * 1e3,
        std::fs::metadata(&model_path).unwrap().len() / 1024,
        data_len as f64 / 1e9,
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&data_path).unwrap()),
    );

    let reset = reset_peak_rss();
    println!(
        "\nin-process (peak RSS {}):",
        if reset {
            "since generation"
        } else {
            "including generation"
        }
    );
    let (model, load_time) = timed(|| onnx::load(&model_path).expect("load"));
    let after_load = peak_rss_kib();
    let n_params: usize = model
        .graph
        .initializers
        .iter()
        .map(Tensor::n_elements)
        .sum();
    let n_external = model
        .graph
        .initializers
        .iter()
        .filter(|t| t.is_external())
        .count();
    println!(
        "  load    {:>8.1} ms   peak RSS {:>7.1} MiB   ({} nodes, {} initializers, {} external, {:.2} B params)",
        load_time.as_secs_f64() * 1e3,
        mib(after_load),
        model.graph.nodes.len(),
        model.graph.initializers.len(),
        n_external,
        n_params as f64 / 1e9
    );
    let (structure, detect_time) =
        timed(|| graft::analysis::sites::detect(&model).expect("detect"));
    let after_detect = peak_rss_kib();
    let n_layers: usize = structure.stacks.iter().map(|s| s.n_layers).sum();
    println!(
        "  detect  {:>8.1} ms   peak RSS {:>7.1} MiB   ({} stacks, {n_layers} layers)",
        detect_time.as_secs_f64() * 1e3,
        mib(after_detect),
        structure.stacks.len()
    );
    let (_, save_time) = timed(|| {
        onnx::save(
            &model,
            &resaved,
            &SaveOptions {
                placement: DataPlacement::Auto,
            },
        )
        .expect("save")
    });
    let after_save = peak_rss_kib();
    println!(
        "  save    {:>8.1} ms   peak RSS {:>7.1} MiB   (DataPlacement::Auto, model-resaved.onnx {} KiB)",
        save_time.as_secs_f64() * 1e3,
        mib(after_save),
        std::fs::metadata(&resaved).unwrap().len() / 1024
    );
    let total = load_time + detect_time + save_time;
    println!(
        "  total   {:>8.1} ms   peak RSS {:>7.1} MiB   (target < 2000 ms, < 300 MiB)",
        total.as_secs_f64() * 1e3,
        mib(after_save)
    );
    drop(model);

    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["model-resaved.onnx", "model.onnx", DATA_FILE],
        "saving with Auto placement must keep the external references and write no data file"
    );

    println!("\ngraft binary (peak RSS of the process, from wait4):");
    let cli_out = dir.path().join("model-cli.onnx");
    let (convert_time, convert_rss) = run_graft(&[
        "convert".as_ref(),
        model_path.as_os_str(),
        "-o".as_ref(),
        cli_out.as_os_str(),
    ]);
    println!(
        "  graft convert MODEL -o OUT        {:>8.1} ms   peak RSS {:>7.1} MiB   (load + save)",
        convert_time.as_secs_f64() * 1e3,
        mib(convert_rss)
    );
    let (inspect_time, inspect_rss) = run_graft(&[
        "inspect".as_ref(),
        model_path.as_os_str(),
        "--json".as_ref(),
    ]);
    println!(
        "  graft inspect MODEL --json        {:>8.1} ms   peak RSS {:>7.1} MiB   (load + detect + print)",
        inspect_time.as_secs_f64() * 1e3,
        mib(inspect_rss)
    );
    println!(
        "\n{DATA_FILE}: {} blocks allocated after all runs (0: nothing was read into or copied to disk)",
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&data_path).unwrap())
    );
}
