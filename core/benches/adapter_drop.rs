//! Static AdapterDrop (Rücklé et al., 2021) on the real all-MiniLM-L6-v2 (6 layers, batch 8,
//! sequence 128) in ONNX Runtime: the base model, Houlsby adapters (`double_seq_bn`,
//! reduction factor 16, non-zero values) in every layer, and the same adapters with those of
//! the lowest n = 1…6 layers dropped (`drop_layers = n`), measured in one run and interleaved
//! round by round so that machine load hits all of them alike. Each dropped layer should win
//! back about a sixth of what the adapters cost; n = 6 is the base model plus the adapters'
//! switch inputs.
//!
//! Needs `python models/make_minilm.py` (output in models/out-large/). `GRAFT_BENCH_THREADS`
//! (default 2) and `GRAFT_BENCH_ROUNDS` (default 30) tune it.
//! Run: `cargo bench -p graft --bench adapter_drop`.

use std::time::Instant;

use graft::onnx;
use graft::plugins::{apply_method, PluginRegistry};
use graft::runtime::{HostTensor, OrtSession, SessionOptions};
use ndarray::{ArrayD, IxDyn};

#[path = "support/tools.rs"]
mod tools;
use tools::{env_or, large_model, median, plugin};

const BATCH: usize = 8;
const SEQUENCE: usize = 128;

fn main() {
    let model_path = large_model(
        "models/out-large/all-minilm-l6-v2/model.onnx",
        "python models/make_minilm.py",
    );
    let threads: usize = env_or("GRAFT_BENCH_THREADS", 2);
    let rounds: usize = env_or("GRAFT_BENCH_ROUNDS", 30);
    let registry = PluginRegistry::discover(&[plugin("graft-plugin-adapter")])
        .expect("load the adapter plugin");

    let base = onnx::load(&model_path).expect("load the model");
    let n_layers: usize = graft::plugins::graph_view(&base)
        .expect("graph view")
        .stacks
        .iter()
        .map(|s| s.n_layers)
        .sum();
    let mut models = vec![("base".to_owned(), base.clone())];
    for dropped in 0..=n_layers {
        let mut adapted = base.clone();
        let settings = serde_json::json!({"config": "double_seq_bn", "drop_layers": dropped});
        match apply_method(&registry, &mut adapted, "adapter", &settings) {
            Ok(_) => {}
            // Every layer dropped: no adapter is left to graft, which is the base model.
            Err(e) if dropped == n_layers => {
                println!("drop_layers = {dropped}: {e} (timed as the base model)");
                continue;
            }
            Err(e) => panic!("apply Houlsby adapters with drop_layers {dropped}: {e}"),
        }
        give_values(&mut adapted);
        let label = if dropped == 0 {
            "Houlsby adapters, all layers".to_owned()
        } else {
            format!("Houlsby, lowest {dropped} dropped")
        };
        models.push((label, adapted));
    }

    let options = SessionOptions {
        threads,
        ..Default::default()
    };
    let mut sessions: Vec<(String, OrtSession)> = models
        .iter()
        .map(|(name, model)| {
            let bytes = onnx::to_bytes(model).expect("serialize");
            (
                name.clone(),
                OrtSession::from_bytes(&bytes, options).expect("session"),
            )
        })
        .collect();
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
    let (base_time, all_time) = (medians[0], medians[1]);
    println!(
        "AdapterDrop on {} — batch {BATCH} × {SEQUENCE}, {threads} threads, median of {rounds} interleaved rounds",
        model_path.display()
    );
    println!("| model | time per batch | versus base | versus all adapters | share of the adapters' cost left |");
    println!("|---|---:|---:|---:|---:|");
    for ((name, _), time) in sessions.iter().zip(&medians) {
        println!(
            "| {name} | {:.2} ms | {:+.1}% | {:+.1}% | {:.0}% |",
            time * 1e3,
            100.0 * (time / base_time - 1.0),
            100.0 * (time / all_time - 1.0),
            100.0 * (time - base_time) / (all_time - base_time),
        );
    }
}

/// Gives the adapters' tensors small non-zero values, as trained adapters have (the up
/// projections of a fresh adapter are near zero, which could let a runtime skip work).
fn give_values(model: &mut graft::ir::Model) {
    let record = graft::patch::read_record(model).expect("record");
    let trainable: Vec<String> = record.trainable().map(str::to_owned).collect();
    for tensor in model
        .graph
        .initializers
        .iter_mut()
        .filter(|t| trainable.contains(&t.name) && t.name.starts_with("adapter."))
    {
        let values: Vec<f32> = (0..tensor.n_elements())
            .map(|i| ((i % 7) as f32 - 3.0) * 1e-2)
            .collect();
        *tensor = graft::ir::Tensor::from_f32(&tensor.name, tensor.dims.clone(), &values);
    }
}
