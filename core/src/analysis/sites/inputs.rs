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
    let mut assign = |name: &str, role, stack: Option<&str>, layer| {
        roles.entry(name.to_owned()).or_insert(GraphInput {
            name: name.to_owned(),
            role,
            stack: stack.map(str::to_owned),
            layer,
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
                    if let Some(cache) = states.as_deref().and_then(|s| cache_input(context, s)) {
                        assign(cache, role, Some(&stack.name), Some(layer.index));
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
        assign(source, role, None, None);
    }
    for core in cores {
        for input in &core.mask_inputs {
            assign(input, InputRole::AttentionMask, None, None);
        }
    }
    for input in &context.graph.inputs {
        let named = NAMED_ROLES.iter().find(|(name, _)| *name == input.name);
        if let Some(&(name, role)) = named.filter(|_| context.is_graph_input(&input.name)) {
            assign(name, role, None, None);
        }
    }
    context
        .graph
        .inputs
        .iter()
        .filter_map(|input| roles.remove(&input.name))
        .collect()
}

/// The graph input concatenated (through views) in front of the per-head `states`.
fn cache_input<'m>(context: &Context<'m>, states: &'m str) -> Option<&'m str> {
    let mut current = states;
    for _ in 0..16 {
        let (_, node) = context.producer(current)?;
        if node.is("Concat") {
            return node.inputs.iter().find_map(|input| {
                let source = peel(context, input);
                context.is_graph_input(source).then_some(source)
            });
        }
        if !CACHE_VIEW_OPS.contains(&node.op_type.as_str()) {
            return None;
        }
        current = node.input(0)?;
    }
    None
}

/// `value` with [`CACHE_VIEW_OPS`] peeled off its producer side.
fn peel<'m>(context: &Context<'m>, value: &'m str) -> &'m str {
    let mut current = value;
    for _ in 0..16 {
        match context.producer(current) {
            Some((_, node)) if CACHE_VIEW_OPS.contains(&node.op_type.as_str()) => {
                match node.input(0) {
                    Some(input) => current = input,
                    None => break,
                }
            }
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
