//! Normalizations: fused `LayerNormalization`/`RMSNormalization` nodes, and decomposed ones found
//! from a `ReduceMean` over the last axis followed (pointwise) by a product with a scale vector
//! and optionally a sum with a shift vector (LayerNorm: mean, subtract, variance; RMSNorm:
//! mean of squares, reciprocal square root).

use std::collections::{HashMap, HashSet};

use super::context::Context;
use super::NormKind;
use crate::ir::Node;

/// One normalization.
#[derive(Clone, Debug)]
pub(super) struct Norm {
    /// Position of the fused node, or of the decomposition's last node (shift `Add` or scale
    /// `Mul`).
    pub node: usize,
    pub scale: String,
    pub shift: Option<String>,
    pub width: usize,
    /// The value normalized.
    pub input: String,
    /// The normalized, scaled (and shifted) value.
    pub output: String,
    /// LayerNorm or RMSNorm.
    pub kind: NormKind,
    /// The epsilon added to the variance, where it could be read.
    pub epsilon: Option<f32>,
}

/// Ops a decomposed normalization is built from between its reduction and its scale.
const STATISTICS_OPS: &[&str] = &[
    "Sub",
    "Pow",
    "ReduceMean",
    "Add",
    "Sqrt",
    "Div",
    "Reciprocal",
    "Mul",
    "Cast",
    "Neg",
];

pub(super) fn find_norms(context: &Context) -> Vec<Norm> {
    let mut norms = Vec::new();
    let mut decomposed: HashMap<usize, (usize, String)> = HashMap::new();
    for (position, node) in context.graph.nodes.iter().enumerate() {
        if node.is("LayerNormalization") || node.is("RMSNormalization") {
            norms.extend(fused(context, position, node));
        } else if node.is("ReduceMean") && reduces_last_axis(context, node) {
            let Some(input) = node.input(0) else {
                continue;
            };
            let root = match context.producer(input) {
                Some((_, pow)) if pow.is("Pow") => pow.input(0).unwrap_or(input),
                _ => input,
            };
            let root = context.source_of(root).to_owned();
            if let Some(scale_mul) = scale_after(context, position) {
                decomposed.entry(scale_mul).or_insert((position, root));
            }
        }
    }
    for (scale_mul, (_, root)) in decomposed {
        norms.extend(decomposed_norm(context, scale_mul, root));
    }
    norms.sort_by_key(|n| n.node);
    norms
}

fn fused(context: &Context, position: usize, node: &Node) -> Option<Norm> {
    let scale = node.input(1)?;
    let tensor = context.float_initializer(scale)?;
    let shift = node
        .input(2)
        .filter(|s| context.float_initializer(s).is_some())
        .map(str::to_owned);
    let kind = if node.is("RMSNormalization") {
        NormKind::RmsNorm
    } else {
        NormKind::LayerNorm
    };
    Some(Norm {
        node: position,
        scale: scale.to_owned(),
        shift,
        width: tensor.n_elements(),
        input: node.input(0)?.to_owned(),
        output: node.outputs.first()?.clone(),
        kind,
        epsilon: Some(node.attr_float("epsilon", 1e-5)),
    })
}

fn reduces_last_axis(context: &Context, node: &Node) -> bool {
    let Some(rank) = node.input(0).and_then(|i| context.shapes.rank(i)) else {
        return false;
    };
    let axes: Vec<i64> = match node.attr_ints("axes") {
        Some(axes) => axes.to_vec(),
        None => node
            .input(1)
            .and_then(|a| context.shapes.integer_value(a))
            .map(|values| {
                values
                    .iter()
                    .filter_map(|d| match d {
                        crate::ir::Dim::Fixed(n) => Some(*n),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    let last = rank as i64 - 1;
    axes.len() == 1 && (axes[0] == -1 || axes[0] == last)
}

/// A vector initializer operand of `node` (all dims 1 but the last), with its length.
fn vector_operand<'m>(context: &Context<'m>, node: &'m Node) -> Option<(&'m str, usize)> {
    node.inputs.iter().find_map(|input| {
        let tensor = context.float_initializer(input)?;
        let is_vector = !tensor.dims.is_empty()
            && tensor.dims.iter().rev().skip(1).all(|&d| d == 1)
            && tensor.n_elements() > 1;
        is_vector.then(|| (input.as_str(), tensor.n_elements()))
    })
}

/// The first `Mul` by a vector initializer reached from the `ReduceMean` at `reduction`
/// through the normalization's pointwise ops.
fn scale_after(context: &Context, reduction: usize) -> Option<usize> {
    let mut pending = vec![reduction];
    let mut visited = HashSet::new();
    while let Some(position) = pending.pop() {
        if visited.len() > 24 || !visited.insert(position) {
            continue;
        }
        let node = context.node(position);
        for output in node.outputs.iter().filter(|o| !o.is_empty()) {
            for &(consumer, _) in context.consumers(output) {
                let next = context.node(consumer);
                if next.is("Mul") && vector_operand(context, next).is_some() {
                    return Some(consumer);
                }
                if STATISTICS_OPS.contains(&next.op_type.as_str()) {
                    pending.push(consumer);
                }
            }
        }
    }
    None
}

fn decomposed_norm(context: &Context, scale_mul: usize, root: String) -> Option<Norm> {
    let node = context.node(scale_mul);
    let (scale, width) = vector_operand(context, node)?;
    if let Some(last) = context.fixed_dim_from_end(&root, 1) {
        if last != width {
            return None;
        }
    }
    let scaled = node.outputs.first()?;
    let shift = match context.consumers(scaled) {
        [(add, _)] if context.node(*add).is("Add") => {
            let add_node = context.node(*add);
            vector_operand(context, add_node)
                .filter(|(_, length)| *length == width)
                .and_then(|(shift, _)| {
                    Some((*add, shift.to_owned(), add_node.outputs.first()?.clone()))
                })
        }
        _ => None,
    };
    let (position, shift, output) = match shift {
        Some((add, shift, output)) => (add, Some(shift), output),
        None => (scale_mul, None, scaled.clone()),
    };
    let statistics = statistics_before(context, scale_mul);
    let kind = if statistics.iter().any(|&p| context.node(p).is("Sub")) {
        NormKind::LayerNorm
    } else {
        NormKind::RmsNorm
    };
    let epsilon = statistics.iter().find_map(|&p| {
        let node = context.node(p);
        if !node.is("Add") {
            return None;
        }
        node.inputs.iter().find_map(|i| scalar_constant(context, i))
    });
    Some(Norm {
        node: position,
        scale: scale.to_owned(),
        shift,
        width,
        input: root,
        output,
        kind,
        epsilon,
    })
}

/// The positions of the statistics ops (see [`STATISTICS_OPS`]) that feed the scale `Mul` at
/// `scale_mul`, back to the normalized value.
fn statistics_before(context: &Context, scale_mul: usize) -> Vec<usize> {
    let mut found = Vec::new();
    let mut pending = vec![scale_mul];
    while let Some(position) = pending.pop() {
        if found.len() > 24 {
            break;
        }
        for input in &context.node(position).inputs {
            if let Some((producer, node)) = context.producer(input) {
                if STATISTICS_OPS.contains(&node.op_type.as_str()) && !found.contains(&producer) {
                    found.push(producer);
                    pending.push(producer);
                }
            }
        }
    }
    found
}

/// The value of a one-element float constant: an initializer or a `Constant` node's
/// `value`/`value_float`.
fn scalar_constant(context: &Context, value: &str) -> Option<f32> {
    if let Some(tensor) = context.float_initializer(value) {
        let values = tensor.float_values().ok()?;
        return (values.len() == 1).then(|| values[0]);
    }
    let (_, node) = context.producer(value)?;
    if !node.is("Constant") {
        return None;
    }
    if let Some(attribute) = node.attribute("value_float") {
        return Some(attribute.f);
    }
    let tensor = &node.attribute("value")?.t;
    let tensor = tensor.as_ref()?;
    if tensor.data_type != 1 {
        return None;
    }
    match (tensor.float_data.as_slice(), tensor.raw_data.as_slice()) {
        ([x], _) => Some(*x),
        (_, raw) if raw.len() == 4 => Some(f32::from_le_bytes(raw.try_into().ok()?)),
        _ => None,
    }
}
