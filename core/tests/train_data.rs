//! Training on raw text: each data format (classification text, instructions in English and
//! Chinese, plain documents) trains a fixture through the shipped tokenizers and example data;
//! instruction prompts are left out of the loss; malformed lines are named or skipped; evaluation
//! writes its lines and the loss curve.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use graft::runtime::HostTensor;
use graft::train::data::{collate, read_data, sniff_format, DataFormat, DataOptions, IGNORE_INDEX};
use graft::train::text::{instruction_prompt, TextEncoder};

fn example_data(name: &str) -> PathBuf {
    repository("examples/data").join(name)
}

fn tokenizer(name: &str) -> PathBuf {
    repository("models/tokenizers")
        .join(name)
        .join("tokenizer.json")
}

/// `graft apply FIXTURE -m lora` (rank 4, on q and v, or on GPT-2's fused qkv) into `dir`;
/// returns the patched model.
fn patched(fixture: &str, dir: &Path) -> PathBuf {
    let patched = dir.join(format!("{fixture}.onnx"));
    let targets = if fixture.starts_with("gpt2") {
        "targets=qkv"
    } else {
        "targets=q,v"
    };
    apply_lora(fixture, &["r=4", targets], &patched);
    patched
}

/// The JSON lines of a run's `metrics.jsonl`.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Trains `model` for `steps` steps on `data` with the tokenizer `tokenizer_name` and checks
/// that it succeeds with a finite loss every step; returns (run folder, stdout).
fn train_ok(
    model: &Path,
    task: &str,
    data: &Path,
    tokenizer_name: &str,
    steps: u32,
    extra: &[&str],
) -> (PathBuf, String) {
    let run = model.with_file_name(format!(
        "run-{}",
        data.file_name().unwrap().to_string_lossy()
    ));
    let steps_text = steps.to_string();
    let tokenizer_path = tokenizer(tokenizer_name);
    let mut args = vec![
        "train",
        text(model),
        "--task",
        task,
        "--data",
        text(data),
        "--tokenizer",
        text(&tokenizer_path),
        "--max-len",
        "64",
        "--steps",
        &steps_text,
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--threads",
        "1",
        "--out",
        text(&run),
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run_graft(&args);
    assert_eq!(
        code,
        0,
        "graft train on {}: {stdout}{stderr}",
        data.display()
    );
    let losses: Vec<f64> = metrics(&run)
        .iter()
        .filter_map(|line| line["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), steps as usize, "{}", data.display());
    assert!(
        losses.iter().all(|loss| loss.is_finite() && *loss > 0.0),
        "{}: losses {losses:?}",
        data.display()
    );
    (run, stdout)
}

#[test]
fn sentiment_text_trains_bert_with_evaluation_and_a_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let model = patched("bert-legacy", dir.path());
    let sentiment = example_data("sentiment.jsonl");
    let (run, stdout) = train_ok(
        &model,
        "seq-cls",
        &sentiment,
        "bert",
        6,
        &["--eval-data", text(&sentiment), "--eval-every", "3"],
    );
    let evaluations: Vec<(u64, f64, f64)> = metrics(&run)
        .iter()
        .filter(|line| line.get("eval_loss").is_some())
        .map(|line| {
            (
                line["step"].as_u64().unwrap(),
                line["eval_loss"].as_f64().unwrap(),
                line["eval_accuracy"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        evaluations.iter().map(|e| e.0).collect::<Vec<_>>(),
        [3, 6],
        "evaluations after steps 3 and 6: {evaluations:?}"
    );
    for (_, loss, accuracy) in &evaluations {
        assert!(loss.is_finite() && *loss > 0.0);
        assert!((0.0..=1.0).contains(accuracy));
    }
    let curve = std::fs::read_to_string(run.join("loss.svg")).unwrap();
    assert!(
        curve.starts_with("<svg") && curve.contains("<polyline"),
        "loss.svg"
    );
    assert!(stdout.contains("best evaluation loss"), "{stdout}");
    assert!(stdout.contains("loss.svg"), "{stdout}");
}

#[test]
fn english_and_chinese_instructions_train_llama() {
    let dir = tempfile::tempdir().unwrap();
    let model = patched("llama-legacy", dir.path());
    for file in ["instructions.jsonl", "instructions_zh.jsonl"] {
        let (_, stdout) = train_ok(&model, "causal-lm", &example_data(file), "causal", 4, &[]);
        assert!(stdout.contains("training examples"), "{stdout}");
    }
}

#[test]
fn plain_text_trains_gpt2_from_txt_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let model = patched("gpt2-legacy", dir.path());
    let corpus = example_data("corpus.txt");
    train_ok(&model, "causal-lm", &corpus, "causal", 4, &[]);

    let jsonl = dir.path().join("corpus.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&corpus)
        .unwrap()
        .lines()
        .take(20)
        .map(|line| serde_json::json!({ "text": line }).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    assert_eq!(sniff_format(&jsonl).unwrap(), DataFormat::Plain);
    train_ok(&model, "causal-lm", &jsonl, "causal", 2, &[]);
}

/// The collated labels of one instruction example are −100 over `<s>` and the prompt and the
/// token ids over the response and `</s>`, as an independent tokenization of the two parts says.
#[test]
fn instruction_prompt_is_masked_out_of_the_loss() {
    let path = tokenizer("causal");
    let reference = tokenizers::Tokenizer::from_file(&path).unwrap();
    let encode = |text: &str| -> Vec<i64> {
        reference
            .encode(text, false)
            .unwrap()
            .get_ids()
            .iter()
            .map(|&id| i64::from(id))
            .collect()
    };
    let (bos, eos) = (
        i64::from(reference.token_to_id("<s>").unwrap()),
        i64::from(reference.token_to_id("</s>").unwrap()),
    );

    let data = read_data(
        &example_data("instructions.jsonl"),
        &DataOptions {
            format: DataFormat::Auto,
            tokenizer: Some(path.clone()),
            max_len: 64,
            skip_bad_lines: false,
        },
    )
    .unwrap();
    assert_eq!(data.format, DataFormat::Instruction);
    let first_line = std::fs::read_to_string(example_data("instructions.jsonl")).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(first_line.lines().next().unwrap()).unwrap();
    let prompt = encode(&instruction_prompt(
        first["instruction"].as_str().unwrap(),
        first["input"].as_str().unwrap(),
    ));
    let response = encode(first["output"].as_str().unwrap());
    assert!(!prompt.is_empty() && !response.is_empty());

    let mut expected_ids = vec![bos];
    expected_ids.extend(&prompt);
    expected_ids.extend(&response);
    expected_ids.push(eos);
    let mut expected_labels = vec![IGNORE_INDEX; 1 + prompt.len()];
    expected_labels.extend(&response);
    expected_labels.push(eos);

    // Batched with a longer example, the first row is padded on the right.
    let longer = data
        .examples
        .iter()
        .find(|e| e.sequences["input_ids"].len() > expected_ids.len())
        .expect("a longer instruction example");
    let batch = collate(&[&data.examples[0], longer]);
    let tensor = |name: &str| -> (Vec<usize>, Vec<i64>) {
        match &batch.iter().find(|(n, _)| n == name).unwrap().1 {
            HostTensor::I64(array) => (array.shape().to_vec(), array.iter().copied().collect()),
            other => panic!("{name} is {other:?}"),
        }
    };
    let (shape, ids) = tensor("input_ids");
    let (_, labels) = tensor("labels");
    let (_, mask) = tensor("attention_mask");
    let width = shape[1];
    let n = expected_ids.len();
    assert_eq!(ids[..n], expected_ids[..]);
    assert_eq!(labels[..n], expected_labels[..]);
    assert!(labels[n..width].iter().all(|&l| l == IGNORE_INDEX));
    assert!(mask[..n].iter().all(|&m| m == 1) && mask[n..width].iter().all(|&m| m == 0));
}

/// Chinese instructions parse and keep scored response tokens; characters outside the tiny
/// vocabulary become <unk> and every id fits the fixtures' 128-token vocabulary.
#[test]
fn chinese_instructions_tokenize_within_the_vocabulary() {
    let encoder = TextEncoder::from_file(&tokenizer("causal"), 64).unwrap();
    let example = encoder
        .instruction("给出这个词的反义词。", "大", "小")
        .unwrap();
    let ids = &example.sequences["input_ids"];
    assert!(ids.iter().all(|&id| (0..128).contains(&id)), "{ids:?}");
    let graft::train::data::Target::Tokens(labels) = &example.target else {
        panic!("instruction examples have token labels");
    };
    let scored: Vec<i64> = labels
        .iter()
        .copied()
        .filter(|&l| l != IGNORE_INDEX)
        .collect();
    assert_eq!(
        scored.last(),
        Some(&i64::from(encoder.eos().unwrap())),
        "{labels:?}"
    );
    assert!(scored.len() >= 2, "the response and </s> are scored");
}

/// A prompt longer than --max-len leaves nothing to score: the line is malformed.
#[test]
fn instruction_cut_before_its_response_is_rejected() {
    let encoder = TextEncoder::from_file(&tokenizer("causal"), 8).unwrap();
    let reason = encoder
        .instruction("Give the opposite of the word.", "hot", "cold")
        .unwrap_err();
    assert!(reason.contains("no response tokens remain"), "{reason}");
}

#[test]
fn text_pairs_get_the_second_token_type() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pairs.jsonl");
    std::fs::write(
        &file,
        "{\"text\": \"the movie was great.\", \"text_pair\": \"i liked it.\", \"label\": 1}\n",
    )
    .unwrap();
    let data = read_data(
        &file,
        &DataOptions {
            format: DataFormat::Auto,
            tokenizer: Some(tokenizer("bert")),
            max_len: 64,
            skip_bad_lines: false,
        },
    )
    .unwrap();
    assert_eq!(data.format, DataFormat::Text);
    let types = &data.examples[0].sequences["token_type_ids"];
    assert_eq!(types[0], 0);
    assert_eq!(*types.last().unwrap(), 1, "{types:?}");
}

#[test]
fn formats_are_told_from_the_shipped_files() {
    for (file, format) in [
        ("sentiment.jsonl", DataFormat::Text),
        ("instructions.jsonl", DataFormat::Instruction),
        ("instructions_zh.jsonl", DataFormat::Instruction),
        ("corpus.txt", DataFormat::Plain),
    ] {
        assert_eq!(sniff_format(&example_data(file)).unwrap(), format, "{file}");
    }
    let tokenized = repository("models/references/train-bert/data.jsonl");
    assert_eq!(sniff_format(&tokenized).unwrap(), DataFormat::Tokenized);
}

#[test]
fn malformed_line_is_named_or_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let model = patched("bert-legacy", dir.path());
    let bad = dir.path().join("bad.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(example_data("sentiment.jsonl"))
        .unwrap()
        .lines()
        .take(20)
        .map(str::to_owned)
        .collect();
    lines[2] = "{\"text\": \"no label here\"}".into();
    lines[6] = "{\"text\": \"cut off".into();
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let tokenizer_path = tokenizer("bert");
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            text(&model),
            "--task",
            "seq-cls",
            "--data",
            text(&bad),
            "--data-format",
            "text",
            "--tokenizer",
            text(&tokenizer_path),
            "--steps",
            "2",
            "--out",
            text(&dir.path().join("run")),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let strings = args(&[]);
    let refs: Vec<&str> = strings.iter().map(String::as_str).collect();
    let (code, _, stderr) = run_graft(&refs);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("bad.jsonl:3:"), "{stderr}");
    assert!(stderr.contains("missing \"label\""), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let strings = args(&["--skip-bad-lines"]);
    let refs: Vec<&str> = strings.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = run_graft(&refs);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("18 training examples"), "{stdout}");
    assert!(
        stdout.contains("skipped 2 malformed training lines"),
        "{stdout}"
    );
}

#[test]
fn text_formats_need_a_tokenizer_and_a_matching_task() {
    let dir = tempfile::tempdir().unwrap();
    let model = patched("llama-legacy", dir.path());
    let corpus = example_data("corpus.txt");
    let run = dir.path().join("run");
    let (code, _, stderr) = run_graft(&[
        "train",
        text(&model),
        "--task",
        "causal-lm",
        "--data",
        text(&corpus),
        "--out",
        text(&run),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("corpus.txt") && stderr.contains("--tokenizer"),
        "{stderr}"
    );

    let tokenizer_path = tokenizer("causal");
    let (code, _, stderr) = run_graft(&[
        "train",
        text(&model),
        "--task",
        "seq-cls",
        "--data",
        text(&corpus),
        "--tokenizer",
        text(&tokenizer_path),
        "--out",
        text(&run),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("plain data cannot train --task seq-cls"),
        "{stderr}"
    );
}

/// Without --tokenizer, the tokenizer.json beside the model is used; without a terminal, a
/// progress line is printed every --log-every steps and after the last (only after the last
/// with --log-every 0).
#[test]
fn tokenizer_beside_the_model_and_log_every() {
    let dir = tempfile::tempdir().unwrap();
    let model = patched("llama-legacy", dir.path());
    std::fs::copy(tokenizer("causal"), dir.path().join("tokenizer.json")).unwrap();
    let corpus = example_data("corpus.txt");
    for (every, want) in [("2", vec!["2", "4", "5"]), ("0", vec!["5"])] {
        let run = dir.path().join(format!("run-{every}"));
        let (code, stdout, stderr) = run_graft(&[
            "train",
            text(&model),
            "--task",
            "causal-lm",
            "--data",
            text(&corpus),
            "--max-len",
            "64",
            "--steps",
            "5",
            "--log-every",
            every,
            "--out",
            text(&run),
        ]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        let logged: Vec<&str> = stdout
            .lines()
            .filter(|line| line.starts_with("step "))
            .map(|line| line.split_whitespace().nth(1).unwrap())
            .collect();
        assert_eq!(logged, want, "--log-every {every}: {stdout}");
    }
}

/// Pre-tokenized lines may carry float features (nested lists, or lists with a fractional
/// number): they batch as float32 with the batch axis first, while flat integer lists stay
/// sequences.
#[test]
fn float_features_batch_beside_sequences() {
    use graft::train::data::{collate, read_data, DataFormat, DataOptions};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("features.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"input_ids":[1,2,3],"pixel_values":[[0.5,1],[2,3]],"scores":[0.25,1],"label":1}"#,
            "\n",
            r#"{"input_ids":[4,5],"pixel_values":[[4,5],[6,7.5]],"scores":[2,3.5],"label":0}"#,
            "\n"
        ),
    )
    .unwrap();
    let options = DataOptions {
        format: DataFormat::Tokenized,
        tokenizer: None,
        max_len: 16,
        skip_bad_lines: false,
    };
    let dataset = read_data(&path, &options).unwrap();
    let batch: Vec<_> = dataset.examples.iter().collect();
    let tensors = collate(&batch);
    let get = |name: &str| &tensors.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(get("pixel_values").shape(), &[2, 2, 2]);
    assert_eq!(
        get("pixel_values").to_f64(),
        vec![0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.5]
    );
    assert_eq!(get("scores").shape(), &[2, 2]);
    assert_eq!(get("input_ids").shape(), &[2, 3]);

    std::fs::write(
        &path,
        concat!(
            r#"{"input_ids":[1],"pixel_values":[[0.5,1]],"label":1}"#,
            "\n",
            r#"{"input_ids":[4],"pixel_values":[[4,5,6]],"label":0}"#,
            "\n"
        ),
    )
    .unwrap();
    let error = read_data(&path, &options).unwrap_err().to_string();
    assert!(
        error.contains(":2:") && error.contains("pixel_values"),
        "{error}"
    );
}
