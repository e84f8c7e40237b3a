//! Training through ONNX Runtime: the training graph (forward + loss + gradients of the
//! trainable tensors, as standard ONNX), a session that runs it, and the host-side loop that
//! feeds batches, clips gradients, updates parameters, evaluates, checkpoints and writes metrics,
//! the loss curve and the adapter.

mod cache;
pub mod checkpoint;
pub mod data;
mod data_check;
pub mod dropout;
pub mod example;
pub mod fingerprint;
pub mod optimizer;
pub mod parameters;
pub mod participation;
pub mod plot;
pub mod text;

pub use data_check::prepare_data;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::autodiff::{gradient_graph, loss};
use crate::ir::attributes::int_attribute;
use crate::ir::{Graph, Model, ValueInfo};
use crate::optimize::narrow_unread_rows;
use crate::patch::GraftRecord;
use crate::runtime::{HostTensor, OrtSession, SessionOptions};
use crate::{Error, Result};
use checkpoint::CheckpointState;
use data::{collate, read_data, DataFormat, DataOptions, Example, Target};
use optimizer::{clip_global_norm, global_norm, Optimizer, OptimizerKind, Schedule};
use parameters::ParameterStore;
use participation::{Participation, StepHooks};

/// What the model is trained to do; decides the loss appended to its first output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Next-token prediction: logits [batch, seq, vocab], labels shifted by one, −100 ignored.
    CausalLm,
    /// Sequence classification: logits [batch, classes], one class per example.
    SeqCls,
    /// Token classification: logits [batch, seq, classes], one label per token, −100 ignored.
    TokenCls,
    /// Regression: logits [batch, 1], one real value per example, mean squared error (Hugging
    /// Face's `num_labels = 1`).
    Regression,
}

/// Everything `graft train` can be told.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The loss.
    pub task: Task,
    /// Training data.
    pub data: PathBuf,
    /// The layout of `data` and `eval_data`.
    pub data_format: DataFormat,
    /// The `tokenizer.json` for the text formats.
    pub tokenizer: Option<PathBuf>,
    /// The most tokens an example tokenized from text has.
    pub max_len: usize,
    /// Evaluation data (same format as `data`).
    pub eval_data: Option<PathBuf>,
    /// Evaluate every this many steps (and always after the last step).
    pub eval_every: Option<u64>,
    /// Also evaluate before the first step (step 0: the model as it starts).
    pub eval_at_start: bool,
    /// Repeat each evaluation once per value of a host input.
    pub eval_sweep: Option<EvalSweep>,
    /// Write a checkpoint every this many steps (and always after the last step).
    pub save_every: Option<u64>,
    /// Continue from the checkpoint in `out` instead of starting afresh.
    pub resume: bool,
    /// With `resume`: continue although the learning rate, schedule, clipping, patched model
    /// or examples differ from the checkpoint's (each change is reported as a warning);
    /// without it such a resume is refused.
    pub accept_changes: bool,
    /// The run folder (metrics, checkpoint, loss curve, adapter).
    pub out: PathBuf,
    /// Optimizer steps; `None` derives them from `epochs`.
    pub steps: Option<u64>,
    /// Passes over the data when `steps` is not given.
    pub epochs: u64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged per optimizer step.
    pub grad_accumulation: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// The update rule.
    pub optimizer: OptimizerKind,
    /// Warmup steps.
    pub warmup: u64,
    /// Learning-rate schedule after warmup.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this value.
    pub clip_norm: Option<f64>,
    /// Seed of the data order.
    pub seed: u64,
    /// Keep the file's order (batches are consecutive lines).
    pub shuffle: bool,
    /// Skip malformed data lines instead of failing.
    pub skip_bad_lines: bool,
    /// Execution provider and threads.
    pub session: SessionOptions,
    /// The methods whose tensors train (empty: every method); the others stay frozen.
    pub train_methods: Vec<String>,
}

impl TrainOptions {
    /// Fails with [`Error::Config`] naming the flag when a setting is outside its domain: zero
    /// steps, epochs, batch size, accumulation or checkpoint/evaluation interval, a negative or
    /// non-finite learning rate, a clipping norm that is not a positive number, optimizer
    /// settings that [`OptimizerKind::check`] refuses, or more threads than the machine has.
    pub fn check(&self) -> Result<()> {
        let positive = |flag: &str, value: u64| {
            if value == 0 {
                Err(Error::Config(format!("{flag} 0: must be at least 1")))
            } else {
                Ok(())
            }
        };
        match self.steps {
            Some(steps) => positive("--steps", steps)?,
            None => positive("--epochs", self.epochs)?,
        }
        positive("--batch-size", self.batch_size as u64)?;
        positive("--grad-accumulation", self.grad_accumulation as u64)?;
        if let Some(every) = self.save_every {
            positive("--save-every", every)?;
        }
        if let Some(every) = self.eval_every {
            positive("--eval-every", every)?;
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(Error::Config(format!(
                "--lr {} must be a finite number, 0 or more",
                self.lr
            )));
        }
        if let Some(norm) = self.clip_norm.filter(|n| !(n.is_finite() && *n > 0.0)) {
            return Err(Error::Config(format!(
                "--clip-norm {norm} must be a positive number"
            )));
        }
        self.optimizer.check()?;
        self.session.check()
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: u64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used for the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (non-padding input positions) processed per second in this step.
    pub tokens_per_s: f64,
    /// The methods' loss terms (unweighted, mean over the step's micro-batches), by
    /// `<method>.<term>`; `loss` includes them weighted.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub loss_terms: std::collections::BTreeMap<String, f64>,
    /// Figures the methods' step hooks reported, by `<method>.<name>`.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub plugin: std::collections::BTreeMap<String, f64>,
}

/// Evaluations repeated once per value of one of the methods' host inputs of kind
/// [`HostInputKind::Value`](graft_plugin_sdk::HostInputKind::Value) — for example robust
/// AdapterDrop's `adapter.<name>.dropped_layers` for n = 0, 1, …, or an adapter's switch.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalSweep {
    /// The host input.
    pub input: String,
    /// Its values, one evaluation each, in order.
    pub values: Vec<f64>,
}

impl std::str::FromStr for EvalSweep {
    type Err = String;

    /// Reads `NAME=V1,V2,…` (`adapter.adapter.dropped_layers=0,2,4`).
    fn from_str(text: &str) -> std::result::Result<EvalSweep, String> {
        let (input, values) = text
            .split_once('=')
            .ok_or_else(|| format!("\"{text}\" is not INPUT=V1,V2,…"))?;
        let values = values
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| format!("\"{v}\" in --eval-sweep {text} is not a number"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if input.is_empty() {
            return Err(format!("--eval-sweep {text} names no input"));
        }
        Ok(EvalSweep {
            input: input.to_owned(),
            values,
        })
    }
}

/// One evaluation line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// The optimizer step after which the evaluation ran.
    pub step: u64,
    /// Mean loss over every scored label of the evaluation set.
    pub eval_loss: f64,
    /// Share of scored labels predicted right (argmax), for seq-cls and token-cls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
    /// The host input values this evaluation ran with, by name, when they were swept
    /// ([`TrainOptions::eval_sweep`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub inputs: std::collections::BTreeMap<String, f64>,
}

/// What [`train`] reports while it runs.
#[derive(Clone, Copy, Debug)]
pub enum TrainEvent<'a> {
    /// The data is read and the sessions are built; steps `first_step + 1 ..= total_steps`
    /// follow.
    Started {
        /// Steps already done (by the checkpoint a resumed run starts from).
        first_step: u64,
        /// The run's total optimizer steps.
        total_steps: u64,
        /// Training examples.
        examples: usize,
        /// Malformed training lines skipped.
        skipped_lines: usize,
        /// Evaluation examples, when there is evaluation data.
        eval_examples: Option<usize>,
    },
    /// Something in the data looks wrong but does not stop the run.
    Warning(&'a str),
    /// A step finished.
    Step(&'a StepMetrics),
    /// An evaluation finished.
    Evaluated(&'a EvalMetrics),
    /// A checkpoint was written.
    Checkpoint {
        /// The step it holds.
        step: u64,
        /// Its folder.
        path: &'a Path,
    },
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    /// Optimizer steps the run has done in all (resumed runs included).
    pub steps: u64,
    /// The step this invocation resumed from.
    pub resumed_from: Option<u64>,
    /// First step's loss.
    pub first_loss: f64,
    /// Last step's loss.
    pub last_loss: f64,
    /// Wall-clock seconds of this invocation.
    pub seconds: f64,
    /// Malformed training lines skipped.
    pub skipped_lines: usize,
    /// Malformed evaluation lines skipped.
    pub skipped_eval_lines: usize,
    /// The evaluation with the lowest loss.
    pub best_eval_loss: Option<EvalMetrics>,
    /// The evaluation with the highest accuracy.
    pub best_eval_accuracy: Option<EvalMetrics>,
    /// The run folder.
    pub out: PathBuf,
    /// The files and folders written into the run folder.
    pub files: Vec<PathBuf>,
}

/// A model's training graph and the names it reads and writes.
pub struct TrainingGraph {
    /// Forward + loss + gradients, as standard ONNX.
    pub model: Model,
    /// The loss output.
    pub loss: String,
    /// (trainable tensor, gradient output), in the order of [`GraftRecord::trainable`].
    pub gradients: Vec<(String, String)>,
    /// (`<method>.<term>`, output) of each loss term, after the gradients.
    pub loss_terms: Vec<(String, String)>,
    /// The dropout masks the host feeds (see [`dropout`]).
    pub dropout_masks: Vec<dropout::DropoutMask>,
}

impl TrainingGraph {
    /// The dropout masks for micro-batch `micro` of step `step` of a run seeded `seed`, sized
    /// by the batch's `feeds`.
    pub fn dropout_feeds(
        &self,
        feeds: &[(String, HostTensor)],
        seed: u64,
        step: u64,
        micro: usize,
    ) -> Result<Vec<(String, HostTensor)>> {
        dropout::mask_feeds(
            &self.dropout_masks,
            &self.model.graph.inputs,
            feeds,
            seed,
            step,
            micro,
        )
    }
}

/// Builds the training graph of a patched model with every method trained; see
/// [`training_graph_for`].
pub fn training_graph(patched: &Model, task: Task) -> Result<TrainingGraph> {
    training_graph_for(patched, task, &[])
}

/// The recorded methods that train when `methods` (a `--train` selection) train: those named,
/// or every method when `methods` is empty. Errors name an unknown method.
pub fn selected_methods<'r>(
    record: &'r GraftRecord,
    methods: &[String],
) -> Result<Vec<&'r graft_plugin_sdk::AppliedMethod>> {
    if let Some(unknown) = methods
        .iter()
        .find(|m| !record.methods.iter().any(|a| &a.method == *m))
    {
        let known: Vec<&str> = record.methods.iter().map(|m| m.method.as_str()).collect();
        return Err(Error::Config(format!(
            "--train {unknown}: the model has no such method; it has {}",
            known.join(", ")
        )));
    }
    Ok(record
        .methods
        .iter()
        .filter(|m| methods.is_empty() || methods.contains(&m.method))
        .collect())
}

/// The tensors trained when `methods` train (see [`selected_methods`]), in the order of
/// [`GraftRecord::trainable`].
pub fn trained_tensors(record: &GraftRecord, methods: &[String]) -> Result<Vec<String>> {
    Ok(selected_methods(record, methods)?
        .into_iter()
        .flat_map(|m| m.trainable.iter().cloned())
        .collect())
}

/// Builds the training graph of a patched model: the task's loss on its first output plus the
/// weighted loss terms of the trained methods, and the gradients of the tensors those
/// `methods` train (every method when empty; see [`trained_tensors`]), which become graph
/// inputs — other methods' tensors and frozen weights stay initializers. Host-fed inputs
/// become plain graph inputs. The methods' `Dropout` nodes become products with masks the host
/// draws at every micro-batch ([`TrainingGraph::dropout_feeds`]), and the rows the loss never
/// reads are not computed ([`narrow_unread_rows`]). Outputs: the loss,
/// the gradients, then the loss terms.
pub fn training_graph_for(
    patched: &Model,
    task: Task,
    methods: &[String],
) -> Result<TrainingGraph> {
    let record = crate::patch::read_record(patched)?;
    let trainable = trained_tensors(&record, methods)?;
    if trainable.is_empty() {
        return Err(Error::Config(
            "the model has no trainable tensors; run `graft apply` first".into(),
        ));
    }
    let mut model = patched.clone();
    let dropout_masks = dropout::host_masks(&mut model, &record)?;
    host_inputs_to_graph_inputs(&mut model, &record);
    let logits = first_output(&model)?.name;
    let task_loss = append_loss(&mut model, task, &logits)?;
    let terms: Vec<(String, f64, String)> = selected_methods(&record, methods)?
        .into_iter()
        .flat_map(|m| {
            m.training.loss_terms.iter().map(|t| {
                (
                    format!("{}.{}", m.method, t.name),
                    t.weight,
                    t.value.clone(),
                )
            })
        })
        .collect();
    let (loss, term_outputs) = add_loss_terms(&mut model, &task_loss, &terms)?;
    narrow_unread_rows(&mut model)?;
    let mut graph = gradient_graph(&model, &loss, &trainable)?;
    for (_, output) in &term_outputs {
        graph
            .model
            .graph
            .outputs
            .push(ValueInfo::tensor(output, crate::ir::DataType::Float, &[]));
    }
    Ok(TrainingGraph {
        model: graph.model,
        loss: graph.loss,
        gradients: graph.gradients,
        loss_terms: term_outputs,
        dropout_masks,
    })
}

/// Makes the host-fed inputs plain graph inputs (the host feeds them at every step).
fn host_inputs_to_graph_inputs(model: &mut Model, record: &GraftRecord) {
    let names: Vec<&str> = record
        .methods
        .iter()
        .flat_map(|m| m.training.host_inputs.iter().map(|i| i.name.as_str()))
        .collect();
    model.graph.initializers_to_inputs(&names);
}

/// Appends `loss = task_loss + Σ weight · term` for `terms` (label, weight, value); each
/// term is summed to a float32 scalar first, exposed as an output named after its label.
/// Returns the total loss and the (label, output) of each term.
fn add_loss_terms(
    model: &mut Model,
    task_loss: &str,
    terms: &[(String, f64, String)],
) -> Result<(String, Vec<(String, String)>)> {
    if terms.is_empty() {
        return Ok((task_loss.to_owned(), Vec::new()));
    }
    let mut taken = model.graph.taken_names();
    let mut fresh = |hint: &str| {
        let name = Graph::first_free_name(hint, |n| taken.contains(n));
        taken.insert(name.clone());
        name
    };
    let mut total = task_loss.to_owned();
    let mut outputs = Vec::new();
    for (label, weight, value) in terms {
        let scalar = fresh(&format!("graft.loss_term.{label}"));
        let mut reduce = crate::ir::Node::new(
            fresh(&format!("{scalar}.sum")),
            "ReduceSum",
            vec![value.clone()],
            vec![scalar.clone()],
        );
        reduce.attributes.push(int_attribute("keepdims", 0));
        let weight_value = fresh(&format!("{scalar}.weight"));
        let mut constant = crate::ir::Node::new(
            fresh(&format!("{scalar}.weight_constant")),
            "Constant",
            vec![],
            vec![weight_value.clone()],
        );
        constant
            .attributes
            .push(crate::ir::attributes::float_attribute(
                "value_float",
                *weight as f32,
            ));
        let weighted = fresh(&format!("{scalar}.weighted"));
        let multiply = crate::ir::Node::new(
            fresh(&format!("{scalar}.mul")),
            "Mul",
            vec![scalar.clone(), weight_value],
            vec![weighted.clone()],
        );
        let sum = fresh("graft.loss_with_terms");
        let add = crate::ir::Node::new(
            fresh(&format!("{sum}.add")),
            "Add",
            vec![total.clone(), weighted],
            vec![sum.clone()],
        );
        model.graph.nodes.extend([reduce, constant, multiply, add]);
        total = sum;
        outputs.push((label.clone(), scalar));
    }
    if let Some(output) = model.graph.outputs.iter_mut().find(|o| o.name == task_loss) {
        output.name.clone_from(&total);
    }
    Ok((total, outputs))
}

/// A model's evaluation graph: forward and loss, no gradients, dropout off.
pub struct EvaluationGraph {
    /// The patched model with the loss appended; trainable tensors are graph inputs.
    pub model: Model,
    /// The loss output (first).
    pub loss: String,
    /// The model's first output (second), the logits scored by the loss.
    pub logits: String,
    /// The trainable tensors, in the order of [`GraftRecord::trainable`].
    pub parameters: Vec<String>,
}

/// Builds the evaluation graph of a patched model: the task's loss on its first output, with the
/// same loss nodes as [`training_graph`] but no gradients and the grafted dropout left off, and
/// the same narrowing to the rows the outputs read.
/// Outputs are the loss, then the first output; the trainable tensors become graph inputs so
/// that the current values are fed at each evaluation.
pub fn evaluation_graph(patched: &Model, task: Task) -> Result<EvaluationGraph> {
    evaluation_graph_for(patched, task, &[])
}

/// [`evaluation_graph`] for a run that trains `methods` only (every method when empty): the
/// tensors they train are the graph inputs.
pub fn evaluation_graph_for(
    patched: &Model,
    task: Task,
    methods: &[String],
) -> Result<EvaluationGraph> {
    let record = crate::patch::read_record(patched)?;
    let parameters = trained_tensors(&record, methods)?;
    let mut model = patched.clone();
    host_inputs_to_graph_inputs(&mut model, &record);
    let logits = first_output(&model)?;
    let loss = append_loss(&mut model, task, &logits.name)?;
    model.graph.initializers_to_inputs(&parameters);
    let loss_dtype = crate::analysis::infer_shapes(&model)?
        .dtype(&loss)
        .ok_or_else(|| {
            Error::Config(format!("the element type of the loss {loss:?} is unknown"))
        })?;
    model.graph.outputs = vec![ValueInfo::tensor(&loss, loss_dtype, &[]), logits.clone()];
    narrow_unread_rows(&mut model)?;
    model.graph.validate()?;
    Ok(EvaluationGraph {
        model,
        loss,
        logits: logits.name,
        parameters,
    })
}

fn first_output(model: &Model) -> Result<ValueInfo> {
    model
        .graph
        .outputs
        .first()
        .cloned()
        .ok_or_else(|| Error::InvalidGraph("the model has no outputs".into()))
}

/// Appends the task's loss on `logits` (with a new `labels` input) and returns the loss value.
fn append_loss(model: &mut Model, task: Task, logits: &str) -> Result<String> {
    match task {
        Task::SeqCls => loss::cross_entropy(model, logits, "labels", data::IGNORE_INDEX),
        Task::CausalLm => loss::causal_lm(model, logits, "labels"),
        Task::TokenCls => loss::token_classification(model, logits, "labels"),
        Task::Regression => loss::regression(model, logits, "labels"),
    }
}

/// Runs training as `options` say, starting from the trainable values in `patched` (or those of
/// an adapter loaded into it beforehand, or those of the checkpoint in `options.out` when
/// `options.resume` is set), and writes into `options.out`: `metrics.jsonl` (a [`StepMetrics`]
/// line per step and an [`EvalMetrics`] line per evaluation; a resumed run keeps the lines up to
/// its checkpoint and appends), `checkpoint/` (see [`checkpoint`]) every `save_every` steps and
/// after the last, `loss.svg`, and the trained adapter (see [`save_adapter`]). `on_event` sees
/// the run's progress.
///
/// A non-finite loss or gradient norm stops the run with an error naming the step and the last
/// checkpoint; that step writes nothing, so the checkpoint stays the last good state. The run
/// folder is locked for the whole run: a second run on it fails at once.
pub fn train(
    patched: &Model,
    options: &TrainOptions,
    hooks: &dyn StepHooks,
    mut on_event: impl FnMut(TrainEvent<'_>),
) -> Result<TrainSummary> {
    options.check()?;
    let started = std::time::Instant::now();
    let data_options = DataOptions {
        format: options.data_format,
        tokenizer: options.tokenizer.clone(),
        max_len: options.max_len,
        skip_bad_lines: options.skip_bad_lines,
    };
    let mut dataset = read_data(&options.data, &data_options)?;
    data_check::prepare_data(patched, options.task, &options.data, &mut dataset)?;
    let eval_set = match &options.eval_data {
        Some(path) => {
            let mut eval_set = read_data(path, &data_options)?;
            data_check::prepare_data(patched, options.task, path, &mut eval_set)?;
            Some(eval_set)
        }
        None => None,
    };
    let examples = &dataset.examples;
    let graph = training_graph_for(patched, options.task, &options.train_methods)?;
    let record = crate::patch::read_record(patched)?;
    let trained_methods: Vec<&str> = selected_methods(&record, &options.train_methods)?
        .into_iter()
        .map(|m| m.method.as_str())
        .collect();
    let mut participation = Participation::new(patched, &record, &trained_methods, options.seed)?;
    if let Some(sweep) = &options.eval_sweep {
        participation.check_value_input(&sweep.input)?;
        if eval_set.is_none() {
            return Err(Error::Config(
                "--eval-sweep needs evaluation data (--eval-data)".into(),
            ));
        }
    }
    let caches = cache::EmptyCaches::of(patched)?;
    let mut session =
        OrtSession::from_bytes(&crate::onnx::to_bytes(&graph.model)?, options.session)?;
    let mut evaluator = match &eval_set {
        Some(eval_set) => Some(Evaluator::new(
            patched,
            options.task,
            &options.train_methods,
            &eval_set.examples,
            options.batch_size.max(1),
            options.session,
            caches.clone(),
        )?),
        None => None,
    };

    let names: Vec<String> = graph.gradients.iter().map(|(n, _)| n.clone()).collect();
    let mut store = ParameterStore::from_model(patched, names.clone())?;
    let lengths = store.lengths();
    let mut optimizer = Optimizer::new(options.optimizer, &lengths);

    let batch_size = options.batch_size.max(1);
    let accumulation = options.grad_accumulation.max(1);
    let batches_per_epoch = examples.len().div_ceil(batch_size);
    let total_steps = options
        .steps
        .unwrap_or_else(|| {
            (options.epochs * batches_per_epoch as u64).div_ceil(accumulation as u64)
        })
        .max(1);
    let mut order = EpochOrder::new(examples.len(), options.shuffle, options.seed);
    let mut state = CheckpointState {
        step: 0,
        total_steps,
        epoch: 0,
        position: 0,
        examples: examples.len(),
        batch_size,
        grad_accumulation: accumulation,
        seed: options.seed,
        shuffle: options.shuffle,
        task: options.task,
        optimizer: options.optimizer,
        optimizer_step: 0,
        parameters: names.clone(),
        trajectory: Some(checkpoint::Trajectory {
            lr: options.lr,
            warmup: options.warmup,
            schedule: options.schedule,
            clip_norm: options.clip_norm,
            model: fingerprint::model(patched),
            data: fingerprint::examples(examples),
        }),
        participation: serde_json::Value::Null,
    };

    std::fs::create_dir_all(&options.out).map_err(|e| Error::io(&options.out, e))?;
    // Held until the run returns: two runs writing one folder would mix their files.
    let _run_lock = crate::folder_lock::FolderLock::acquire(&options.out, "run folder")?;
    let metrics_path = options.out.join("metrics.jsonl");
    let mut history = History::default();
    let mut last_checkpoint: Option<(u64, PathBuf)> = None;
    let first_step = if options.resume {
        let saved = checkpoint::load(&options.out)?;
        checkpoint::remove_uncommitted(&options.out)?;
        let changes = saved
            .state
            .check_resumable(&state, &saved.path, options.accept_changes)?;
        for change in &changes {
            on_event(TrainEvent::Warning(change));
        }
        for ((name, values), length) in names.iter().zip(&saved.parameters).zip(&lengths) {
            if values.len() != *length {
                return Err(Error::Config(format!(
                    "{}: tensor {name:?} has {} values, the model's has {length}",
                    saved.path.display(),
                    values.len()
                )));
            }
        }
        store.values = saved.parameters;
        optimizer = saved.optimizer;
        participation.restore(&saved.state.participation, &saved.participation)?;
        order.restore(saved.state.epoch, saved.state.position);
        history = History::keep_until(&metrics_path, saved.state.step)?;
        last_checkpoint = Some((saved.state.step, saved.path));
        saved.state.step
    } else {
        checkpoint::remove_all(&options.out)?;
        crate::atomic_file::write_atomically(&metrics_path, b"")?;
        0
    };
    let mut metrics_file = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let mut write_line =
        |line: String| writeln!(metrics_file, "{line}").map_err(|e| Error::io(&metrics_path, e));

    let eval_warnings = eval_set.iter().flat_map(|set| &set.warnings);
    for warning in dataset.warnings.iter().chain(eval_warnings) {
        on_event(TrainEvent::Warning(warning));
    }
    on_event(TrainEvent::Started {
        first_step,
        total_steps,
        examples: examples.len(),
        skipped_lines: dataset.skipped,
        eval_examples: eval_set.as_ref().map(|set| set.examples.len()),
    });
    if let Some(evaluator) = evaluator.as_mut() {
        if options.eval_at_start && first_step == 0 {
            let sweep = options.eval_sweep.as_ref();
            for evaluation in evaluator.sweep(0, total_steps, &store, &participation, sweep)? {
                write_line(serde_json::to_string(&evaluation).unwrap_or_default())?;
                history.evaluations.push(evaluation.clone());
                on_event(TrainEvent::Evaluated(&evaluation));
            }
        }
    }
    for step in first_step..total_steps {
        let step_number = step + 1;
        let step_started = std::time::Instant::now();
        // The parameters first, each batch's inputs after them (replaced batch by batch).
        let mut feeds = store.feeds()?;
        let n_parameters = feeds.len();
        let mut gradients: Vec<Vec<f32>> = lengths.iter().map(|&n| vec![0.0; n]).collect();
        let mut loss_sum = 0.0;
        let mut term_sums = vec![0.0; graph.loss_terms.len()];
        let mut tokens = 0usize;
        // The lines of a micro-batch with no label to score: its loss is 0/0.
        let mut unscored: Option<Vec<usize>> = None;
        for micro in 0..accumulation {
            let indices = order.next_batch(batch_size);
            let batch: Vec<&Example> = indices.iter().map(|&i| &examples[i]).collect();
            if unscored.is_none()
                && !batch
                    .iter()
                    .any(|e| data_check::scores_something(e, options.task))
            {
                unscored = Some(indices.iter().map(|&i| dataset.lines[i]).collect());
            }
            feeds.truncate(n_parameters);
            feeds.extend(
                collate(&batch)
                    .into_iter()
                    .chain(caches.feeds(batch.len()))
                    .filter(|(name, _)| session.input_names.contains(name)),
            );
            feeds.extend(participation.feeds(true, step_number, total_steps, micro)?);
            let masks = graph.dropout_feeds(&feeds, options.seed, step_number, micro)?;
            feeds.extend(masks);
            tokens += batch.iter().map(|e| sequence_length(e)).sum::<usize>();
            let outputs = session.run(&feeds)?;
            for (sum, (_, term)) in term_sums.iter_mut().zip(&graph.loss_terms) {
                *sum += scalar(&outputs, term, "training")?;
            }
            loss_sum += scalar(&outputs, &graph.loss, "training")?;
            for (accumulated, (_, gradient_name)) in gradients.iter_mut().zip(&graph.gradients) {
                let gradient = output(&outputs, gradient_name, "training")?.to_f64();
                for (a, g) in accumulated.iter_mut().zip(gradient) {
                    *a += (g / accumulation as f64) as f32;
                }
            }
        }
        let loss = loss_sum / accumulation as f64;
        let grad_norm = match options.clip_norm {
            Some(max_norm) => clip_global_norm(&mut gradients, max_norm),
            None => global_norm(&gradients),
        };
        let lr = options
            .schedule
            .lr(options.lr, step, options.warmup, total_steps);
        let mut plugin_metrics = participation::HookMetrics::new();
        let fault = if let (false, Some(lines)) = (loss.is_finite(), &unscored) {
            Some(format!(
                "no label of a batch is scored (lines {lines:?} of {} have only the ignore \
                 label {}), so its loss is undefined; give those lines a label to score or \
                 remove them",
                options.data.display(),
                data::IGNORE_INDEX
            ))
        } else if !loss.is_finite() || !grad_norm.is_finite() {
            Some(format!(
                "the loss or a gradient is not finite (loss {loss}, gradient norm {grad_norm})"
            ))
        } else {
            optimizer.update(&mut store.values, &gradients, lr);
            plugin_metrics = participation.after_step(
                hooks,
                patched,
                step_number,
                total_steps,
                &mut store,
                &gradients,
            )?;
            store.first_not_finite().map(|name| {
                format!("the update (lr {lr:e}) made trainable tensor {name:?} not finite")
            })
        };
        if let Some(fault) = fault {
            let kept = match &last_checkpoint {
                Some((saved_step, path)) => format!(
                    "the last good checkpoint (step {saved_step}) is in {}",
                    path.display()
                ),
                None => "no checkpoint was written before it (see --save-every)".to_owned(),
            };
            let advice = if unscored.is_some() {
                ""
            } else {
                " — try a lower --lr or --clip-norm"
            };
            return Err(Error::Config(format!(
                "step {step_number}: {fault}; training stopped{advice}; {kept}"
            )));
        }
        let metrics = StepMetrics {
            step: step_number,
            loss,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
            loss_terms: graph
                .loss_terms
                .iter()
                .zip(&term_sums)
                .map(|((label, _), sum)| (label.clone(), sum / accumulation as f64))
                .collect(),
            plugin: plugin_metrics,
        };
        write_line(serde_json::to_string(&metrics).unwrap_or_default())?;
        history.training.push((step_number, loss));
        on_event(TrainEvent::Step(&metrics));

        let last = step_number == total_steps;
        if let Some(evaluator) = evaluator.as_mut() {
            if last
                || options
                    .eval_every
                    .is_some_and(|k| k > 0 && step_number % k == 0)
            {
                let sweep = options.eval_sweep.as_ref();
                let evaluations =
                    evaluator.sweep(step_number, total_steps, &store, &participation, sweep)?;
                for evaluation in evaluations {
                    write_line(serde_json::to_string(&evaluation).unwrap_or_default())?;
                    history.evaluations.push(evaluation.clone());
                    on_event(TrainEvent::Evaluated(&evaluation));
                }
            }
        }
        if last
            || options
                .save_every
                .is_some_and(|k| k > 0 && step_number % k == 0)
        {
            state.step = step_number;
            (state.epoch, state.position) = (order.epoch, order.position);
            state.optimizer_step = optimizer.step;
            let (participation_state, participation_tensors) = participation.snapshot();
            state.participation = participation_state;
            let path = checkpoint::save(
                &options.out,
                &state,
                &store.dims,
                &store.values,
                &optimizer,
                &participation_tensors,
            )?;
            on_event(TrainEvent::Checkpoint {
                step: step_number,
                path: &path,
            });
            last_checkpoint = Some((step_number, path));
        }
    }

    let mut trained = patched.clone();
    store.write_into(&mut trained)?;
    participation.write_value_inputs(&mut trained)?;
    let mut files = vec![metrics_path.clone()];
    if let Some((_, path)) = &last_checkpoint {
        files.push(path.clone());
    }
    let curve = options.out.join("loss.svg");
    let eval_points: Vec<(u64, f64)> = history
        .evaluations
        .iter()
        .map(|e| (e.step, e.eval_loss))
        .collect();
    plot::write_loss_curve(&curve, &history.training, &eval_points)?;
    files.push(curve);
    files.extend(save_adapter(&trained, &options.out)?);
    let best = |key: fn(&EvalMetrics) -> Option<f64>, higher: bool| {
        history
            .evaluations
            .iter()
            .filter(|e| is_unswept(options.eval_sweep.as_ref(), e))
            .filter_map(|e| key(e).filter(|v| v.is_finite()).map(|v| (v, e)))
            .max_by(|a, b| {
                let order = a.0.total_cmp(&b.0);
                if higher {
                    order
                } else {
                    order.reverse()
                }
            })
            .map(|(_, e)| e.clone())
    };
    Ok(TrainSummary {
        steps: total_steps,
        resumed_from: options.resume.then_some(first_step),
        first_loss: history.training.first().map_or(f64::NAN, |p| p.1),
        last_loss: history.training.last().map_or(f64::NAN, |p| p.1),
        seconds: started.elapsed().as_secs_f64(),
        skipped_lines: dataset.skipped,
        skipped_eval_lines: eval_set.as_ref().map_or(0, |set| set.skipped),
        best_eval_loss: best(|e| Some(e.eval_loss), false),
        best_eval_accuracy: best(|e| e.eval_accuracy, true),
        out: options.out.clone(),
        files,
    })
}

/// The losses of a run so far, for the loss curve and the summary.
#[derive(Default)]
struct History {
    training: Vec<(u64, f64)>,
    evaluations: Vec<EvalMetrics>,
}

impl History {
    /// Reads `metrics.jsonl` back, keeps the lines of steps up to `step` (those a checkpoint at
    /// `step` accounts for) and rewrites the file with only them.
    fn keep_until(metrics_path: &Path, step: u64) -> Result<History> {
        let text = match std::fs::read_to_string(metrics_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(metrics_path, e)),
        };
        let mut history = History::default();
        let mut kept = String::new();
        for line in text.lines() {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(line_step) = value["step"].as_u64().filter(|&s| s <= step) else {
                continue;
            };
            if let Some(loss) = value["loss"].as_f64() {
                history.training.push((line_step, loss));
            } else if let Ok(evaluation) = serde_json::from_value::<EvalMetrics>(value) {
                history.evaluations.push(evaluation);
            } else {
                continue;
            }
            kept.push_str(line);
            kept.push('\n');
        }
        crate::atomic_file::write_atomically(metrics_path, kept.as_bytes())?;
        Ok(history)
    }
}

/// Evaluation: the evaluation graph's session and the batches it is fed.
struct Evaluator<'a> {
    session: OrtSession,
    graph: EvaluationGraph,
    task: Task,
    batches: Vec<Vec<&'a Example>>,
    caches: cache::EmptyCaches,
}

impl<'a> Evaluator<'a> {
    fn new(
        patched: &Model,
        task: Task,
        methods: &[String],
        examples: &'a [Example],
        batch_size: usize,
        session_options: SessionOptions,
        caches: cache::EmptyCaches,
    ) -> Result<Self> {
        let graph = evaluation_graph_for(patched, task, methods)?;
        let bytes = crate::onnx::to_bytes(&graph.model)?;
        let session = OrtSession::from_bytes(&bytes, session_options)?;
        let batches = examples
            .chunks(batch_size)
            .map(|chunk| chunk.iter().collect())
            .collect();
        Ok(Evaluator {
            session,
            graph,
            task,
            batches,
            caches,
        })
    }

    /// The evaluations after `step`: [`Evaluator::evaluate`] with the methods' inputs in
    /// evaluation mode, once, or once per value of `sweep`'s input (recorded in `inputs`).
    fn sweep(
        &mut self,
        step: u64,
        total_steps: u64,
        store: &ParameterStore,
        participation: &Participation,
        sweep: Option<&EvalSweep>,
    ) -> Result<Vec<EvalMetrics>> {
        let host_feeds = participation.feeds(false, step, total_steps, 0)?;
        let mut evaluations = Vec::new();
        for (setting, feeds) in sweep_feeds(sweep, &host_feeds)? {
            let mut evaluation = self.evaluate(step, store, &feeds)?;
            evaluation.inputs.extend(setting);
            evaluations.push(evaluation);
        }
        Ok(evaluations)
    }

    /// The loss over every scored label of the evaluation set (each batch's mean loss weighted
    /// by its scored labels) and, for classification tasks, the accuracy.
    fn evaluate(
        &mut self,
        step: u64,
        store: &ParameterStore,
        host_feeds: &[(String, HostTensor)],
    ) -> Result<EvalMetrics> {
        let mut feeds = store.feeds()?;
        feeds.extend(host_feeds.iter().cloned());
        let n_parameters = feeds.len();
        let (mut loss_sum, mut scored) = (0.0, 0usize);
        let (mut correct, mut counted) = (0usize, 0usize);
        for batch in &self.batches {
            let collated = collate(batch);
            let (labels, n_sequences) = collated
                .iter()
                .find(|(name, _)| name == "labels")
                .map(|(_, t)| (t.to_f64(), t.shape().first().copied().unwrap_or(1)))
                .unwrap_or_default();
            feeds.truncate(n_parameters);
            feeds.extend(
                collated
                    .into_iter()
                    .chain(self.caches.feeds(batch.len()))
                    .filter(|(name, _)| self.session.input_names.contains(name)),
            );
            let outputs = self.session.run(&feeds)?;
            let batch_scored = scored_labels(self.task, batch);
            if batch_scored > 0 {
                let loss = output(&outputs, &self.graph.loss, "evaluation")?
                    .to_f64()
                    .first()
                    .copied()
                    .unwrap_or(f64::NAN);
                loss_sum += loss * batch_scored as f64;
                scored += batch_scored;
            }
            if matches!(self.task, Task::SeqCls | Task::TokenCls) {
                let logits = output(&outputs, &self.graph.logits, "evaluation")?;
                let classes = logits.shape().last().copied().unwrap_or(0).max(1);
                let values = logits.to_f64();
                let rows: Vec<&[f64]> = values.chunks(classes).collect();
                for (row, label) in scored_rows(&rows, &labels, n_sequences) {
                    if *label as i64 == data::IGNORE_INDEX {
                        continue;
                    }
                    let predicted = row
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map_or(0, |(index, _)| index);
                    correct += usize::from(predicted as f64 == *label);
                    counted += 1;
                }
            }
        }
        Ok(EvalMetrics {
            step,
            eval_loss: if scored > 0 {
                loss_sum / scored as f64
            } else {
                f64::NAN
            },
            eval_accuracy: (counted > 0).then(|| correct as f64 / counted as f64),
            inputs: Default::default(),
        })
    }
}

/// Pairs each label with its row of logits. `rows` hold `n_sequences` equal runs, one per
/// sequence (one row each for sequence classification); when a method lengthened the
/// sequence (a soft prompt), each run starts with rows the labels do not have, which are
/// skipped.
fn scored_rows<'r>(
    rows: &[&'r [f64]],
    labels: &'r [f64],
    n_sequences: usize,
) -> impl Iterator<Item = (&'r [f64], &'r f64)> + 'r {
    let n_sequences = n_sequences.max(1);
    let per_sequence = labels.len() / n_sequences;
    let rows_per_sequence = rows.len() / n_sequences;
    let skip = rows_per_sequence.saturating_sub(per_sequence);
    let rows: Vec<&'r [f64]> = rows
        .chunks(rows_per_sequence.max(1))
        .flat_map(|run| run.iter().skip(skip).copied())
        .collect();
    rows.into_iter().zip(labels)
}

/// The host feeds of one evaluation, with the swept input's setting when there is a sweep.
type SweptFeeds = (Option<(String, f64)>, Vec<(String, HostTensor)>);

/// The evaluations to run after a step: one with the host inputs as fed, or with a sweep one
/// per value of its input, each with the setting it records.
fn sweep_feeds(
    sweep: Option<&EvalSweep>,
    host_feeds: &[(String, HostTensor)],
) -> Result<Vec<SweptFeeds>> {
    let Some(sweep) = sweep else {
        return Ok(vec![(None, host_feeds.to_vec())]);
    };
    sweep
        .values
        .iter()
        .map(|&value| {
            let mut feeds = host_feeds.to_vec();
            let fed = feeds
                .iter_mut()
                .find(|(name, _)| *name == sweep.input)
                .ok_or_else(|| Error::Config(format!("no host input {}", sweep.input)))?;
            fed.1 = fed.1.filled_with(value);
            Ok((Some((sweep.input.clone(), value)), feeds))
        })
        .collect()
}

/// Whether an evaluation counts for the run's best ones: every evaluation without a sweep,
/// those at the sweep's first value with one.
fn is_unswept(sweep: Option<&EvalSweep>, evaluation: &EvalMetrics) -> bool {
    sweep.is_none_or(|sweep| {
        evaluation.inputs.get(&sweep.input).copied() == sweep.values.first().copied()
    })
}

/// How many labels of a batch the task's loss averages over.
fn scored_labels(task: Task, batch: &[&Example]) -> usize {
    batch
        .iter()
        .map(|example| match (&example.target, task) {
            (Target::Tokens(labels), Task::CausalLm) => labels
                .iter()
                .skip(1)
                .filter(|&&l| l != data::IGNORE_INDEX)
                .count(),
            (Target::Tokens(labels), _) => {
                labels.iter().filter(|&&l| l != data::IGNORE_INDEX).count()
            }
            (Target::Class(class), _) => usize::from(*class != data::IGNORE_INDEX),
            (Target::Value(_), _) => 1,
        })
        .sum()
}

fn sequence_length(example: &Example) -> usize {
    example.sequences.get("input_ids").map_or(0, Vec::len)
}

/// The first element of the output `name`, as f64.
fn scalar(outputs: &[(String, HostTensor)], name: &str, graph: &str) -> Result<f64> {
    Ok(output(outputs, name, graph)?
        .to_f64()
        .first()
        .copied()
        .unwrap_or(f64::NAN))
}

fn output<'o>(
    outputs: &'o [(String, HostTensor)],
    name: &str,
    graph: &str,
) -> Result<&'o HostTensor> {
    outputs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| Error::Runtime(format!("the {graph} graph did not produce {name:?}")))
}

fn task_name(task: Task) -> &'static str {
    match task {
        Task::CausalLm => "causal-lm",
        Task::SeqCls => "seq-cls",
        Task::TokenCls => "token-cls",
        Task::Regression => "regression",
    }
}

/// Writes the trainable tensors of `trained` into `dir`: `adapter.safetensors` with graft's
/// names (what `graft merge --adapter` reads) and, when its adapter fits one HF PEFT adapter
/// ([`crate::peft::can_export`]), the PEFT files (`adapter_model.safetensors`,
/// `adapter_config.json`). Returns the files written.
pub fn save_adapter(trained: &Model, dir: &Path) -> Result<Vec<PathBuf>> {
    let adapter = dir.join("adapter.safetensors");
    crate::adapter::save(trained, &adapter)?;
    let mut files = vec![adapter];
    if crate::peft::can_export(trained)? {
        crate::peft::export(trained, dir)?;
        files.push(dir.join("adapter_model.safetensors"));
        files.push(dir.join("adapter_config.json"));
    }
    Ok(files)
}

/// The order examples are visited in: the file's order, or a seeded shuffle per epoch.
struct EpochOrder {
    order: Vec<usize>,
    position: usize,
    epoch: u64,
    shuffle: bool,
    rng: rand_chacha::ChaCha8Rng,
}

impl EpochOrder {
    fn new(n_examples: usize, shuffle: bool, seed: u64) -> Self {
        use rand::SeedableRng;
        let mut order = EpochOrder {
            order: (0..n_examples).collect(),
            position: 0,
            epoch: 0,
            shuffle,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        };
        order.reshuffle();
        order
    }

    /// Moves a fresh order to where a checkpoint left one: `epoch` reshuffles replayed from the
    /// seed, then `position` examples into that epoch.
    fn restore(&mut self, epoch: u64, position: usize) {
        for _ in 0..epoch {
            self.reshuffle();
        }
        self.epoch = epoch;
        self.position = position;
    }

    fn reshuffle(&mut self) {
        if self.shuffle {
            use rand::seq::SliceRandom;
            self.order.shuffle(&mut self.rng);
        }
    }

    /// The next `size` example indices; an epoch's last batch may be shorter, and the next batch
    /// starts a new epoch.
    fn next_batch(&mut self, size: usize) -> Vec<usize> {
        if self.position >= self.order.len() {
            self.position = 0;
            self.epoch += 1;
            self.reshuffle();
        }
        let end = (self.position + size).min(self.order.len());
        let batch = self.order[self.position..end].to_vec();
        self.position = end;
        batch
    }
}
