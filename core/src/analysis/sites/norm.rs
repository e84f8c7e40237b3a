//! Normalizations: fused `LayerNormalization`/`RMSNormalization` nodes, and decomposed ones found
//! from a `ReduceMean` over the last axis followed (pointwise) by a product with a scale vector
//! and optionally a sum with a shift vector (LayerNorm: mean, subtract, variance; RMSNorm:
//! mean of squares, reciprocal square root).

use std::collections::{HashMap, HashSet};

use super::context::Context;
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
    Some(Norm {
        node: position,
        scale: scale.to_owned(),
        shift,
        width: tensor.n_elements(),
        input: node.input(0)?.to_owned(),
        output: node.outputs.first()?.clone(),
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
    Some(Norm {
        node: position,
        scale: scale.to_owned(),
        shift,
        width,
        input: root,
        output,
    })
}
