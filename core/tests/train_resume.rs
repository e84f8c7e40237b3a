//! Checkpoints: a `graft train` killed with SIGKILL and resumed with `--resume` gives the same
//! per-step losses as an uninterrupted run, and a numerical fault stops training with the last
//! good checkpoint intact.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const STEPS: u64 = 150;

fn patched_bert(dir: &Path) -> PathBuf {
    let patched = dir.join("patched.onnx");
    apply_lora("bert-legacy", &["r=4", "targets=q,v"], &patched);
    patched
}

/// The `graft train` arguments of the runs compared here: shuffled sentiment data over several
/// epochs, an evaluation every 10 steps, a checkpoint every step, one thread (so that the same
/// inputs give bit-identical outputs).
fn train_args(patched: &Path, extra: &[&str]) -> Vec<String> {
    let data = repository("examples/data/sentiment.jsonl");
    let tokenizer = repository("models/tokenizers/bert/tokenizer.json");
    let mut args: Vec<String> = [
        "train",
        text(patched),
        "--task",
        "seq-cls",
        "--data",
        text(&data),
        "--tokenizer",
        text(&tokenizer),
        "--max-len",
        "64",
        "--eval-data",
        text(&data),
        "--eval-every",
        "10",
        "--batch-size",
        "16",
        "--lr",
        "1e-2",
        "--schedule",
        "linear",
        "--warmup",
        "5",
        "--save-every",
        "1",
        "--threads",
        "1",
        "--steps",
        &STEPS.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run(args: &[String]) -> (i32, String, String) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_graft(&refs)
}

/// (step, loss) of every training line and (step, eval_loss) of every evaluation line.
type Curves = (Vec<(u64, f64)>, Vec<(u64, f64)>);

fn curves(run_dir: &Path) -> Curves {
    let (mut training, mut evaluation) = (Vec::new(), Vec::new());
    for line in std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = value["step"].as_u64().unwrap();
        if let Some(loss) = value["loss"].as_f64() {
            training.push((step, loss));
        } else {
            evaluation.push((step, value["eval_loss"].as_f64().unwrap()));
        }
    }
    (training, evaluation)
}

fn checkpoint_step(run_dir: &Path) -> u64 {
    let state = std::fs::read_to_string(run_dir.join("checkpoint/state.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&state).unwrap()["step"]
        .as_u64()
        .unwrap()
}

/// Kills a run once its metrics show at least 20 steps, resumes it, and compares every step's
/// loss and every evaluation with an uninterrupted run. The same graph, data order and optimizer
/// state at one thread make the runs bit-identical; 1e-6 is the bar.
#[test]
fn killed_run_resumes_with_the_losses_of_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    check_kill_and_resume(dir.path(), &patched_bert(dir.path()));
}

/// The same with LoRA dropout 0.3: graft draws the masks per (seed, step), so the resumed
/// part draws the masks of the uninterrupted run.
#[test]
fn killed_run_with_dropout_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("patched.onnx");
    apply_lora(
        "bert-legacy",
        &["r=4", "targets=q,v", "dropout=0.3"],
        &patched,
    );
    check_kill_and_resume(dir.path(), &patched);
}

/// The same with AdaLoRA, whose step hook keeps importance averages and a rank pattern
/// between steps: the checkpoint carries them, so the resumed run prunes as the whole run did.
#[test]
fn killed_adalora_run_resumes_its_step_hook_state() {
    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("patched.onnx");
    apply_method(
        "bert-legacy",
        "adalora",
        &["init_r=4", "target_r=2", "tinit=2", "tfinal=5", "deltaT=2"],
        &patched,
    );
    check_kill_and_resume(dir.path(), &patched);
}

fn check_kill_and_resume(dir: &Path, patched: &Path) {
    let patched = patched.to_path_buf();

    let whole = dir.join("whole");
    let (code, stdout, stderr) = run(&train_args(&patched, &["--out", text(&whole)]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (expected_training, expected_evaluation) = curves(&whole);
    assert_eq!(expected_training.len() as u64, STEPS);

    let interrupted = dir.join("interrupted");
    let args = train_args(&patched, &["--out", text(&interrupted)]);
    let mut child = graft_command()
        .args(&args[..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics = interrupted.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let lines = std::fs::read_to_string(&metrics)
            .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
            .unwrap_or(0);
        if lines >= 20 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "the run made no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = checkpoint_step(&interrupted);
    assert!(
        (1..STEPS).contains(&killed_at),
        "killed after step {killed_at} of {STEPS}: the test needs a run cut short"
    );

    let (code, stdout, stderr) = run(&train_args(&patched, &["--resume", text(&interrupted)]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("resuming after step {killed_at}")),
        "{stdout}"
    );
    let (training, evaluation) = curves(&interrupted);
    let steps: Vec<u64> = training.iter().map(|p| p.0).collect();
    assert_eq!(
        steps,
        (1..=STEPS).collect::<Vec<_>>(),
        "one line per step, none repeated"
    );
    for ((step, got), (_, want)) in training.iter().zip(&expected_training) {
        assert!(
            (got - want).abs() <= 1e-6,
            "step {step} (resumed after {killed_at}): loss {got} vs uninterrupted {want}"
        );
    }
    assert_eq!(evaluation.len(), expected_evaluation.len());
    for ((step, got), (_, want)) in evaluation.iter().zip(&expected_evaluation) {
        assert!(
            (got - want).abs() <= 1e-6,
            "evaluation at step {step}: {got} vs {want}"
        );
    }
    assert_eq!(checkpoint_step(&interrupted), STEPS);
    assert_eq!(
        std::fs::read(interrupted.join("adapter.safetensors")).unwrap(),
        std::fs::read(whole.join("adapter.safetensors")).unwrap(),
        "the final adapters are identical"
    );
}

/// SGD with a learning rate of 1e20 blows the tiny BERT up after a few steps: the run stops with
/// exit status 2 naming the step, and the checkpoint holds the step before it, with finite values.
#[test]
fn numerical_fault_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let patched = patched_bert(dir.path());
    let run_dir = dir.path().join("run");
    let data = repository("examples/data/sentiment.jsonl");
    let tokenizer = repository("models/tokenizers/bert/tokenizer.json");
    let (code, stdout, stderr) = run_graft(&[
        "train",
        text(&patched),
        "--task",
        "seq-cls",
        "--data",
        text(&data),
        "--tokenizer",
        text(&tokenizer),
        "--optimizer",
        "sgd",
        "--lr",
        "1e20",
        "--steps",
        "20",
        "--save-every",
        "1",
        "--threads",
        "1",
        "--out",
        text(&run_dir),
    ]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let fault_step: u64 = stderr
        .split("step ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("the message names the step: {stderr}"));
    assert!(fault_step >= 2, "{stderr}");
    assert!(stderr.contains("not finite"), "{stderr}");
    let checkpoint = run_dir.join("checkpoint");
    assert!(
        stderr.contains(&format!(
            "last good checkpoint (step {}) is in {}",
            fault_step - 1,
            checkpoint.display()
        )),
        "{stderr}"
    );
    assert_eq!(checkpoint_step(&run_dir), fault_step - 1);
    let bytes = std::fs::read(checkpoint.join("adapter.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in tensors.tensors() {
        assert!(
            view.data()
                .chunks_exact(4)
                .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
            "checkpointed {name} is not finite"
        );
    }
    let (training, _) = curves(&run_dir);
    assert_eq!(
        training.len() as u64,
        fault_step - 1,
        "no line for the bad step"
    );
}

/// A resumed run must be asked for the same run: a different batch size is refused.
#[test]
fn resume_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let patched = patched_bert(dir.path());
    let run_dir = dir.path().join("run");
    let mut args = train_args(&patched, &["--out", text(&run_dir)]);
    let steps = args.iter().position(|a| a == "--steps").unwrap();
    args[steps + 1] = "3".into();
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let batch = args.iter().position(|a| a == "--batch-size").unwrap();
    args[batch + 1] = "8".into();
    args.truncate(args.len() - 2);
    args.extend(["--resume".to_owned(), text(&run_dir).to_owned()]);
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--batch-size 16, this run has 8"),
        "{stderr}"
    );
}
