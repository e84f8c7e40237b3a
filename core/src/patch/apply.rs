//! Validating a patch against the graph and applying it all at once: the model is changed only
//! if every check passes.

use std::collections::{BTreeMap, HashMap, HashSet};

use graft_plugin_sdk::{AttributeValue, Fold, NewNode, PatchReply};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::AttributeProto;

use super::record::AppliedMethod;
use super::{data_type, materialize};
use crate::ir::{Dim, Graph, Model, Node, ValueInfo};
use crate::{Error, Result};

/// Applies a plugin's reply to `model`, or leaves `model` untouched and explains what is wrong:
/// name clashes, dangling values, element-type mismatches, cycles, unknown tensors to mark
/// trainable. New trainable parameters become initializers that are also listed as graph inputs
/// (so a runtime can override them), and the method is recorded in the model's metadata.
pub fn apply_patch(model: &mut Model, reply: &PatchReply, method: AppliedMethod) -> Result<()> {
    let mut patched = model.clone();
    apply_to(&mut patched, reply, method)?;
    *model = patched;
    Ok(())
}

fn invalid(message: String) -> Error {
    Error::InvalidGraph(message)
}

fn apply_to(model: &mut Model, reply: &PatchReply, mut method: AppliedMethod) -> Result<()> {
    let patch = &reply.patch;
    reply
        .check_payloads()
        .map_err(|e| invalid(format!("tensor payloads: {e}")))?;
    let graph = &mut model.graph;

    let mut taken = graph.taken_names();
    let mut claim = |name: &str, what: &str| -> Result<()> {
        if name.is_empty() {
            return Err(invalid(format!("a new {what} has an empty name")));
        }
        if !taken.insert(name.to_owned()) {
            return Err(invalid(format!(
                "new {what} {name:?} clashes with an existing name"
            )));
        }
        Ok(())
    };
    for parameter in &patch.parameters {
        claim(&parameter.name, "parameter")?;
    }
    for node in &patch.nodes {
        claim(&node.name, "node")?;
        for output in node.outputs.iter().filter(|o| !o.is_empty()) {
            claim(output, "value")?;
        }
    }
    for input in &patch.graph_inputs {
        claim(&input.name, "graph input")?;
    }
    for input in &patch.training.host_inputs {
        claim(&input.name, "host input")?;
    }

    let mut trainable = Vec::new();
    for parameter in &patch.parameters {
        let tensor = materialize(parameter, &reply.tensors)?;
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
                }
            }
        }
    }

    for output in &patch.graph_outputs {
        graph.outputs.push(ValueInfo::tensor(
            &output.name,
            data_type(output.dtype)?,
            &output.shape.iter().map(sdk_dim).collect::<Vec<_>>(),
        ));
    }
    for name in &patch.mark_trainable {
        let Some(tensor) = graph.initializer(name) else {
            return Err(invalid(format!(
                "cannot mark {name:?} trainable: no initializer has that name"
            )));
        };
        if !tensor.dtype.is_float() {
            return Err(invalid(format!(
                "cannot mark {name:?} trainable: it is {}",
                tensor.dtype
            )));
        }
        if !graph.inputs.iter().any(|i| &i.name == name) {
            let dims: Vec<Dim> = tensor.dims.iter().map(|&d| Dim::Fixed(d)).collect();
            let dtype = tensor.dtype;
            graph.inputs.push(ValueInfo::tensor(name, dtype, &dims));
        }
        trainable.push(name.clone());
    }

    topological_sort(graph)?;
    drop_unread_rewired_initializers(graph, patch);
    forget_annotations_downstream_of(graph, &new_node_names);
    graph.validate()?;
    check_new_node_types(model, &new_node_names)?;

    let mut record = crate::patch::read_record(model)?;
    for existing in record.trainable() {
        if trainable.iter().any(|t| t == existing) {
            return Err(invalid(format!(
                "{existing:?} is already trainable by an earlier method"
            )));
        }
    }
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
/// the existing order wherever it is already valid. Fails, naming a node, if the wiring has a
/// cycle or reads an undefined value.
pub fn topological_sort(graph: &mut Graph) -> Result<()> {
    let mut available: HashSet<String> = graph.inputs.iter().map(|v| v.name.clone()).collect();
    available.extend(graph.initializers.iter().map(|t| t.name.clone()));
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
    let n_nodes = graph.nodes.len();
    let mut waiting_on: Vec<usize> = vec![0; n_nodes];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n_nodes];
    for (i, node) in graph.nodes.iter().enumerate() {
        let mut seen = HashSet::new();
        for input in node.inputs.iter().filter(|i| !i.is_empty()) {
            if available.contains(input.as_str()) {
                continue;
            }
            // An input nobody produces is left for validate(), which names it.
            if let Some(&p) = producer.get(input.as_str()) {
                if seen.insert(p) {
                    waiting_on[i] += 1;
                    dependents[p].push(i);
                }
            }
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n_nodes).filter(|&i| waiting_on[i] == 0).collect();
    let mut order = Vec::with_capacity(n_nodes);
    while let Some(next) = ready.pop_first() {
        order.push(next);
        for &d in &dependents[next] {
            waiting_on[d] -= 1;
            if waiting_on[d] == 0 {
                ready.insert(d);
            }
        }
    }
    if order.len() != n_nodes {
        let stuck = (0..n_nodes).find(|&i| waiting_on[i] > 0).unwrap_or(0);
        let node = &graph.nodes[stuck];
        return Err(invalid(format!(
            "the patch creates a cycle through node {:?} ({})",
            node.name, node.op_type
        )));
    }
    let mut nodes: Vec<Option<Node>> = std::mem::take(&mut graph.nodes)
        .into_iter()
        .map(Some)
        .collect();
    graph.nodes = order.into_iter().filter_map(|i| nodes[i].take()).collect();
    Ok(())
}

/// Checks element types where a new node joins values that must agree (elementwise arithmetic,
/// MatMul, Concat): a float32 branch added onto a float16 stream is a bug in the plugin.
fn check_new_node_types(model: &Model, new_nodes: &HashSet<&str>) -> Result<()> {
    let types = crate::analysis::shapes::infer_shapes(model)?;
    let graph = &model.graph;
    const SAME_TYPE_OPS: &[&str] = &["Add", "Sub", "Mul", "Div", "MatMul", "Concat", "Gemm"];
    for node in graph
        .nodes
        .iter()
        .filter(|n| new_nodes.contains(n.name.as_str()))
    {
        if !SAME_TYPE_OPS.contains(&node.op_type.as_str()) {
            continue;
        }
        let dtypes: BTreeMap<&str, _> = node
            .inputs
            .iter()
            .filter(|i| !i.is_empty())
            .filter_map(|i| types.dtype(i).map(|d| (i.as_str(), d)))
            .collect();
        let mut distinct: Vec<_> = dtypes.values().collect();
        distinct.dedup();
        if distinct.len() > 1 {
            return Err(invalid(format!(
                "new node {:?} ({}) mixes element types: {}",
                node.name,
                node.op_type,
                dtypes
                    .iter()
                    .map(|(v, d)| format!("{v:?} is {d}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(())
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
