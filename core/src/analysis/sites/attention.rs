//! Attention by shape: a `Softmax` whose input comes (through scaling and masking) from a
//! `MatMul` of two computed operands (queries · keysᵀ) and whose output is the left operand of
//! another `MatMul` (· values). The linears feeding each operand are q, k and v (one linear
//! feeding all three is a fused qkv, with the runs of its output columns each operand reads);
//! the linear reading the context is o.

use std::collections::{HashSet, VecDeque};

use std::ops::Range;

use super::context::{Context, VIEW_OPS};
use super::linear::{output_columns, Linears};
use super::{SiteKind, SplitPart};
use crate::ir::{DataType, Dim, Tensor};

/// One attention found in the graph.
#[derive(Clone, Debug)]
pub(super) struct AttentionCore {
    /// Linear (index into [`Linears::all`]) feeding the queries.
    pub query: usize,
    /// Linear feeding the keys.
    pub key: usize,
    /// Linear feeding the values.
    pub value: usize,
    /// Linear reading the attention's output.
    pub output: Option<usize>,
    pub n_heads: Option<usize>,
    pub n_kv_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub key_states: Option<String>,
    pub value_states: Option<String>,
    /// Whether the scores are masked by a causal (triangular) mask.
    pub causal: bool,
    /// Whether the scores depend on a graph input other than through q, k, v (a padding mask).
    pub masked: bool,
    /// The `Softmax` input.
    pub scores: String,
    /// The `Softmax` output.
    pub probabilities: String,
    /// The graph inputs the scores depend on other than through q, k, v, in the order found.
    pub mask_inputs: Vec<String>,
    /// The additive term nearest the `Softmax` on the path from the `Q·Kᵀ` product.
    pub mask: Option<String>,
    /// For a fused qkv linear whose output is sliced or split into queries, keys and values:
    /// the parts in output-column order.
    pub qkv_split: Vec<SplitPart>,
}

impl AttentionCore {
    /// Whether one linear computes queries, keys and values.
    pub fn fused(&self) -> bool {
        self.query == self.key && self.key == self.value
    }
}

/// Ops through which scores flow from the `Q·Kᵀ` `MatMul` to the `Softmax` (scaling, masking,
/// bias, soft-capping).
const SCORE_OPS: &[&str] = &[
    "Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Dropout", "Max", "Min", "Tanh",
    "Clip", "Reshape",
];

/// Ops between a `Softmax` and the `MatMul` with the values.
const PROBABILITY_OPS: &[&str] = &["Cast", "Dropout", "Identity", "Where", "Reshape"];

/// Ops whose outputs carry no data of their inputs, or mark another computation; walks from an
/// attention operand back to its projection stop at them.
const BARRIER_OPS: &[&str] = &[
    "Shape",
    "Size",
    "ConstantOfShape",
    "Constant",
    "Range",
    "Softmax",
    "MatMul",
    "Gemm",
    "Conv",
    "LayerNormalization",
    "RMSNormalization",
    "ReduceMean",
    "ReduceSum",
    "EyeLike",
];

/// Ops that move per-head key/value tensors around without changing their data.
const STATE_VIEW_OPS: &[&str] = &[
    "Transpose",
    "Reshape",
    "Expand",
    "Unsqueeze",
    "Squeeze",
    "Cast",
    "Identity",
];

const COMPARISONS: &[&str] = &["Less", "LessOrEqual", "Greater", "GreaterOrEqual"];

pub(super) fn find_attention(context: &Context, linears: &Linears) -> Vec<AttentionCore> {
    let mut linear_at_node = std::collections::HashMap::new();
    for (i, linear) in linears.all.iter().enumerate() {
        linear_at_node.insert(linear.node, i);
    }
    let mut cores = Vec::new();
    for node in &context.graph.nodes {
        if !node.is("Softmax") {
            continue;
        }
        let (Some(scores_input), Some(probabilities)) = (node.input(0), node.outputs.first())
        else {
            continue;
        };
        let Some(scores) = scores_matmul(context, scores_input) else {
            continue;
        };
        let Some(context_matmul) = context_matmul(context, probabilities) else {
            continue;
        };
        let scores_node = context.node(scores);
        let context_node = context.node(context_matmul);
        let (Some(query_operand), Some(key_operand), Some(value_operand)) = (
            scores_node.input(0),
            scores_node.input(1),
            context_node.input(1),
        ) else {
            continue;
        };
        let (Some(query), Some(key), Some(value)) = (
            nearest_linear(context, linears, query_operand),
            nearest_linear(context, linears, key_operand),
            nearest_linear(context, linears, value_operand),
        ) else {
            continue;
        };
        let output = context_node
            .outputs
            .first()
            .and_then(|attended| reading_linear(context, &linear_at_node, attended));
        let head_dim = context
            .fixed_dim_from_end(query_operand, 1)
            .or_else(|| context.fixed_dim_from_end(value_operand, 1));
        let query_heads = context
            .shape(query_operand)
            .filter(|s| s.len() >= 4)
            .and_then(|_| context.fixed_dim_from_end(query_operand, 3));
        let fused = query == key && key == value;
        let n_heads = query_heads.or_else(|| {
            let width = linears.all[query].out_features;
            let width = if fused { width / 3 } else { width };
            head_dim.and_then(|d| width.is_multiple_of(d).then_some(width / d))
        });
        let n_kv_heads = head_dim.zip(n_heads).and_then(|(d, heads)| {
            if fused {
                let total = linears.all[query].out_features / d;
                total
                    .checked_sub(heads)
                    .filter(|rest| rest.is_multiple_of(2) && *rest > 0)
                    .map(|rest| rest / 2)
            } else {
                let width = linears.all[key].out_features;
                width.is_multiple_of(d).then_some(width / d)
            }
        });
        let key_length = scores_node
            .outputs
            .first()
            .and_then(|s| context.shape(s))
            .and_then(|s| s.last().cloned());
        let value_length = context.shape(probabilities).and_then(|s| s.last().cloned());
        let key_states = head_dim
            .zip(key_length)
            .and_then(|(d, length)| per_head_states(context, key_operand, &length, d));
        let value_states = head_dim
            .zip(value_length)
            .and_then(|(d, length)| per_head_states(context, value_operand, &length, d));
        let qkv_split = if fused {
            let operands = [
                (SiteKind::Q, query_operand),
                (SiteKind::K, key_operand),
                (SiteKind::V, value_operand),
            ];
            fused_parts(context, linears, query, &operands)
        } else {
            Vec::new()
        };
        let (causal, mask_inputs) = mask_kind(context, scores_input, scores);
        let mask = additive_term(context, scores_input, scores);
        cores.push(AttentionCore {
            query,
            key,
            value,
            output,
            n_heads,
            n_kv_heads,
            head_dim,
            key_states,
            value_states,
            causal,
            masked: !mask_inputs.is_empty(),
            mask_inputs,
            scores: scores_input.to_owned(),
            probabilities: probabilities.clone(),
            mask,
            qkv_split,
        });
    }
    cores
}

/// The `MatMul` of two computed operands that the scores reaching `value` come from.
fn scores_matmul(context: &Context, value: &str) -> Option<usize> {
    let mut queue = VecDeque::from([(value, 0usize)]);
    let mut visited = HashSet::new();
    while let Some((current, depth)) = queue.pop_front() {
        if depth > 8 || !visited.insert(current) {
            continue;
        }
        let Some((position, node)) = context.producer(current) else {
            continue;
        };
        if node.is("MatMul") {
            if context.dynamic_inputs(position).count() == 2 {
                return Some(position);
            }
            continue;
        }
        if SCORE_OPS.contains(&node.op_type.as_str()) {
            for input in context.dynamic_inputs(position) {
                queue.push_back((input, depth + 1));
            }
        }
    }
    None
}

/// The `MatMul` whose left operand is (a cast or masked copy of) the probabilities.
fn context_matmul(context: &Context, probabilities: &str) -> Option<usize> {
    let mut pending = vec![(probabilities, 0usize)];
    while let Some((current, depth)) = pending.pop() {
        if depth > 4 {
            continue;
        }
        for &(position, slot) in context.consumers(current) {
            let node = context.node(position);
            if node.is("MatMul") && slot == 0 {
                return Some(position);
            }
            if PROBABILITY_OPS.contains(&node.op_type.as_str()) {
                if let Some(output) = node.outputs.first() {
                    pending.push((output, depth + 1));
                }
            }
        }
    }
    None
}

/// Walking from the `Softmax` input back along the operand that reaches the `Q·Kᵀ` product at
/// `scores`, the other operand of the first `Add` (or of a `Sub` subtracting it) that is not
/// constant: the additive mask (or position bias) entering the scores.
fn additive_term(context: &Context, scores_input: &str, scores: usize) -> Option<String> {
    let mut current = scores_input;
    for _ in 0..16 {
        let (position, node) = context.producer(current)?;
        if position == scores {
            return None;
        }
        let op = node.op_type.as_str();
        if !SCORE_OPS.contains(&op) {
            return None;
        }
        let on_path: Vec<usize> = node
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, i)| !i.is_empty() && reaches(context, i, scores))
            .map(|(slot, _)| slot)
            .collect();
        let [slot] = on_path[..] else {
            return None;
        };
        if matches!(op, "Add") || (op == "Sub" && slot == 0) {
            let other = node.input(1 - slot)?;
            if !context.is_constant(other) {
                return Some(other.to_owned());
            }
        }
        current = node.input(slot)?;
    }
    None
}

/// Whether `value` is computed from the output of the node at `target` through score ops.
fn reaches(context: &Context, value: &str, target: usize) -> bool {
    let mut queue = VecDeque::from([value]);
    let mut visited = HashSet::new();
    while let Some(current) = queue.pop_front() {
        if visited.len() > 64 || !visited.insert(current) {
            continue;
        }
        let Some((position, node)) = context.producer(current) else {
            continue;
        };
        if position == target {
            return true;
        }
        if SCORE_OPS.contains(&node.op_type.as_str()) {
            queue.extend(context.dynamic_inputs(position));
        }
    }
    false
}

/// The nearest linear whose output reaches `value` through data (not shape) dependencies.
fn nearest_linear(context: &Context, linears: &Linears, value: &str) -> Option<usize> {
    let mut queue = VecDeque::from([value]);
    let mut visited = HashSet::new();
    while let Some(current) = queue.pop_front() {
        if visited.len() > 256 || !visited.insert(current) {
            continue;
        }
        if let Some(linear) = linears.producing(current) {
            return Some(linear);
        }
        let Some((position, node)) = context.producer(current) else {
            continue;
        };
        let op = node.op_type.as_str();
        let embedding_lookup = op == "Gather"
            && node
                .input(0)
                .is_some_and(|d| context.initializer(d).is_some());
        if BARRIER_OPS.contains(&op) || embedding_lookup {
            continue;
        }
        let data_inputs: Vec<&str> = if matches!(op, "Reshape" | "Expand" | "Tile" | "Slice") {
            node.input(0).into_iter().collect()
        } else {
            context.dynamic_inputs(position).collect()
        };
        queue.extend(data_inputs.into_iter().filter(|v| !context.is_constant(v)));
    }
    None
}

/// The parts of the fused `linear`'s output that reach each operand, in output-column order;
/// empty unless each operand reaches its own run of columns and the runs tile the output.
fn fused_parts(
    context: &Context,
    linears: &Linears,
    linear: usize,
    operands: &[(SiteKind, &str)],
) -> Vec<SplitPart> {
    let mut parts: Vec<(Range<usize>, SiteKind)> = Vec::new();
    for &(kind, operand) in operands {
        match nearest_columns(context, linears, linear, operand) {
            Some(columns) => parts.push((columns, kind)),
            None => return Vec::new(),
        }
    }
    parts.sort_by_key(|(columns, _)| columns.start);
    let mut end = 0;
    for (columns, _) in &parts {
        if columns.start != end {
            return Vec::new();
        }
        end = columns.end;
    }
    if end != linears.all[linear].out_features {
        return Vec::new();
    }
    parts
        .into_iter()
        .map(|(columns, kind)| SplitPart {
            kind,
            width: columns.len(),
        })
        .collect()
}

/// The run of `linear`'s output columns, taken by a `Slice` or `Split`, nearest to `value` on
/// the data path back to the linear.
fn nearest_columns(
    context: &Context,
    linears: &Linears,
    linear: usize,
    value: &str,
) -> Option<Range<usize>> {
    let mut queue = VecDeque::from([value]);
    let mut visited = HashSet::new();
    while let Some(current) = queue.pop_front() {
        if visited.len() > 256 || !visited.insert(current) {
            continue;
        }
        if let Some((found, columns)) = output_columns(context, linears, current) {
            if found == linear {
                return Some(columns);
            }
            continue;
        }
        if linears.producing(current).is_some() {
            continue;
        }
        let Some((position, node)) = context.producer(current) else {
            continue;
        };
        let op = node.op_type.as_str();
        if BARRIER_OPS.contains(&op) {
            continue;
        }
        let data_inputs: Vec<&str> = if matches!(op, "Reshape" | "Expand" | "Tile" | "Slice") {
            node.input(0).into_iter().collect()
        } else {
            context.dynamic_inputs(position).collect()
        };
        queue.extend(data_inputs.into_iter().filter(|v| !context.is_constant(v)));
    }
    None
}

/// The linear that reads the attention's output through transposes and reshapes.
fn reading_linear(
    context: &Context,
    linear_at_node: &std::collections::HashMap<usize, usize>,
    attended: &str,
) -> Option<usize> {
    let mut pending = vec![attended];
    let mut visited = 0;
    while let Some(current) = pending.pop() {
        visited += 1;
        if visited > 32 {
            break;
        }
        for &(position, slot) in context.consumers(current) {
            if slot == 0 {
                if let Some(&linear) = linear_at_node.get(&position) {
                    return Some(linear);
                }
            }
            let node = context.node(position);
            let op = node.op_type.as_str();
            if slot == 0 && (op == "Transpose" || VIEW_OPS.contains(&op)) {
                if let Some(output) = node.outputs.first() {
                    pending.push(output);
                }
            }
        }
    }
    None
}

/// The farthest-upstream `[batch, heads, length, head_dim]` tensor on the view-only path from an
/// attention operand back towards its projection: the key or value states after any cache
/// concatenation and before any grouped-query repetition.
fn per_head_states(
    context: &Context,
    operand: &str,
    length: &Dim,
    head_dim: usize,
) -> Option<String> {
    let head_dim = Dim::Fixed(head_dim as i64);
    let mut found = None;
    let mut current = operand;
    for _ in 0..16 {
        if let Some([_, _, sequence, width]) = context.shape(current) {
            if sequence == length && *width == head_dim && *length != Dim::Unknown {
                found = Some(current.to_owned());
            }
        }
        match context.producer(current) {
            Some((_, node)) if STATE_VIEW_OPS.contains(&node.op_type.as_str()) => {
                match node.input(0) {
                    Some(input) => current = input,
                    None => break,
                }
            }
            _ => break,
        }
    }
    found
}

/// Whether the scores reaching `scores_input` (besides through the `Q·Kᵀ` `MatMul` at
/// `scores`) are masked causally, and the graph inputs they depend on (a padding mask).
fn mask_kind(context: &Context, scores_input: &str, scores: usize) -> (bool, Vec<String>) {
    let mut causal = false;
    let mut inputs = Vec::new();
    let mut queue = VecDeque::from([scores_input]);
    let mut visited = HashSet::new();
    while let Some(current) = queue.pop_front() {
        if visited.len() > 512 || !visited.insert(current) {
            continue;
        }
        if context.is_graph_input(current) {
            inputs.push(current.to_owned());
            continue;
        }
        if let Some(tensor) = context.initializer(current) {
            causal |= is_triangular(tensor);
            continue;
        }
        let Some((position, node)) = context.producer(current) else {
            continue;
        };
        let op = node.op_type.as_str();
        if position == scores
            || matches!(
                op,
                "MatMul" | "Gemm" | "Softmax" | "Shape" | "Size" | "Conv"
            )
            || op.contains("Normalization")
        {
            continue;
        }
        if op == "Trilu" {
            causal = true;
        }
        if COMPARISONS.contains(&op) && context.dynamic_inputs(position).count() == 2 {
            causal = true;
        }
        for input in node.inputs.iter().filter(|i| !i.is_empty()) {
            queue.push_back(input);
        }
    }
    (causal, inputs)
}

/// Whether a constant is a square mask that differs above and below the diagonal: the
/// triangular constant some exports use as a causal mask.
fn is_triangular(tensor: &Tensor) -> bool {
    let dims = &tensor.dims;
    let [.., rows, columns] = dims[..] else {
        return false;
    };
    if rows != columns || rows < 2 || tensor.n_elements() > 1 << 22 {
        return false;
    }
    let Ok(bytes) = tensor.raw_bytes() else {
        return false;
    };
    let size = rows as usize;
    let element = |i: usize| -> Option<f64> {
        match tensor.dtype {
            DataType::Bool | DataType::Uint8 => bytes.get(i).map(|&b| f64::from(b)),
            DataType::Float => bytes
                .get(4 * i..4 * i + 4)
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            _ => None,
        }
    };
    let (Some(below), Some(above)) = (element(size), element(1)) else {
        return false;
    };
    if below == above {
        return false;
    }
    for row in 0..size {
        for column in 0..size {
            let expected = if column > row { above } else { below };
            if element(row * size + column) != Some(expected) {
                return false;
            }
        }
    }
    true
}
