//! Linear projections: `MatMul(x, W)`, `MatMul(x, Transpose(W))` and `Gemm(x, W, b)` whose
//! weight is a 2-D floating-point initializer, with the bias `Add` that follows a `MatMul`.

use std::collections::HashMap;

use super::context::Context;
use super::WeightLayout;
use crate::ir::Node;

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
