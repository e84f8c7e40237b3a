//! Graph inputs by role, from what they feed: the ids a token, token-type or position lookup
//! reads (token ids of a cross-attending stack are decoder input ids), the images a patch
//! convolution reads, the mask that reaches the attention scores, and the caches concatenated
//! in front of a layer's key and value states. A standard HF input name labels an input only
//! when its structure gives no role.

use std::collections::{HashMap, HashSet, VecDeque};

use super::attention::AttentionCore;
use super::context::Context;
use super::stacks::DetectedStack;
use super::{Embedding, EmbeddingKind, GraphInput, InputRole};

/// Ops that move a cached key or value tensor without changing its data.
const CACHE_VIEW_OPS: &[&str] = &[
    "Transpose",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Cast",
    "Identity",
];

/// Whether `node` merely moves a cached tensor: one of [`CACHE_VIEW_OPS`], or a `Concat` of a
/// single input (the legacy exporter's copy of each cache tensor).
fn is_cache_view(node: &crate::ir::Node) -> bool {
    CACHE_VIEW_OPS.contains(&node.op_type.as_str())
        || (node.is("Concat") && node.inputs.iter().filter(|i| !i.is_empty()).count() == 1)
}

/// HF's input names, used only for inputs whose structure gives no role.
const NAMED_ROLES: &[(&str, InputRole)] = &[
    ("input_ids", InputRole::TokenIds),
    ("attention_mask", InputRole::AttentionMask),
    ("position_ids", InputRole::PositionIds),
    ("token_type_ids", InputRole::TokenTypeIds),
    ("decoder_input_ids", InputRole::DecoderInputIds),
    ("pixel_values", InputRole::PixelValues),
];

pub(super) fn find_input_roles(
    context: &Context,
    stacks: &[DetectedStack],
    cores: &[AttentionCore],
    embeddings: &[Embedding],
) -> Vec<GraphInput> {
    let mut roles: HashMap<String, GraphInput> = HashMap::new();
    let mut assign = |name: &str, role, stack: Option<&str>, layer, present: Option<&str>| {
        roles.entry(name.to_owned()).or_insert(GraphInput {
            name: name.to_owned(),
            role,
            stack: stack.map(str::to_owned),
            layer,
            present: present.map(str::to_owned),
        });
    };
    for detected in stacks {
        let stack = &detected.stack;
        for layer in &stack.layers {
            for attention in &layer.attention {
                let caches = [
                    (&attention.key_states, InputRole::PastKey),
                    (&attention.value_states, InputRole::PastValue),
                ];
                for (states, role) in caches {
                    if let Some((cache, concat)) =
                        states.as_deref().and_then(|s| cache_input(context, s))
                    {
                        let present = graph_output_through_views(context, concat);
                        assign(cache, role, Some(&stack.name), Some(layer.index), present);
                    }
                }
            }
        }
    }
    let decoder_ids = decoder_token_ids(context, stacks);
    let kinds: HashMap<&str, EmbeddingKind> = embeddings
        .iter()
        .map(|e| (e.weight.as_str(), e.kind))
        .collect();
    for node in &context.graph.nodes {
        let (weight, read) = if node.is("Conv") {
            (node.input(1), node.input(0))
        } else {
            (node.input(0), node.input(1))
        };
        let (Some(weight), Some(read)) = (weight, read) else {
            continue;
        };
        let Some(&kind) = kinds.get(weight) else {
            continue;
        };
        let source = context.source_of(read);
        if !context.is_graph_input(source) {
            continue;
        }
        let role = match (node.op_type.as_str(), kind) {
            ("Gather", EmbeddingKind::Token) if decoder_ids.contains(source) => {
                InputRole::DecoderInputIds
            }
            ("Gather", EmbeddingKind::Token) => InputRole::TokenIds,
            ("Gather", EmbeddingKind::TokenType) => InputRole::TokenTypeIds,
            ("Gather", EmbeddingKind::Position) => InputRole::PositionIds,
            ("Conv", EmbeddingKind::Patch) => InputRole::PixelValues,
            _ => continue,
        };
        assign(source, role, None, None, None);
    }
    for core in cores {
        for input in &core.mask_inputs {
            assign(input, InputRole::AttentionMask, None, None, None);
        }
    }
    for input in &context.graph.inputs {
        let named = NAMED_ROLES.iter().find(|(name, _)| *name == input.name);
        if let Some(&(name, role)) = named.filter(|_| context.is_graph_input(&input.name)) {
            assign(name, role, None, None, None);
        }
    }
    context
        .graph
        .inputs
        .iter()
        .filter_map(|input| roles.remove(&input.name))
        .collect()
}

/// The graph input concatenated (through views) in front of the per-head `states`, and the
/// concatenation's output.
fn cache_input<'m>(context: &Context<'m>, states: &'m str) -> Option<(&'m str, &'m str)> {
    let mut current = states;
    for _ in 0..16 {
        let (_, node) = context.producer(current)?;
        if node.is("Concat") && !is_cache_view(node) {
            let cache = concatenated_graph_input(context, node, 2)?;
            return Some((cache, node.outputs.first()?.as_str()));
        }
        if !is_cache_view(node) {
            return None;
        }
        current = node.input(0)?;
    }
    None
}

/// The graph input among the (view-peeled) inputs of the `Concat` `node`, looking `depth`
/// levels into inner `Concat`s (a cache that a prefix was put before).
fn concatenated_graph_input<'m>(
    context: &Context<'m>,
    node: &'m crate::ir::Node,
    depth: usize,
) -> Option<&'m str> {
    node.inputs.iter().find_map(|input| {
        let source = peel(context, input);
        if context.is_graph_input(source) {
            return Some(source);
        }
        let (_, inner) = context.producer(source)?;
        (depth > 0 && inner.is("Concat"))
            .then(|| concatenated_graph_input(context, inner, depth - 1))
            .flatten()
    })
}

/// The graph output that `value` is, or that it reaches through a chain of
/// [`CACHE_VIEW_OPS`] (the `present` cache a layer returns).
fn graph_output_through_views<'m>(context: &Context<'m>, value: &'m str) -> Option<&'m str> {
    let mut current = value;
    for _ in 0..16 {
        if let Some(output) = context.graph.outputs.iter().find(|o| o.name == current) {
            return Some(output.name.as_str());
        }
        let next = context
            .consumers(current)
            .iter()
            .find_map(|&(position, _)| {
                let node = context.node(position);
                (is_cache_view(node) && node.input(0) == Some(current))
                    .then(|| node.outputs.first().map(String::as_str))
                    .flatten()
            })?;
        current = next;
    }
    None
}

/// `value` with [`CACHE_VIEW_OPS`] peeled off its producer side.
fn peel<'m>(context: &Context<'m>, value: &'m str) -> &'m str {
    let mut current = value;
    for _ in 0..16 {
        match context.producer(current) {
            Some((_, node)) if is_cache_view(node) => match node.input(0) {
                Some(input) => current = input,
                None => break,
            },
            _ => break,
        }
    }
    current
}

/// The graph inputs read by table lookups feeding the stream of a cross-attending stack.
fn decoder_token_ids<'m>(context: &Context<'m>, stacks: &'m [DetectedStack]) -> HashSet<&'m str> {
    let mut ids = HashSet::new();
    for detected in stacks.iter().filter(|d| d.stack.cross_attention) {
        let Some(stream) = detected.stack.input.as_deref() else {
            continue;
        };
        let mut queue = VecDeque::from([stream]);
        let mut visited = HashSet::new();
        while let Some(current) = queue.pop_front() {
            if visited.len() > 256 || !visited.insert(current) {
                continue;
            }
            let Some((position, node)) = context.producer(current) else {
                continue;
            };
            if node.is("Gather")
                && node
                    .input(0)
                    .is_some_and(|t| context.initializer(t).is_some())
            {
                if let Some(source) = node.input(1).map(|i| context.source_of(i)) {
                    if context.is_graph_input(source) {
                        ids.insert(source);
                    }
                }
                continue;
            }
            if matches!(
                node.op_type.as_str(),
                "MatMul" | "Gemm" | "Softmax" | "Shape" | "Size"
            ) {
                continue;
            }
            queue.extend(context.dynamic_inputs(position));
        }
    }
    ids
}
