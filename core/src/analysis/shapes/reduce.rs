//! Shape rules of reductions: `Reduce*` (axes as attribute or, from opset 18 and for
//! `ReduceSum` from 13, as input) and `ArgMax`/`ArgMin`.

use super::{normalize_axis, Fact, OpContext, RuleTable};
use crate::ir::{DataType, Dim};

const REDUCTIONS: &[&str] = &[
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
];

pub(super) fn register(table: &mut RuleTable) {
    for &op in REDUCTIONS {
        table.insert(op, reduction);
    }
    table.insert("ArgMax", arg_extremum);
    table.insert("ArgMin", arg_extremum);
}

fn reduced_shape(input: &[Dim], axes: &[usize], keep_dims: bool) -> Vec<Dim> {
    input
        .iter()
        .enumerate()
        .filter_map(|(i, dim)| match (axes.contains(&i), keep_dims) {
            (false, _) => Some(dim.clone()),
            (true, true) => Some(Dim::Fixed(1)),
            (true, false) => None,
        })
        .collect()
}

fn reduction(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(0);
    let keep_dims = context.node.attr_int("keepdims", 1) != 0;
    let axes_are_input = reduce_axes_are_input(&context.node.op_type, context.opset);
    let shape = context.shape(0).and_then(|input| {
        let axes: Vec<i64> = if axes_are_input {
            if context.has_input(1) {
                context.fixed_values(1)?
            } else {
                Vec::new()
            }
        } else {
            context
                .node
                .attr_ints("axes")
                .map(<[i64]>::to_vec)
                .unwrap_or_default()
        };
        let axes: Vec<usize> = if axes.is_empty() {
            if context.node.attr_int("noop_with_empty_axes", 0) != 0 {
                return Some(input.to_vec());
            }
            (0..input.len()).collect()
        } else {
            axes.iter()
                .map(|&a| normalize_axis(a, input.len()))
                .collect::<Option<_>>()?
        };
        Some(reduced_shape(input, &axes, keep_dims))
    });
    vec![Fact::new(dtype, shape)]
}

fn arg_extremum(context: &OpContext) -> Vec<Fact> {
    let keep_dims = context.node.attr_int("keepdims", 1) != 0;
    let shape = context.shape(0).and_then(|input| {
        let axis = normalize_axis(context.node.attr_int("axis", 0), input.len())?;
        Some(reduced_shape(input, &[axis], keep_dims))
    });
    vec![Fact::new(Some(DataType::Int64), shape)]
}

/// Whether a Reduce* node of `op_type` takes its axes as an input (the `axes` attribute
/// before that): ReduceSum from opset 13, every other reduction from opset 18.
pub(crate) fn reduce_axes_are_input(op_type: &str, opset: i64) -> bool {
    opset >= 18 || (op_type == "ReduceSum" && opset >= 13)
}
