//! Methods taking part in training (SDK ABI 2) through `graft train` and the training graph:
//! a loss term's gradient against central differences, `--train` freezing the other methods
//! byte for byte, and step-hook metrics in `metrics.jsonl`. (Resume with step-hook state and
//! dropout is in train_resume.rs; AdaLoRA parity with PEFT in adalora.rs.)

mod common;

use common::*;

/// The loss and every gradient of `model`'s training graph on the fixture's inputs (labels 0),
/// with `overrides` replacing trainable values.
fn loss_and_gradients(
    model: &graft::ir::Model,
    overrides: &[(String, Vec<f32>)],
) -> (f64, Vec<(String, Vec<f64>)>) {
    let training = graft::train::training_graph(model, graft::train::Task::SeqCls).unwrap();
    let mut session = training_session(&training, true);
    let feeds = bert_training_feeds(model, &training, &session, overrides);
    let outputs = session.run(&feeds).unwrap();
    let get = |name: &str| outputs.iter().find(|(n, _)| n == name).unwrap().1.to_f64();
    let gradients = training
        .gradients
        .iter()
        .map(|(tensor, gradient)| (tensor.clone(), get(gradient)))
        .collect();
    (get(&training.loss)[0], gradients)
}

/// AdaLoRA's orthogonality term enters the loss: the gradient of A (which the task loss
/// barely reaches at E ≈ 0) matches central differences of the whole loss, and differs from
/// the gradient without the term.
#[test]
fn a_loss_term_changes_gradients_as_central_differences_say() {
    let dir = tempfile::tempdir().unwrap();
    let apply = |weight: &str| {
        let path = dir.path().join(format!("adalora-{weight}.onnx"));
        apply_method(
            "bert-legacy",
            "adalora",
            &[
                "init_r=4",
                "target_r=2",
                &format!("orth_reg_weight={weight}"),
            ],
            &path,
        );
        let mut model = graft::onnx::load(&path).unwrap();
        randomize_trainable(&mut model);
        model
    };
    let with_term = apply("0.5");
    let without = apply("0");
    let (_, gradients) = loss_and_gradients(&with_term, &[]);
    let (_, plain) = loss_and_gradients(&without, &[]);
    let (name, analytic) = gradients.iter().find(|(n, _)| n.ends_with(".A")).unwrap();
    let (_, analytic_plain) = plain.iter().find(|(n, _)| n == name).unwrap();
    let change = analytic
        .iter()
        .zip(analytic_plain)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        change > 1e-3,
        "the loss term changes {name}'s gradient by only {change}"
    );

    let values = with_term.graph.initializer(name).unwrap().to_f32().unwrap();
    // float32 graph: a step of 1e-2 keeps the rounding error of the loss difference (~1e-7 /
    // 1e-2) well below the 1e-2 relative bar, and the curvature error (~h²) too.
    let h = 1e-2f32;
    for index in [0, 7, values.len() / 2, values.len() - 1] {
        let shifted = |delta: f32| {
            let mut v = values.clone();
            v[index] += delta;
            loss_and_gradients(&with_term, &[(name.clone(), v)]).0
        };
        let numeric = (shifted(h) - shifted(-h)) / (2.0 * h as f64);
        let got = analytic[index];
        assert!(
            (got - numeric).abs() <= 2e-3 + 1e-2 * numeric.abs(),
            "{name}[{index}]: gradient {got} vs central difference {numeric}"
        );
    }
}

/// `graft train --train lora` on a model with LoRA and BitFit trains LoRA only: BitFit's
/// tensors come out byte-identical; an unknown method is refused with the known ones named.
#[test]
fn frozen_methods_stay_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("patched.onnx");
    let model = fixture_model("bert-legacy");
    let (code, stdout, stderr) = run_graft(&[
        "apply",
        model.to_str().unwrap(),
        "-m",
        "lora",
        "-m",
        "bitfit",
        "-o",
        patched.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let data = repository("examples/data/sentiment.jsonl");
    let tokenizer = repository("models/tokenizers/bert/tokenizer.json");
    let run = dir.path().join("run");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            patched.to_str().unwrap(),
            "--task",
            "seq-cls",
            "--data",
            data.to_str().unwrap(),
            "--tokenizer",
            tokenizer.to_str().unwrap(),
            "--steps",
            "3",
            "--lr",
            "1e-2",
            "--out",
            run.to_str().unwrap(),
        ];
        args.extend(extra);
        run_graft(&args)
    };
    let (code, stdout, stderr) = train(&["--train", "lora"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let record = graft::patch::read_record(&graft::onnx::load(&patched).unwrap()).unwrap();
    let base = graft::onnx::load(&patched).unwrap();
    let trained = read_tensors(&run.join("adapter.safetensors"));
    let (mut frozen, mut changed) = (0, 0);
    for method in &record.methods {
        for name in &method.trainable {
            let (_, _, values) = trained.iter().find(|(n, _, _)| n == name).unwrap();
            let before = base.graph.initializer(name).unwrap().to_f32().unwrap();
            let same = values
                .iter()
                .zip(&before)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            if method.method == "bitfit" {
                assert!(same, "frozen bitfit tensor {name} changed");
                frozen += 1;
            } else if !same {
                changed += 1;
            }
        }
    }
    assert!(
        frozen > 0 && changed > 0,
        "frozen {frozen}, changed {changed}"
    );

    let (code, _, stderr) = train(&["--train", "adapter"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--train adapter") && stderr.contains("lora, bitfit"),
        "{stderr}"
    );
}

/// ARCHITECTURE.md's training-graph invariant on a model with a loss term, a step hook and
/// a second, frozen method: default-domain ops only; the trained tensors are graph inputs and
/// no longer initializers, the frozen method's stay initializers; outputs are the loss, then
/// one `<tensor>_grad` per trained tensor, then the loss terms.
#[test]
fn training_graphs_keep_their_contract() {
    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("patched.onnx");
    let (code, stdout, stderr) = run_graft(&[
        "apply",
        fixture_model("bert-legacy").to_str().unwrap(),
        "-m",
        "adalora",
        "--set",
        "adalora.init_r=4",
        "--set",
        "adalora.target_r=2",
        "-m",
        "bitfit",
        "-o",
        patched.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let model = graft::onnx::load(&patched).unwrap();
    let record = graft::patch::read_record(&model).unwrap();
    let methods = vec!["adalora".to_owned()];
    let training =
        graft::train::training_graph_for(&model, graft::train::Task::SeqCls, &methods).unwrap();
    let graph = &training.model.graph;
    assert!(graph.nodes.iter().all(|n| n.domain.is_empty()));
    let adalora = record
        .methods
        .iter()
        .find(|m| m.method == "adalora")
        .unwrap();
    let bitfit = record
        .methods
        .iter()
        .find(|m| m.method == "bitfit")
        .unwrap();
    for name in &adalora.trainable {
        assert!(
            graph.inputs.iter().any(|i| &i.name == name),
            "{name} is not an input"
        );
        assert!(
            graph.initializer(name).is_none(),
            "{name} is still an initializer"
        );
    }
    for name in &bitfit.trainable {
        assert!(
            graph.initializer(name).is_some(),
            "frozen {name} is not an initializer"
        );
    }
    let outputs: Vec<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
    let mut expected = vec![training.loss.clone()];
    expected.extend(adalora.trainable.iter().map(|t| format!("{t}_grad")));
    expected.extend(training.loss_terms.iter().map(|(_, output)| output.clone()));
    assert_eq!(
        outputs,
        expected.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(training.loss_terms.len(), 1);
    assert_eq!(training.loss_terms[0].0, "adalora.orthogonality");
}

/// Host-fed inputs reach the graph and a step hook's values come back: a probe method reads
/// the training mode, the step, the progress, an int64 value its hook sets, and 1000 uniform
/// draws, through loss terms of weight 0 that `metrics.jsonl` logs. Per step k of 4: the mode
/// is 1, the step k, the progress (k−1)/4, the value the hook set after step k−1 (k−1, 0 at
/// first), and the draws' sum changes every step but repeats in a second run.
#[test]
fn host_inputs_are_fed_and_a_step_hook_sets_them() {
    use graft::patch::{apply_patch, AppliedMethod};
    use graft_plugin_sdk::{
        DType, HostArray, HostInput, HostInputKind, Init, LossTerm, PatchBuilder, SiteKind,
        StepHook, StepReply, StepRequest,
    };

    let mut model = graft::onnx::load(&fixture_model("bert-legacy")).unwrap();
    let view = graft::plugins::graph_view(&model).unwrap();
    let mut b = PatchBuilder::new(&view, "probe");
    let site = view
        .sites()
        .find(|s| s.site.kind == SiteKind::V)
        .unwrap()
        .site
        .clone();
    let seed = b.next_seed();
    b.low_rank_branch(
        &site,
        2,
        1.0,
        Init::linear_default(site.in_features, seed),
        Init::Zeros,
        None,
    )
    .unwrap();
    let input = |name: &str, kind, dtype, shape: Vec<usize>| HostInput {
        name: name.into(),
        kind,
        dtype,
        shape,
        default: Init::Zeros,
    };
    let host_inputs = vec![
        input(
            "probe.mode",
            HostInputKind::TrainingMode,
            DType::Bool,
            vec![],
        ),
        input("probe.step", HostInputKind::Step, DType::Float, vec![]),
        input(
            "probe.progress",
            HostInputKind::Progress,
            DType::Float,
            vec![1],
        ),
        input("probe.value", HostInputKind::Value, DType::Int64, vec![1]),
        input(
            "probe.uniform",
            HostInputKind::Uniform,
            DType::Float,
            vec![1000],
        ),
    ];
    let to_float = |b: &mut PatchBuilder, name: &str| {
        b.op(
            &format!("{name}.float"),
            "Cast",
            &[name],
            &[("to", graft_plugin_sdk::AttributeValue::Int(1))],
        )
    };
    let mode = to_float(&mut b, "probe.mode");
    let value = to_float(&mut b, "probe.value");
    let step_plus_mode = b.op("probe.step_plus_mode", "Add", &["probe.step", &mode], &[]);
    let with_value = b.op("probe.with_value", "Add", &[&step_plus_mode, &value], &[]);
    let draws = b.op("probe.draws", "ReduceSum", &["probe.uniform"], &[]);
    let mut reply = b.finish();
    let term = |name: &str, value: &str| LossTerm {
        name: name.into(),
        value: value.into(),
        weight: 0.0,
    };
    reply.patch.training.loss_terms = vec![
        term("inputs", &with_value),
        term("progress", "probe.progress"),
        term("draws", &draws),
    ];
    reply.patch.training.host_inputs = host_inputs;
    reply.patch.training.step_hook = Some(StepHook::default());
    let method = AppliedMethod {
        method: "probe".into(),
        plugin: "core/tests/participation.rs".into(),
        ..AppliedMethod::default()
    };
    apply_patch(&mut model, &reply, method).unwrap();

    /// Sets the value input to the step just finished, after checking it sees the last one.
    struct Hooks;
    impl graft::train::participation::StepHooks for Hooks {
        fn step(&self, _: &AppliedMethod, request: &StepRequest) -> graft::Result<StepReply> {
            let seen = request.values["probe.value"].data[0];
            assert_eq!(
                seen,
                request.step as f32 - 1.0,
                "the hook sees its last value"
            );
            let mut reply = StepReply::default();
            let array = HostArray::new(vec![1], vec![request.step as f32]).unwrap();
            reply.set.insert("probe.value".into(), array);
            Ok(reply)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &str| {
        let options = graft::train::TrainOptions {
            task: graft::train::Task::SeqCls,
            data: repository("examples/data/sentiment.jsonl"),
            data_format: graft::train::data::DataFormat::Auto,
            tokenizer: Some(repository("models/tokenizers/bert/tokenizer.json")),
            max_len: 32,
            eval_data: None,
            eval_every: None,
            eval_at_start: false,
            eval_sweep: None,
            save_every: None,
            resume: false,
            accept_changes: false,
            out: dir.path().join(out),
            steps: Some(4),
            epochs: 1,
            batch_size: 4,
            grad_accumulation: 1,
            lr: 1e-3,
            optimizer: graft::train::optimizer::OptimizerKind::Sgd {
                momentum: 0.0,
                weight_decay: 0.0,
            },
            warmup: 0,
            schedule: graft::train::optimizer::Schedule::Constant,
            clip_norm: None,
            seed: 5,
            shuffle: false,
            skip_bad_lines: false,
            session: Default::default(),
            train_methods: vec![],
        };
        graft::train::train(&model, &options, &Hooks, |_| {}).unwrap();
        std::fs::read_to_string(dir.path().join(out).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss_terms"].clone())
            .collect::<Vec<_>>()
    };
    let first = run("first");
    assert_eq!(first.len(), 4);
    for (index, terms) in first.iter().enumerate() {
        let k = index as f64 + 1.0;
        assert_eq!(
            terms["probe.inputs"].as_f64(),
            Some(k + 1.0 + (k - 1.0)),
            "step {k}"
        );
        assert_eq!(
            terms["probe.progress"].as_f64(),
            Some((k - 1.0) / 4.0),
            "step {k}"
        );
        let draws = terms["probe.draws"].as_f64().unwrap();
        assert!(
            (400.0..600.0).contains(&draws),
            "step {k}: 1000 draws sum to {draws}"
        );
    }
    assert_ne!(first[0]["probe.draws"], first[1]["probe.draws"]);
    assert_eq!(first, run("second"), "the same seed draws the same values");
}
