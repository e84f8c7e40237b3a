//! `graft import-hf`: graphs built from Hugging Face checkpoint folders compute what PyTorch
//! computed (models/record_hf_checkpoints.py recorded the folders and the outputs), graft's site
//! detection reads them, PEFT adapter files recorded on the exported fixtures apply to them, and
//! bad folders are refused by name.

mod common;

use std::path::Path;

use common::*;
use graft::import_hf::{import, Head, ImportOptions};
use graft::runtime::read_npz;

/// Every recorded checkpoint folder (`models/references/hf-<name>`).
const CHECKPOINTS: &[&str] = &[
    "bert-seq-cls",
    "roberta-seq-cls",
    "llama-causal",
    "minilm-base",
    "bert-token-cls",
    "xlmr-token-cls",
    "distilbert-seq-cls",
    "mistral-causal",
    "qwen2-causal",
    "llama3-rope-causal",
    "yarn-rope-causal",
];

/// Float32 arithmetic in another order than PyTorch's; the recordings' outputs are O(1).
const TOLERANCE: f64 = 1e-5;

fn checkpoint(name: &str) -> std::path::PathBuf {
    reference(&format!("hf-{name}"))
}

/// `graft import-hf DIR -o OUT EXTRA…`: (exit status, stdout, stderr).
fn import_hf_cli(dir: &Path, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "import-hf",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_graft(&args)
}

fn imported(dir: &Path, options: &ImportOptions) -> graft::ir::Model {
    import(dir, options)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .model
}

#[test]
fn every_checkpoint_computes_what_pytorch_computed() {
    for name in CHECKPOINTS {
        let dir = checkpoint(name);
        let model = imported(&dir, &ImportOptions::default());
        let inputs = read_npz(&dir.join("inputs.npz")).unwrap();
        let expected = read_npz(&dir.join("outputs.npz")).unwrap();
        let outputs = run_model(&model, &inputs);
        assert_eq!(outputs.len(), expected.len(), "{name}: outputs");
        let diff = max_diff(&expected, &outputs);
        assert!(
            diff <= TOLERANCE,
            "{name}: max |graft - PyTorch| = {diff:e}"
        );
        eprintln!("hf-{name}: max |graft - PyTorch| = {diff:.2e}");
    }
}

/// The checkpoints of the committed fixtures' own models give the fixtures' outputs, and
/// detection finds in the built graph what `expected.json` says the exported one has.
#[test]
fn fixture_models_rebuilt_from_their_checkpoints_match_the_exports() {
    for (name, fixture) in [
        ("bert-seq-cls", "bert-legacy"),
        ("roberta-seq-cls", "roberta-legacy"),
        ("llama-causal", "llama-legacy"),
    ] {
        let model = imported(&checkpoint(name), &ImportOptions::default());
        let diff = max_diff(
            &fixture_outputs(fixture),
            &run_model(&model, &fixture_inputs(fixture)),
        );
        assert!(diff <= TOLERANCE, "{name} on {fixture}'s inputs: {diff:e}");

        let built = graft::analysis::sites::detect(&model).unwrap();
        let exported =
            graft::analysis::sites::detect(&graft::onnx::load(&fixture_model(fixture)).unwrap())
                .unwrap();
        let shape = |s: &graft::analysis::sites::Structure| -> Vec<_> {
            (s.stacks.iter())
                .map(|stack| {
                    let sites: Vec<_> = (stack.layers.iter())
                        .flat_map(|l| l.sites.iter().map(|s| (s.kind, s.label.clone())))
                        .collect();
                    (
                        stack.n_layers,
                        stack.hidden_size,
                        stack.n_heads,
                        stack.n_kv_heads,
                        sites,
                    )
                })
                .collect()
        };
        assert_eq!(
            shape(&built),
            shape(&exported),
            "{name}: detected structure"
        );
    }
}

#[test]
fn a_decoder_with_a_kv_cache_matches_the_exported_cache_fixture() {
    let options = ImportOptions {
        kv_cache: true,
        ..Default::default()
    };
    let model = imported(&checkpoint("llama-causal"), &options);
    let fixture = "llama-past-legacy";
    let outputs = run_model(&model, &fixture_inputs(fixture));
    let expected = fixture_outputs(fixture);
    assert_eq!(outputs.len(), expected.len());
    let diff = max_diff(&expected, &outputs);
    assert!(
        diff <= TOLERANCE,
        "logits and present keys/values: {diff:e}"
    );
}

/// PEFT LoRA adapters recorded on the exported bert and llama fixtures apply to the imported
/// models by module path and give PEFT's outputs.
#[test]
fn peft_adapters_apply_to_imported_models() {
    let out = tempfile::tempdir().unwrap();
    for (name, fixture, adapter) in [
        ("bert-seq-cls", "bert-legacy", "peft-bert"),
        ("llama-causal", "llama-legacy", "peft-llama"),
    ] {
        let model_path = out.path().join(format!("{name}.onnx"));
        let dir = checkpoint(name);
        let (code, _, stderr) = import_hf_cli(&dir, &model_path, &[]);
        assert_eq!(code, 0, "{stderr}");
        let patched = out.path().join(format!("{name}-peft.onnx"));
        let adapter_dir = reference(adapter);
        let (code, _, stderr) = run_graft(&[
            "apply",
            model_path.to_str().unwrap(),
            "--from-peft",
            adapter_dir.to_str().unwrap(),
            "-o",
            patched.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{name} + {adapter}: {stderr}");
        let model = graft::onnx::load(&patched).unwrap();
        let expected = read_npz(&adapter_dir.join("outputs.npz")).unwrap();
        let diff = max_diff(&expected, &run_model(&model, &fixture_inputs(fixture)));
        assert!(diff <= TOLERANCE, "{name} + {adapter}: {diff:e}");
    }
}

/// Saved in the checkpoint's folder, float32 weights stay in the safetensors file (the model file
/// holds the graph only) and the model loads, verifies and runs from there; saved elsewhere it
/// carries its weights.
#[test]
fn float32_weights_are_referenced_in_place_beside_the_checkpoint() {
    let folder = tempfile::tempdir().unwrap();
    let source = checkpoint("llama-causal");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(source.join(file), folder.path().join(file)).unwrap();
    }
    let beside = folder.path().join("model.onnx");
    let (code, stdout, stderr) = import_hf_cli(folder.path(), &beside, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("detected: stack decoder with 2 layers"),
        "{stdout}"
    );
    let weights = std::fs::metadata(folder.path().join("model.safetensors"))
        .unwrap()
        .len();
    let graph = std::fs::metadata(&beside).unwrap().len();
    assert!(
        graph < weights / 2,
        "model.onnx is {graph} bytes, the weights {weights}"
    );
    let (code, _, stderr) = run_graft(&["verify", beside.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let model = graft::onnx::load(&beside).unwrap();
    let external = (model.graph.initializers.iter())
        .filter(|t| t.is_external())
        .count();
    assert!(
        external >= 20,
        "{external} tensors refer to model.safetensors"
    );
    let inputs = read_npz(&source.join("inputs.npz")).unwrap();
    let diff = max_diff(
        &read_npz(&source.join("outputs.npz")).unwrap(),
        &run_model(&model, &inputs),
    );
    assert!(diff <= TOLERANCE, "{diff:e}");

    let elsewhere = tempfile::tempdir().unwrap().keep().join("model.onnx");
    let (code, _, stderr) = import_hf_cli(folder.path(), &elsewhere, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(std::fs::metadata(&elsewhere).unwrap().len() > weights);
}

#[test]
fn the_head_can_be_chosen_and_the_summary_read_as_json() {
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("encoder.onnx");
    let dir = checkpoint("bert-seq-cls");
    let (code, stdout, stderr) = import_hf_cli(&dir, &path, &["--head", "base", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["head"], "base");
    assert_eq!(summary["model_type"], "bert");
    assert_eq!(summary["stacks"][0]["n_layers"], 2);
    let model = graft::onnx::load(&path).unwrap();
    let outputs: Vec<&str> = model
        .graph
        .outputs
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(outputs, ["last_hidden_state", "pooler_output"]);

    let options = ImportOptions {
        head: Some(Head::CausalLm),
        ..Default::default()
    };
    let error = import(&dir, &options).unwrap_err().to_string();
    assert!(error.contains("causal-LM"), "{error}");
}

/// A bad folder is refused with a message naming what is wrong, exit status 2, and no output.
#[test]
fn bad_checkpoints_are_refused_by_name() {
    let source = checkpoint("qwen2-causal");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    let edited = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut config = config.clone();
        edit(&mut config);
        config.to_string()
    };
    let weights = std::fs::read(source.join("model.safetensors")).unwrap();
    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "no hidden size",
            edited(&|c| {
                c.as_object_mut().unwrap().remove("hidden_size");
            }),
            weights.clone(),
            "field \"hidden_size\": missing",
        ),
        (
            "unknown family",
            edited(&|c| c["model_type"] = "mamba".into()),
            weights.clone(),
            "\"mamba\" is not a family graft imports",
        ),
        (
            "unknown activation",
            edited(&|c| c["hidden_act"] = "quick_gelu_v9".into()),
            weights.clone(),
            "field \"hidden_act\": activation \"quick_gelu_v9\"",
        ),
        (
            "dynamic rope",
            edited(&|c| c["rope_parameters"]["rope_type"] = "dynamic".into()),
            weights.clone(),
            "rope type \"dynamic\" is not supported",
        ),
        (
            "heads that do not divide",
            edited(&|c| c["num_key_value_heads"] = 3.into()),
            weights.clone(),
            "field \"num_key_value_heads\": 3 does not divide",
        ),
        (
            "a head nobody builds",
            edited(&|c| c["architectures"] = serde_json::json!(["Qwen2ForQuestionAnswering"])),
            weights.clone(),
            "pass --head",
        ),
        (
            "weights of other shapes than the config says",
            edited(&|c| c["head_dim"] = 16.into()),
            weights.clone(),
            "model.layers.0.self_attn.q_proj.weight has shape [32, 32]; config.json implies [64, 32]",
        ),
        (
            "truncated weights",
            config.to_string(),
            weights[..weights.len() / 2].to_vec(),
            "not a valid safetensors file",
        ),
        (
            "weights missing a tensor",
            edited(&|c| c["num_hidden_layers"] = 3.into()),
            weights.clone(),
            "no tensor \"model.layers.2.input_layernorm.weight\"",
        ),
    ];
    for (what, config, weights, message) in cases {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(folder.path().join("config.json"), config).unwrap();
        std::fs::write(folder.path().join("model.safetensors"), weights).unwrap();
        let out = folder.path().join("out.onnx");
        let (code, _, stderr) = import_hf_cli(folder.path(), &out, &[]);
        assert_eq!(code, 2, "{what}: {stderr}");
        assert!(stderr.contains(message), "{what}: {stderr}");
        assert!(!out.exists(), "{what}: an output was written");
    }
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("config.json"), config.to_string()).unwrap();
    let error = import(empty.path(), &ImportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("no model.safetensors"), "{error}");
}

/// A bare BertModel checkpoint (all-MiniLM-L6-v2's shape) gets a classification head with
/// `--num-labels`: module paths become the head class's (`bert.encoder…`), the new classifier is
/// drawn from the seed (same seed, same head), and it trains, with `--eval-at-start` scoring the
/// model before the first step.
#[test]
fn a_new_head_on_a_bare_encoder_is_seeded_and_trains() {
    let out = tempfile::tempdir().unwrap();
    let dir = checkpoint("minilm-base");
    let build = |name: &str, seed: &str| {
        let path = out.path().join(name);
        let (code, stdout, stderr) = import_hf_cli(
            &dir,
            &path,
            &["--head", "seq-cls", "--num-labels", "3", "--seed", seed],
        );
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("new head: classifier"), "{stdout}");
        path
    };
    let (first, again, other) = (
        build("a.onnx", "7"),
        build("b.onnx", "7"),
        build("c.onnx", "8"),
    );
    let inputs = read_npz(&dir.join("inputs.npz")).unwrap();
    let logits = |path: &Path| run_model(&graft::onnx::load(path).unwrap(), &inputs);
    assert_eq!(max_diff(&logits(&first), &logits(&again)), 0.0);
    assert!(max_diff(&logits(&first), &logits(&other)) > 1e-3);
    let model = graft::onnx::load(&first).unwrap();
    let classifier = model.graph.initializer("classifier.weight").unwrap();
    assert_eq!(classifier.dims, [3, 32]);
    assert!(model
        .graph
        .initializer("bert.encoder.layer.0.attention.self.query.weight")
        .is_some());

    let (code, _, stderr) = import_hf_cli(&dir, &out.path().join("d.onnx"), &["--head", "seq-cls"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("pass --num-labels N"), "{stderr}");

    let patched = out.path().join("patched.onnx");
    let (code, _, stderr) = run_graft(&[
        "apply",
        first.to_str().unwrap(),
        "-m",
        "lora",
        "--set",
        "targets=q,v",
        "-o",
        patched.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let run = out.path().join("run");
    let eval = repository("examples/data/sentiment_eval.jsonl");
    let (code, _, stderr) = train_seq_cls(
        &patched,
        "examples/data/sentiment.jsonl",
        3,
        &run,
        &["--eval-data", eval.to_str().unwrap(), "--eval-at-start"],
    );
    assert_eq!(code, 0, "{stderr}");
    let lines = metrics(&run);
    let evaluations: Vec<u64> = (lines.iter())
        .filter(|l| l.get("eval_loss").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        evaluations,
        [0, 3],
        "evaluated before the first step and after the last"
    );
    assert_eq!(lines[0]["step"], 0);
}

/// `--head base` on a causal LM checkpoint: the decoder alone, named as LlamaModel names its
/// modules (`layers.0…`); its final states times `lm_head.weight`ᵀ (on the host) are PyTorch's
/// logits.
#[test]
fn a_decoder_without_its_head_gives_the_states_the_lm_head_reads() {
    let dir = checkpoint("llama-causal");
    let options = ImportOptions {
        head: Some(Head::Base),
        ..Default::default()
    };
    let model = imported(&dir, &options);
    assert!(model
        .graph
        .initializer("layers.0.self_attn.q_proj.weight")
        .is_some());
    assert!(model.graph.initializer("lm_head.weight").is_none());
    let outputs = run_model(&model, &read_npz(&dir.join("inputs.npz")).unwrap());
    let [(name, states)] = &outputs[..] else {
        panic!("one output expected, got {}", outputs.len())
    };
    assert_eq!(name, "last_hidden_state");
    let head = read_tensors(&dir.join("model.safetensors"))
        .into_iter()
        .find(|t| t.0 == "lm_head.weight")
        .unwrap();
    let (vocab, width) = (head.1[0], head.1[1]);
    let states = states.to_f64();
    let expected = read_npz(&dir.join("outputs.npz")).unwrap();
    let logits = expected[0].1.to_f64();
    let mut worst: f64 = 0.0;
    for (row, state) in states.chunks(width).enumerate() {
        for v in 0..vocab {
            let dot: f64 = (state.iter().zip(&head.2[v * width..(v + 1) * width]))
                .map(|(s, w)| s * *w as f64)
                .sum();
            worst = worst.max((dot - logits[row * vocab + v]).abs());
        }
    }
    assert!(
        worst <= TOLERANCE,
        "states · lm_headᵀ vs PyTorch's logits: {worst:e}"
    );
}
