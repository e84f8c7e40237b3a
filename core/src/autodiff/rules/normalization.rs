//! Gradient rules of normalizations and reductions: Softmax, LogSoftmax, LayerNormalization,
//! ReduceSum and ReduceMean.

use super::{Gradient, Gradients, RuleContext};
use crate::analysis::shapes::{normalize_axis, reduce_axes_are_input};
use crate::ir::Dim;
use crate::Result;

/// Softmax (opset ≥ 13, one axis): dX = Y·(GO − Σ_axis GO·Y).
pub(super) fn softmax(ctx: &mut RuleContext) -> Result<Gradients> {
    let out = ctx.output(0)?;
    let axis = ctx.axis("axis", -1, ctx.rank(out)?)? as i64;
    let upstream = ctx.output_gradient(0)?;
    let product = ctx.op("Mul", &[&upstream, out]);
    let total = ctx.reduce("ReduceSum", &product, Some(&[axis]), true);
    let centered = ctx.op("Sub", &[&upstream, &total]);
    Ok(vec![Some(Gradient::Exact(
        ctx.op("Mul", &[out, &centered]),
    ))])
}

/// LogSoftmax (opset ≥ 13, one axis): dX = GO − exp(Y)·Σ_axis GO.
pub(super) fn log_softmax(ctx: &mut RuleContext) -> Result<Gradients> {
    let out = ctx.output(0)?;
    let axis = ctx.axis("axis", -1, ctx.rank(out)?)? as i64;
    let upstream = ctx.output_gradient(0)?;
    let total = ctx.reduce("ReduceSum", &upstream, Some(&[axis]), true);
    let probabilities = ctx.op("Exp", &[out]);
    let product = ctx.op("Mul", &[&probabilities, &total]);
    Ok(vec![Some(Gradient::Exact(
        ctx.op("Sub", &[&upstream, &product]),
    ))])
}

/// LayerNormalization over the axes from `axis` on. Mean and inverse standard deviation are
/// recomputed in the input's type; dX = invstd·(g − mean(g) − x̂·mean(g·x̂)) with g = GO·scale,
/// dScale = GO·x̂ and dBias = GO, both summed by the driver over the leading axes.
pub(super) fn layer_normalization(ctx: &mut RuleContext) -> Result<Gradients> {
    let (x, scale) = (ctx.input(0)?, ctx.input(1)?);
    if ctx.has_output_gradient(1) || ctx.has_output_gradient(2) {
        return Err(
            ctx.unsupported("gradients through the Mean or InvStdDev outputs are not supported")
        );
    }
    let rank = ctx.rank(x)?;
    let axis = ctx.axis("axis", -1, rank)?;
    let axes: Vec<i64> = (axis as i64..rank as i64).collect();
    let epsilon = ctx.scalar(f64::from(ctx.attr_float("epsilon", 1e-5)), x)?;
    let upstream = ctx.output_gradient(0)?;

    let mean = ctx.reduce("ReduceMean", x, Some(&axes), true);
    let centered = ctx.op("Sub", &[x, &mean]);
    let square = ctx.op("Mul", &[&centered, &centered]);
    let variance = ctx.reduce("ReduceMean", &square, Some(&axes), true);
    let shifted = ctx.op("Add", &[&variance, &epsilon]);
    let deviation = ctx.op("Sqrt", &[&shifted]);
    let inverse_deviation = ctx.op("Reciprocal", &[&deviation]);
    let normalized = ctx.op("Mul", &[&centered, &inverse_deviation]);

    let x_shape = ctx.shape(x).map(<[Dim]>::to_vec);
    let mut gradients = vec![None, None, None];
    if ctx.wants(0) {
        let scaled = ctx.op("Mul", &[&upstream, scale]);
        let scaled_mean = ctx.reduce("ReduceMean", &scaled, Some(&axes), true);
        let projected = ctx.op("Mul", &[&scaled, &normalized]);
        let projected_mean = ctx.reduce("ReduceMean", &projected, Some(&axes), true);
        let correction = ctx.op("Mul", &[&normalized, &projected_mean]);
        let first = ctx.op("Sub", &[&scaled, &scaled_mean]);
        let second = ctx.op("Sub", &[&first, &correction]);
        gradients[0] = Some(Gradient::Exact(
            ctx.op("Mul", &[&second, &inverse_deviation]),
        ));
    }
    if ctx.wants(1) {
        let product = ctx.op("Mul", &[&upstream, &normalized]);
        gradients[1] = Some(Gradient::Shaped(product, x_shape.clone()));
    }
    if ctx.wants(2) {
        gradients[2] = Some(Gradient::Shaped(upstream, x_shape));
    }
    Ok(gradients)
}

/// ReduceSum and ReduceMean: GO (with the reduced axes restored) expanded to the input's shape,
/// divided by the number of elements averaged for ReduceMean.
pub(super) fn reduce_sum_mean(ctx: &mut RuleContext) -> Result<Gradients> {
    let (x, out) = (ctx.input(0)?, ctx.output(0)?);
    let axes_are_input = reduce_axes_are_input(&ctx.node.op_type, ctx.opset());
    let keepdims = ctx.attr_int("keepdims", 1) != 0;
    let noop_with_empty_axes = ctx.attr_int("noop_with_empty_axes", 0) != 0;
    let upstream = ctx.output_gradient(0)?;
    let axes_value = if axes_are_input {
        ctx.node.input(1)
    } else {
        None
    };
    let constant_axes = if axes_are_input {
        axes_value.and_then(|value| ctx.constant_ints(value))
    } else {
        ctx.node.attr_ints("axes").map(<[i64]>::to_vec)
    };
    let no_axes = match (&constant_axes, axes_value) {
        (Some(axes), _) => axes.is_empty(),
        (None, value) => value.is_none(),
    };
    if no_axes && noop_with_empty_axes {
        return Ok(vec![Some(Gradient::Exact(upstream)), None]);
    }
    let restored = if keepdims || no_axes {
        upstream
    } else {
        match (&constant_axes, axes_value) {
            (Some(axes), _) => {
                let rank = ctx.rank(x)?;
                let axes: Option<Vec<i64>> = axes
                    .iter()
                    .map(|&a| normalize_axis(a, rank).map(|a| a as i64))
                    .collect();
                let axes = axes.ok_or_else(|| ctx.unsupported("an axis is out of range"))?;
                ctx.unsqueeze(&upstream, &axes)
            }
            (None, Some(value)) => ctx.op("Unsqueeze", &[&upstream, value]),
            (None, None) => upstream,
        }
    };
    let shape = ctx.op("Shape", &[x]);
    let mut gradient = ctx.op("Expand", &[&restored, &shape]);
    if ctx.node.op_type == "ReduceMean" {
        let input_size = ctx.op("Size", &[x]);
        let output_size = ctx.op("Size", &[out]);
        let count = ctx.op("Div", &[&input_size, &output_size]);
        let count = ctx.op("CastLike", &[&count, x]);
        gradient = ctx.op("Div", &[&gradient, &count]);
    }
    Ok(vec![Some(Gradient::Exact(gradient)), None])
}
