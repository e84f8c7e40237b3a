//! Standard training losses appended to a model as default-domain ONNX nodes, so that
//! [`gradient_graph`](super::gradient_graph) differentiates them with the same rules as the model.
//!
//! Each function adds a target graph input, appends the loss nodes (named `Loss/<k>`) and
//! returns the name of the scalar loss value: `loss`, or `loss.1`, `loss.2`, ... when taken.
//! Graph outputs are left as they are.

use super::emitter::Emitter;
use crate::analysis::infer_shapes;
use crate::ir::attributes::int_attribute;
use crate::ir::{DataType, Dim, Model, ValueInfo};
use crate::{Error, Result};

/// The label value ignored by the cross-entropy losses, as in PyTorch and Hugging Face.
pub const IGNORE_INDEX: i64 = -100;

/// Cross entropy of `logits` `[N, C]` against a new int64 graph input `labels` `[N]`, averaged
/// over the labels that are not `ignore_index` (PyTorch's `F.cross_entropy(logits, labels,
/// ignore_index=ignore_index)`; NaN when every label is ignored, as there).
pub fn cross_entropy(
    model: &mut Model,
    logits: &str,
    labels: &str,
    ignore_index: i64,
) -> Result<String> {
    let (dtype, shape) = float_value(model, logits, 2)?;
    add_input(model, labels, DataType::Int64, &shape[..1])?;
    let mut emitter = loss_emitter(model);
    let loss = cross_entropy_nodes(&mut emitter, logits, labels, ignore_index, dtype)?;
    model.graph.nodes.extend(emitter.into_nodes());
    Ok(loss)
}

/// Hugging Face's causal language-modelling loss: `logits` `[B, S, V]` predict the next token,
/// so positions `0..S-1` are scored against `labels[:, 1..S]` of a new int64 graph input
/// `labels` `[B, S]`; the mean is over the labels that are not [`IGNORE_INDEX`].
pub fn causal_lm(model: &mut Model, logits: &str, labels: &str) -> Result<String> {
    token_cross_entropy(model, logits, labels, true)
}

/// Token classification: cross entropy of `logits` `[B, S, C]` against a new int64 graph input
/// `labels` `[B, S]`, averaged over the tokens whose label is not [`IGNORE_INDEX`].
pub fn token_classification(model: &mut Model, logits: &str, labels: &str) -> Result<String> {
    token_cross_entropy(model, logits, labels, false)
}

/// Cross entropy of `logits` `[B, S', C]` against a new int64 graph input `labels` `[B, S]`
/// over every token whose label is not [`IGNORE_INDEX`]; with `shift_labels`, position `s`
/// predicts label `s + 1` (the last position and the first label drop out).
///
/// When a method lengthened the sequence (a soft prompt prepends `S' − S` positions), the
/// labels are first prefixed with `S' − S` ignored labels, as HF PEFT prefixes them with
/// `-100`: the prepended positions are never scored, and under `shift_labels` the last one
/// predicts the first real token.
fn token_cross_entropy(
    model: &mut Model,
    logits: &str,
    labels: &str,
    shift_labels: bool,
) -> Result<String> {
    let (dtype, shape) = float_value(model, logits, 3)?;
    add_input(model, labels, DataType::Int64, &shape[..2])?;
    let mut emitter = loss_emitter(model);
    let labels = &prefix_ignored_labels(&mut emitter, logits, labels);
    let (logits, labels) = if shift_labels {
        let starts = emitter.ints(&[0]);
        let ends = emitter.ints(&[-1]);
        let axes = emitter.ints(&[1]);
        let shifted_logits = emitter.op("Slice", &[logits, &starts, &ends, &axes]);
        let starts = emitter.ints(&[1]);
        let ends = emitter.ints(&[i64::MAX]);
        let shifted_labels = emitter.op("Slice", &[labels, &starts, &ends, &axes]);
        (shifted_logits, shifted_labels)
    } else {
        (logits.to_owned(), labels.to_owned())
    };
    let (flat_logits, flat_labels) = flatten_tokens(&mut emitter, &logits, &labels);
    let loss = cross_entropy_nodes(
        &mut emitter,
        &flat_logits,
        &flat_labels,
        IGNORE_INDEX,
        dtype,
    )?;
    model.graph.nodes.extend(emitter.into_nodes());
    Ok(loss)
}

/// Mean squared error between `predictions` and a new graph input `targets` of the same type
/// and shape (PyTorch's `F.mse_loss` with mean reduction).
pub fn mean_squared_error(model: &mut Model, predictions: &str, targets: &str) -> Result<String> {
    let shapes = infer_shapes(model)?;
    let dtype = shapes
        .dtype(predictions)
        .filter(|d| d.is_float())
        .ok_or_else(|| {
            Error::Config(format!(
                "{predictions:?} is not a floating-point value of the graph"
            ))
        })?;
    let shape = shapes
        .shape(predictions)
        .map(<[Dim]>::to_vec)
        .ok_or_else(|| Error::Config(format!("the rank of {predictions:?} is unknown")))?;
    add_input(model, targets, dtype, &shape)?;
    let mut emitter = loss_emitter(model);
    let difference = emitter.op("Sub", &[predictions, targets]);
    let square = emitter.op("Mul", &[&difference, &difference]);
    let loss = emitter.claim_unique("loss");
    emitter.node_into(
        "ReduceMean",
        &[&square],
        vec![int_attribute("keepdims", 0)],
        &loss,
    );
    model.graph.nodes.extend(emitter.into_nodes());
    Ok(loss)
}

/// Hugging Face's regression loss (`num_labels = 1`): the mean squared error of `predictions`
/// `[N, 1]` against a new float graph input `targets` `[N]`, one value per example, reshaped
/// to `[N, 1]` in the graph. Fails naming the value when its last axis is fixed and not 1.
pub fn regression(model: &mut Model, predictions: &str, targets: &str) -> Result<String> {
    let (dtype, shape) = float_value(model, predictions, 2)?;
    if let Dim::Fixed(n) = shape[1] {
        if n != 1 {
            return Err(Error::Config(format!(
                "--task regression scores one output per example, but the model's {predictions:?} \
                 has {n} per example; use a model with a single output (num_labels = 1)"
            )));
        }
    }
    add_input(model, targets, dtype, &shape[..1])?;
    let mut emitter = loss_emitter(model);
    let target_shape = emitter.op("Shape", &[predictions]);
    let columns = emitter.op("Reshape", &[targets, &target_shape]);
    let difference = emitter.op("Sub", &[predictions, &columns]);
    let square = emitter.op("Mul", &[&difference, &difference]);
    let loss = emitter.claim_unique("loss");
    emitter.node_into(
        "ReduceMean",
        &[&square],
        vec![int_attribute("keepdims", 0)],
        &loss,
    );
    model.graph.nodes.extend(emitter.into_nodes());
    Ok(loss)
}

/// The element type and shape of a floating-point `value` of rank `rank`.
fn float_value(model: &Model, value: &str, rank: usize) -> Result<(DataType, Vec<Dim>)> {
    let shapes = infer_shapes(model)?;
    let dtype = shapes
        .dtype(value)
        .filter(|d| d.is_float())
        .ok_or_else(|| {
            Error::Config(format!(
                "{value:?} is not a floating-point value of the graph"
            ))
        })?;
    let shape = shapes
        .shape(value)
        .map_or_else(|| vec![Dim::Unknown; rank], <[Dim]>::to_vec);
    if shape.len() != rank {
        return Err(Error::Config(format!(
            "{value:?} has rank {}; this loss needs rank {rank}",
            shape.len()
        )));
    }
    Ok((dtype, shape))
}

fn add_input(model: &mut Model, name: &str, dtype: DataType, shape: &[Dim]) -> Result<()> {
    if name.is_empty() || model.graph.defined_values().contains(name) {
        return Err(Error::Config(format!(
            "cannot add the loss input {name:?}: the name is empty or already used"
        )));
    }
    model
        .graph
        .inputs
        .push(ValueInfo::tensor(name, dtype, shape));
    Ok(())
}

fn loss_emitter(model: &Model) -> Emitter {
    let graph = &model.graph;
    let mut emitter = Emitter::new(graph, model.opset());
    emitter.set_scope("Loss".to_owned());
    emitter
}

/// `labels` `[B, S]` prefixed along axis 1 with [`IGNORE_INDEX`] to the length of `logits`
/// `[B, S', C]`: `Concat(fill[B, S' − S], labels)` (an empty fill when `S' = S`).
fn prefix_ignored_labels(emitter: &mut Emitter, logits: &str, labels: &str) -> String {
    let logits_len = emitter.shape_slice(logits, 1, Some(2));
    let batch = emitter.shape_slice(labels, 0, Some(1));
    let labels_len = emitter.shape_slice(labels, 1, Some(2));
    let extra = emitter.op("Sub", &[&logits_len, &labels_len]);
    let shape = emitter.op_with("Concat", &[&batch, &extra], vec![int_attribute("axis", 0)]);
    let fill = emitter.filled_int64(&shape, IGNORE_INDEX);
    emitter.op_with("Concat", &[&fill, labels], vec![int_attribute("axis", 1)])
}

/// `[B, S, C]` logits and `[B, S]` labels flattened to `[B·S, C]` and `[B·S]`.
fn flatten_tokens(emitter: &mut Emitter, logits: &str, labels: &str) -> (String, String) {
    let classes = emitter.shape_slice(logits, -1, None);
    let minus_one = emitter.ints(&[-1]);
    let rows = emitter.op_with(
        "Concat",
        &[&minus_one, &classes],
        vec![int_attribute("axis", 0)],
    );
    let flat_logits = emitter.op("Reshape", &[logits, &rows]);
    let flat_labels = emitter.reshape_to(labels, &[-1]);
    (flat_logits, flat_labels)
}

/// Mean over non-ignored rows of −log softmax(logits)[label], built from LogSoftmax,
/// GatherElements and a Where mask (ignored labels read class 0, then are masked out).
fn cross_entropy_nodes(
    emitter: &mut Emitter,
    logits: &str,
    labels: &str,
    ignore_index: i64,
    dtype: DataType,
) -> Result<String> {
    let log_probabilities =
        emitter.op_with("LogSoftmax", &[logits], vec![int_attribute("axis", -1)]);
    let ignored_label = emitter.int_scalar(ignore_index);
    let ignored = emitter.op("Equal", &[labels, &ignored_label]);
    let valid = emitter.op("Not", &[&ignored]);
    let first_class = emitter.int_scalar(0);
    let safe_labels = emitter.op("Where", &[&valid, labels, &first_class]);
    let keys = emitter.unsqueeze(&safe_labels, &[-1]);
    let picked = emitter.op_with(
        "GatherElements",
        &[&log_probabilities, &keys],
        vec![int_attribute("axis", -1)],
    );
    let picked = emitter.squeeze(&picked, &[-1]);
    let negative = emitter.op("Neg", &[&picked]);
    let zero = emitter.scalar(0.0, dtype)?;
    let masked = emitter.op("Where", &[&valid, &negative, &zero]);
    let total = emitter.reduce("ReduceSum", &masked, None, false);
    let counted = emitter.op_with(
        "Cast",
        &[&valid],
        vec![int_attribute("to", i64::from(dtype.code()))],
    );
    let count = emitter.reduce("ReduceSum", &counted, None, false);
    let loss = emitter.claim_unique("loss");
    emitter.node_into("Div", &[&total, &count], Vec::new(), &loss);
    Ok(loss)
}
