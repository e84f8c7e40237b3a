//! Gradient rules of the ops that move, select or copy elements: Transpose, the reshaping ops,
//! Expand, Concat, Split, Slice and the Gather family (whose gradients scatter-add GO back).

use super::{inverse_permutation, Gradient, Gradients, RuleContext};
use crate::ir::attributes::{int_attribute, string_attribute};
use crate::ir::{DataType, Dim};
use crate::Result;

pub(super) fn transpose(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let perm = match ctx.node.attr_ints("perm") {
        Some(perm) => perm.to_vec(),
        None => (0..ctx.rank(a)? as i64).rev().collect(),
    };
    let upstream = ctx.output_gradient(0)?;
    Ok(vec![Some(Gradient::Exact(
        ctx.transpose(&upstream, &inverse_permutation(&perm)),
    ))])
}

/// Reshape, Flatten, Squeeze, Unsqueeze: GO reshaped to the input's shape.
pub(super) fn reshape(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    let mut gradients = vec![Some(Gradient::Exact(ctx.reshape_like(&upstream, a)))];
    gradients.resize_with(ctx.node.inputs.len(), || None);
    Ok(gradients)
}

/// Expand: GO has the output's shape; the driver sums it back to the input's.
pub(super) fn expand(ctx: &mut RuleContext) -> Result<Gradients> {
    let upstream = ctx.output_gradient(0)?;
    Ok(vec![Some(Gradient::Broadcast(upstream)), None])
}

/// Concat: GO split along the axis into the inputs' sizes.
pub(super) fn concat(ctx: &mut RuleContext) -> Result<Gradients> {
    let out = ctx.output(0)?;
    let rank = ctx.rank(out)?;
    let axis = ctx.axis("axis", 0, rank)?;
    let inputs: Vec<&str> = ctx.node.inputs.iter().map(String::as_str).collect();
    let static_sizes: Option<Vec<i64>> = inputs
        .iter()
        .map(|input| match ctx.shape(input)?.get(axis)? {
            Dim::Fixed(n) => Some(*n),
            _ => None,
        })
        .collect();
    let sizes = match static_sizes {
        Some(sizes) => ctx.ints(&sizes),
        None => {
            let mut pieces = Vec::with_capacity(inputs.len());
            for input in &inputs {
                pieces.push(ctx.shape_slice(input, axis as i64, Some(axis as i64 + 1)));
            }
            let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
            ctx.op_with("Concat", &pieces, vec![int_attribute("axis", 0)])
        }
    };
    let upstream = ctx.output_gradient(0)?;
    let parts = ctx.node_outputs(
        "Split",
        &[&upstream, &sizes],
        vec![int_attribute("axis", axis as i64)],
        inputs.len(),
    );
    Ok(parts
        .into_iter()
        .map(|part| Some(Gradient::Exact(part)))
        .collect())
}

/// Split: the outputs' gradients (zeros where none flowed) concatenated along the axis.
pub(super) fn split(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let rank = ctx.rank(a)?;
    let axis = ctx.axis("axis", 0, rank)?;
    let mut parts = Vec::with_capacity(ctx.node.outputs.len());
    for slot in 0..ctx.node.outputs.len() {
        parts.push(ctx.output_gradient(slot)?);
    }
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let joined = ctx.op_with("Concat", &parts, vec![int_attribute("axis", axis as i64)]);
    let mut gradients = vec![Some(Gradient::Exact(joined))];
    gradients.resize_with(ctx.node.inputs.len(), || None);
    Ok(gradients)
}

/// A grid holding each element's flat position, shaped like `like`.
fn position_grid(ctx: &mut RuleContext, like: &str) -> (String, String) {
    let size = ctx.op("Size", &[like]);
    let zero = ctx.int_scalar(0);
    let one = ctx.int_scalar(1);
    let positions = ctx.op("Range", &[&zero, &size, &one]);
    (ctx.reshape_like(&positions, like), size)
}

/// Slice: GO written back at the sliced positions, found by slicing a grid of flat positions
/// with the node's own operands (so negative, clamped and strided bounds need no special case).
pub(super) fn slice(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    let (grid, size) = position_grid(ctx, a);
    let mut operands: Vec<&str> = vec![&grid];
    operands.extend(ctx.node.inputs.iter().skip(1).map(String::as_str));
    let picked = ctx.op("Slice", &operands);
    let flat_positions = ctx.reshape_to(&picked, &[-1]);
    let flat_gradient = ctx.reshape_to(&upstream, &[-1]);
    let flat_shape = ctx.reshape_to(&size, &[1]);
    let zeros = ctx.zeros_of_shape(&flat_shape, a)?;
    let scattered = ctx.op_with(
        "ScatterElements",
        &[&zeros, &flat_positions, &flat_gradient],
        vec![int_attribute("axis", 0)],
    );
    let mut gradients = vec![Some(Gradient::Exact(ctx.reshape_like(&scattered, a)))];
    gradients.resize_with(ctx.node.inputs.len(), || None);
    Ok(gradients)
}

/// Gather: GO scatter-added (repeated indices accumulate) into zeros of the data's shape, with
/// the gathered axis moved to the front so that ScatterND indexes it.
pub(super) fn gather(ctx: &mut RuleContext) -> Result<Gradients> {
    let (data, indices) = (ctx.input(0)?, ctx.input(1)?);
    let rank = ctx.rank(data)?;
    let axis = ctx.axis("axis", 0, rank)?;
    let upstream = ctx.output_gradient(0)?;
    let indices = match ctx.known_dtype(indices) {
        Some(DataType::Int64) => indices.to_owned(),
        _ => ctx.op_with(
            "Cast",
            &[indices],
            vec![int_attribute("to", i64::from(DataType::Int64.code()))],
        ),
    };
    let dimension_vector = ctx.shape_slice(data, axis as i64, Some(axis as i64 + 1));
    let dimension = ctx.reshape_to(&dimension_vector, &[]);
    let zero = ctx.int_scalar(0);
    let negative = ctx.op("Less", &[&indices, &zero]);
    let wrapped = ctx.op("Add", &[&indices, &dimension]);
    let positive = ctx.op("Where", &[&negative, &wrapped, &indices]);
    let keys = ctx.unsqueeze(&positive, &[-1]);
    let add = || vec![string_attribute("reduction", "add")];
    let gradient = if axis == 0 {
        let zeros = ctx.zeros_like(data)?;
        ctx.op_with("ScatterND", &[&zeros, &keys, &upstream], add())
    } else {
        let index_rank = ctx.rank(ctx.input(1)?)?;
        let (axis, index_rank, rank) = (axis as i64, index_rank as i64, rank as i64);
        let mut data_perm = vec![axis];
        data_perm.extend((0..rank).filter(|&d| d != axis));
        let mut upstream_perm: Vec<i64> = (axis..axis + index_rank).collect();
        upstream_perm.extend(0..axis);
        upstream_perm.extend(axis + index_rank..rank + index_rank - 1);
        let data_shape = ctx.op("Shape", &[data]);
        let perm_positions = ctx.ints(&data_perm);
        let moved_shape = ctx.op_with(
            "Gather",
            &[&data_shape, &perm_positions],
            vec![int_attribute("axis", 0)],
        );
        let zeros = ctx.zeros_of_shape(&moved_shape, data)?;
        let moved_upstream = ctx.transpose(&upstream, &upstream_perm);
        let scattered = ctx.op_with("ScatterND", &[&zeros, &keys, &moved_upstream], add());
        ctx.transpose(&scattered, &inverse_permutation(&data_perm))
    };
    Ok(vec![Some(Gradient::Exact(gradient)), None])
}

/// GatherElements: GO scatter-added at the same indices.
pub(super) fn gather_elements(ctx: &mut RuleContext) -> Result<Gradients> {
    let (data, indices) = (ctx.input(0)?, ctx.input(1)?);
    let rank = ctx.rank(data)?;
    let axis = ctx.axis("axis", 0, rank)?;
    let upstream = ctx.output_gradient(0)?;
    let zeros = ctx.zeros_like(data)?;
    let gradient = ctx.op_with(
        "ScatterElements",
        &[&zeros, indices, &upstream],
        vec![
            int_attribute("axis", axis as i64),
            string_attribute("reduction", "add"),
        ],
    );
    Ok(vec![Some(Gradient::Exact(gradient)), None])
}

/// GatherND (batch_dims = 0): GO scatter-added at the same index tuples.
pub(super) fn gather_nd(ctx: &mut RuleContext) -> Result<Gradients> {
    let (data, indices) = (ctx.input(0)?, ctx.input(1)?);
    let batch_dims = ctx.attr_int("batch_dims", 0);
    if batch_dims != 0 {
        return Err(ctx.unsupported(format_args!("batch_dims={batch_dims} is not supported")));
    }
    let upstream = ctx.output_gradient(0)?;
    let zeros = ctx.zeros_like(data)?;
    let gradient = ctx.op_with(
        "ScatterND",
        &[&zeros, indices, &upstream],
        vec![string_attribute("reduction", "add")],
    );
    Ok(vec![Some(Gradient::Exact(gradient)), None])
}
