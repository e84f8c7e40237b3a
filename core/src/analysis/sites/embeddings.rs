//! What surrounds the stacks: embeddings (token and token-type lookups indexed by graph inputs,
//! position lookups or position tables added whole, patch convolutions over a graph input) and
//! heads (linears after the last layer of a stack that belong to no layer).

use std::collections::{HashSet, VecDeque};

use super::context::Context;
use super::linear::Linears;
use super::stacks::{linear_label, DetectedStack};
use super::{Embedding, EmbeddingKind, Head};
use crate::analysis::labels::{initializer_label, node_label};
use crate::analysis::shapes::fixed_size;

/// A table lookup indexed by a graph input: a token or token-type embedding.
struct Lookup<'m> {
    position: usize,
    table: &'m str,
    ids: &'m str,
    rows: usize,
    dim: usize,
    output: &'m str,
}

pub(super) fn find_embeddings(context: &Context, stacks: &[DetectedStack]) -> Vec<Embedding> {
    let widths: HashSet<usize> = stacks.iter().map(|s| s.stack.hidden_size).collect();
    let mut lookups = Vec::new();
    let mut found = Vec::new();
    for (position, node) in context.graph.nodes.iter().enumerate() {
        if node.is("Gather") && node.attr_int("axis", 0) == 0 {
            let (Some(table), Some(indices), Some(output)) =
                (node.input(0), node.input(1), node.outputs.first())
            else {
                continue;
            };
            let Some(tensor) = context.float_initializer(table) else {
                continue;
            };
            let [rows, dim] = tensor.dims[..] else {
                continue;
            };
            let (Ok(rows), Ok(dim)) = (usize::try_from(rows), usize::try_from(dim)) else {
                continue;
            };
            if !widths.contains(&dim) {
                continue;
            }
            let ids = context.source_of(indices);
            if context.is_graph_input(ids) {
                lookups.push(Lookup {
                    position,
                    table,
                    ids,
                    rows,
                    dim,
                    output,
                });
            } else if is_summed(context, output) {
                found.push(embedding(
                    context,
                    position,
                    EmbeddingKind::Position,
                    table,
                    output,
                    rows,
                    dim,
                ));
            }
        } else if node.is("Conv") {
            let (Some(pixels), Some(kernel), Some(output)) =
                (node.input(0), node.input(1), node.outputs.first())
            else {
                continue;
            };
            let Some(tensor) = context.float_initializer(kernel) else {
                continue;
            };
            let Some(&channels) = tensor.dims.first() else {
                continue;
            };
            let Ok(dim) = usize::try_from(channels) else {
                continue;
            };
            if !widths.contains(&dim) || !context.is_graph_input(context.source_of(pixels)) {
                continue;
            }
            let n_patches = context
                .shape(output)
                .and_then(|shape| shape.get(2..))
                .and_then(fixed_size)
                .unwrap_or(0);
            found.push(embedding(
                context,
                position,
                EmbeddingKind::Patch,
                kernel,
                output,
                n_patches,
                dim,
            ));
        } else if node.is("Add") {
            if let Some(table) = added_position_table(context, node, &widths) {
                let (Some(output), Some(tensor)) =
                    (node.outputs.first(), context.initializer(table))
                else {
                    continue;
                };
                let dims = &tensor.dims;
                let rows = usize::try_from(dims[dims.len() - 2]).unwrap_or(0);
                let dim = usize::try_from(dims[dims.len() - 1]).unwrap_or(0);
                found.push(embedding(
                    context,
                    position,
                    EmbeddingKind::Position,
                    table,
                    output,
                    rows,
                    dim,
                ));
            }
        }
    }
    let vocabulary = lookups.iter().map(|l| l.rows).max().unwrap_or(0);
    let token_tables: HashSet<&str> = lookups
        .iter()
        .filter(|l| l.rows == vocabulary)
        .map(|l| l.table)
        .collect();
    let token_ids: HashSet<&str> = lookups
        .iter()
        .filter(|l| token_tables.contains(l.table))
        .map(|l| l.ids)
        .collect();
    for lookup in &lookups {
        let kind = if token_tables.contains(lookup.table) || token_ids.contains(lookup.ids) {
            EmbeddingKind::Token
        } else {
            EmbeddingKind::TokenType
        };
        found.push(embedding(
            context,
            lookup.position,
            kind,
            lookup.table,
            lookup.output,
            lookup.rows,
            lookup.dim,
        ));
    }
    found.sort_by_key(|(position, _)| *position);
    found.into_iter().map(|(_, e)| e).collect()
}

fn embedding(
    context: &Context,
    position: usize,
    kind: EmbeddingKind,
    weight: &str,
    output: &str,
    n_embeddings: usize,
    dim: usize,
) -> (usize, Embedding) {
    let node = context.node(position);
    let label = node_label(node).or_else(|| initializer_label(weight));
    (
        position,
        Embedding {
            kind,
            node: node.name.clone(),
            weight: weight.to_owned(),
            output: output.to_owned(),
            label,
            n_embeddings,
            dim,
        },
    )
}

/// Whether `value` is added (through views) to another computed value.
fn is_summed(context: &Context, value: &str) -> bool {
    context
        .readers_through_views(value)
        .iter()
        .any(|&(position, read)| {
            let node = context.node(position);
            node.is("Add")
                && node
                    .inputs
                    .iter()
                    .any(|i| !i.is_empty() && i != read && !context.is_constant(i))
        })
}

/// The `[1, positions, width]` (or `[positions, width]`) table an `Add` adds to embeddings that
/// come from a lookup or a patch convolution.
fn added_position_table<'m>(
    context: &Context<'m>,
    node: &'m crate::ir::Node,
    widths: &HashSet<usize>,
) -> Option<&'m str> {
    let table = node
        .inputs
        .iter()
        .find(|i| context.float_initializer(i).is_some())?;
    let other = node.inputs.iter().find(|i| !i.is_empty() && *i != table)?;
    let dims = &context.float_initializer(table)?.dims;
    let shaped = match dims[..] {
        [1, rows, width] | [rows, width] => {
            rows > 1 && usize::try_from(width).is_ok_and(|w| widths.contains(&w))
        }
        _ => false,
    };
    (shaped && !context.is_constant(other) && comes_from_embedding(context, other)).then_some(table)
}

/// Whether `value` is computed from a table lookup or a convolution without crossing a matrix
/// product or a normalization.
fn comes_from_embedding(context: &Context, value: &str) -> bool {
    let mut queue = VecDeque::from([value]);
    let mut visited = HashSet::new();
    while let Some(current) = queue.pop_front() {
        if visited.len() > 32 || !visited.insert(current) {
            continue;
        }
        let Some((position, node)) = context.producer(current) else {
            continue;
        };
        let op = node.op_type.as_str();
        if op == "Conv"
            || (op == "Gather"
                && node
                    .input(0)
                    .is_some_and(|t| context.initializer(t).is_some()))
        {
            return true;
        }
        if matches!(op, "MatMul" | "Gemm" | "Softmax") || op.contains("Normalization") {
            continue;
        }
        queue.extend(context.dynamic_inputs(position));
    }
    false
}

pub(super) fn find_heads(
    context: &Context,
    linears: &Linears,
    stacks: &[DetectedStack],
) -> Vec<Head> {
    let assigned: HashSet<usize> = stacks
        .iter()
        .flat_map(|s| s.linears.iter().copied())
        .collect();
    let Some(first_end) = stacks.iter().map(|s| s.last_node).min() else {
        return Vec::new();
    };
    linears
        .all
        .iter()
        .enumerate()
        .filter(|(i, linear)| !assigned.contains(i) && linear.node > first_end)
        .map(|(_, linear)| Head {
            node: context.node(linear.node).name.clone(),
            weight: linear.weight.clone(),
            label: linear_label(context, linear),
            in_features: linear.in_features,
            out_features: linear.out_features,
            layout: linear.layout,
            bias: linear.bias.clone(),
            input: linear.input.clone(),
            output: linear.output.clone(),
        })
        .collect()
}
