//! Soft prompts (the `prompt` plugin). Prompt tuning: HF PEFT's prompt-tuning adapters
//! (recorded by models/record_references.py) import and compute what PEFT computed, on both
//! exporters; graft's own prompts export to files PEFT loads and computes the same with
//! (recorded by models/check_graft_export.py); an empty prompt changes nothing; prompts train
//! for classification and language modelling; the graph runs in tract; bad settings are
//! refused by name. Prefix tuning, on the models exported with a key/value cache: the same
//! parity both ways with PEFT's `PREFIX_TUNING`, generation step by step, training, gradients.

mod common;

use common::*;
use graft::runtime::HostTensor;

/// PEFT computes in float32 in another operation order.
const PARITY_TOLERANCE: f64 = 1e-5;

/// The settings models/check_graft_export.py grafts with (`PROMPT_SETTINGS`).
const EXPORT_SETTINGS: [&str; 2] = ["num_virtual_tokens=4", "seed=7"];

const ARCHS: [&str; 3] = ["bert", "gpt2", "llama"];

/// `graft export PATCHED --format peft -o OUT`, asserting success; returns the written
/// `adapter_config.json`.
fn export_peft(patched: &std::path::Path, out: &std::path::Path) -> serde_json::Value {
    let (code, stdout, stderr) =
        run_graft(&["export", text(patched), "--format", "peft", "-o", text(out)]);
    assert_eq!(code, 0, "export of {}: {stdout}{stderr}", patched.display());
    read_json(&out.join("adapter_config.json"))
}

/// `graft apply FIXTURE --from-peft ADAPTER -o OUT`, asserting success; returns its stdout.
fn import_peft(fixture: &str, adapter: &std::path::Path, out: &std::path::Path) -> String {
    let (code, stdout, stderr) = run_graft(&[
        "apply",
        text(&fixture_model(fixture)),
        "--from-peft",
        text(adapter),
        "-o",
        text(out),
    ]);
    assert_eq!(
        code,
        0,
        "{fixture} from {}: {stdout}{stderr}",
        adapter.display()
    );
    stdout
}

/// Checks every gradient of `model`'s training graph for `task` against central differences
/// of the loss (step 1e-3) at the first, middle and last element of each trained tensor;
/// returns the number of tensors checked.
fn assert_gradients_match_central_differences(
    model: &graft::ir::Model,
    fixture: &str,
    task: graft::train::Task,
) -> usize {
    let (_, gradients) = loss_and_gradients(model, fixture, task, &[]);
    for (name, analytic) in &gradients {
        let values = model.graph.initializer(name).unwrap().to_f32().unwrap();
        let h = 1e-3f32;
        for index in [0, values.len() / 2, values.len() - 1] {
            let shifted = |delta: f32| {
                let mut v = values.clone();
                v[index] += delta;
                loss_and_gradients(model, fixture, task, &[(name.clone(), v)]).0
            };
            let numeric = (shifted(h) - shifted(-h)) / (2.0 * h as f64);
            let got = analytic[index];
            assert!(
                (got - numeric).abs() <= 2e-3 + 1e-2 * numeric.abs(),
                "{fixture} {name}[{index}]: gradient {got} vs central difference {numeric}"
            );
        }
    }
    gradients.len()
}

#[test]
fn peft_prompt_adapters_import_and_reproduce_peft() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let recording = reference(&format!("peft-prompt-{arch}"));
        let want = graft::runtime::read_npz(&recording.join("outputs.npz")).unwrap();
        for exporter in ["legacy", "dynamo"] {
            let fixture = format!("{arch}-{exporter}");
            let patched = dir.path().join(format!("{fixture}.onnx"));
            let stdout = import_peft(&fixture, &recording, &patched);
            assert!(
                stdout.contains("prompt_tuning: 4 virtual tokens"),
                "{stdout}"
            );
            let model = graft::onnx::load(&patched).unwrap();
            let got = run_model(&model, &fixture_inputs(&fixture));
            // PEFT's outputs carry the virtual positions too: [B, 4 + S, V] for the LMs.
            assert_eq!(logits(&got).shape(), logits(&want).shape(), "{fixture}");
            let diff = logits(&got).max_abs_diff(logits(&want));
            assert!(diff <= PARITY_TOLERANCE, "{fixture}: graft vs PEFT {diff}");
            if arch == "bert" {
                // PEFT trains the classifier with the prompt (modules_to_save): it is imported.
                assert!(stdout.contains("replaced classifier.weight"), "{stdout}");
            }
        }
    }
}

#[test]
fn graft_prompts_export_to_files_peft_reproduces() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let recording = reference(&format!("graft-export-prompt-{arch}"));
        let want = graft::runtime::read_npz(&recording.join("outputs.npz")).unwrap();
        for exporter in ["legacy", "dynamo"] {
            let fixture = format!("{arch}-{exporter}");
            let patched = dir.path().join(format!("{fixture}.onnx"));
            apply_method(&fixture, "prompt_tuning", &EXPORT_SETTINGS, &patched);
            let model = graft::onnx::load(&patched).unwrap();
            let got = run_model(&model, &fixture_inputs(&fixture));
            let diff = logits(&got).max_abs_diff(logits(&want));
            assert!(
                diff <= PARITY_TOLERANCE,
                "{fixture}: graft vs PEFT on graft's export {diff}"
            );
            let exported = dir.path().join(format!("{fixture}-peft"));
            let config = export_peft(&patched, &exported);
            assert_eq!(
                read_tensors(&exported.join("adapter_model.safetensors")),
                read_tensors(&recording.join("adapter_model.safetensors")),
                "{fixture}: the exported tensors differ from the checked export"
            );
            assert_eq!(config["peft_type"], "PROMPT_TUNING");
            assert_eq!(config["num_virtual_tokens"], 4);
            let task = if arch == "bert" {
                "SEQ_CLS"
            } else {
                "CAUSAL_LM"
            };
            assert_eq!(config["task_type"], task, "{fixture}");
        }
    }
}

/// With no virtual tokens nothing is grafted and the outputs are the base model's (in ONNX
/// Runtime), bit for bit.
#[test]
fn an_empty_prompt_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for fixture in [
        "bert-legacy",
        "gpt2-dynamo",
        "llama-legacy",
        "roberta-dynamo",
    ] {
        let patched = dir.path().join(format!("{fixture}.onnx"));
        apply_method(
            fixture,
            "prompt_tuning",
            &["num_virtual_tokens=0"],
            &patched,
        );
        let model = graft::onnx::load(&patched).unwrap();
        let got = run_model(&model, &fixture_inputs(fixture));
        let base = graft::onnx::load(&fixture_model(fixture)).unwrap();
        let want = run_model(&base, &fixture_inputs(fixture));
        assert_eq!(logits(&got).max_abs_diff(logits(&want)), 0.0, "{fixture}");
    }
}

/// The prompted graphs are standard ONNX: tract runs them (RoBERTa's too, whose position ids
/// the graph derives from the token ids) with ONNX Runtime's outputs, and so it runs the
/// prefixed cache models (with a past, `present` outputs included) and P-Tuning's encoder.
#[test]
fn prompts_run_in_tract_as_in_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    for (fixture, method) in [
        ("bert-legacy", "prompt_tuning"),
        ("gpt2-legacy", "prompt_tuning"),
        ("llama-dynamo", "prompt_tuning"),
        ("roberta-legacy", "prompt_tuning"),
        ("gpt2-dynamo", "p_tuning"),
        ("gpt2-past-legacy", "prefix_tuning"),
        ("llama-past-dynamo", "prefix_tuning"),
    ] {
        let patched = dir.path().join(format!("{fixture}-{method}.onnx"));
        apply_method(fixture, method, &EXPORT_SETTINGS, &patched);
        let model = graft::onnx::load(&patched).unwrap();
        let inputs = fixture_inputs(fixture);
        let ort = run_model(&model, &inputs);
        let tract = run_tract(&model, &inputs).unwrap();
        for (name, value) in &ort {
            let other = &tract.iter().find(|(n, _)| n == name).unwrap().1;
            let diff = value.max_abs_diff(other);
            assert!(
                diff <= 1e-5,
                "{fixture} {method} {name}: tract vs ONNX Runtime {diff}"
            );
        }
    }
}

#[test]
fn prompts_train_for_classification_and_language_modelling() {
    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("bert.onnx");
    apply_method(
        "bert-legacy",
        "prompt_tuning",
        &["num_virtual_tokens=8"],
        &patched,
    );
    let run = dir.path().join("run-bert");
    let eval = repository("examples/data/sentiment_eval.jsonl");
    let (code, stdout, stderr) = train_seq_cls(
        &patched,
        "examples/data/sentiment.jsonl",
        40,
        &run,
        &["--eval-data", text(&eval)],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_loss_falls(&metrics(&run));
    assert!(stdout.contains("best evaluation accuracy"), "{stdout}");
    // The prompt and the classifier train (PEFT's modules_to_save), nothing else.
    let trained: Vec<String> = read_tensors(&run.join("adapter.safetensors"))
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    assert_eq!(trained.len(), 3, "{trained:?}");
    assert!(
        trained.iter().any(|n| n.ends_with("prompt.embedding")),
        "{trained:?}"
    );

    // Causal LM: the labels are shifted past the prompt, as PEFT prefixes them with -100.
    let patched = dir.path().join("gpt2.onnx");
    apply_method(
        "gpt2-legacy",
        "prompt_tuning",
        &["num_virtual_tokens=8"],
        &patched,
    );
    let run = dir.path().join("run-gpt2");
    let corpus = repository("examples/data/corpus.txt");
    let tokenizer = repository("models/tokenizers/causal/tokenizer.json");
    let (code, stdout, stderr) = run_graft(&[
        "train",
        text(&patched),
        "--task",
        "causal-lm",
        "--data",
        text(&corpus),
        "--tokenizer",
        text(&tokenizer),
        "--max-len",
        "64",
        "--steps",
        "30",
        "--batch-size",
        "4",
        "--lr",
        "0.05",
        "--out",
        text(&run),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_loss_falls(&metrics(&run));
    let config = read_json(&run.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "PROMPT_TUNING");
}

/// `init=sample_vocab` starts the prompt from rows of the vocabulary, `init=tokens` from the
/// given ids, repeated to the prompt's length as PEFT's TEXT init repeats the text's tokens.
#[test]
fn prompts_start_from_vocabulary_rows() {
    let dir = tempfile::tempdir().unwrap();
    let base = graft::onnx::load(&fixture_model("llama-legacy")).unwrap();
    let table = base
        .graph
        .initializers
        .iter()
        .find(|t| t.dims.len() == 2 && t.dims[0] == 128)
        .expect("the token embedding table")
        .to_f32()
        .unwrap();
    let width = 32;
    let row = |i: usize| table[i * width..(i + 1) * width].to_vec();
    let prompt_rows = |settings: &[&str]| {
        let patched = dir.path().join("p.onnx");
        apply_method("llama-legacy", "prompt_tuning", settings, &patched);
        let model = graft::onnx::load(&patched).unwrap();
        let prompt = model
            .graph
            .initializers
            .iter()
            .find(|t| t.name.ends_with("prompt.embedding"))
            .unwrap()
            .to_f32()
            .unwrap();
        prompt
            .chunks(width)
            .map(<[f32]>::to_vec)
            .collect::<Vec<_>>()
    };
    let rows = prompt_rows(&["num_virtual_tokens=5", "init=tokens", "init_tokens=3,17"]);
    assert_eq!(rows, [row(3), row(17), row(3), row(17), row(3)]);
    let rows = prompt_rows(&["num_virtual_tokens=6", "init=sample_vocab"]);
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| (0..128).any(|i| row(i) == *r)));
}

#[test]
fn bad_prompt_settings_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    for (fixture, settings, needle) in [
        (
            "bert-legacy",
            vec!["init=learned"],
            "init: \"learned\" is not one of",
        ),
        (
            "bert-legacy",
            vec!["init=tokens"],
            "init=tokens needs init_tokens",
        ),
        (
            "bert-legacy",
            vec!["init=tokens", "init_tokens=99999"],
            "below the vocabulary size",
        ),
        ("bert-legacy", vec!["task_type=SEQCLS"], "task_type"),
        ("gpt2-past-legacy", vec![], "key/value cache"),
    ] {
        let mut args = vec![
            "apply".to_owned(),
            text(&fixture_model(fixture)).to_owned(),
            "-m".into(),
            "prompt_tuning".into(),
        ];
        for setting in settings {
            args.push("--set".into());
            args.push(setting.into());
        }
        args.extend(["-o".into(), text(&out).to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = run_graft(&args);
        assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out.exists());
    }
}

/// The prompt's (and the trained classifier's) gradients agree with central differences of
/// the loss, for classification and for language modelling, where the labels are shifted past
/// the virtual positions.
#[test]
fn prompt_gradients_match_central_differences() {
    let registry =
        graft::plugins::PluginRegistry::discover(&[plugin_library("graft_plugin_prompt")]).unwrap();
    for (fixture, task) in [
        ("bert-legacy", graft::train::Task::SeqCls),
        ("gpt2-legacy", graft::train::Task::CausalLm),
        ("llama-dynamo", graft::train::Task::CausalLm),
    ] {
        let mut model = graft::onnx::load(&fixture_model(fixture)).unwrap();
        graft::plugins::apply_method(
            &registry,
            &mut model,
            "prompt_tuning",
            &serde_json::json!({"num_virtual_tokens": 3, "init_std": 0.5}),
        )
        .unwrap();
        let gradients = assert_gradients_match_central_differences(&model, fixture, task);
        assert!(gradients > 0, "{fixture}: no gradients");
    }
}

// Prefix tuning (`prefix_tuning`): the prefix is every layer's key/value cache, on the models
// exported with a cache.

const CACHE_FIXTURES: [&str; 4] = [
    "gpt2-past-legacy",
    "gpt2-past-dynamo",
    "llama-past-legacy",
    "llama-past-dynamo",
];

fn arch_of(fixture: &str) -> &str {
    fixture.split('-').next().unwrap()
}

/// `inputs` plus an empty cache (`[batch, heads, 0, head_dim]`) for each cache input of
/// `model` that `inputs` lacks.
fn with_empty_caches(
    model: &graft::ir::Model,
    mut inputs: Vec<(String, HostTensor)>,
) -> Vec<(String, HostTensor)> {
    let batch = inputs[0].1.shape()[0];
    for input in &model.graph.inputs {
        if !input.name.starts_with("past") || inputs.iter().any(|(n, _)| *n == input.name) {
            continue;
        }
        let shape = input.value_type().unwrap().shape.unwrap();
        let fixed = |d: &graft::ir::Dim| match d {
            graft::ir::Dim::Fixed(n) => *n as usize,
            other => panic!("{}: {other:?}", input.name),
        };
        let dims = [batch, fixed(&shape[1]), 0, fixed(&shape[3])];
        inputs.push((
            input.name.clone(),
            HostTensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&dims))),
        ));
    }
    inputs
}

#[test]
fn peft_prefix_adapters_import_and_reproduce_peft() {
    let dir = tempfile::tempdir().unwrap();
    for fixture in CACHE_FIXTURES {
        let recording = reference(&format!("peft-prefix-{}", arch_of(fixture)));
        let want = graft::runtime::read_npz(&recording.join("outputs.npz")).unwrap();
        let inputs = graft::runtime::read_npz(&recording.join("inputs.npz")).unwrap();
        let patched = dir.path().join(format!("{fixture}.onnx"));
        let stdout = import_peft(fixture, &recording, &patched);
        assert!(
            stdout.contains("prefix_tuning: 4 virtual tokens"),
            "{stdout}"
        );
        let model = graft::onnx::load(&patched).unwrap();
        let got = run_model(&model, &with_empty_caches(&model, inputs));
        let diff = logits(&got).max_abs_diff(logits(&want));
        assert!(diff <= PARITY_TOLERANCE, "{fixture}: graft vs PEFT {diff}");
    }
}

#[test]
fn graft_prefixes_export_to_files_peft_reproduces() {
    let dir = tempfile::tempdir().unwrap();
    for fixture in CACHE_FIXTURES {
        let arch = arch_of(fixture);
        let recording = reference(&format!("graft-export-prefix-{arch}"));
        let want = graft::runtime::read_npz(&recording.join("outputs.npz")).unwrap();
        let inputs =
            graft::runtime::read_npz(&reference(&format!("peft-prefix-{arch}/inputs.npz")))
                .unwrap();
        let patched = dir.path().join(format!("{fixture}.onnx"));
        apply_method(fixture, "prefix_tuning", &EXPORT_SETTINGS, &patched);
        let model = graft::onnx::load(&patched).unwrap();
        let got = run_model(&model, &with_empty_caches(&model, inputs));
        let diff = logits(&got).max_abs_diff(logits(&want));
        assert!(
            diff <= PARITY_TOLERANCE,
            "{fixture}: graft vs PEFT on graft's export {diff}"
        );
        let exported = dir.path().join(format!("{fixture}-peft"));
        export_peft(&patched, &exported);
        assert_eq!(
            read_tensors(&exported.join("adapter_model.safetensors")),
            read_tensors(&recording.join("adapter_model.safetensors")),
            "{fixture}"
        );
    }
}

/// With a past, the prefixed model is the base model given the prefix in front of its cache
/// (and ones in front of its mask), and its `present` outputs return the cache without the
/// prefix; so generating step by step, each step fed the last one's `present`, gives what one
/// run over the whole sequence gives.
#[test]
fn a_prefix_leaves_generation_working() {
    let dir = tempfile::tempdir().unwrap();
    for fixture in CACHE_FIXTURES {
        let patched = dir.path().join(format!("{fixture}.onnx"));
        apply_method(fixture, "prefix_tuning", &EXPORT_SETTINGS, &patched);
        let model = graft::onnx::load(&patched).unwrap();
        let ids = fixture_inputs(fixture)
            .into_iter()
            .find(|(n, _)| n == "input_ids")
            .unwrap()
            .1;
        let HostTensor::I64(ids) = ids else {
            panic!("int64 ids")
        };
        let columns = |from: usize, to: usize| {
            HostTensor::I64(ids.slice(ndarray::s![.., from..to]).to_owned().into_dyn())
        };
        let ones = |width: usize| {
            HostTensor::I64(ndarray::ArrayD::ones(ndarray::IxDyn(&[
                ids.shape()[0],
                width,
            ])))
        };
        let length = ids.shape()[1];
        let whole = run_model(
            &model,
            &with_empty_caches(
                &model,
                vec![
                    ("input_ids".into(), columns(0, length)),
                    ("attention_mask".into(), ones(length)),
                ],
            ),
        );
        let split = 4;
        let first = run_model(
            &model,
            &with_empty_caches(
                &model,
                vec![
                    ("input_ids".into(), columns(0, split)),
                    ("attention_mask".into(), ones(split)),
                ],
            ),
        );
        let mut second_inputs = vec![
            ("input_ids".to_owned(), columns(split, length)),
            ("attention_mask".to_owned(), ones(length)),
        ];
        for (name, value) in &first {
            if let Some(layer_part) = name.strip_prefix("present") {
                assert_eq!(
                    value.shape()[2],
                    split,
                    "{fixture} {name}: the prefix is returned"
                );
                second_inputs.push((format!("past_key_values{layer_part}"), value.clone()));
            }
        }
        let second = run_model(&model, &second_inputs);
        let HostTensor::F32(all) = logits(&whole) else {
            panic!()
        };
        let HostTensor::F32(last) = logits(&second) else {
            panic!()
        };
        let tail = all.slice(ndarray::s![.., split.., ..]).to_owned();
        let diff = (&tail - last).mapv(f32::abs).fold(0.0f32, |a, &b| a.max(b));
        assert!(diff <= 1e-5, "{fixture}: step by step vs at once {diff}");
    }
}

#[test]
fn prefixes_change_nothing_when_empty_train_and_are_refused_without_a_cache() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = "llama-past-legacy";
    let empty = dir.path().join("empty.onnx");
    apply_method(fixture, "prefix_tuning", &["num_virtual_tokens=0"], &empty);
    let base = graft::onnx::load(&fixture_model(fixture)).unwrap();
    let inputs = fixture_inputs(fixture);
    let unchanged = run_model(&graft::onnx::load(&empty).unwrap(), &inputs);
    assert_eq!(
        logits(&unchanged).max_abs_diff(logits(&run_model(&base, &inputs))),
        0.0
    );

    let patched = dir.path().join("gpt2.onnx");
    apply_method(
        "gpt2-past-dynamo",
        "prefix_tuning",
        &["num_virtual_tokens=8"],
        &patched,
    );
    let run = dir.path().join("run");
    let (code, stdout, stderr) = run_graft(&[
        "train",
        text(&patched),
        "--task",
        "causal-lm",
        "--data",
        text(&repository("examples/data/corpus.txt")),
        "--tokenizer",
        text(&repository("models/tokenizers/causal/tokenizer.json")),
        "--max-len",
        "64",
        "--steps",
        "30",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--out",
        text(&run),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_loss_falls(&metrics(&run));
    let config = read_json(&run.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "PREFIX_TUNING");

    let out = dir.path().join("refused.onnx");
    let (code, _, stderr) = run_graft(&[
        "apply",
        text(&fixture_model("gpt2-legacy")),
        "-m",
        "prefix_tuning",
        "-o",
        text(&out),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no cache inputs"), "{stderr}");
    assert!(!out.exists());
}

/// The prefix's gradients agree with central differences of the causal-LM loss, with a past.
#[test]
fn prefix_gradients_match_central_differences() {
    let registry =
        graft::plugins::PluginRegistry::discover(&[plugin_library("graft_plugin_prompt")]).unwrap();
    for fixture in ["gpt2-past-legacy", "llama-past-dynamo"] {
        let mut model = graft::onnx::load(&fixture_model(fixture)).unwrap();
        graft::plugins::apply_method(
            &registry,
            &mut model,
            "prefix_tuning",
            &serde_json::json!({"num_virtual_tokens": 2, "init_std": 0.5}),
        )
        .unwrap();
        let task = graft::train::Task::CausalLm;
        let gradients = assert_gradients_match_central_differences(&model, fixture, task);
        assert_eq!(gradients, 1, "{fixture}");
    }
}

// P-Tuning (`p_tuning`): a trained MLP prompt encoder computes the virtual tokens; `graft
// merge` bakes them into a table, and PEFT's `P_TUNING` files hold that table.

#[test]
fn p_tuning_bakes_its_encoder_and_exports_what_peft_reproduces() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["bert", "gpt2"] {
        let recording = reference(&format!("graft-export-p_tuning-{arch}"));
        let want = graft::runtime::read_npz(&recording.join("outputs.npz")).unwrap();
        for exporter in ["legacy", "dynamo"] {
            let fixture = format!("{arch}-{exporter}");
            let inputs = fixture_inputs(&fixture);
            let patched = dir.path().join(format!("{fixture}.onnx"));
            apply_method(&fixture, "p_tuning", &EXPORT_SETTINGS, &patched);
            let model = graft::onnx::load(&patched).unwrap();
            let got = run_model(&model, &inputs);
            let diff = logits(&got).max_abs_diff(logits(&want));
            assert!(
                diff <= PARITY_TOLERANCE,
                "{fixture}: graft vs PEFT on graft's export {diff}"
            );

            // The merge evaluates the encoder once: the same outputs from a plain table.
            let merged = dir.path().join(format!("{fixture}-merged.onnx"));
            let (code, stdout, stderr) = run_graft(&["merge", text(&patched), "-o", text(&merged)]);
            assert_eq!(code, 0, "{fixture}: {stdout}{stderr}");
            let merged = graft::onnx::load(&merged).unwrap();
            assert!(
                !merged
                    .graph
                    .nodes
                    .iter()
                    .any(|n| n.name.starts_with("p_tuning.encoder")),
                "{fixture}: the encoder is still in the merged graph"
            );
            let baked = run_model(&merged, &inputs);
            assert_eq!(logits(&baked).max_abs_diff(logits(&got)), 0.0, "{fixture}");

            let exported = dir.path().join(format!("{fixture}-peft"));
            let config = export_peft(&patched, &exported);
            assert_eq!(config["peft_type"], "P_TUNING");
            // PEFT's P_TUNING files import as the table they hold.
            let imported = dir.path().join(format!("{fixture}-imported.onnx"));
            import_peft(&fixture, &recording, &imported);
            let again = run_model(&graft::onnx::load(&imported).unwrap(), &inputs);
            let diff = logits(&again).max_abs_diff(logits(&want));
            assert!(
                diff <= PARITY_TOLERANCE,
                "{fixture}: imported P_TUNING {diff}"
            );
        }
    }
}

/// The gradients reach the encoder's input embeddings and every layer of the MLP.
#[test]
fn p_tuning_gradients_match_central_differences() {
    let registry =
        graft::plugins::PluginRegistry::discover(&[plugin_library("graft_plugin_prompt")]).unwrap();
    let fixture = "gpt2-legacy";
    let mut model = graft::onnx::load(&fixture_model(fixture)).unwrap();
    graft::plugins::apply_method(
        &registry,
        &mut model,
        "p_tuning",
        &serde_json::json!({"num_virtual_tokens": 2, "encoder_hidden_size": 8}),
    )
    .unwrap();
    let task = graft::train::Task::CausalLm;
    let gradients = assert_gradients_match_central_differences(&model, fixture, task);
    assert_eq!(gradients, 7, "embedding + 3 × (weight, bias)");
}

/// With `prefix_projection` the prefix is an MLP's output (the paper's reparameterization):
/// its gradients reach every layer of the MLP, `graft merge` bakes it into the table, and the
/// PEFT export holds that table, which imports back to the same outputs.
#[test]
fn projected_prefixes_train_through_their_mlp_and_bake() {
    let registry =
        graft::plugins::PluginRegistry::discover(&[plugin_library("graft_plugin_prompt")]).unwrap();
    let fixture = "llama-past-legacy";
    let mut model = graft::onnx::load(&fixture_model(fixture)).unwrap();
    graft::plugins::apply_method(
        &registry,
        &mut model,
        "prefix_tuning",
        &serde_json::json!({
            "num_virtual_tokens": 2, "prefix_projection": true, "encoder_hidden_size": 8
        }),
    )
    .unwrap();
    let task = graft::train::Task::CausalLm;
    let gradients = assert_gradients_match_central_differences(&model, fixture, task);
    assert_eq!(gradients, 5, "embedding + 2 × (weight, bias)");

    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("projected.onnx");
    graft::onnx::save(&model, &patched, &Default::default()).unwrap();
    let inputs = fixture_inputs(fixture);
    let want = run_model(&model, &inputs);
    let merged = dir.path().join("merged.onnx");
    let (code, stdout, stderr) = run_graft(&["merge", text(&patched), "-o", text(&merged)]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let baked = run_model(&graft::onnx::load(&merged).unwrap(), &inputs);
    assert_eq!(logits(&baked).max_abs_diff(logits(&want)), 0.0);
    let exported = dir.path().join("peft");
    export_peft(&patched, &exported);
    let imported = dir.path().join("imported.onnx");
    import_peft(fixture, &exported, &imported);
    let again = run_model(&graft::onnx::load(&imported).unwrap(), &inputs);
    let diff = logits(&again).max_abs_diff(logits(&want));
    assert!(diff <= 1e-6, "the exported table computes {diff} away");
}
