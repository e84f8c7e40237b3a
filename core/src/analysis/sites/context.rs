//! The read-only context every detection pass works on: the graph, its producer/consumer index,
//! inferred shapes, and small graph walks shared by the passes.

use std::collections::HashMap;

use crate::analysis::shapes::{infer_shapes, ShapeMap};
use crate::ir::{Dim, Graph, GraphIndex, Model, Node, Tensor};
use crate::Result;

/// Ops that only re-view or re-type a tensor; walks look through them.
pub(super) const VIEW_OPS: &[&str] = &[
    "Reshape",
    "Flatten",
    "Cast",
    "Identity",
    "Dropout",
    "Squeeze",
    "Unsqueeze",
];

/// The graph and everything the passes derive from it once.
pub(super) struct Context<'m> {
    pub graph: &'m Graph,
    pub index: GraphIndex<'m>,
    pub shapes: ShapeMap,
    initializers: HashMap<&'m str, &'m Tensor>,
    graph_inputs: HashMap<&'m str, usize>,
}

impl<'m> Context<'m> {
    /// Indexes `model`'s graph and infers its shapes.
    pub fn new(model: &'m Model) -> Result<Self> {
        let graph = &model.graph;
        let initializers: HashMap<&str, &Tensor> = graph
            .initializers
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let graph_inputs = graph
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, input)| !initializers.contains_key(input.name.as_str()))
            .map(|(position, input)| (input.name.as_str(), position))
            .collect();
        Ok(Context {
            graph,
            index: GraphIndex::new(graph),
            shapes: infer_shapes(model)?,
            initializers,
            graph_inputs,
        })
    }

    /// The node at `position`.
    pub fn node(&self, position: usize) -> &'m Node {
        &self.graph.nodes[position]
    }

    /// The (position, node) producing `value`.
    pub fn producer(&self, value: &str) -> Option<(usize, &'m Node)> {
        self.index
            .producer(value)
            .map(|(position, _)| (position, self.node(position)))
    }

    /// The (position, input slot) pairs that read `value`.
    pub fn consumers(&self, value: &str) -> &[(usize, usize)] {
        self.index.consumers(value)
    }

    /// The initializer called `value`.
    pub fn initializer(&self, value: &str) -> Option<&'m Tensor> {
        self.initializers.get(value).copied()
    }

    /// A floating-point initializer called `value`.
    pub fn float_initializer(&self, value: &str) -> Option<&'m Tensor> {
        self.initializer(value).filter(|t| t.dtype.is_float())
    }

    /// Whether `value` is a graph input that no initializer backs.
    pub fn is_graph_input(&self, value: &str) -> bool {
        self.graph_inputs.contains_key(value)
    }

    /// Whether `value` depends on no graph input.
    pub fn is_constant(&self, value: &str) -> bool {
        self.initializers.contains_key(value) || self.shapes.is_constant(value)
    }

    /// The inferred shape of `value`.
    pub fn shape(&self, value: &str) -> Option<&[Dim]> {
        self.shapes.shape(value)
    }

    /// A fixed, positive size of `value` at `axis` counted from the end (1 = last axis).
    pub fn fixed_dim_from_end(&self, value: &str, axis: usize) -> Option<usize> {
        let shape = self.shape(value)?;
        let position = shape.len().checked_sub(axis)?;
        match shape[position] {
            Dim::Fixed(n) if n > 0 => usize::try_from(n).ok(),
            _ => None,
        }
    }

    /// `value` with view ops (see [`VIEW_OPS`]) peeled off its producer side: the value whose
    /// data it merely re-views.
    pub fn source_of(&self, value: &'m str) -> &'m str {
        let mut current = value;
        for _ in 0..16 {
            match self.producer(current) {
                Some((_, node)) if VIEW_OPS.contains(&node.op_type.as_str()) => {
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

    /// Nodes reading `value` through view ops: the first non-view consumers, with the value they
    /// read.
    pub fn readers_through_views(&self, value: &'m str) -> Vec<(usize, &'m str)> {
        let mut readers = Vec::new();
        let mut pending = vec![value];
        let mut visited = 0;
        while let Some(current) = pending.pop() {
            visited += 1;
            if visited > 64 {
                break;
            }
            for &(position, _) in self.consumers(current) {
                let node = self.node(position);
                if VIEW_OPS.contains(&node.op_type.as_str()) && node.input(0) == Some(current) {
                    if let Some(output) = node.outputs.first() {
                        pending.push(output);
                    }
                } else {
                    readers.push((position, current));
                }
            }
        }
        readers
    }

    /// The non-constant inputs of the node at `position`.
    pub fn dynamic_inputs(&self, position: usize) -> impl Iterator<Item = &'m str> + '_ {
        self.node(position)
            .inputs
            .iter()
            .filter(|name| !name.is_empty() && !self.is_constant(name))
            .map(String::as_str)
    }
}
