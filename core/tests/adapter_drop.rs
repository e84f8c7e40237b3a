//! AdapterDrop (Rücklé et al., 2021) and the adapters' switches: static AdapterDrop removes
//! the adapters of the lowest layers from the graph; robust AdapterDrop drops the adapters of
//! a freshly drawn number of lowest layers at every training step, and evaluation runs per
//! number of dropped layers (`graft train --eval-sweep`); every named adapter has a switch
//! input that turns it off exactly.

mod common;

use common::*;
use graft::ir::Model;
use graft::plugins::{apply_method as apply_in_process, PluginRegistry};
use graft::runtime::HostTensor;
use serde_json::json;

fn adapted(fixture: &str, settings: serde_json::Value) -> Model {
    let registry = PluginRegistry::discover(&[plugin_library("graft_plugin_adapter")]).unwrap();
    let mut model = graft::onnx::load(&fixture_model(fixture)).unwrap();
    apply_in_process(&registry, &mut model, "adapter", &settings)
        .unwrap_or_else(|e| panic!("{fixture} {settings}: {e}"));
    model
}

fn layers(model: &Model) -> usize {
    let view = graft::plugins::graph_view(model).unwrap();
    view.stacks.iter().map(|s| s.n_layers).sum()
}

/// `inputs` plus a float or bool scalar feed of `name`.
fn with_scalar(
    inputs: &[(String, HostTensor)],
    name: &str,
    value: f64,
    boolean: bool,
) -> Vec<(String, HostTensor)> {
    let scalar = if boolean {
        HostTensor::Bool(ndarray::arr0(value != 0.0).into_dyn())
    } else {
        HostTensor::F32(ndarray::arr0(value as f32).into_dyn())
    };
    let mut feeds = inputs.to_vec();
    feeds.push((name.to_owned(), scalar));
    feeds
}

/// Static AdapterDrop: `drop_layers = n` grafts no adapter on the lowest n layers and
/// computes what an adapter with those layers left out computes.
#[test]
fn static_adapter_drop_removes_the_lowest_layers_adapters() {
    for fixture in ["bert-legacy", "llama-legacy"] {
        let settings = |extra: serde_json::Value| {
            let mut s = json!({"config": "double_seq_bn", "reduction_factor": 4});
            s.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            s
        };
        let all = adapted(fixture, settings(json!({})));
        let mut dropped = adapted(fixture, settings(json!({"drop_layers": 1})));
        let mut left_out = adapted(fixture, settings(json!({"leave_out": "0"})));
        let count = |m: &Model| {
            graft::patch::read_record(m).unwrap().methods[0]
                .parameters
                .len()
        };
        let per_layer = count(&all) / layers(&all);
        assert_eq!(
            count(&dropped),
            count(&all) - per_layer,
            "{fixture}: one layer fewer"
        );
        randomize_trainable(&mut dropped);
        randomize_trainable(&mut left_out);
        let inputs = fixture_inputs(fixture);
        let diff = max_diff(
            &run_model(&dropped, &inputs),
            &run_model(&left_out, &inputs),
        );
        assert!(
            diff == 0.0,
            "{fixture}: drop_layers=1 vs leave_out=[0]: {diff}"
        );
        let record = graft::patch::read_record(&dropped).unwrap();
        assert!(
            record.methods[0]
                .parameters
                .iter()
                .all(|p| !p.contains(".0.")),
            "{fixture}: layer 0 still has adapter tensors: {:?}",
            record.methods[0].parameters
        );
    }
}

/// The switch input `adapter.<name>.active` and robust AdapterDrop's `dropped_layers` input,
/// fed to the patched graph outside training: all adapters on is the plain adapter, the
/// switch off or every layer dropped is the base model exactly, and dropping the lowest n
/// layers is the adapter with those layers left out.
#[test]
fn switch_and_dropped_layers_inputs_select_the_adapters_exactly() {
    for fixture in ["bert-legacy", "llama-legacy"] {
        let inputs = fixture_inputs(fixture);
        let base = run_model(
            &graft::onnx::load(&fixture_model(fixture)).unwrap(),
            &inputs,
        );
        let settings = json!({"config": "seq_bn", "reduction_factor": 4, "robust_drop": true});
        let mut robust = adapted(fixture, settings.clone());
        randomize_trainable(&mut robust);
        let n_layers = layers(&robust);
        let on = run_model(&robust, &inputs);
        assert!(
            max_diff(&on, &base) > 1e-4,
            "{fixture}: the adapter changes nothing"
        );
        let off = run_model(
            &robust,
            &with_scalar(&inputs, "adapter.adapter.active", 0.0, true),
        );
        assert_eq!(max_diff(&off, &base), 0.0, "{fixture}: switched off");
        let all_dropped = with_scalar(
            &inputs,
            "adapter.adapter.dropped_layers",
            n_layers as f64,
            false,
        );
        assert_eq!(
            max_diff(&run_model(&robust, &all_dropped), &base),
            0.0,
            "{fixture}: all dropped"
        );

        // The same trained values without robust AdapterDrop, with layer 0 left out.
        let mut left_out = adapted(
            fixture,
            json!({"config": "seq_bn", "reduction_factor": 4, "leave_out": "0"}),
        );
        for name in graft::patch::read_record(&left_out).unwrap().trainable() {
            let tensor = robust.graph.initializer(name).unwrap().clone();
            let slot = left_out
                .graph
                .initializers
                .iter_mut()
                .find(|t| t.name == name)
                .unwrap();
            *slot = tensor;
        }
        let one_dropped = with_scalar(&inputs, "adapter.adapter.dropped_layers", 1.0, false);
        let diff = max_diff(
            &run_model(&robust, &one_dropped),
            &run_model(&left_out, &inputs),
        );
        assert_eq!(diff, 0.0, "{fixture}: one layer dropped vs leave_out [0]");
    }
}

/// Robust AdapterDrop in training graphs: each step's draw drops the adapters of the lowest n
/// layers (their gradients are exactly zero), n varies over the steps, the top layer's adapter
/// always trains, and the draws repeat for the same seed.
#[test]
fn robust_adapter_drop_draws_the_dropped_layers_each_step() {
    let mut model = adapted(
        "bert-legacy",
        json!({"config": "seq_bn", "reduction_factor": 4, "robust_drop": true}),
    );
    randomize_trainable(&mut model);
    let n_layers = layers(&model);
    assert!(n_layers >= 2, "bert-legacy has {n_layers} layers");
    let training = graft::train::training_graph(&model, graft::train::Task::SeqCls).unwrap();
    let mut session = training_session(&training, true);
    let record = graft::patch::read_record(&model).unwrap();
    let layer_of = |tensor: &str| -> usize {
        tensor
            .split('.')
            .find_map(|part| part.parse().ok())
            .unwrap_or_else(|| panic!("no layer index in {tensor}"))
    };
    let steps = 24;
    let mut dropped_counts = Vec::new();
    for seed in [7, 7] {
        let participation =
            graft::train::participation::Participation::new(&model, &record, &[], seed).unwrap();
        let mut counts = Vec::new();
        for step in 1..=steps {
            let mut feeds = bert_training_feeds(&model, &training, &session, &[]);
            feeds.extend(participation.feeds(true, step, steps, 0).unwrap());
            feeds.retain(|(name, _)| session.input_names.contains(name));
            let outputs = session.run(&feeds).unwrap();
            let mut silent = vec![true; n_layers];
            for (tensor, gradient) in &training.gradients {
                let values = outputs
                    .iter()
                    .find(|(n, _)| n == gradient)
                    .unwrap()
                    .1
                    .to_f64();
                if values.iter().any(|&v| v != 0.0) {
                    silent[layer_of(tensor)] = false;
                }
            }
            // The dropped layers are exactly the lowest ones.
            let n = silent.iter().take_while(|&&s| s).count();
            assert!(
                silent[n..].iter().all(|&s| !s),
                "step {step}: silent layers {silent:?}"
            );
            counts.push(n);
        }
        dropped_counts.push(counts);
    }
    let counts = &dropped_counts[0];
    assert_eq!(
        counts, &dropped_counts[1],
        "the same seed draws differently"
    );
    assert!(
        counts.iter().all(|&n| n < n_layers),
        "the top layer never drops: {counts:?}"
    );
    assert!(
        counts.contains(&0) && counts.iter().any(|&n| n > 0),
        "n does not vary: {counts:?}"
    );
}

/// `graft train` trains a robust-AdapterDrop adapter (the loss falls) and, with
/// `--eval-sweep`, evaluates it once per number of dropped layers; a sweep of an input the
/// model does not have is refused by name.
#[test]
fn robust_adapter_drop_trains_and_evaluates_per_dropped_layers() {
    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("robust.onnx");
    apply_method(
        "bert-legacy",
        "adapter",
        &["config=seq_bn", "reduction_factor=4", "robust_drop=true"],
        &patched,
    );
    let eval = repository("examples/data/sentiment_eval.jsonl");
    let train = |out: &std::path::Path, sweep: &str| {
        let extra = ["--eval-data", eval.to_str().unwrap(), "--eval-sweep", sweep];
        train_seq_cls(&patched, "examples/data/sentiment.jsonl", 30, out, &extra)
    };
    let run = dir.path().join("run");
    let (code, stdout, stderr) = train(&run, "adapter.adapter.dropped_layers=0,1,2");
    assert_eq!(code, 0, "train: {stdout}{stderr}");
    let lines = metrics(&run);
    assert_loss_falls(&lines);
    let swept: Vec<f64> = lines
        .iter()
        .filter(|v| v.get("eval_loss").is_some())
        .map(|v| {
            v["inputs"]["adapter.adapter.dropped_layers"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(swept, [0.0, 1.0, 2.0], "one evaluation per n");
    assert!(
        stdout.contains("adapter.adapter.dropped_layers=2"),
        "{stdout}"
    );

    let (code, stdout, stderr) = train(&dir.path().join("bad"), "adapter.nope.dropped_layers=0");
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("adapter.nope.dropped_layers")
            && stderr.contains("adapter.adapter.dropped_layers"),
        "{stderr}"
    );
}
