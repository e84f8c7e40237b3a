//! Validating a patch against the graph and applying it all at once: the model is changed only
//! if every check passes.

use std::collections::{BTreeMap, HashMap, HashSet};

use graft_plugin_sdk::{AttributeValue, Fold, GraphView, NewNode, PatchReply};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::AttributeProto;

use super::record::AppliedMethod;
use super::{data_type, materialize};
use crate::ir::{Dim, Graph, Model, Node, ValueInfo};
use crate::{Error, Result};

/// Applies a plugin's reply to `model`, or leaves `model` untouched and explains what is wrong.
///
/// The patch is first checked by the SDK's [`graft_plugin_sdk::Patch::check`] against the
/// plugin's view of `model` ([`crate::plugins::graph_view`]): names, references and trainable
/// tensors, every problem reported at once; then its tensor payloads. What needs the patched
/// graph is checked on it: cycles (named as the model's own when the model alone has one),
/// wiring, and the element types and shapes where new or rewired nodes join values
/// ([`crate::analysis::ShapeConflict`]). New trainable parameters become initializers that are
/// also listed as graph inputs (so a runtime can override them), and the method is recorded in
/// the model's metadata.
pub fn apply_patch(model: &mut Model, reply: &PatchReply, method: AppliedMethod) -> Result<()> {
    let view = crate::plugins::graph_view(model)?;
    apply_patch_with_view(model, &view, reply, method)
}

/// [`apply_patch`] with the plugin's view of `model` already built; `view` must be
/// `graph_view(model)`.
pub(crate) fn apply_patch_with_view(
    model: &mut Model,
    view: &GraphView,
    reply: &PatchReply,
    method: AppliedMethod,
) -> Result<()> {
    check_against_view(reply, view)?;
    let mut patched = model.clone();
    apply_to(&mut patched, &model.graph, reply, method)?;
    *model = patched;
    Ok(())
}

fn invalid(message: String) -> Error {
    Error::InvalidGraph(message)
}

/// Succeeds when `problems` is empty, else refuses the patch listing every one.
fn refuse_if_any(mut problems: Vec<String>) -> Result<()> {
    match problems.len() {
        0 => Ok(()),
        1 => Err(invalid(problems.remove(0))),
        n => Err(invalid(format!("{n} problems: {}", problems.join("; ")))),
    }
}

/// Every problem the SDK's checks find in `reply`: the patch against `view`, then the payloads.
fn check_against_view(reply: &PatchReply, view: &GraphView) -> Result<()> {
    let mut problems = reply.patch.check(view).err().unwrap_or_default();
    if let Err(e) = reply.check_payloads() {
        problems.push(format!("tensor payloads: {e}"));
    }
    refuse_if_any(problems)
}

fn apply_to(
    model: &mut Model,
    base: &Graph,
    reply: &PatchReply,
    mut method: AppliedMethod,
) -> Result<()> {
    let patch = &reply.patch;
    let graph = &mut model.graph;

    let mut trainable = Vec::new();
    for parameter in &patch.parameters {
        let tensor = materialize(parameter, &reply.tensors, base)?;
        if parameter.trainable {
            trainable.push(parameter.name.clone());
            graph.inputs.push(ValueInfo::tensor(
                &parameter.name,
                tensor.dtype,
                &tensor
                    .dims
                    .iter()
                    .map(|&d| Dim::Fixed(d))
                    .collect::<Vec<_>>(),
            ));
        }
        graph.initializers.push(tensor);
    }
    for input in &patch.training.host_inputs {
        let tensor = super::init::materialize_host_input(input)?;
        let dims: Vec<Dim> = tensor.dims.iter().map(|&d| Dim::Fixed(d)).collect();
        graph
            .inputs
            .push(ValueInfo::tensor(&input.name, tensor.dtype, &dims));
        graph.initializers.push(tensor);
    }
    for input in &patch.graph_inputs {
        graph.inputs.push(ValueInfo::tensor(
            &input.name,
            data_type(input.dtype)?,
            &input.shape.iter().map(sdk_dim).collect::<Vec<_>>(),
        ));
    }

    let new_node_names: HashSet<&str> = patch.nodes.iter().map(|n| n.name.as_str()).collect();
    for node in &patch.nodes {
        graph.nodes.push(node_from_patch(node));
    }

    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut rewired: HashSet<String> = HashSet::new();
    for rewire in &patch.rewires {
        let is_output = graph.outputs.iter().any(|o| o.name == rewire.value);
        if is_output && rewire.only.is_empty() {
            let defined = graph.defined_values();
            let fresh = Graph::first_free_name(&format!("{}.base", rewire.value), |name| {
                defined.contains(name)
            });
            rename_definition(graph, &rewire.value, &fresh)?;
            for node in graph.nodes.iter_mut() {
                let moves = !new_node_names.contains(node.name.as_str())
                    && !rewire.keep.contains(&node.name);
                for input in node.inputs.iter_mut().filter(|i| **i == rewire.value) {
                    *input = if moves {
                        rewired.insert(node.name.clone());
                        rewire.replacement.clone()
                    } else {
                        fresh.clone()
                    };
                }
            }
            let mut identity = Node::new(
                format!("graft.output.{}", rewire.value),
                "Identity",
                vec![rewire.replacement.clone()],
                vec![rewire.value.clone()],
            );
            identity.doc_string = "graft: keeps the public output name of a rewired value".into();
            graph.nodes.push(identity);
            renamed.insert(rewire.value.clone(), fresh);
            continue;
        }
        for node in graph.nodes.iter_mut() {
            let selected = if rewire.only.is_empty() {
                !new_node_names.contains(node.name.as_str()) && !rewire.keep.contains(&node.name)
            } else {
                rewire.only.contains(&node.name)
            };
            if selected {
                for input in node.inputs.iter_mut().filter(|i| **i == rewire.value) {
                    *input = rewire.replacement.clone();
                    rewired.insert(node.name.clone());
                }
            }
        }
    }

    for rewire in &patch.output_rewires {
        let defined = graph.defined_values();
        let fresh = Graph::first_free_name(&format!("{}.base", rewire.output), |name| {
            defined.contains(name)
        });
        rename_definition(graph, &rewire.output, &fresh)?;
        for node in graph.nodes.iter_mut() {
            for input in node.inputs.iter_mut().filter(|i| **i == rewire.output) {
                *input = fresh.clone();
            }
        }
        let mut identity = Node::new(
            format!("graft.output.{}", rewire.output),
            "Identity",
            vec![rewire.replacement.clone()],
            vec![rewire.output.clone()],
        );
        identity.doc_string = "graft: the graph output returns another value".into();
        graph.nodes.push(identity);
        renamed.insert(rewire.output.clone(), fresh);
    }
    for output in &patch.graph_outputs {
        graph.outputs.push(ValueInfo::tensor(
            &output.name,
            data_type(output.dtype)?,
            &output.shape.iter().map(sdk_dim).collect::<Vec<_>>(),
        ));
    }
    for name in &patch.mark_trainable {
        let needs_input = !graph.inputs.iter().any(|i| &i.name == name);
        if let Some(tensor) = graph.initializer(name).filter(|_| needs_input) {
            let dims: Vec<Dim> = tensor.dims.iter().map(|&d| Dim::Fixed(d)).collect();
            let dtype = tensor.dtype;
            graph.inputs.push(ValueInfo::tensor(name, dtype, &dims));
        }
        trainable.push(name.clone());
    }

    sort_patched(graph, base)?;
    drop_unread_rewired_initializers(graph, patch);
    forget_annotations_downstream_of(graph, &new_node_names);
    graph.validate()?;
    check_operands(model, &new_node_names, &rewired)?;

    let mut record = crate::patch::read_record(model)?;
    method.trainable = trainable;
    method.parameters = patch.parameters.iter().map(|p| p.name.clone()).collect();
    method.nodes = patch.nodes.iter().map(|n| n.name.clone()).collect();
    method.training = patch.training.clone();
    record.methods.push(method);
    // A later method's branches attach to the sites' base outputs, inside the branches of
    // earlier methods, so they must be folded first: its folds go before the earlier ones (the
    // order within one method is kept).
    let new_folds: Vec<Fold> = patch
        .folds
        .iter()
        .map(|fold| {
            let mut fold = fold.clone();
            fold.rename_base_output(|name| renamed.get(name).cloned());
            fold
        })
        .collect();
    record.folds.splice(0..0, new_folds);
    crate::patch::write_record(&record, model);
    Ok(())
}

fn sdk_dim(dim: &graft_plugin_sdk::Dim) -> Dim {
    match dim {
        graft_plugin_sdk::Dim::Fixed(n) => Dim::Fixed(*n),
        graft_plugin_sdk::Dim::Symbolic(s) => Dim::Symbol(s.clone()),
        graft_plugin_sdk::Dim::Unknown => Dim::Unknown,
    }
}

fn rename_definition(graph: &mut Graph, value: &str, fresh: &str) -> Result<()> {
    let output = graph
        .nodes
        .iter_mut()
        .flat_map(|node| node.outputs.iter_mut())
        .find(|output| *output == value);
    if let Some(output) = output {
        *output = fresh.to_owned();
        return Ok(());
    }
    Err(invalid(format!(
        "cannot rewire graph output {value:?}: it is not produced by a node"
    )))
}

/// The IR node for a node a patch describes.
pub fn node_from_patch(node: &NewNode) -> Node {
    let attributes = node
        .attributes
        .iter()
        .map(|(name, value)| attribute(name, value))
        .collect();
    Node {
        name: node.name.clone(),
        op_type: node.op_type.clone(),
        domain: node.domain.clone(),
        inputs: node.inputs.clone(),
        outputs: node.outputs.clone(),
        attributes,
        ..Node::default()
    }
}

/// An ONNX attribute from the SDK's attribute value.
pub(crate) fn attribute(name: &str, value: &AttributeValue) -> AttributeProto {
    let mut proto = AttributeProto::new();
    proto.name = name.to_owned();
    let kind = match value {
        AttributeValue::Int(i) => {
            proto.i = *i;
            AttributeType::INT
        }
        AttributeValue::Float(f) => {
            proto.f = *f;
            AttributeType::FLOAT
        }
        AttributeValue::String(s) => {
            proto.s = s.as_bytes().to_vec();
            AttributeType::STRING
        }
        AttributeValue::Ints(v) => {
            proto.ints = v.clone();
            AttributeType::INTS
        }
        AttributeValue::Floats(v) => {
            proto.floats = v.clone();
            AttributeType::FLOATS
        }
        AttributeValue::Strings(v) => {
            proto.strings = v.iter().map(|s| s.as_bytes().to_vec()).collect();
            AttributeType::STRINGS
        }
    };
    proto.type_ = kind.into();
    proto
}

/// Reorders `graph.nodes` so that every node comes after the producers of its inputs, keeping
/// the existing order wherever it is already valid. Fails, naming a node on the cycle, if the
/// wiring has one; an input nobody produces is left for [`Graph::validate`], which names it.
pub fn topological_sort(graph: &mut Graph) -> Result<()> {
    let order = topological_order(graph).map_err(|on_cycle| {
        let node = &graph.nodes[on_cycle];
        invalid(format!(
            "the graph has a cycle through node {:?} ({})",
            node.name, node.op_type
        ))
    })?;
    reorder(graph, order);
    Ok(())
}

/// A node on a cycle of `graph`'s wiring, when it has one (an ONNX graph must have none).
pub fn node_on_cycle(graph: &Graph) -> Option<&Node> {
    topological_order(graph)
        .err()
        .map(|index| &graph.nodes[index])
}

/// Sorts the patched graph, or says whose cycle stops it: the model's own when `base` (the graph
/// before the patch) has one too, else the patch's.
fn sort_patched(graph: &mut Graph, base: &Graph) -> Result<()> {
    match topological_order(graph) {
        Ok(order) => {
            reorder(graph, order);
            Ok(())
        }
        Err(on_cycle) => Err(match topological_order(base) {
            Err(on_base_cycle) => {
                let node = &base.nodes[on_base_cycle];
                invalid(format!(
                    "the model already has a cycle through node {:?} ({})",
                    node.name, node.op_type
                ))
            }
            Ok(_) => {
                let node = &graph.nodes[on_cycle];
                invalid(format!(
                    "the patch creates a cycle through node {:?} ({})",
                    node.name, node.op_type
                ))
            }
        }),
    }
}

/// The node indices in an order where every node comes after the producers of its inputs
/// (stable where the existing order is valid), or the index of a node on a cycle.
fn topological_order(graph: &Graph) -> std::result::Result<Vec<usize>, usize> {
    let mut available: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    available.extend(graph.initializers.iter().map(|t| t.name.as_str()));
    let producer: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            n.outputs
                .iter()
                .filter(|o| !o.is_empty())
                .map(move |o| (o.as_str(), i))
        })
        .collect();
    let producers_of = |node: &Node| -> Vec<usize> {
        let mut producers: Vec<usize> = (node.inputs.iter())
            .filter(|i| !i.is_empty() && !available.contains(i.as_str()))
            .filter_map(|i| producer.get(i.as_str()).copied())
            .collect();
        producers.sort_unstable();
        producers.dedup();
        producers
    };
    let n_nodes = graph.nodes.len();
    let mut waiting_on: Vec<usize> = vec![0; n_nodes];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n_nodes];
    for (i, node) in graph.nodes.iter().enumerate() {
        for p in producers_of(node) {
            waiting_on[i] += 1;
            dependents[p].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n_nodes).filter(|&i| waiting_on[i] == 0).collect();
    let mut order = Vec::with_capacity(n_nodes);
    let mut emitted = vec![false; n_nodes];
    while let Some(next) = ready.pop_first() {
        order.push(next);
        emitted[next] = true;
        for &d in &dependents[next] {
            waiting_on[d] -= 1;
            if waiting_on[d] == 0 {
                ready.insert(d);
            }
        }
    }
    let Some(stuck) = (0..n_nodes).find(|&i| !emitted[i]) else {
        return Ok(order);
    };
    // A node left over waits on a producer that is left over too; walking from producer to
    // producer must come back to a node already seen, and that node is on a cycle.
    let mut seen = HashSet::new();
    let mut current = stuck;
    while seen.insert(current) {
        let waited_on = producers_of(&graph.nodes[current])
            .into_iter()
            .find(|&p| !emitted[p]);
        match waited_on {
            Some(p) => current = p,
            None => break,
        }
    }
    Err(current)
}

/// Puts `graph.nodes` in `order` (a permutation of their indices).
fn reorder(graph: &mut Graph, order: Vec<usize>) {
    let mut nodes: Vec<Option<Node>> = std::mem::take(&mut graph.nodes)
        .into_iter()
        .map(Some)
        .collect();
    graph.nodes = order.into_iter().filter_map(|i| nodes[i].take()).collect();
}

/// Checks, on the patched model's inferred types and shapes, every node the patch added or
/// rewired: where it joins values that must agree (elementwise arithmetic, MatMul, Gemm,
/// Concat) their element types must be equal, and no node may have input shapes its op cannot
/// combine ([`crate::analysis::ShapeMap::conflicts`]). A float32 branch added onto a float16
/// stream, or a LoRA factor of the wrong width, is a bug in the plugin.
fn check_operands(
    model: &Model,
    new_nodes: &HashSet<&str>,
    rewired: &HashSet<String>,
) -> Result<()> {
    let shapes = crate::analysis::shapes::infer_shapes(model)?;
    let role = |node: &str| {
        if new_nodes.contains(node) {
            Some("new")
        } else if rewired.contains(node) {
            Some("rewired")
        } else {
            None
        }
    };
    const SAME_TYPE_OPS: &[&str] = &["Add", "Sub", "Mul", "Div", "MatMul", "Concat", "Gemm"];
    let mut problems = Vec::new();
    for node in &model.graph.nodes {
        let Some(role) = role(&node.name) else {
            continue;
        };
        if !SAME_TYPE_OPS.contains(&node.op_type.as_str()) {
            continue;
        }
        let dtypes: BTreeMap<&str, _> = node
            .inputs
            .iter()
            .filter(|i| !i.is_empty())
            .filter_map(|i| shapes.dtype(i).map(|d| (i.as_str(), d)))
            .collect();
        let mut distinct: Vec<_> = dtypes.values().collect();
        distinct.dedup();
        if distinct.len() > 1 {
            problems.push(format!(
                "{role} node {:?} ({}) mixes element types: {}",
                node.name,
                node.op_type,
                dtypes
                    .iter()
                    .map(|(v, d)| format!("{v:?} is {d}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    for conflict in shapes.conflicts() {
        if let Some(role) = role(&conflict.node) {
            problems.push(format!("{role} {conflict}"));
        }
    }
    refuse_if_any(problems)
}

/// Removes initializers that a rewire replaced and nothing reads any more (a weight replaced by a
/// dequantizing subgraph, for instance), so that the saved model does not carry them.
fn drop_unread_rewired_initializers(graph: &mut Graph, patch: &graft_plugin_sdk::Patch) {
    let read = graph.read_values();
    let unread: HashSet<String> = patch
        .rewires
        .iter()
        .map(|r| r.value.as_str())
        .filter(|value| !read.contains(value) && graph.initializer(value).is_some())
        .map(str::to_owned)
        .collect();
    graph.initializers.retain(|t| !unread.contains(&t.name));
    graph.inputs.retain(|i| !unread.contains(&i.name));
}

/// Drops the exporter's type annotations (`value_info`) of every value computed downstream of the
/// patch's new nodes: a patch may change their shapes (a soft prompt lengthens the sequence), and
/// runtimes trust the annotations.
fn forget_annotations_downstream_of(graph: &mut Graph, new_nodes: &HashSet<&str>) {
    let mut tainted: HashSet<String> = HashSet::new();
    for node in &graph.nodes {
        let downstream = new_nodes.contains(node.name.as_str())
            || node.inputs.iter().any(|i| tainted.contains(i));
        if downstream {
            tainted.extend(node.outputs.iter().cloned());
        }
    }
    graph.value_infos.retain(|v| !tainted.contains(&v.name));
}
