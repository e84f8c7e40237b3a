//! Training through ONNX Runtime: the training graph (forward + loss + gradients of the
//! trainable tensors, as standard ONNX), a session that runs it, and the host-side loop that
//! feeds batches, clips gradients, updates parameters and writes metrics and the adapter.

pub mod data;
pub mod optimizer;

use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use serde::Serialize;

use crate::autodiff::{gradient_graph, loss};
use crate::ir::{Model, Tensor};
use crate::patch::GraftRecord;
use crate::runtime::{HostTensor, OrtSession, SessionOptions};
use crate::{Error, Result};
use data::{collate, read_jsonl, Example};
use optimizer::{clip_global_norm, global_norm, Optimizer, OptimizerKind, Schedule};

/// What the model is trained to do; decides the loss appended to its first output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Next-token prediction: logits [batch, seq, vocab], labels shifted by one, −100 ignored.
    CausalLm,
    /// Sequence classification: logits [batch, classes], one class per example.
    SeqCls,
    /// Token classification: logits [batch, seq, classes], one label per token, −100 ignored.
    TokenCls,
    /// Regression: mean squared error between the first output and the label.
    Regression,
}

/// Everything `graft train` can be told.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The loss.
    pub task: Task,
    /// Pre-tokenized JSONL training data.
    pub data: PathBuf,
    /// The run folder (metrics, adapter).
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
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    /// Optimizer steps taken.
    pub steps: u64,
    /// First step's loss.
    pub first_loss: f64,
    /// Last step's loss.
    pub last_loss: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The run folder.
    pub out: PathBuf,
}

/// A model's training graph and the names it reads and writes.
pub struct TrainingGraph {
    /// Forward + loss + gradients, as standard ONNX.
    pub model: Model,
    /// The loss output.
    pub loss: String,
    /// (trainable tensor, gradient output), in the order of [`GraftRecord::trainable`].
    pub gradients: Vec<(String, String)>,
}

/// Builds the training graph of a patched model: the task's loss on its first output, and the
/// gradients of every tensor the graft record marks trainable (which become graph inputs; frozen
/// weights stay initializers). LoRA dropout nodes are switched to training mode.
pub fn training_graph(patched: &Model, task: Task) -> Result<TrainingGraph> {
    let record = GraftRecord::read(patched)?;
    let trainable: Vec<String> = record.trainable().map(str::to_owned).collect();
    if trainable.is_empty() {
        return Err(Error::Config(
            "the model has no trainable tensors; run `graft apply` first".into(),
        ));
    }
    let mut model = patched.clone();
    enable_dropout(&mut model)?;
    let logits = model
        .graph
        .outputs
        .first()
        .map(|o| o.name.clone())
        .ok_or_else(|| Error::InvalidGraph("the model has no outputs".into()))?;
    let loss = match task {
        Task::SeqCls => loss::cross_entropy(&mut model, &logits, "labels", data::IGNORE_INDEX)?,
        Task::CausalLm => loss::causal_lm(&mut model, &logits, "labels")?,
        Task::TokenCls => loss::token_classification(&mut model, &logits, "labels")?,
        Task::Regression => loss::mean_squared_error(&mut model, &logits, "labels")?,
    };
    let graph = gradient_graph(&model, &loss, &trainable)?;
    Ok(TrainingGraph {
        model: graph.model,
        loss: graph.loss,
        gradients: graph.gradients,
    })
}

/// Turns on the `Dropout` nodes inside grafted branches (their `training_mode` input), so that
/// dropout is active in training graphs and absent in evaluation graphs.
fn enable_dropout(model: &mut Model) -> Result<()> {
    let record = GraftRecord::read(model)?;
    let branch_nodes: std::collections::HashSet<&str> = record
        .folds
        .iter()
        .filter_map(crate::merge::branch_of)
        .flat_map(|(nodes, _, _)| nodes.iter().map(String::as_str))
        .collect();
    let dropouts: Vec<usize> = model
        .graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.is("Dropout") && branch_nodes.contains(n.name.as_str()))
        .map(|(i, _)| i)
        .collect();
    if dropouts.is_empty() {
        return Ok(());
    }
    let flag = "graft.training_mode";
    model.graph.initializers.push(Tensor::from_raw(
        flag,
        crate::ir::DataType::Bool,
        vec![],
        vec![1],
    ));
    for index in dropouts {
        let node = &mut model.graph.nodes[index];
        node.inputs.resize(3, String::new());
        node.inputs[2] = flag.to_owned();
    }
    Ok(())
}

/// Runs training as `options` say, starting from the trainable values in `patched` (or those of
/// an adapter loaded into it beforehand), and writes `metrics.jsonl`, the trained adapter in HF
/// PEFT's format (`adapter_model.safetensors`, `adapter_config.json`) and `adapter.safetensors`
/// (graft's tensor names) into `options.out`. `on_step` sees each step's metrics.
pub fn train(
    patched: &Model,
    options: &TrainOptions,
    mut on_step: impl FnMut(&StepMetrics),
) -> Result<TrainSummary> {
    let started = std::time::Instant::now();
    let (examples, _skipped) = read_jsonl(&options.data, options.skip_bad_lines)?;
    let graph = training_graph(patched, options.task)?;
    let bytes = crate::onnx::to_bytes(&graph.model)?;
    let mut session = OrtSession::from_bytes(&bytes, options.session)?;

    let mut parameters: Vec<Vec<f32>> = Vec::new();
    let mut dims: Vec<Vec<i64>> = Vec::new();
    for (name, _) in &graph.gradients {
        let tensor = patched
            .graph
            .initializer(name)
            .ok_or_else(|| Error::Tensor {
                name: name.clone(),
                reason: "trainable tensor missing from the model".into(),
            })?;
        parameters.push(tensor.to_f32()?);
        dims.push(tensor.dims.clone());
    }
    let lengths: Vec<usize> = parameters.iter().map(Vec::len).collect();
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

    std::fs::create_dir_all(&options.out).map_err(|e| Error::io(&options.out, e))?;
    let metrics_path = options.out.join("metrics.jsonl");
    let mut metrics_file =
        std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    for step in 0..total_steps {
        let step_started = std::time::Instant::now();
        let mut gradients: Vec<Vec<f32>> = lengths.iter().map(|&n| vec![0.0; n]).collect();
        let mut loss_sum = 0.0;
        let mut tokens = 0usize;
        for _ in 0..accumulation {
            let batch: Vec<&Example> = order
                .next_batch(batch_size)
                .into_iter()
                .map(|i| &examples[i])
                .collect();
            let mut feeds: Vec<(String, HostTensor)> = collate(&batch)
                .into_iter()
                .filter(|(name, _)| session.input_names.contains(name))
                .collect();
            tokens += batch
                .iter()
                .map(|e| e.sequences["input_ids"].len())
                .sum::<usize>();
            for ((name, _), (values, shape)) in
                graph.gradients.iter().zip(parameters.iter().zip(&dims))
            {
                let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                let array = ArrayD::from_shape_vec(IxDyn(&shape), values.clone()).map_err(|e| {
                    Error::Tensor {
                        name: name.clone(),
                        reason: e.to_string(),
                    }
                })?;
                feeds.push((name.clone(), HostTensor::F32(array)));
            }
            let outputs = session.run(&feeds)?;
            let scalar = |name: &str| -> Result<&HostTensor> {
                outputs
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| {
                        Error::Runtime(format!("the training graph did not produce {name:?}"))
                    })
            };
            loss_sum += scalar(&graph.loss)?
                .to_f64()
                .first()
                .copied()
                .unwrap_or(f64::NAN);
            for (accumulated, (_, gradient_name)) in gradients.iter_mut().zip(&graph.gradients) {
                let gradient = scalar(gradient_name)?.to_f64();
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
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::Runtime(format!(
                "step {}: the loss or a gradient is not finite (loss {loss}, gradient norm {grad_norm}); \
                 training stopped — try a lower --lr or --clip-norm",
                step + 1
            )));
        }
        let lr = options
            .schedule
            .lr(options.lr, step, options.warmup, total_steps);
        optimizer.update(&mut parameters, &gradients, lr);
        let metrics = StepMetrics {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
        };
        let line = serde_json::to_string(&metrics).unwrap_or_default();
        writeln!(metrics_file, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
        on_step(&metrics);
        if step == 0 {
            first_loss = loss;
        }
        last_loss = loss;
    }
    let mut trained = patched.clone();
    for ((name, _), (values, shape)) in graph.gradients.iter().zip(parameters.iter().zip(&dims)) {
        if let Some(tensor) = trained
            .graph
            .initializers
            .iter_mut()
            .find(|t| &t.name == name)
        {
            *tensor = Tensor::from_f32(name, shape.clone(), values);
        }
    }
    save_adapter(&trained, &options.out)?;
    Ok(TrainSummary {
        steps: total_steps,
        first_loss,
        last_loss,
        seconds: started.elapsed().as_secs_f64(),
        out: options.out.clone(),
    })
}

/// Writes the trainable tensors of `trained` into `dir`: `adapter.safetensors` with graft's
/// names (what `graft merge --adapter` reads) and, when the model has LoRA branches with labels,
/// the HF PEFT files.
pub fn save_adapter(trained: &Model, dir: &Path) -> Result<()> {
    crate::adapter::save(trained, &dir.join("adapter.safetensors"))?;
    if crate::peft::lora_branches(trained).is_ok() {
        crate::peft::export(trained, dir)?;
    }
    Ok(())
}

/// The order examples are visited in: the file's order, or a seeded shuffle per epoch.
struct EpochOrder {
    order: Vec<usize>,
    position: usize,
    shuffle: bool,
    rng: rand_chacha::ChaCha8Rng,
}

impl EpochOrder {
    fn new(n_examples: usize, shuffle: bool, seed: u64) -> Self {
        use rand::SeedableRng;
        let mut order = EpochOrder {
            order: (0..n_examples).collect(),
            position: 0,
            shuffle,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        };
        order.reshuffle();
        order
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
            self.reshuffle();
        }
        let end = (self.position + size).min(self.order.len());
        let batch = self.order[self.position..end].to_vec();
        self.position = end;
        batch
    }
}
