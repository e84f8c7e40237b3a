//! Settings, stacked methods and command lines that used to crash graft (a panic, an abort, a
//! segfault) or be misread: each is refused with exit status 2 and a message naming the cause,
//! or works as documented.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const FIXTURE: &str = "bert-legacy";

/// Runs `graft ARGS` and asserts that it exits with status 2, an `error:` line that contains
/// every one of `needles`, and no panic; returns stderr.
fn assert_refused(args: &[&str], needles: &[&str]) -> String {
    let (code, stdout, stderr) = run_graft(args);
    assert_eq!(code, 2, "graft {args:?} should fail: {stdout}{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "graft {args:?}: stderr should mention {needle:?}: {stderr}"
        );
    }
    stderr
}

/// Runs `graft ARGS`, asserts success, returns (stdout, stderr).
fn assert_ok(args: &[&str]) -> (String, String) {
    let (code, stdout, stderr) = run_graft(args);
    assert_eq!(code, 0, "graft {args:?}: {stdout}{stderr}");
    (stdout, stderr)
}

/// `graft train` arguments for a short sequence-classification run of `steps` steps.
fn train_args(patched: &Path, out: &Path, steps: u64) -> Vec<String> {
    [
        "train",
        text(patched),
        "--task",
        "seq-cls",
        "--data",
        text(&repository("examples/data/sentiment.jsonl")),
        "--tokenizer",
        text(&repository("models/tokenizers/bert/tokenizer.json")),
        "--max-len",
        "32",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--steps",
        &steps.to_string(),
        "--out",
        text(out),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A LoRA-patched fixture in `dir`.
fn patched(dir: &Path) -> PathBuf {
    let path = dir.join("patched.onnx");
    apply_lora(FIXTURE, &["r=4"], &path);
    path
}

/// Item 8: LoRA applied twice puts two branches on each target; exporting that as HF PEFT
/// files (one branch per module) is refused naming the module, training keeps graft's own
/// adapter file, and the formats that can hold both branches still work.
#[test]
fn lora_applied_twice_exports_and_trains_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model(FIXTURE);
    let twice = dir.path().join("twice.onnx");
    assert_ok(&[
        "apply",
        text(&model),
        "-m",
        "lora",
        "-m",
        "lora",
        "-o",
        text(&twice),
    ]);
    let peft = dir.path().join("peft");
    assert_refused(
        &[
            "export",
            text(&twice),
            "--format",
            "peft",
            "-o",
            text(&peft),
        ],
        &[
            "bert.encoder.layer.0.attention.self.query",
            "more than one LoRA branch",
        ],
    );
    assert!(!peft.exists());
    let served = dir.path().join("served");
    assert_ok(&[
        "export",
        text(&twice),
        "--format",
        "onnx-adapter",
        "-o",
        text(&served),
    ]);
    let run = dir.path().join("run");
    assert_ok(&refs(&train_args(&twice, &run, 1)));
    assert!(run.join("adapter.safetensors").is_file());
    assert!(!run.join("adapter_model.safetensors").exists());
}

/// Item 9: ranks beyond what a site's weight can use are refused before anything is
/// allocated, naming the site and its dimensions; the largest useful rank works.
#[test]
fn ranks_beyond_the_weights_dimensions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model(FIXTURE);
    let out = dir.path().join("out.onnx");
    for (method, setting) in [
        ("lora", "r=100000000"),
        ("lora", "r=100000"),
        ("lora", "r=33"),
        ("adalora", "init_r=100000000"),
    ] {
        assert_refused(
            &[
                "apply",
                text(&model),
                "-m",
                method,
                "--set",
                setting,
                "-o",
                text(&out),
            ],
            &["exceeds min(in, out) = min(32, 32) = 32", "site "],
        );
        assert!(!out.exists());
    }
    assert_ok(&[
        "apply",
        text(&model),
        "-m",
        "lora",
        "--set",
        "r=32",
        "-o",
        text(&out),
    ]);
}

/// Writes `lines` (one JSON object each) as the data file `path`.
fn write_data(path: &Path, lines: &[&str]) -> PathBuf {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    path.to_path_buf()
}

/// `graft train` on a pre-tokenized file: `--task TASK`, one step, batch size 2, plus `extra`.
fn train_on(patched: &Path, data: &Path, task: &str, run: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        text(patched),
        "--task",
        task,
        "--data",
        text(data),
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--steps",
        "1",
        "--out",
        text(run),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

const GOOD_LINE: &str =
    r#"{"input_ids": [1, 5, 6, 2], "token_type_ids": [0, 0, 0, 0], "label": 1}"#;

/// Item 11: more threads than the machine has are refused before ONNX Runtime is asked for
/// them (it crashed creating 100000).
#[test]
fn too_many_threads_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let patched = patched(dir.path());
    let data = write_data(&dir.path().join("data.jsonl"), &[GOOD_LINE, GOOD_LINE]);
    let run = dir.path().join("run");
    let mut args = train_on(&patched, &data, "seq-cls", &run, &[]);
    let threads = args.iter().position(|a| a == "--threads").unwrap();
    args[threads + 1] = "100000".into();
    assert_refused(&refs(&args), &["--threads 100000", "logical CPUs"]);
}

/// Item 13: a reader that closes the pipe early (`graft inspect MODEL | head -1`) ends graft
/// quietly, without a panic.
#[test]
fn a_closed_stdout_pipe_is_not_a_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = graft_command()
        .args(["inspect", text(&fixture_model(FIXTURE))])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        output.status.success() || output.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        output.status
    );
}

/// Runs `graft ARGS`, killing it if it has not ended within a minute; returns
/// (exit code, stderr) and panics naming the command if it hung.
fn run_with_deadline(args: &[&str]) -> (i32, String) {
    let mut child = graft_command()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("graft {args:?} hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Item 16: a FIFO or a device as the model, as `--config`, as the data or the tokenizer is
/// refused by name at once (it used to block forever, or read `/dev/zero` until memory ran
/// out).
#[test]
fn fifos_and_devices_are_refused_as_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let patched = patched(dir.path());
    let fifo = dir.path().join("fifo");
    let name = std::ffi::CString::new(text(&fifo)).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    let out = dir.path().join("out.onnx");
    let data = write_data(&dir.path().join("data.jsonl"), &[GOOD_LINE, GOOD_LINE]);
    let run = dir.path().join("run");
    for special in [text(&fifo), "/dev/zero"] {
        let kind = if special == "/dev/zero" {
            "character device"
        } else {
            "FIFO"
        };
        let commands: Vec<Vec<String>> = vec![
            ["convert", special, "-o", text(&out)]
                .map(String::from)
                .to_vec(),
            [
                "apply",
                text(&fixture_model(FIXTURE)),
                "-m",
                "lora",
                "--config",
                special,
                "-o",
                text(&out),
            ]
            .map(String::from)
            .to_vec(),
            train_on(&patched, Path::new(special), "seq-cls", &run, &[]),
            train_on(
                &patched,
                &repository("examples/data/sentiment.jsonl"),
                "seq-cls",
                &run,
                &["--tokenizer", special],
            ),
            train_on(&patched, &data, "seq-cls", &run, &["--eval-data", special]),
        ];
        for args in commands {
            let (code, stderr) = run_with_deadline(&refs(&args));
            assert_eq!(code, 2, "graft {args:?}: {stderr}");
            assert!(
                stderr.contains(special) && stderr.contains(kind),
                "graft {args:?}: {stderr}"
            );
        }
    }
}

/// Item 17: a negative class and a fractional label for classification are refused naming
/// the file and line; integer labels train a regression model.
#[test]
fn labels_of_the_wrong_kind_are_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    let patched = patched(dir.path());
    let run = dir.path().join("run");
    for (label, needle) in [
        ("-1", "label -1 is negative"),
        ("0.5", "label 0.5 is not an integer class"),
    ] {
        let bad = format!(
            r#"{{"input_ids": [1, 5, 7, 2], "token_type_ids": [0, 0, 0, 0], "label": {label}}}"#
        );
        let data = write_data(&dir.path().join("bad.jsonl"), &[GOOD_LINE, &bad]);
        let args = train_on(&patched, &data, "seq-cls", &run, &[]);
        assert_refused(&refs(&args), &[&format!("{}:2", text(&data)), needle]);
    }

    let single = single_output_fixture(&dir.path().join("single.onnx"));
    let single_patched = dir.path().join("single-patched.onnx");
    assert_ok(&[
        "apply",
        text(&single),
        "-m",
        "lora",
        "--set",
        "r=4",
        "-o",
        text(&single_patched),
    ]);
    let data = write_data(
        &dir.path().join("values.jsonl"),
        &[
            r#"{"input_ids": [1, 5, 6, 2], "token_type_ids": [0, 0, 0, 0], "label": 1}"#,
            r#"{"input_ids": [1, 5, 7, 2], "token_type_ids": [0, 0, 0, 0], "label": 0.25}"#,
        ],
    );
    assert_ok(&refs(&train_on(
        &single_patched,
        &data,
        "regression",
        &run,
        &[],
    )));
    // The two-class model has two outputs per example: regression names that.
    assert_refused(
        &refs(&train_on(&patched, &data, "regression", &run, &[])),
        &["--task regression", "has 2 per example"],
    );
}

/// The fixture with its classifier cut to its first output: logits `[batch, 1]`, as a
/// regression model (`num_labels = 1`) has them.
fn single_output_fixture(path: &Path) -> PathBuf {
    use graft::ir::{Dim, Tensor, ValueInfo};
    let mut model = graft::onnx::load(&fixture_model(FIXTURE)).unwrap();
    for tensor in model.graph.initializers.iter_mut() {
        if !tensor.name.starts_with("classifier.") {
            continue;
        }
        let values = tensor.to_f32().unwrap();
        let (dims, kept): (Vec<i64>, Vec<f32>) = match tensor.dims.as_slice() {
            [2] => (vec![1], values[..1].to_vec()),
            [2, cols] => (vec![1, *cols], values[..*cols as usize].to_vec()),
            [rows, 2] => (vec![*rows, 1], values.iter().step_by(2).copied().collect()),
            other => panic!("unexpected classifier shape {other:?}"),
        };
        *tensor = Tensor::from_f32(&tensor.name, dims, &kept);
    }
    let logits = model.graph.outputs[0].clone();
    let value_type = logits.value_type().unwrap();
    let mut shape = value_type.shape.unwrap();
    *shape.last_mut().unwrap() = Dim::Fixed(1);
    model.graph.outputs[0] = ValueInfo::tensor(&logits.name, value_type.dtype.unwrap(), &shape);
    graft::onnx::save(&model, path, &Default::default()).unwrap();
    path.to_path_buf()
}

/// Item 18: labels, token-type ids and lengths the model cannot take, a line of invalid
/// UTF-8 and a missing model input are refused naming the file and line; a UTF-8 byte-order
/// mark is accepted.
#[test]
fn data_the_model_cannot_take_is_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let patched = patched(dir.path());
    let run = dir.path().join("run");
    let long_ids = vec!["5"; 70].join(", ");
    let long_types = vec!["0"; 70].join(", ");
    let long =
        format!(r#"{{"input_ids": [{long_ids}], "token_type_ids": [{long_types}], "label": 1}}"#);
    let cases = [
        (
            r#"{"input_ids": [1, 5, 7, 2], "token_type_ids": [0, 0, 0, 0], "label": 5}"#,
            "label 5 is outside the model's 2 outputs",
        ),
        (
            r#"{"input_ids": [1, 5, 7, 2], "token_type_ids": [0, 0, 7, 0], "label": 1}"#,
            "token_type_ids has 7, outside the 2 rows",
        ),
        (
            r#"{"input_ids": [1, 5, 700, 2], "token_type_ids": [0, 0, 0, 0], "label": 1}"#,
            "input_ids has 700, outside the 128 rows",
        ),
        (
            r#"{"input_ids": [1, 5, 7, 2], "label": 1}"#,
            "the model reads \"token_type_ids\"",
        ),
        (&long, "70 tokens, more than the model's 64 positions"),
    ];
    for (line, needle) in cases {
        let data = write_data(&dir.path().join("bad.jsonl"), &[GOOD_LINE, line]);
        assert_refused(
            &refs(&train_on(&patched, &data, "seq-cls", &run, &[])),
            &[&format!("{}:2", text(&data)), needle],
        );
    }

    let data = dir.path().join("latin1.jsonl");
    let mut bytes = format!("{GOOD_LINE}\n{GOOD_LINE}\n").into_bytes();
    bytes.extend(b"{\"text\": \"caf\xe9\", \"label\": 1}\n");
    std::fs::write(&data, bytes).unwrap();
    assert_refused(
        &refs(&train_on(&patched, &data, "seq-cls", &run, &[])),
        &[text(&data), "line 3: not valid UTF-8"],
    );

    let data = dir.path().join("bom.jsonl");
    std::fs::write(&data, format!("\u{feff}{GOOD_LINE}\n{GOOD_LINE}\n")).unwrap();
    assert_ok(&refs(&train_on(&patched, &data, "seq-cls", &run, &[])));
}

/// Item 20: method settings and training flags outside their domain are refused naming the
/// setting (a TOML `nan` used to become the default, negative values passed).
#[test]
fn settings_outside_their_domain_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model(FIXTURE);
    let out = dir.path().join("out.onnx");
    for (toml, needles) in [
        (
            "alpha = nan\n",
            vec!["setting alpha", "NaN is not a finite number"],
        ),
        (
            "[lora]\nalpha = inf\n",
            vec!["setting lora.alpha", "inf is not a finite number"],
        ),
        ("dropout = -0.1\n", vec!["dropout -0.1", "[0, 1)"]),
    ] {
        let config = dir.path().join("settings.toml");
        std::fs::write(&config, toml).unwrap();
        let mut needles = needles;
        if !toml.contains("dropout") {
            needles.push(text(&config));
        }
        assert_refused(
            &[
                "apply",
                text(&model),
                "-m",
                "lora",
                "--config",
                text(&config),
                "-o",
                text(&out),
            ],
            &needles,
        );
    }
    assert_refused(
        &[
            "apply",
            text(&model),
            "-m",
            "lora",
            "--set",
            "dropout=-0.1",
            "-o",
            text(&out),
        ],
        &["dropout -0.1"],
    );
    assert!(!out.exists());

    let patched = patched(dir.path());
    let data = write_data(&dir.path().join("data.jsonl"), &[GOOD_LINE, GOOD_LINE]);
    let run = dir.path().join("run");
    let base = train_on(&patched, &data, "seq-cls", &run, &[]);
    let flag_at = |flag: &str| base.iter().position(|a| a == flag).unwrap();
    for (flag, value, needle) in [
        ("--steps", "0", "--steps 0"),
        ("--batch-size", "0", "--batch-size 0"),
    ] {
        let mut args = base.clone();
        args[flag_at(flag) + 1] = value.into();
        assert_refused(&refs(&args), &[needle]);
    }
    for (extra, needle) in [
        (vec!["--grad-accumulation", "0"], "--grad-accumulation 0"),
        (vec!["--lr=-0.001"], "--lr -0.001"),
        (vec!["--eps=-1"], "--eps -1"),
        (vec!["--weight-decay=-0.1"], "--weight-decay -0.1"),
        (vec!["--betas", "1.5", "0.999"], "--betas (beta1) 1.5"),
        (vec!["--clip-norm", "nan"], "--clip-norm NaN"),
        (vec!["--save-every", "0"], "--save-every 0"),
    ] {
        let args = train_on(&patched, &data, "seq-cls", &run, &extra);
        assert_refused(&refs(&args), &[needle]);
    }
}

/// The fixture with a two-node cycle (its first node reads the output of a node that reads
/// the first's), saved as `path`; returns the first node's name.
fn cyclic_fixture(path: &Path) -> String {
    let mut model = graft::onnx::load(&fixture_model(FIXTURE)).unwrap();
    let graph = &mut model.graph;
    let (first, consumer) = (0..graph.nodes.len())
        .find_map(|first| {
            let outputs = graph.nodes[first].outputs.clone();
            let consumer = (first + 1..graph.nodes.len()).find(|&c| {
                graph.nodes[c].inputs.iter().any(|i| outputs.contains(i))
                    && !graph.nodes[c].outputs.is_empty()
            })?;
            (!graph.nodes[first].inputs.is_empty()).then_some((first, consumer))
        })
        .unwrap();
    let fed_back = graph.nodes[consumer].outputs[0].clone();
    graph.nodes[first].inputs[0] = fed_back;
    let name = graph.nodes[first].name.clone();
    graft::onnx::save(&model, path, &Default::default()).unwrap();
    name
}

/// Item 21: messages name the real cause: a cycle already in the input is the model's (not
/// the plugin's), `layers` that select nothing are named as such, a batch with only ignored
/// labels is not blamed on the learning rate, and data that is mostly the tokenizer's unknown
/// token is warned about.
#[test]
fn messages_name_the_real_cause() {
    let dir = tempfile::tempdir().unwrap();
    let cyclic = dir.path().join("cyclic.onnx");
    let node = cyclic_fixture(&cyclic);
    let out = dir.path().join("out.onnx");
    let stderr = assert_refused(
        &["apply", text(&cyclic), "-m", "lora", "-o", text(&out)],
        &[text(&cyclic), "cycle through node", &node],
    );
    assert!(!stderr.contains("plugin"), "{stderr}");

    let stderr = assert_refused(
        &[
            "apply",
            text(&fixture_model(FIXTURE)),
            "-m",
            "lora",
            "--set",
            "layers=99",
            "-o",
            text(&out),
        ],
        &["layers [\"99\"] select none of the layers", "[0, 1]"],
    );
    assert!(!stderr.contains("match no site"), "{stderr}");

    let patched = patched(dir.path());
    let run = dir.path().join("run");
    let ignored = r#"{"input_ids": [1, 5, 7, 2], "token_type_ids": [0, 0, 0, 0], "label": -100}"#;
    let data = write_data(&dir.path().join("ignored.jsonl"), &[ignored, ignored]);
    let mut args = train_on(&patched, &data, "seq-cls", &run, &["--no-shuffle"]);
    let stderr = assert_refused(&refs(&args), &["no label of a batch is scored", "[1, 2]"]);
    assert!(!stderr.contains("--lr"), "{stderr}");

    let chinese = write_data(
        &dir.path().join("chinese.jsonl"),
        &[
            r#"{"text": "这是一个很好的电影", "label": 1}"#,
            r#"{"text": "这部电影很糟糕", "label": 0}"#,
        ],
    );
    let tokenizer = repository("models/tokenizers/bert/tokenizer.json");
    args = train_on(
        &patched,
        &chinese,
        "seq-cls",
        &run,
        &["--tokenizer", text(&tokenizer)],
    );
    let (_, stderr) = assert_ok(&refs(&args));
    assert!(
        stderr.contains("warning: ") && stderr.contains("are the unknown token [UNK]"),
        "{stderr}"
    );
    args = train_on(
        &patched,
        &repository("examples/data/sentiment.jsonl"),
        "seq-cls",
        &run,
        &["--tokenizer", text(&tokenizer)],
    );
    let (_, stderr) = assert_ok(&refs(&args));
    assert!(!stderr.contains("unknown token"), "{stderr}");
}

/// Item 10: a 50 MB line of text is cut to what `--max-len` keeps before it is tokenized:
/// training on it fits in 2 GiB of address space (tokenizing it whole took 9.3 GB), and the
/// example is the one the line's first words give.
#[test]
fn a_huge_text_line_is_cut_before_it_is_tokenized() {
    let dir = tempfile::tempdir().unwrap();
    let patched = patched(dir.path());
    let words = [
        "good", "bad", "movie", "the", "was", "really", "lovely", "terrible",
    ];
    let text_of = |n: usize| -> String {
        (0..n)
            .map(|i| words[i % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let line = |n: usize| serde_json::json!({"text": text_of(n), "label": 1}).to_string();
    let short = r#"{"text": "the movie was bad", "label": 0}"#;
    let huge = write_data(&dir.path().join("huge.jsonl"), &[&line(9_000_000), short]);
    assert!(std::fs::metadata(&huge).unwrap().len() > 50_000_000);
    let tokenizer = repository("models/tokenizers/bert/tokenizer.json");
    let run = dir.path().join("run");
    let args = train_on(
        &patched,
        &huge,
        "seq-cls",
        &run,
        &["--tokenizer", text(&tokenizer), "--max-len", "32"],
    );
    let mut command = graft_command();
    command.args(&args);
    // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            let limit = 2 << 30;
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            libc::setrlimit(libc::RLIMIT_AS, &rlimit);
            Ok(())
        });
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let encoder = graft::train::text::TextEncoder::from_file(&tokenizer, 32).unwrap();
    let target = graft::train::data::Target::Class(1);
    let cut = encoder
        .classification(&text_of(9_000_000), None, target.clone())
        .unwrap();
    let whole = encoder.classification(&text_of(60), None, target).unwrap();
    assert_eq!(cut, whole);
    assert_eq!(cut.sequences["input_ids"].len(), 32);
}

/// Item 19: `--resume` refuses a changed learning rate, schedule, clipping, data, `--max-len`
/// or patched model, naming it; `--accept-changes` continues and says what changed; the same
/// settings resume.
#[test]
fn resume_refuses_changed_settings_unless_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let patched = patched(dir.path());
    let other_model = dir.path().join("other.onnx");
    apply_lora(FIXTURE, &["r=4", "seed=7"], &other_model);
    let sentiment = repository("examples/data/sentiment.jsonl");
    // The same lines with the labels flipped: as many examples, other targets.
    let other_data = dir.path().join("flipped.jsonl");
    let flipped = std::fs::read_to_string(&sentiment)
        .unwrap()
        .replace("\"label\": 0", "\"label\": 2")
        .replace("\"label\": 1", "\"label\": 0")
        .replace("\"label\": 2", "\"label\": 1");
    std::fs::write(&other_data, flipped).unwrap();
    let tokenizer = repository("models/tokenizers/bert/tokenizer.json");
    let run = dir.path().join("run");
    let args = |model: &Path, data: &Path, extra: &[&str]| {
        let mut all = vec!["--tokenizer", text(&tokenizer)];
        if !extra.contains(&"--max-len") {
            all.extend(["--max-len", "32"]);
        }
        all.extend(extra);
        let mut args = train_on(model, data, "seq-cls", &run, &all);
        let steps = args.iter().position(|a| a == "--steps").unwrap();
        args[steps + 1] = "2".into();
        args
    };
    assert_ok(&refs(&args(&patched, &sentiment, &["--save-every", "1"])));
    let resume = |mut args: Vec<String>| {
        args.extend(["--resume".into(), text(&run).into()]);
        args
    };
    for (changed, needle) in [
        (args(&patched, &sentiment, &["--lr", "0.01"]), "--lr 0.001"),
        (
            args(&patched, &sentiment, &["--schedule", "cosine"]),
            "--schedule Constant",
        ),
        (
            args(&patched, &sentiment, &["--clip-norm", "1"]),
            "--clip-norm None",
        ),
        (args(&patched, &other_data, &[]), "training examples"),
        (
            args(&patched, &sentiment, &["--max-len", "16"]),
            "training examples",
        ),
        (args(&other_model, &sentiment, &[]), "a patched model"),
    ] {
        let stderr = assert_refused(&refs(&resume(changed)), &["cannot resume", needle]);
        assert!(stderr.contains("--accept-changes"), "{stderr}");
    }
    let (_, stderr) = assert_ok(&refs(&resume(args(&patched, &sentiment, &[]))));
    assert!(!stderr.contains("warning"), "{stderr}");
    let mut accepted = resume(args(&patched, &sentiment, &["--lr", "0.01"]));
    accepted.push("--accept-changes".into());
    let (_, stderr) = assert_ok(&refs(&accepted));
    assert!(
        stderr.contains("warning: resuming with --lr 0.01 instead of the checkpoint's 0.001"),
        "{stderr}"
    );
}

/// A model whose only node divides its int64 input `a` (`[1]`) by an int64 constant `b`.
fn integer_division_model(path: &Path, b: i64) {
    use onnx_protobuf::{Message, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};
    let mut model = ModelProto::new();
    model.ir_version = 8;
    let mut opset = OperatorSetIdProto::new();
    opset.version = 17;
    model.opset_import.push(opset);
    let graph = model.graph.mut_or_insert_default();
    graph.name = "division".into();
    let mut divisor = TensorProto::new();
    divisor.name = "b".into();
    divisor.data_type = onnx_protobuf::tensor_proto::DataType::INT64 as i32;
    divisor.dims = vec![1];
    divisor.int64_data = vec![b];
    graph.initializer.push(divisor);
    let mut node = NodeProto::new();
    node.name = "divide".into();
    node.op_type = "Div".into();
    node.input = vec!["a".into(), "b".into()];
    node.output = vec!["y".into()];
    graph.node.push(node);
    let int64 = graft::ir::DataType::Int64;
    let one = [graft::ir::Dim::Fixed(1)];
    graph
        .input
        .push(graft::ir::ValueInfo::tensor("a", int64, &one).proto);
    graph
        .output
        .push(graft::ir::ValueInfo::tensor("y", int64, &one).proto);
    std::fs::write(path, model.write_to_bytes().unwrap()).unwrap();
}

/// Item 12: a model that makes ONNX Runtime divide INT64_MIN by −1 (a hardware arithmetic
/// fault) ends graft with exit status 2 and a message saying so, not with SIGFPE.
#[test]
fn an_integer_division_fault_in_the_runtime_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("division.onnx");
    integer_division_model(&model, -1);
    let inputs = dir.path().join("inputs.npz");
    let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(&inputs).unwrap());
    npz.add_array("a", &ndarray::arr1(&[i64::MIN])).unwrap();
    npz.finish().unwrap();
    assert_refused(
        &[
            "run",
            text(&model),
            "--inputs",
            text(&inputs),
            "--threads",
            "1",
        ],
        &["arithmetic fault", "SIGFPE"],
    );
}
