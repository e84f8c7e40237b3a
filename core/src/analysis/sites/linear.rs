//! Linear projections: `MatMul(x, W)`, `MatMul(x, Transpose(W))` and `Gemm(x, W, b)` whose
//! weight is a 2-D floating-point initializer, with the bias `Add` that follows a `MatMul`, and
//! the runs of output columns a `Slice` or `Split` takes from a linear's output.

use std::collections::HashMap;
use std::ops::Range;

use super::context::Context;
use super::WeightLayout;
use crate::analysis::shapes::normalize_axis;
use crate::ir::{Dim, Node};

/// One linear projection.
#[derive(Clone, Debug)]
pub(super) struct Linear {
    /// Position of the `MatMul`/`Gemm` node.
    pub node: usize,
    pub weight: String,
    pub layout: WeightLayout,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: Option<String>,
    /// Position of the separate bias `Add`, if any.
    pub bias_node: Option<usize>,
    pub input: String,
    /// The value consumers read (the bias `Add`'s output when the bias is separate).
    pub output: String,
}

/// Every linear of the graph in node order, and a lookup from each output value to it.
pub(super) struct Linears {
    pub all: Vec<Linear>,
    by_value: HashMap<String, usize>,
}

impl Linears {
    /// The linear whose (biased or raw) output is `value`.
    pub fn producing(&self, value: &str) -> Option<usize> {
        self.by_value.get(value).copied()
    }
}

pub(super) fn find_linears(context: &Context) -> Linears {
    let mut all = Vec::new();
    for (position, node) in context.graph.nodes.iter().enumerate() {
        if let Some(linear) = linear_at(context, position, node) {
            all.push(linear);
        }
    }
    let mut by_value = HashMap::new();
    for (i, linear) in all.iter().enumerate() {
        by_value.insert(linear.output.clone(), i);
        if let Some(raw) = context.node(linear.node).outputs.first() {
            by_value.insert(raw.clone(), i);
        }
    }
    Linears { all, by_value }
}

/// The `[rows, columns]` of a 2-D float initializer.
fn matrix(context: &Context, value: &str) -> Option<(usize, usize)> {
    let tensor = context.float_initializer(value)?;
    match tensor.dims[..] {
        [rows, columns] if rows > 0 && columns > 0 => {
            Some((usize::try_from(rows).ok()?, usize::try_from(columns).ok()?))
        }
        _ => None,
    }
}

fn linear_at(context: &Context, position: usize, node: &Node) -> Option<Linear> {
    let input = node.input(0)?;
    if context.is_constant(input) {
        return None;
    }
    let operand = node.input(1)?;
    let (weight, layout, in_features, out_features, bias) = if node.is("MatMul") {
        if let Some((rows, columns)) = matrix(context, operand) {
            (operand, WeightLayout::InOut, rows, columns, None)
        } else {
            let (_, transpose) = context.producer(operand)?;
            let transposed = transpose.input(0)?;
            let swaps = transpose
                .attr_ints("perm")
                .is_none_or(|perm| perm == [1, 0]);
            if !transpose.is("Transpose") || !swaps {
                return None;
            }
            let (rows, columns) = matrix(context, transposed)?;
            (transposed, WeightLayout::OutIn, columns, rows, None)
        }
    } else if node.is("Gemm") && node.attr_int("transA", 0) == 0 {
        let (rows, columns) = matrix(context, operand)?;
        let bias = node
            .input(2)
            .filter(|b| context.float_initializer(b).is_some())
            .map(str::to_owned);
        if node.attr_int("transB", 0) != 0 {
            (operand, WeightLayout::OutIn, columns, rows, bias)
        } else {
            (operand, WeightLayout::InOut, rows, columns, bias)
        }
    } else {
        return None;
    };
    let raw_output = node.outputs.first().filter(|o| !o.is_empty())?;
    let separate_bias = if bias.is_none() {
        bias_add(context, raw_output, out_features)
    } else {
        None
    };
    let (bias, bias_node, output) = match separate_bias {
        Some((bias_node, bias_name, output)) => (Some(bias_name), Some(bias_node), output),
        None => (bias, None, raw_output.clone()),
    };
    Some(Linear {
        node: position,
        weight: weight.to_owned(),
        layout,
        in_features,
        out_features,
        bias,
        bias_node,
        input: input.to_owned(),
        output,
    })
}

/// The `Add` of a 1-D bias of `out_features` elements that alone reads `raw_output`:
/// (position, bias name, output).
fn bias_add(
    context: &Context,
    raw_output: &str,
    out_features: usize,
) -> Option<(usize, String, String)> {
    let [(position, slot)] = context.consumers(raw_output) else {
        return None;
    };
    let node = context.node(*position);
    if !node.is("Add") {
        return None;
    }
    let other_slot = if *slot == 0 { 1 } else { 0 };
    let bias = node.input(other_slot)?;
    let tensor = context.float_initializer(bias)?;
    let is_vector = tensor.dims.iter().rev().skip(1).all(|&d| d == 1);
    if !is_vector || tensor.n_elements() != out_features {
        return None;
    }
    let output = node.outputs.first().filter(|o| !o.is_empty())?;
    Some((*position, bias.to_owned(), output.clone()))
}

/// The linear of which `value` is a run of consecutive output columns, with the run: the output
/// of a `Slice` (step 1) or of a `Split` along the last axis of the linear's output, or of a
/// view of it that keeps that axis.
pub(super) fn output_columns(
    context: &Context,
    linears: &Linears,
    value: &str,
) -> Option<(usize, Range<usize>)> {
    let (_, node) = context.producer(value)?;
    let data = node.input(0)?;
    let linear = linears.producing(context.source_of(data))?;
    let width = linears.all[linear].out_features;
    // Views that keep the last axis whole (GPT-2's `Reshape` from `[batch · sequence, 3 · hidden]`
    // back to `[batch, sequence, 3 · hidden]`) keep every row, so columns stay columns.
    if context.fixed_dim_from_end(data, 1) != Some(width) {
        return None;
    }
    let last_axis = context.shape(data)?.len().checked_sub(1)?;
    let on_last_axis = |axis: i64| normalize_axis(axis, last_axis + 1) == Some(last_axis);
    if node.is("Split") {
        if !on_last_axis(node.attr_int("axis", 0)) {
            return None;
        }
        let mut start = 0;
        for output in &node.outputs {
            let part = context.fixed_dim_from_end(output, 1)?;
            if output == value {
                return (start + part <= width).then_some((linear, start..start + part));
            }
            start += part;
        }
        return None;
    }
    if !node.is("Slice") {
        return None;
    }
    let scalar = |slot: usize| -> Option<i64> {
        match context.shapes.integer_value(node.input(slot)?)? {
            [Dim::Fixed(n)] => Some(*n),
            _ => None,
        }
    };
    let (start, end, axis, step) = if node.input(1).is_some() {
        let optional = |slot: usize| match node.input(slot) {
            Some(_) => scalar(slot),
            None => Some(if slot == 3 { 0 } else { 1 }),
        };
        (scalar(1)?, scalar(2)?, optional(3)?, optional(4)?)
    } else {
        let single = |name: &str| match node.attr_ints(name)? {
            [n] => Some(*n),
            _ => None,
        };
        (
            single("starts")?,
            single("ends")?,
            single("axes").unwrap_or(0),
            1,
        )
    };
    if step != 1 || !on_last_axis(axis) {
        return None;
    }
    let width = i64::try_from(width).ok()?;
    let resolve = |bound: i64| {
        let bound = if bound < 0 {
            bound.saturating_add(width)
        } else {
            bound
        };
        usize::try_from(bound.clamp(0, width)).ok()
    };
    let (start, end) = (resolve(start)?, resolve(end)?);
    (start < end).then_some((linear, start..end))
}
