//! Inference cost of LoRA in ONNX Runtime on the real all-MiniLM-L6-v2 (batch 8, sequence 128):
//! the base model, the model with unmerged LoRA (r=8 on q and v, non-zero B) and the merged
//! model, measured in one run, interleaved round by round so that machine load hits all three
//! alike. Target: unmerged ≤ 5% over the base; merged equal to the base.
//!
//! Needs `python models/make_minilm.py` (output in models/out-large/). `GRAFT_BENCH_THREADS`
//! (default 2) and `GRAFT_BENCH_ROUNDS` (default 30) tune it.
//! Run: `cargo bench -p graft --bench lora_inference`.

use std::time::Instant;

use graft::onnx;
use graft::plugins::{apply_method, PluginRegistry};
use graft::runtime::{HostTensor, OrtSession, SessionOptions};
use ndarray::{ArrayD, IxDyn};

#[path = "support/tools.rs"]
mod tools;
use tools::{env_or, large_model, lora_plugin, median};

const BATCH: usize = 8;
const SEQUENCE: usize = 128;

fn main() {
    let model_path = large_model(
        "models/out-large/all-minilm-l6-v2/model.onnx",
        "python models/make_minilm.py",
    );
    let threads: usize = env_or("GRAFT_BENCH_THREADS", 2);
    let rounds: usize = env_or("GRAFT_BENCH_ROUNDS", 30);

    let registry = PluginRegistry::discover(&[lora_plugin()]).expect("load the lora plugin");

    let base = onnx::load(&model_path).expect("load the model");
    let mut patched = base.clone();
    apply_method(
        &registry,
        &mut patched,
        "lora",
        &serde_json::json!({"r": 8, "alpha": 16, "targets": "q,v"}),
    )
    .expect("apply LoRA");
    for tensor in patched
        .graph
        .initializers
        .iter_mut()
        .filter(|t| t.name.ends_with(".B"))
    {
        let values: Vec<f32> = (0..tensor.n_elements())
            .map(|i| ((i % 7) as f32 - 3.0) * 1e-3)
            .collect();
        *tensor = graft::ir::Tensor::from_f32(&tensor.name, tensor.dims.clone(), &values);
    }
    let mut merged = patched.clone();
    graft::merge::merge(&mut merged).expect("merge");

    let options = SessionOptions {
        threads,
        ..Default::default()
    };
    let session = |model: &graft::ir::Model| {
        OrtSession::from_bytes(&onnx::to_bytes(model).expect("serialize"), options)
            .expect("session")
    };
    let mut sessions = [
        ("base", session(&base)),
        ("unmerged LoRA", session(&patched)),
        ("merged", session(&merged)),
    ];
    let ids = ArrayD::from_shape_fn(IxDyn(&[BATCH, SEQUENCE]), |i| {
        1000 + ((i[0] * 131 + i[1] * 17) % 28000) as i64
    });
    let inputs = vec![
        ("input_ids".to_owned(), HostTensor::I64(ids)),
        (
            "attention_mask".to_owned(),
            HostTensor::I64(ArrayD::from_elem(IxDyn(&[BATCH, SEQUENCE]), 1)),
        ),
        (
            "token_type_ids".to_owned(),
            HostTensor::I64(ArrayD::from_elem(IxDyn(&[BATCH, SEQUENCE]), 0)),
        ),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); sessions.len()];
    for (_, session) in sessions.iter_mut() {
        session.run(&inputs).expect("warmup");
    }
    for _ in 0..rounds {
        for (index, (_, session)) in sessions.iter_mut().enumerate() {
            let start = Instant::now();
            session.run(&inputs).expect("run");
            times[index].push(start.elapsed().as_secs_f64());
        }
    }
    let medians: Vec<f64> = times.into_iter().map(median).collect();
    println!("LoRA inference on {} — batch {BATCH} × {SEQUENCE}, {threads} threads, median of {rounds} interleaved rounds", model_path.display());
    println!("| model | time per batch | versus base |");
    println!("|---|---:|---:|");
    for ((name, _), time) in sessions.iter().zip(&medians) {
        println!(
            "| {name} | {:.2} ms | {:+.1}% |",
            time * 1e3,
            100.0 * (time / medians[0] - 1.0)
        );
    }
}
