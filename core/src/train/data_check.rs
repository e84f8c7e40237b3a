//! Checks a data set against the task and the model before any step runs, so that a label, an
//! id or a length the model cannot take is refused naming the data file and line instead of
//! reaching ONNX Runtime (whose kernel errors name neither) or being misread (a negative class
//! wrapping around, a fractional label silently ignored).

use std::path::Path;

use super::data::{DataFormat, Dataset, Example, Target, IGNORE_INDEX};
use super::{first_output, task_name, Task};
use crate::analysis::EmbeddingKind;
use crate::ir::{Dim, Model};
use crate::{Error, Result};

/// What the model accepts, read from its graph once.
struct ModelLimits {
    /// The last axis of the logits (classes, or the vocabulary for causal LM), when fixed.
    n_outputs: Option<i64>,
    /// `(graph input, lookup node, table rows)` for each table that a graph input indexes
    /// directly (`input_ids`, `token_type_ids`, `position_ids`, ...).
    lookups: Vec<(String, String, i64)>,
    /// Rows of the learned absolute position embedding, when the model has one.
    n_positions: Option<usize>,
}

impl ModelLimits {
    fn of(model: &Model) -> Result<ModelLimits> {
        let logits = first_output(model)?;
        let n_outputs = logits
            .value_type()
            .and_then(|ty| ty.shape)
            .and_then(|shape| match shape.last() {
                Some(Dim::Fixed(n)) if *n > 0 => Some(*n),
                _ => None,
            });
        let inputs: Vec<&str> = model.graph.inputs.iter().map(|i| i.name.as_str()).collect();
        let lookups = model
            .graph
            .nodes
            .iter()
            .filter(|node| node.is("Gather"))
            .filter_map(|node| {
                let indices = node.inputs.get(1)?;
                if !inputs.contains(&indices.as_str()) {
                    return None;
                }
                let table = model.graph.initializer(node.inputs.first()?)?;
                Some((indices.clone(), node.name.clone(), *table.dims.first()?))
            })
            .collect();
        // Site detection is best effort here: a model it cannot read simply has no position
        // limit checked.
        let n_positions = crate::analysis::detect(model).ok().and_then(|structure| {
            structure
                .embeddings
                .iter()
                .find(|e| e.kind == EmbeddingKind::Position)
                .map(|e| e.n_embeddings)
                .filter(|&n| n > 0)
        });
        Ok(ModelLimits {
            n_outputs,
            lookups,
            n_positions,
        })
    }
}

/// Prepares `dataset` (read from `path`) for training `patched` on `task`: fails, naming the
/// file and line, when its format cannot feed the task's loss, when a target is not of the
/// task's kind (a fractional label for classification, a list for one label per example), when
/// a class or token label is negative (other than the ignore index −100) or beyond the logits'
/// last axis, when a sequence that the model looks up in a table (token ids, token-type ids)
/// is missing or indexes past the table, or when it is longer than the learned positions. Integer labels for regression become values.
///
/// Public (re-exported as [`crate::train::prepare_data`]) so that the data fuzz target runs
/// the very check [`super::train`] runs. Contract for every caller: for any `dataset` that
/// [`super::data::read_data`] returned and any model, the result is `Ok` or an error (a data
/// problem is an [`Error::Config`] naming `path:line`), never a panic.
pub fn prepare_data(patched: &Model, task: Task, path: &Path, dataset: &mut Dataset) -> Result<()> {
    let fits = match dataset.format {
        DataFormat::Text => matches!(task, Task::SeqCls | Task::Regression),
        DataFormat::Instruction | DataFormat::Plain => task == Task::CausalLm,
        DataFormat::Auto | DataFormat::Tokenized => true,
    };
    if !fits {
        return Err(Error::Config(format!(
            "{}: {} data cannot train --task {}: text data is for seq-cls or regression, \
             instruction and plain data for causal-lm",
            path.display(),
            dataset.format.name(),
            task_name(task)
        )));
    }
    let limits = ModelLimits::of(patched)?;
    for (example, line) in dataset.examples.iter_mut().zip(&dataset.lines) {
        let fail = |reason: String| Error::Config(format!("{}:{line}: {reason}", path.display()));
        if task == Task::Regression {
            if let Target::Class(class) = example.target {
                example.target = Target::Value(class as f32);
            }
        }
        check_target(task, &example.target, limits.n_outputs).map_err(fail)?;
        for (input, node, rows) in &limits.lookups {
            let Some(sequence) = example.sequences.get(input) else {
                return Err(fail(format!(
                    "the model reads {input:?} (node {node:?}), which this line does not give"
                )));
            };
            if let Some(id) = sequence.iter().find(|&&id| id < 0 || id >= *rows) {
                return Err(fail(format!(
                    "{input} has {id}, outside the {rows} rows of the table that node {node:?} \
                     looks it up in; the data or tokenizer does not match the model"
                )));
            }
        }
        if let (Some(positions), Some(ids)) =
            (limits.n_positions, example.sequences.get("input_ids"))
        {
            if ids.len() > positions {
                return Err(fail(format!(
                    "the sequence has {} tokens, more than the model's {positions} positions; \
                     lower --max-len or shorten the line",
                    ids.len()
                )));
            }
        }
    }
    Ok(())
}

/// `Ok` when `target` is of the kind `task` scores and, for classes and tokens, a valid index
/// into `n_outputs` (or the ignore index).
fn check_target(
    task: Task,
    target: &Target,
    n_outputs: Option<i64>,
) -> std::result::Result<(), String> {
    let task_flag = task_name(task);
    let check_class = |class: i64, what: &str| {
        if class == IGNORE_INDEX {
            return Ok(());
        }
        if class < 0 {
            return Err(format!(
                "{what} {class} is negative; classes count from 0 ({IGNORE_INDEX} marks a label \
                 to ignore)"
            ));
        }
        match n_outputs {
            Some(n) if class >= n => Err(format!(
                "{what} {class} is outside the model's {n} outputs (0 to {})",
                n - 1
            )),
            _ => Ok(()),
        }
    };
    match (task, target) {
        (Task::SeqCls, Target::Class(class)) => check_class(*class, "label"),
        (Task::SeqCls, Target::Value(value)) => Err(format!(
            "label {value} is not an integer class, as --task seq-cls needs; use --task \
             regression for real-valued labels"
        )),
        (Task::Regression, Target::Value(value)) if !value.is_finite() => {
            Err(format!("label {value} is not a finite number"))
        }
        (Task::Regression, Target::Value(_)) => Ok(()),
        (Task::TokenCls | Task::CausalLm, Target::Tokens(labels)) => labels
            .iter()
            .try_for_each(|&label| check_class(label, "token label")),
        (Task::SeqCls | Task::Regression, _) => Err(format!(
            "\"labels\" (one per token) given, but --task {task_flag} needs one \"label\" per \
             example"
        )),
        (Task::TokenCls | Task::CausalLm, _) => Err(format!(
            "\"label\" (one per example) given, but --task {task_flag} needs \"labels\", one \
             per token"
        )),
    }
}

/// Whether `example` has at least one label the task's loss scores: a class or token label
/// other than the ignore index (for causal LM, past the first position, which nothing
/// predicts), or any regression value.
pub(super) fn scores_something(example: &Example, task: Task) -> bool {
    match &example.target {
        Target::Class(class) => *class != IGNORE_INDEX,
        Target::Value(_) => true,
        Target::Tokens(labels) => {
            let skip = usize::from(task == Task::CausalLm);
            labels.iter().skip(skip).any(|&label| label != IGNORE_INDEX)
        }
    }
}
