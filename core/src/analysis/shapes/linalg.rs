//! Shape rules of linear-algebra and normalization ops: `MatMul`, `Gemm`, `Conv`,
//! `LayerNormalization`, `RMSNormalization`.

use super::symbolic::{broadcast_conflict, broadcast_shapes};
use super::{normalize_axis, Fact, OpContext, RuleTable};
use crate::ir::Dim;

pub(super) fn register(table: &mut RuleTable) {
    table.insert("MatMul", matmul);
    table.insert("Gemm", gemm);
    table.insert("Conv", conv);
    table.insert("LayerNormalization", normalization);
    table.insert("RMSNormalization", normalization);
}

/// The shape of `MatMul(a, b)` with NumPy semantics (1-D operands promoted, batch dims broadcast).
pub(super) fn matmul_shape(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    match (a.len(), b.len()) {
        (0, _) | (_, 0) => None,
        (1, 1) => Some(Vec::new()),
        (1, rank_b) => {
            let mut shape = b[..rank_b - 2].to_vec();
            shape.push(b[rank_b - 1].clone());
            Some(shape)
        }
        (rank_a, 1) => Some(a[..rank_a - 1].to_vec()),
        (rank_a, rank_b) => {
            let mut shape = broadcast_shapes(&a[..rank_a - 2], &b[..rank_b - 2]);
            shape.push(a[rank_a - 2].clone());
            shape.push(b[rank_b - 1].clone());
            Some(shape)
        }
    }
}

/// Why `MatMul(a, b)` cannot be computed, when fixed sizes show it: the inner dimensions differ
/// or the batch dimensions cannot broadcast.
fn matmul_conflict(a: &[Dim], b: &[Dim]) -> Option<String> {
    let (rank_a, rank_b) = (a.len(), b.len());
    if rank_a == 0 || rank_b == 0 {
        return None;
    }
    let inner_b = &b[rank_b.saturating_sub(2)];
    if let Some(reason) = inner_conflict(&a[rank_a - 1], inner_b) {
        return Some(reason);
    }
    if rank_a < 2 || rank_b < 2 {
        return None;
    }
    let (x, y) = (&a[..rank_a - 2], &b[..rank_b - 2]);
    broadcast_conflict(x, y).map(|(axis, x, y)| {
        format!(
            "batch sizes {x} and {y} at axis {} cannot broadcast",
            axis - 2
        )
    })
}

/// Why two inner (contracted) dimensions cannot meet: both fixed and different.
fn inner_conflict(a: &Dim, b: &Dim) -> Option<String> {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) if x != y => {
            Some(format!("inner dimensions {x} and {y} differ"))
        }
        _ => None,
    }
}

fn matmul(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(0).or_else(|| context.dtype(1));
    let (a, b) = (context.shape(0), context.shape(1));
    if let Some(reason) = a.zip(b).and_then(|(a, b)| matmul_conflict(a, b)) {
        context.report_conflict(0, 1, reason);
    }
    let shape = a.zip(b).and_then(|(a, b)| matmul_shape(a, b));
    vec![Fact::new(dtype, shape)]
}

fn gemm(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(0).or_else(|| context.dtype(1));
    let (trans_a, trans_b) = (
        context.node.attr_int("transA", 0),
        context.node.attr_int("transB", 0),
    );
    let inner_a = match (context.shape(0), trans_a) {
        (Some([_, k]), 0) | (Some([k, _]), _) => Some(k),
        _ => None,
    };
    let inner_b = match (context.shape(1), trans_b) {
        (Some([k, _]), 0) | (Some([_, k]), _) => Some(k),
        _ => None,
    };
    if let Some(reason) = inner_a.zip(inner_b).and_then(|(a, b)| inner_conflict(a, b)) {
        let reason = format!("{reason} (transA = {trans_a}, transB = {trans_b})");
        context.report_conflict(0, 1, reason);
    }
    let rows = match (context.shape(0), context.node.attr_int("transA", 0)) {
        (Some([m, _]), 0) | (Some([_, m]), _) => m.clone(),
        _ => Dim::Unknown,
    };
    let columns = match (context.shape(1), context.node.attr_int("transB", 0)) {
        (Some([_, n]), 0) | (Some([n, _]), _) => n.clone(),
        _ => Dim::Unknown,
    };
    vec![Fact::new(dtype, Some(vec![rows, columns]))]
}

fn conv(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(0);
    let (Some(input), Some(weight)) = (context.shape(0), context.shape(1)) else {
        return vec![Fact::new(dtype, None)];
    };
    if input.len() < 3 || weight.len() != input.len() {
        return vec![Fact::new(dtype, None)];
    }
    let n_spatial = input.len() - 2;
    let node = context.node;
    let kernel: Vec<Dim> = match node.attr_ints("kernel_shape") {
        Some(kernel) => kernel.iter().map(|&k| Dim::Fixed(k)).collect(),
        None => weight[2..].to_vec(),
    };
    let attribute_or = |name: &str, default: i64, length: usize| -> Vec<i64> {
        node.attr_ints(name)
            .map_or_else(|| vec![default; length], <[i64]>::to_vec)
    };
    let strides = attribute_or("strides", 1, n_spatial);
    let dilations = attribute_or("dilations", 1, n_spatial);
    let pads = attribute_or("pads", 0, 2 * n_spatial);
    let auto_pad = node.attr_string("auto_pad").unwrap_or_default();
    let mut shape = vec![input[0].clone(), weight[0].clone()];
    for axis in 0..n_spatial {
        let stride = strides.get(axis).copied().unwrap_or(1).max(1);
        let dilation = dilations.get(axis).copied().unwrap_or(1);
        let size = match (&input[axis + 2], kernel.get(axis)) {
            (Dim::Fixed(size), Some(Dim::Fixed(kernel))) => {
                let begin = pads.get(axis).copied().unwrap_or(0);
                let end = pads.get(axis + n_spatial).copied().unwrap_or(0);
                conv_output_size(*size, *kernel, stride, dilation, begin, end, &auto_pad)
                    .map_or(Dim::Unknown, Dim::Fixed)
            }
            (symbol, Some(Dim::Fixed(1))) if stride == 1 && pads.iter().all(|&p| p == 0) => {
                symbol.clone()
            }
            _ => Dim::Unknown,
        };
        shape.push(size);
    }
    vec![Fact::new(dtype, Some(shape))]
}

/// The output size of one convolved axis; `None` when the arithmetic overflows.
fn conv_output_size(
    size: i64,
    kernel: i64,
    stride: i64,
    dilation: i64,
    pad_begin: i64,
    pad_end: i64,
    auto_pad: &str,
) -> Option<i64> {
    let reach = dilation
        .checked_mul(kernel.checked_sub(1)?)?
        .checked_add(1)?;
    let padded = match auto_pad {
        "SAME_UPPER" | "SAME_LOWER" => return Some(size.checked_add(stride - 1)? / stride),
        "VALID" => size,
        _ => size.checked_add(pad_begin)?.checked_add(pad_end)?,
    };
    Some(padded.checked_sub(reach)? / stride + 1)
}

/// Output 0 like `X`; optional statistics outputs keep the leading dims and reduce the rest to 1.
fn normalization(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(0);
    let shape = context.shape(0).map(<[Dim]>::to_vec);
    let statistics = shape.as_ref().and_then(|shape| {
        let axis = normalize_axis(context.node.attr_int("axis", -1), shape.len())?;
        let mut reduced = shape[..axis].to_vec();
        reduced.resize(shape.len(), Dim::Fixed(1));
        Some(reduced)
    });
    vec![
        Fact::new(dtype, shape),
        Fact::new(dtype, statistics.clone()),
        Fact::new(dtype, statistics),
    ]
}
