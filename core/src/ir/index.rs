//! A read-only petgraph view of a [`Graph`]: who produces and who consumes each value, and the
//! node-to-node wires with their slots. Built once per analysis; edits go through patches, after
//! which a new index is built.

use std::collections::HashMap;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;

use super::{Graph, Node};

/// A wire from a producer's output slot to a consumer's input slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wire {
    /// Output slot of the producing node.
    pub from_slot: usize,
    /// Input slot of the consuming node.
    pub to_slot: usize,
}

/// Producer/consumer lookups over a graph's nodes (by position in [`Graph::nodes`]).
pub struct GraphIndex<'g> {
    graph: &'g Graph,
    /// The node graph: weights are node positions, edges are wires.
    pub wiring: DiGraph<usize, Wire>,
    producers: HashMap<&'g str, (usize, usize)>,
    consumers: HashMap<&'g str, Vec<(usize, usize)>>,
}

impl<'g> GraphIndex<'g> {
    /// Indexes `graph`.
    pub fn new(graph: &'g Graph) -> Self {
        let mut wiring = DiGraph::with_capacity(graph.nodes.len(), graph.nodes.len() * 2);
        for position in 0..graph.nodes.len() {
            wiring.add_node(position);
        }
        let mut producers = HashMap::new();
        for (position, node) in graph.nodes.iter().enumerate() {
            for (slot, output) in node.outputs.iter().enumerate() {
                if !output.is_empty() {
                    producers.insert(output.as_str(), (position, slot));
                }
            }
        }
        let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        for (position, node) in graph.nodes.iter().enumerate() {
            for (slot, input) in node.inputs.iter().enumerate() {
                if input.is_empty() {
                    continue;
                }
                consumers
                    .entry(input.as_str())
                    .or_default()
                    .push((position, slot));
                if let Some(&(producer, from_slot)) = producers.get(input.as_str()) {
                    wiring.add_edge(
                        NodeIndex::new(producer),
                        NodeIndex::new(position),
                        Wire {
                            from_slot,
                            to_slot: slot,
                        },
                    );
                }
            }
        }
        GraphIndex {
            graph,
            wiring,
            producers,
            consumers,
        }
    }

    /// The graph this index describes.
    pub fn graph(&self) -> &'g Graph {
        self.graph
    }

    /// The node at `position`.
    pub fn node(&self, position: usize) -> &'g Node {
        &self.graph.nodes[position]
    }

    /// The node (position, output slot) that produces `value`; `None` for graph inputs,
    /// initializers and undefined names.
    pub fn producer(&self, value: &str) -> Option<(usize, usize)> {
        self.producers.get(value).copied()
    }

    /// The node producing `value`, if any.
    pub fn producer_node(&self, value: &str) -> Option<&'g Node> {
        self.producer(value).map(|(p, _)| &self.graph.nodes[p])
    }

    /// Every (node position, input slot) that reads `value`.
    pub fn consumers(&self, value: &str) -> &[(usize, usize)] {
        self.consumers.get(value).map_or(&[], Vec::as_slice)
    }

    /// Positions of the nodes that read any output of the node at `position`.
    pub fn successors(&self, position: usize) -> impl Iterator<Item = usize> + '_ {
        self.wiring
            .edges(NodeIndex::new(position))
            .map(|edge| edge.target().index())
    }

    /// Positions of the nodes whose outputs the node at `position` reads.
    pub fn predecessors(&self, position: usize) -> impl Iterator<Item = usize> + '_ {
        self.wiring
            .edges_directed(NodeIndex::new(position), petgraph::Direction::Incoming)
            .map(|edge| edge.source().index())
    }
}
