//! Graph optimizations for the graphs graft runs itself (training and evaluation). Each keeps
//! every graph output, up to the rounding of a product taken over fewer rows.

use std::collections::{HashMap, HashSet};

use crate::analysis::shapes::{infer_shapes, normalize_axis, ShapeMap};
use crate::ir::attributes::int_attribute;
use crate::ir::{Dim, Graph, GraphIndex, Model, Node, Tensor};
use crate::Result;

/// Rows `start..end` along axis `axis` of a value (bounds as `Slice` reads them: negative ones
/// count from the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Rows {
    axis: usize,
    start: i64,
    end: i64,
}

/// Makes the nodes in front of a single-row read compute that row only.
///
/// Where a node reads one row of a value — a `Gather` of a constant index along one axis, as a
/// BERT-style pooler reads the first token of the last layer (or a last-token pooler reads
/// index -1) — the nodes producing that value
/// which work row by row along that axis are narrowed to the row: elementwise ops (with
/// broadcasting), `LayerNormalization` and `Softmax` over other axes, `MatMul` and `Gemm` on
/// their row operand, `Transpose`, and `Reshape` of the axes after it. Narrowing goes back
/// until a value is also read in full elsewhere; a `Slice` takes the row there. In a BERT
/// sequence classifier, the last layer's query, attention output and feed-forward then run on
/// one token per sequence, while its keys and values still cover them all.
///
/// A value is narrowed only when every node reading it reads the same rows and it is not a
/// graph output, so every graph output keeps its values; products over fewer rows may round
/// differently in the last bits. Returns the number of nodes narrowed (0 leaves the model as it
/// was).
pub fn narrow_unread_rows(model: &mut Model) -> Result<usize> {
    let graph = &model.graph;
    // Values read inside subgraphs are not in the index below: leave such graphs alone.
    let has_subgraphs = graph.nodes.iter().any(|n| {
        n.attributes
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
    });
    if has_subgraphs {
        return Ok(0);
    }
    let shapes = infer_shapes(model)?;
    let opset = model.opset();
    let index = GraphIndex::new(graph);
    let graph_outputs: HashSet<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();

    // (node, input slot) → the rows of that input the node reads once the plan is applied.
    let mut requests: HashMap<(usize, usize), Rows> = HashMap::new();
    let mut gathers: Vec<usize> = Vec::new();
    for (position, node) in graph.nodes.iter().enumerate() {
        if let Some(rows) = gathered_row(node, &shapes) {
            requests.insert((position, 0), rows);
            gathers.push(position);
        }
    }
    // Nodes in reverse order, so that every reader of a value is planned before its producer.
    let mut narrowed: HashMap<usize, Rows> = HashMap::new();
    for (position, node) in graph.nodes.iter().enumerate().rev() {
        let Some(output) = single_output(node) else {
            continue;
        };
        let readers = index.consumers(output);
        if readers.is_empty() || graph_outputs.contains(output) {
            continue;
        }
        let wanted = requests.get(&readers[0]).copied();
        let Some(rows) =
            wanted.filter(|_| readers.iter().all(|r| requests.get(r) == wanted.as_ref()))
        else {
            continue;
        };
        if let Some(inputs) = narrowed_inputs(node, rows, &shapes, opset) {
            for (slot, input_rows) in inputs {
                requests.insert((position, slot), input_rows);
            }
            narrowed.insert(position, rows);
        }
    }
    if narrowed.is_empty() {
        return Ok(0);
    }

    // A gather whose input was not narrowed keeps reading it in full: no slice for it.
    let reads_narrowed = |node: usize| {
        index
            .producer(&graph.nodes[node].inputs[0])
            .is_some_and(|(p, _)| narrowed.contains_key(&p))
    };
    let narrowed_gathers: Vec<usize> = gathers
        .iter()
        .copied()
        .filter(|&g| reads_narrowed(g))
        .collect();
    requests.retain(|&(node, _), _| !gathers.contains(&node) || narrowed_gathers.contains(&node));
    let mut rewrite = Rewrite::new(graph);
    // Every narrowed read of a value that is still computed in full goes through a slice.
    let mut reads: Vec<((usize, usize), Rows)> = requests.into_iter().collect();
    reads.sort_by_key(|&((node, slot), _)| (node, slot));
    for ((node, slot), rows) in reads {
        let value = model.graph.nodes[node].inputs[slot].clone();
        if index
            .producer(&value)
            .is_some_and(|(p, _)| narrowed.contains_key(&p))
        {
            continue;
        }
        let sliced = rewrite.slice(&value, rows, node);
        rewrite.replace_input(node, slot, sliced);
    }
    // A gather of a narrowed value reads its one row at index 0.
    for gather in narrowed_gathers {
        let zero = rewrite.constant("rows.index", &[], &[0]);
        rewrite.replace_input(gather, 1, zero);
    }
    // A narrowed Reshape keeps the target's trailing dimensions and takes the leading ones,
    // through the narrowed axis, from its narrowed input.
    let mut reshapes: Vec<(usize, Rows)> = narrowed
        .iter()
        .filter(|(p, _)| graph.nodes[**p].is("Reshape"))
        .map(|(p, r)| (*p, *r))
        .collect();
    reshapes.sort_by_key(|(p, _)| *p);
    for (position, rows) in reshapes {
        let data = rewrite.input(position, 0);
        let target = rewrite.input(position, 1);
        let shape = rewrite.node("Shape", &[&data], position);
        let lead_start = rewrite.constant("rows.lead_start", &[1], &[0]);
        let lead_end = rewrite.constant("rows.lead_end", &[1], &[rows.axis as i64 + 1]);
        let lead = rewrite.node("Slice", &[&shape, &lead_start, &lead_end], position);
        let tail_end = rewrite.constant("rows.tail_end", &[1], &[i64::MAX]);
        let tail = rewrite.node("Slice", &[&target, &lead_end, &tail_end], position);
        let mut concat = Node::new("", "Concat", vec![lead, tail], Vec::new());
        concat.attributes.push(int_attribute("axis", 0));
        let new_target = rewrite.push(concat, "rows.shape", position);
        rewrite.replace_input(position, 1, new_target);
    }
    let changed: HashSet<String> = narrowed
        .keys()
        .map(|&p| model.graph.nodes[p].outputs[0].clone())
        .collect();
    rewrite.apply(&mut model.graph);
    // The narrowed values' recorded shapes no longer hold.
    model
        .graph
        .value_infos
        .retain(|v| !changed.contains(&v.name));
    Ok(narrowed.len())
}

/// The row a `Gather` of a constant scalar index reads, as rows `i..i + 1` of its axis (from the
/// end for a negative `i`).
fn gathered_row(node: &Node, shapes: &ShapeMap) -> Option<Rows> {
    if !node.is("Gather") {
        return None;
    }
    let rank = shapes.rank(node.input(0)?)?;
    let axis = normalize_axis(node.attr_int("axis", 0), rank)?;
    let indices = node.input(1)?;
    if shapes.rank(indices)? != 0 {
        return None;
    }
    match shapes.integer_value(indices)? {
        // A negative index counts from the end, as `Slice` bounds do; -1's row runs to the end.
        [Dim::Fixed(start)] => Some(Rows {
            axis,
            start: *start,
            end: if *start == -1 { i64::MAX } else { start + 1 },
        }),
        _ => None,
    }
}

/// The node's one output, when it has exactly one and it is its first.
fn single_output(node: &Node) -> Option<&str> {
    let mut outputs = node
        .outputs
        .iter()
        .enumerate()
        .filter(|(_, o)| !o.is_empty());
    match (outputs.next(), outputs.next()) {
        (Some((0, output)), None) => Some(output),
        _ => None,
    }
}

/// Ops that work element by element on one input.
#[rustfmt::skip]
const UNARY: &[&str] = &[
    "Abs", "Cast", "Ceil", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
    "HardSwish", "Identity", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu",
    "Round", "Selu", "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Tanh",
];

/// Ops that work element by element on inputs broadcast against each other.
#[rustfmt::skip]
const BROADCASTING: &[&str] = &[
    "Add", "And", "Div", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Max",
    "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub", "Sum", "Where", "Xor",
];

/// The rows of each input `node` reads to give `rows` of its output, or `None` where `node`
/// does not work row by row along that axis (or the shapes cannot tell).
fn narrowed_inputs(
    node: &Node,
    rows: Rows,
    shapes: &ShapeMap,
    opset: i64,
) -> Option<Vec<(usize, Rows)>> {
    let output = shapes.shape(&node.outputs[0])?;
    let rank = output.len();
    let axis = rows.axis;
    if axis >= rank {
        return None;
    }
    let on = |slot: usize, axis: usize| (slot, Rows { axis, ..rows });
    let op = node.op_type.as_str();
    if !node.is(op) {
        return None;
    }
    if UNARY.contains(&op) {
        return (shapes.rank(node.input(0)?)? == rank).then(|| vec![on(0, axis)]);
    }
    if BROADCASTING.contains(&op) {
        return broadcast_reads(node, rows, output, shapes, node.inputs.len());
    }
    match op {
        "LayerNormalization" => {
            let normalized = normalize_axis(node.attr_int("axis", -1), rank)?;
            (axis < normalized).then(|| vec![on(0, axis)])
        }
        "Softmax" | "LogSoftmax" => {
            let default = if opset >= 13 { -1 } else { 1 };
            let reduced = normalize_axis(node.attr_int("axis", default), rank)?;
            let row_wise = if opset >= 13 {
                axis != reduced
            } else {
                axis < reduced
            };
            row_wise.then(|| vec![on(0, axis)])
        }
        "MatMul" => {
            let (a, b) = (shapes.rank(node.input(0)?)?, shapes.rank(node.input(1)?)?);
            if a < 2 || b < 2 || axis + 1 >= rank {
                None
            } else if axis + 2 == rank {
                Some(vec![on(0, a - 2)])
            } else {
                broadcast_reads(node, rows, output, shapes, 2)
            }
        }
        "Gemm" => {
            if axis != 0 {
                return None;
            }
            let mut reads = vec![on(0, usize::from(node.attr_int("transA", 0) != 0))];
            if let Some(c) = node.input(2) {
                let c_shape = shapes.shape(c)?;
                match c_shape {
                    [m, _] if same_extent(m, &output[0]) && *m != Dim::Fixed(1) => {
                        reads.push(on(2, 0))
                    }
                    [m, _] if *m == Dim::Fixed(1) => {}
                    [_] | [] => {}
                    _ => return None,
                }
            }
            Some(reads)
        }
        "Transpose" => {
            let perm = match node.attr_ints("perm") {
                Some(perm) => perm.to_vec(),
                None => (0..rank as i64).rev().collect(),
            };
            let from = usize::try_from(*perm.get(axis)?).ok()?;
            (from < rank).then(|| vec![on(0, from)])
        }
        "Reshape" => {
            node.input(1)?;
            let input = shapes.shape(node.input(0)?)?;
            let leading_kept =
                axis < input.len() && (0..=axis).all(|k| same_extent(&input[k], &output[k]));
            leading_kept.then(|| vec![on(0, axis)])
        }
        _ => None,
    }
}

/// For an op whose first `slots` inputs broadcast against each other (numpy-style, aligned at
/// the right) into `output`: each input reads the rows where it spans the output's axis, and
/// nothing more where it has extent 1 there or lacks the axis.
fn broadcast_reads(
    node: &Node,
    rows: Rows,
    output: &[Dim],
    shapes: &ShapeMap,
    slots: usize,
) -> Option<Vec<(usize, Rows)>> {
    let mut reads = Vec::new();
    for slot in 0..slots {
        let Some(input) = node.input(slot) else {
            continue;
        };
        let shape = shapes.shape(input)?;
        let Some(aligned) = (rows.axis + shape.len()).checked_sub(output.len()) else {
            continue;
        };
        if shape[aligned] == Dim::Fixed(1) && output[rows.axis] != Dim::Fixed(1) {
            continue;
        }
        if !same_extent(&shape[aligned], &output[rows.axis]) {
            return None;
        }
        reads.push((
            slot,
            Rows {
                axis: aligned,
                ..rows
            },
        ));
    }
    Some(reads)
}

/// Whether two dimensions are known to be the same size.
fn same_extent(a: &Dim, b: &Dim) -> bool {
    *a != Dim::Unknown && a == b
}

/// The edits of [`narrow_unread_rows`], collected against the unchanged graph and applied at
/// once: new nodes (each placed before a given node), new initializers, and replaced inputs.
struct Rewrite {
    /// Every name in use, new ones included.
    taken: HashSet<String>,
    /// (node, input slot) → the value it reads instead.
    inputs: HashMap<(usize, usize), String>,
    /// Each node's inputs as they were.
    original_inputs: Vec<Vec<String>>,
    /// New nodes, each to be placed before the node at the given position.
    before: Vec<(usize, Node)>,
    /// New constants.
    initializers: Vec<Tensor>,
    /// (value, rows) → the output of the `Slice` that takes them.
    slices: HashMap<(String, Rows), String>,
}

impl Rewrite {
    fn new(graph: &Graph) -> Self {
        Rewrite {
            taken: graph.taken_names(),
            inputs: HashMap::new(),
            original_inputs: graph.nodes.iter().map(|n| n.inputs.clone()).collect(),
            before: Vec::new(),
            initializers: Vec::new(),
            slices: HashMap::new(),
        }
    }

    fn fresh(&mut self, stem: &str) -> String {
        let name = Graph::first_free_name(stem, |n| self.taken.contains(n));
        self.taken.insert(name.clone());
        name
    }

    /// Input `slot` of node `node`, as rewritten so far.
    fn input(&self, node: usize, slot: usize) -> String {
        self.inputs
            .get(&(node, slot))
            .cloned()
            .unwrap_or_else(|| self.original_inputs[node][slot].clone())
    }

    fn replace_input(&mut self, node: usize, slot: usize, value: String) {
        self.inputs.insert((node, slot), value);
    }

    /// A new int64 initializer `stem…` of the given shape and values.
    fn constant(&mut self, stem: &str, dims: &[i64], values: &[i64]) -> String {
        let name = self.fresh(&format!("graft.{stem}"));
        self.initializers
            .push(Tensor::from_i64(&name, dims.to_vec(), values));
        name
    }

    /// Places `node` (its one output named from `stem`) before node `position`.
    fn push(&mut self, mut node: Node, stem: &str, position: usize) -> String {
        let output = self.fresh(stem);
        node.name = self.fresh(&format!("{output}.node"));
        node.outputs = vec![output.clone()];
        self.before.push((position, node));
        output
    }

    /// A one-output node `op(inputs)` placed before node `position`.
    fn node(&mut self, op: &str, inputs: &[&str], position: usize) -> String {
        let node = Node::new(
            "",
            op,
            inputs.iter().map(|s| s.to_string()).collect(),
            Vec::new(),
        );
        self.push(node, &format!("rows.{}", op.to_lowercase()), position)
    }

    /// `value`'s `rows`, one `Slice` per value and rows, placed before the first node that
    /// reads it (nodes are visited in order).
    fn slice(&mut self, value: &str, rows: Rows, position: usize) -> String {
        let key = (value.to_owned(), rows);
        if let Some(sliced) = self.slices.get(&key) {
            return sliced.clone();
        }
        let starts = self.constant("rows.start", &[1], &[rows.start]);
        let ends = self.constant("rows.end", &[1], &[rows.end]);
        let axes = self.constant("rows.axis", &[1], &[rows.axis as i64]);
        let node = Node::new(
            "",
            "Slice",
            vec![value.to_owned(), starts, ends, axes],
            Vec::new(),
        );
        let sliced = self.push(node, &format!("{value}.rows"), position);
        self.slices.insert(key, sliced.clone());
        sliced
    }

    fn apply(self, graph: &mut Graph) {
        for ((node, slot), value) in self.inputs {
            graph.nodes[node].inputs[slot] = value;
        }
        graph.initializers.extend(self.initializers);
        let mut before = self.before;
        before.sort_by_key(|(position, _)| *position);
        let mut before = before.into_iter().peekable();
        let old = std::mem::take(&mut graph.nodes);
        for (position, node) in old.into_iter().enumerate() {
            while let Some((_, new)) = before.next_if(|(p, _)| *p == position) {
                graph.nodes.push(new);
            }
            graph.nodes.push(node);
        }
    }
}
