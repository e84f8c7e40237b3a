//! Training checkpoints: everything a run needs to continue exactly where it stopped, in
//! `RUN_DIR/checkpoint/`.
//!
//! A checkpoint folder holds `adapter.safetensors` (the trainable tensors by graft name, float32;
//! `graft merge --adapter` reads it), `optimizer.safetensors` (the optimizer's moments, keyed
//! `first_moment.<tensor>` and `second_moment.<tensor>`) and `state.json` ([`CheckpointState`]:
//! the step, the data position, the optimizer's rule and step count, and the settings a resumed
//! run must share). A checkpoint is written into `checkpoint.tmp/` and then put in place by one
//! atomic exchange with `checkpoint/` (one rename for the first), after which the previous one
//! is removed: `checkpoint/` is the commit point, so a run killed at any point leaves
//! `checkpoint/` holding either the previous complete checkpoint or the new one, and [`load`]
//! reads only it.

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::optimizer::{Optimizer, OptimizerKind, Schedule};
use super::Task;
use crate::atomic_file::write_atomically;
use crate::{Error, Result};

/// The folder, inside a run folder, of the current checkpoint.
pub const CHECKPOINT_DIR: &str = "checkpoint";
const TEMPORARY_DIR: &str = "checkpoint.tmp";
/// Where earlier versions of graft kept the previous checkpoint during a swap; removed.
const PREVIOUS_DIR: &str = "checkpoint.old";
const STATE_FILE: &str = "state.json";
const ADAPTER_FILE: &str = "adapter.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const PARTICIPATION_FILE: &str = "participation.safetensors";

/// What `state.json` records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: u64,
    /// The run's total optimizer steps (the learning-rate schedule depends on it).
    pub total_steps: u64,
    /// Completed passes over the data order (reshuffles made after the first order).
    pub epoch: u64,
    /// How many examples of the current epoch's order have been used.
    pub position: usize,
    /// Training examples.
    pub examples: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accumulation: usize,
    /// Seed of the data order.
    pub seed: u64,
    /// Whether the data order is shuffled.
    pub shuffle: bool,
    /// The loss.
    pub task: Task,
    /// The update rule.
    pub optimizer: OptimizerKind,
    /// The optimizer's own step count.
    pub optimizer_step: u64,
    /// The trainable tensors, in training order.
    pub parameters: Vec<String>,
    /// The settings and inputs besides the data order that shape the run; absent in
    /// checkpoints of earlier graft versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trajectory: Option<Trajectory>,
    /// The methods' step-hook states (see [`super::participation`]); their tensors are in
    /// `participation.safetensors`.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub participation: serde_json::Value,
}

/// What shapes a run's trajectory besides the data order and the optimizer: the learning-rate
/// schedule, clipping, and fingerprints of the patched model and of the examples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// Schedule after warmup.
    pub schedule: Schedule,
    /// Global gradient-norm clipping.
    pub clip_norm: Option<f64>,
    /// [`super::fingerprint::model`] of the patched model the run started from.
    pub model: String,
    /// [`super::fingerprint::examples`] of the training examples.
    pub data: String,
}

impl Trajectory {
    /// `(what, saved, asked)` for every field where `self` (saved) and `run` differ.
    fn differences(&self, run: &Trajectory) -> Vec<(&'static str, String, String)> {
        let fields = [
            ("--lr", self.lr.to_string(), run.lr.to_string()),
            ("--warmup", self.warmup.to_string(), run.warmup.to_string()),
            (
                "--schedule",
                format!("{:?}", self.schedule),
                format!("{:?}", run.schedule),
            ),
            (
                "--clip-norm",
                format!("{:?}", self.clip_norm),
                format!("{:?}", run.clip_norm),
            ),
            (
                "a patched model (fingerprint)",
                self.model.clone(),
                run.model.clone(),
            ),
            (
                "training examples (data file, tokenizer, --max-len; fingerprint)",
                self.data.clone(),
                run.data.clone(),
            ),
        ];
        fields.into_iter().filter(|(_, a, b)| a != b).collect()
    }
}

impl CheckpointState {
    /// Fails, naming the first difference, unless `self` (from a checkpoint) and `run` (what
    /// the resuming run was asked for; its `step`, `epoch`, `position` and `optimizer_step` are
    /// not compared) describe the same training run. Differences in the [`Trajectory`] (the
    /// learning rate, the schedule, clipping, the model, the examples) are refused unless
    /// `accept_changes` is set, in which case each comes back as a sentence to report; the
    /// rest (the data order, the optimizer, the trainable tensors) is always refused.
    pub fn check_resumable(
        &self,
        run: &CheckpointState,
        checkpoint: &Path,
        accept_changes: bool,
    ) -> Result<Vec<String>> {
        let differences = [
            (
                "total steps",
                self.total_steps.to_string(),
                run.total_steps.to_string(),
            ),
            (
                "training examples",
                self.examples.to_string(),
                run.examples.to_string(),
            ),
            (
                "--batch-size",
                self.batch_size.to_string(),
                run.batch_size.to_string(),
            ),
            (
                "--grad-accumulation",
                self.grad_accumulation.to_string(),
                run.grad_accumulation.to_string(),
            ),
            ("--seed", self.seed.to_string(), run.seed.to_string()),
            (
                "shuffling",
                self.shuffle.to_string(),
                run.shuffle.to_string(),
            ),
            (
                "--task",
                format!("{:?}", self.task),
                format!("{:?}", run.task),
            ),
            (
                "optimizer",
                format!("{:?}", self.optimizer),
                format!("{:?}", run.optimizer),
            ),
            (
                "trainable tensors",
                self.parameters.join(", "),
                run.parameters.join(", "),
            ),
        ];
        for (what, saved, asked) in differences {
            if saved != asked {
                return Err(Error::Config(format!(
                    "{}: cannot resume: the checkpoint was made with {what} {saved}, this run has \
                     {asked}; resume with the same settings",
                    checkpoint.display()
                )));
            }
        }
        let (Some(saved), Some(asked)) = (&self.trajectory, &run.trajectory) else {
            return Ok(Vec::new());
        };
        let changes = saved.differences(asked);
        if let (false, Some((what, saved, asked))) = (accept_changes, changes.first()) {
            return Err(Error::Config(format!(
                "{}: cannot resume: the checkpoint was made with {what} {saved}, this run has \
                 {asked}; resume with the same settings, or pass --accept-changes to continue \
                 with the new ones",
                checkpoint.display()
            )));
        }
        Ok(changes
            .into_iter()
            .map(|(what, saved, asked)| {
                format!(
                    "resuming with {what} {asked} instead of the checkpoint's {saved} \
                     (--accept-changes): the run no longer follows one trajectory"
                )
            })
            .collect())
    }
}

/// A checkpoint read back by [`load`].
pub struct Checkpoint {
    /// Its folder.
    pub path: PathBuf,
    /// Its state.
    pub state: CheckpointState,
    /// Trainable tensor values, in the order of `state.parameters`.
    pub parameters: Vec<Vec<f32>>,
    /// The optimizer, moments included.
    pub optimizer: Optimizer,
    /// The step hooks' state tensors and the value inputs, by name.
    pub participation: Vec<(String, Vec<f32>)>,
}

/// Writes a checkpoint of `parameters` (named and shaped by `names` and `dims`) and `optimizer`
/// into `run_dir/checkpoint/`, replacing the previous one only once the new one is complete.
/// Returns the checkpoint folder.
pub fn save(
    run_dir: &Path,
    state: &CheckpointState,
    dims: &[Vec<i64>],
    parameters: &[Vec<f32>],
    optimizer: &Optimizer,
    participation: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<PathBuf> {
    let target = run_dir.join(CHECKPOINT_DIR);
    let temporary = run_dir.join(TEMPORARY_DIR);
    remove_folder(&temporary)?;
    remove_folder(&run_dir.join(PREVIOUS_DIR))?;
    std::fs::create_dir_all(&temporary).map_err(|e| Error::io(&temporary, e))?;

    let names = &state.parameters;
    let shapes: Vec<Vec<usize>> = dims
        .iter()
        .map(|d| d.iter().map(|&n| n as usize).collect())
        .collect();
    let adapter: Vec<(String, &[usize], &[f32])> = names
        .iter()
        .zip(&shapes)
        .zip(parameters)
        .map(|((name, shape), values)| (name.clone(), shape.as_slice(), values.as_slice()))
        .collect();
    write_tensors(&temporary.join(ADAPTER_FILE), &adapter)?;
    let mut moments = Vec::new();
    for (prefix, buffers) in [
        ("first_moment", &optimizer.first_moments),
        ("second_moment", &optimizer.second_moments),
    ] {
        for ((name, shape), values) in names.iter().zip(&shapes).zip(buffers) {
            moments.push((
                format!("{prefix}.{name}"),
                shape.as_slice(),
                values.as_slice(),
            ));
        }
    }
    write_tensors(&temporary.join(OPTIMIZER_FILE), &moments)?;
    if !participation.is_empty() {
        let tensors: Vec<(String, &[usize], &[f32])> = participation
            .iter()
            .map(|(name, shape, values)| (name.clone(), shape.as_slice(), values.as_slice()))
            .collect();
        write_tensors(&temporary.join(PARTICIPATION_FILE), &tensors)?;
    }
    let state_json = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::Config(format!("cannot encode the checkpoint state: {e}")))?;
    write_atomically(&temporary.join(STATE_FILE), &state_json)?;

    crate::atomic_file::sync_dir(&temporary);
    crate::pause::point(&format!("checkpoint-staged:{}", state.step));
    if target.exists() {
        crate::staged_folder::exchange(&temporary, &target)?;
        crate::atomic_file::sync_dir(run_dir);
        crate::pause::point(&format!("checkpoint-exchanged:{}", state.step));
        remove_folder(&temporary)?;
    } else {
        std::fs::rename(&temporary, &target).map_err(|e| Error::io(&target, e))?;
        crate::atomic_file::sync_dir(run_dir);
    }
    Ok(target)
}

/// Reads the checkpoint of `run_dir` (`checkpoint/`; a `checkpoint.tmp/` that a killed run
/// left behind was never committed and is ignored).
pub fn load(run_dir: &Path) -> Result<Checkpoint> {
    let path = run_dir.join(CHECKPOINT_DIR);
    let state_path = path.join(STATE_FILE);
    if !state_path.is_file() {
        return Err(Error::Config(format!(
            "{}: no checkpoint to resume from (expected {})",
            run_dir.display(),
            state_path.display()
        )));
    }
    let text = crate::input_file::read_to_string(&state_path)?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| {
        Error::Config(format!(
            "{}: not a graft checkpoint state: {e}",
            state_path.display()
        ))
    })?;
    let adapter = read_tensors(&path.join(ADAPTER_FILE))?;
    let moments = read_tensors(&path.join(OPTIMIZER_FILE))?;
    let participation_path = path.join(PARTICIPATION_FILE);
    let participation = if participation_path.is_file() {
        read_tensors(&participation_path)?
    } else {
        Vec::new()
    };
    let take = |tensors: &[(String, Vec<f32>)], key: &str, file: &str| {
        tensors
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, values)| values.clone())
            .ok_or_else(|| {
                Error::Config(format!(
                    "{}: tensor {key:?} is missing",
                    path.join(file).display()
                ))
            })
    };
    let mut parameters = Vec::new();
    let mut first_moments = Vec::new();
    let mut second_moments = Vec::new();
    for name in &state.parameters {
        parameters.push(take(&adapter, name, ADAPTER_FILE)?);
        first_moments.push(take(
            &moments,
            &format!("first_moment.{name}"),
            OPTIMIZER_FILE,
        )?);
        if matches!(state.optimizer, OptimizerKind::AdamW { .. }) {
            second_moments.push(take(
                &moments,
                &format!("second_moment.{name}"),
                OPTIMIZER_FILE,
            )?);
        }
    }
    let optimizer = Optimizer {
        kind: state.optimizer,
        step: state.optimizer_step,
        first_moments,
        second_moments,
    };
    Ok(Checkpoint {
        path,
        state,
        parameters,
        optimizer,
        participation,
    })
}

/// Removes every checkpoint folder of `run_dir` (a fresh run replaces an old run's state).
pub fn remove_all(run_dir: &Path) -> Result<()> {
    for folder in [CHECKPOINT_DIR, PREVIOUS_DIR, TEMPORARY_DIR] {
        remove_folder(&run_dir.join(folder))?;
    }
    Ok(())
}

/// Removes what a killed save left beside `checkpoint/` (never committed, never read), so a
/// resumed run leaves only its committed checkpoint behind.
pub fn remove_uncommitted(run_dir: &Path) -> Result<()> {
    for folder in [PREVIOUS_DIR, TEMPORARY_DIR] {
        remove_folder(&run_dir.join(folder))?;
    }
    Ok(())
}

fn remove_folder(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

fn write_tensors(path: &Path, tensors: &[(String, &[usize], &[f32])]) -> Result<()> {
    let buffers: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), bytes) in tensors.iter().zip(&buffers) {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), bytes)
                .map_err(|e| Error::Tensor {
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
        views.push((name.clone(), view));
    }
    let bytes = safetensors::serialize(views, &None).map_err(|e| {
        Error::Config(format!(
            "{}: cannot encode safetensors: {e}",
            path.display()
        ))
    })?;
    write_atomically(path, &bytes)
}

fn read_tensors(path: &Path) -> Result<Vec<(String, Vec<f32>)>> {
    let bytes = crate::input_file::read(path)?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Config(format!("{}: not a safetensors file: {e}", path.display())))?;
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(Error::Config(format!(
                    "{}: tensor {name:?} is {:?}, checkpoints hold float32",
                    path.display(),
                    view.dtype()
                )));
            }
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok((name, values))
        })
        .collect()
}
