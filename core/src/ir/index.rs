//! Producer and consumer lookups over a [`Graph`]'s nodes, with their slots. Built once per
//! analysis; edits go through patches, after which a new index is built.

use std::collections::HashMap;

use super::Graph;

/// Producer/consumer lookups over a graph's nodes (by position in [`Graph::nodes`]).
pub struct GraphIndex<'g> {
    producers: HashMap<&'g str, (usize, usize)>,
    consumers: HashMap<&'g str, Vec<(usize, usize)>>,
}

impl<'g> GraphIndex<'g> {
    /// Indexes `graph`.
    pub fn new(graph: &'g Graph) -> Self {
        let mut producers = HashMap::new();
        let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        for (position, node) in graph.nodes.iter().enumerate() {
            for (slot, output) in node.outputs.iter().enumerate() {
                if !output.is_empty() {
                    producers.insert(output.as_str(), (position, slot));
                }
            }
            for (slot, input) in node.inputs.iter().enumerate() {
                if !input.is_empty() {
                    consumers
                        .entry(input.as_str())
                        .or_default()
                        .push((position, slot));
                }
            }
        }
        GraphIndex {
            producers,
            consumers,
        }
    }

    /// The node (position, output slot) that produces `value`; `None` for graph inputs,
    /// initializers and undefined names.
    pub fn producer(&self, value: &str) -> Option<(usize, usize)> {
        self.producers.get(value).copied()
    }

    /// Every (node position, input slot) that reads `value`.
    pub fn consumers(&self, value: &str) -> &[(usize, usize)] {
        self.consumers.get(value).map_or(&[], Vec::as_slice)
    }
}
