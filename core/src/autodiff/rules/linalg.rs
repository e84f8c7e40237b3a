//! Gradient rules of the linear-algebra ops: MatMul (any rank, broadcast batch dimensions),
//! Gemm, and Conv (any number of spatial dimensions).

use super::{swap_last_two, Gradient, Gradients, RuleContext};
use crate::ir::attributes::{float_attribute, int_attribute, ints_attribute};
use crate::ir::Dim;
use crate::Result;

/// MatMul: dA = GO·Bᵀ and dB = Aᵀ·GO over the output's batch dimensions (the driver sums the
/// batch dimensions an input was broadcast over); 1-D operands are lifted to matrices first.
/// A 2-D B under a batched A, the shape of a linear layer's weight, gets one flattened product.
pub(super) fn matmul(ctx: &mut RuleContext) -> Result<Gradients> {
    let (a, b, out) = (ctx.input(0)?, ctx.input(1)?, ctx.output(0)?);
    let (rank_a, rank_b) = (ctx.rank(a)?, ctx.rank(b)?);
    let upstream = ctx.output_gradient(0)?;
    let lifted_upstream = match (rank_a, rank_b) {
        (1, 1) => ctx.unsqueeze(&upstream, &[0, 1]),
        (1, _) => ctx.unsqueeze(&upstream, &[-2]),
        (_, 1) => ctx.unsqueeze(&upstream, &[-1]),
        _ => upstream.clone(),
    };
    let batch: Option<Vec<Dim>> = ctx.shape(out).map(|shape| {
        let trailing = usize::from(rank_a >= 2) + usize::from(rank_b >= 2);
        shape[..shape.len().saturating_sub(trailing)].to_vec()
    });
    let with_batch = |shape: Option<&[Dim]>, rank: usize| -> Option<Vec<Dim>> {
        let mut full = batch.clone()?;
        let shape = shape?;
        full.extend_from_slice(&shape[shape.len().saturating_sub(rank.min(2))..]);
        Some(full)
    };
    let (shape_a, shape_b) = (
        with_batch(ctx.shape(a), rank_a),
        with_batch(ctx.shape(b), rank_b),
    );

    let mut gradients = vec![None, None];
    if ctx.wants(0) {
        let lifted_b = if rank_b == 1 {
            ctx.unsqueeze(b, &[-1])
        } else {
            b.to_owned()
        };
        let b_transposed = ctx.transpose(&lifted_b, &swap_last_two(rank_b.max(2)));
        let mut a_gradient = ctx.op("MatMul", &[&lifted_upstream, &b_transposed]);
        if rank_a == 1 {
            a_gradient = ctx.squeeze(&a_gradient, &[-2]);
        }
        gradients[0] = Some(Gradient::Shaped(a_gradient, shape_a));
    }
    if ctx.wants(1) {
        gradients[1] = Some(if rank_b == 2 && rank_a >= 3 {
            let inner = ctx.shape_slice(a, -1, None);
            let columns = ctx.shape_slice(&upstream, -1, None);
            let minus_one = ctx.ints(&[-1]);
            let a_rows = ctx.op_with(
                "Concat",
                &[&minus_one, &inner],
                vec![int_attribute("axis", 0)],
            );
            let upstream_rows = ctx.op_with(
                "Concat",
                &[&minus_one, &columns],
                vec![int_attribute("axis", 0)],
            );
            let a_matrix = ctx.op("Reshape", &[a, &a_rows]);
            let upstream_matrix = ctx.op("Reshape", &[&upstream, &upstream_rows]);
            let a_transposed = ctx.transpose(&a_matrix, &[1, 0]);
            Gradient::Exact(ctx.op("MatMul", &[&a_transposed, &upstream_matrix]))
        } else {
            let lifted_a = if rank_a == 1 {
                ctx.unsqueeze(a, &[0])
            } else {
                a.to_owned()
            };
            let a_transposed = ctx.transpose(&lifted_a, &swap_last_two(rank_a.max(2)));
            let mut b_gradient = ctx.op("MatMul", &[&a_transposed, &lifted_upstream]);
            if rank_b == 1 {
                b_gradient = ctx.squeeze(&b_gradient, &[-1]);
            }
            Gradient::Shaped(b_gradient, shape_b)
        });
    }
    Ok(gradients)
}

/// Gemm: Y = α·op(A)·op(B) + β·C. Each matrix gradient is itself one Gemm.
pub(super) fn gemm(ctx: &mut RuleContext) -> Result<Gradients> {
    let (a, b) = (ctx.input(0)?, ctx.input(1)?);
    let alpha = ctx.attr_float("alpha", 1.0);
    let beta = ctx.attr_float("beta", 1.0);
    let trans_a = ctx.attr_int("transA", 0) != 0;
    let trans_b = ctx.attr_int("transB", 0) != 0;
    let upstream = ctx.output_gradient(0)?;
    let gemm = |ctx: &mut RuleContext, x: &str, y: &str, trans_x: bool, trans_y: bool| {
        let attributes = vec![
            float_attribute("alpha", alpha),
            int_attribute("transA", i64::from(trans_x)),
            int_attribute("transB", i64::from(trans_y)),
        ];
        Some(Gradient::Exact(ctx.op_with("Gemm", &[x, y], attributes)))
    };
    let mut gradients = vec![None, None, None];
    if ctx.wants(0) {
        gradients[0] = if trans_a {
            gemm(ctx, b, &upstream, trans_b, true)
        } else {
            gemm(ctx, &upstream, b, false, !trans_b)
        };
    }
    if ctx.wants(1) {
        gradients[1] = if trans_b {
            gemm(ctx, &upstream, a, true, trans_a)
        } else {
            gemm(ctx, a, &upstream, !trans_a, false)
        };
    }
    if ctx.wants(2) {
        let c_gradient = if beta == 1.0 {
            upstream.clone()
        } else {
            let scale = ctx.scalar(f64::from(beta), a)?;
            ctx.op("Mul", &[&upstream, &scale])
        };
        gradients[2] = Some(Gradient::Broadcast(c_gradient));
    }
    Ok(gradients)
}

/// Conv (group 1 for the weight gradient): the bias gradient sums GO over batch and space; the
/// weight gradient is a convolution of the input by GO with batch and channels swapped (strides
/// and dilations exchanged), cut to the kernel size; the input gradient is a ConvTranspose of GO
/// by the weight, cut or zero-padded to the input's size.
pub(super) fn conv(ctx: &mut RuleContext) -> Result<Gradients> {
    let (x, w) = (ctx.input(0)?, ctx.input(1)?);
    let rank = ctx.rank(x)?;
    if rank < 3 {
        return Err(ctx.unsupported(format_args!("input rank {rank} has no spatial dimension")));
    }
    let n_spatial = rank - 2;
    let auto_pad = ctx.node.attr_string("auto_pad").unwrap_or_default();
    if !matches!(auto_pad.as_str(), "" | "NOTSET" | "VALID") {
        return Err(ctx.unsupported(format_args!("auto_pad={auto_pad} is not supported")));
    }
    let list = |name: &str, default: i64, length: usize| -> Vec<i64> {
        ctx.node
            .attr_ints(name)
            .filter(|v| v.len() == length)
            .map_or_else(|| vec![default; length], <[i64]>::to_vec)
    };
    let strides = list("strides", 1, n_spatial);
    let dilations = list("dilations", 1, n_spatial);
    let pads = if auto_pad == "VALID" {
        vec![0; 2 * n_spatial]
    } else {
        list("pads", 0, 2 * n_spatial)
    };
    let group = ctx.attr_int("group", 1);
    let upstream = ctx.output_gradient(0)?;
    let spatial_axes: Vec<i64> = (2..rank as i64).collect();
    let mut swap_batch_and_channels: Vec<i64> = vec![1, 0];
    swap_batch_and_channels.extend(&spatial_axes);

    let mut gradients = vec![None, None, None];
    if ctx.wants(0) {
        let mut begin_pads = pads[..n_spatial].to_vec();
        begin_pads.extend(std::iter::repeat_n(0, n_spatial));
        let attributes = vec![
            ints_attribute("strides", &strides),
            ints_attribute("dilations", &dilations),
            ints_attribute("pads", &begin_pads),
            int_attribute("group", group),
        ];
        let transposed = ctx.op_with("ConvTranspose", &[&upstream, w], attributes);
        let starts = ctx.ints(&vec![0; n_spatial]);
        let ends = ctx.shape_slice(x, 2, None);
        let axes = ctx.ints(&spatial_axes);
        let cut = ctx.op("Slice", &[&transposed, &starts, &ends, &axes]);
        let wanted = ctx.op("Shape", &[x]);
        let have = ctx.op("Shape", &[&cut]);
        let missing = ctx.op("Sub", &[&wanted, &have]);
        let no_leading = ctx.ints(&vec![0; rank]);
        let pad_amounts = ctx.op_with(
            "Concat",
            &[&no_leading, &missing],
            vec![int_attribute("axis", 0)],
        );
        gradients[0] = Some(Gradient::Exact(ctx.op("Pad", &[&cut, &pad_amounts])));
    }
    if ctx.wants(1) {
        if group != 1 {
            return Err(ctx.unsupported(format_args!(
                "the weight gradient of a grouped convolution (group={group}) is not supported"
            )));
        }
        let x_swapped = ctx.transpose(x, &swap_batch_and_channels);
        let upstream_swapped = ctx.transpose(&upstream, &swap_batch_and_channels);
        let attributes = vec![
            ints_attribute("strides", &dilations),
            ints_attribute("dilations", &strides),
            ints_attribute("pads", &pads),
        ];
        let correlation = ctx.op_with("Conv", &[&x_swapped, &upstream_swapped], attributes);
        let starts = ctx.ints(&vec![0; n_spatial]);
        let ends = ctx.shape_slice(w, 2, None);
        let axes = ctx.ints(&spatial_axes);
        let cut = ctx.op("Slice", &[&correlation, &starts, &ends, &axes]);
        gradients[1] = Some(Gradient::Exact(
            ctx.transpose(&cut, &swap_batch_and_channels),
        ));
    }
    if ctx.wants(2) {
        let mut axes = vec![0];
        axes.extend(&spatial_axes);
        gradients[2] = Some(Gradient::Exact(ctx.reduce(
            "ReduceSum",
            &upstream,
            Some(&axes),
            false,
        )));
    }
    Ok(gradients)
}
