//! Reverse-mode automatic differentiation of ONNX graphs, emitting standard ONNX.
//!
//! [`gradient_graph`] turns a model with a scalar loss into a training graph: the forward graph
//! followed by backward nodes that compute `d loss / d tensor` for each requested tensor. Only
//! nodes on a path from a requested tensor to the loss are differentiated; integer, boolean and
//! shape subgraphs are left alone because gradients flow through floating-point values only.
//!
//! The work is split the way tinygrad's `gradient.py` splits it. The per-op rules live in one
//! table (`rules`); each returns one gradient (or none) per input and never deals with
//! broadcasting or fan-out. This driver, once for all ops, walks the nodes in reverse order,
//! sums the gradients of a value read by several nodes, and reduces a gradient that
//! broadcasting widened back to its input's shape — statically where shapes allow, otherwise
//! with a `Shape`-based subgraph computed at run time.
//!
//! Names follow ONNX Runtime's gradient builder: the gradient of tensor `t` is `t_grad`, and
//! backward nodes of forward node `n` are named `n_Grad/<k>`. Every emitted node is a
//! default-domain ONNX op of the model's opset, so the training graph runs on any runtime.
//! [`loss`] appends standard losses (cross entropy, causal LM, MSE) for the same rules to
//! differentiate.

mod emitter;
pub mod loss;
mod rules;

use std::collections::{HashMap, HashSet};

use emitter::{float_fill, Emitter};
use rules::{Gradient, Rule, RuleContext};

use crate::analysis::{infer_shapes, ShapeMap};
use crate::ir::attributes::{int_attribute, tensor_attribute};
use crate::ir::{DataType, Dim, Graph, Model, Node, ValueInfo};
use crate::{Error, Result};

/// The oldest default-domain opset [`gradient_graph`] accepts (LayerNormalization's, and new
/// enough for every op the rules emit).
pub const MINIMUM_OPSET: i64 = 17;

/// A training graph built by [`gradient_graph`].
#[derive(Clone, Debug)]
pub struct GradientGraph {
    /// The forward graph plus the backward nodes. Its outputs are the loss and then one gradient
    /// per differentiated tensor, in the order requested. The differentiated tensors are graph
    /// inputs (no longer initializers); every other initializer is kept as it was.
    pub model: Model,
    /// The name of the loss output.
    pub loss: String,
    /// For each differentiated tensor, in the order requested: (tensor name, gradient output
    /// name). The gradient of `t` is named `t_grad` and has `t`'s type and shape.
    pub gradients: Vec<(String, String)>,
}

/// Builds the graph computing `loss` and its gradient with respect to each tensor of `wrt`.
///
/// `loss` must be a floating-point value of `model`'s graph with one element (rank 0, or every
/// dimension 1). Each tensor of `wrt` must be a floating-point initializer or graph input; it
/// becomes a graph input of the returned model, and its gradient output `<tensor>_grad` (a name
/// that must be free) has its shape. A tensor the loss does not depend on gets a zero gradient.
///
/// Fails, leaving `model` untouched, when the model's opset is older than [`MINIMUM_OPSET`],
/// when `loss` or a `wrt` tensor is unsuitable, or when a node between them cannot be
/// differentiated: the error reads "failed to compute gradient for node N (Op): reason" and
/// says whether the op has no rule or the rule does not support the node's attributes.
pub fn gradient_graph(model: &Model, loss: &str, wrt: &[String]) -> Result<GradientGraph> {
    let opset = model.opset();
    if opset < MINIMUM_OPSET {
        return Err(Error::Config(format!(
            "gradients need default-domain opset {MINIMUM_OPSET} or newer; the model imports \
             opset {opset}"
        )));
    }
    let graph = &model.graph;
    let shapes = infer_shapes(model)?;
    check_loss(graph, &shapes, loss)?;
    check_wrt(graph, &shapes, wrt)?;

    let requires_gradient = forward_reach(graph, &shapes, wrt);
    let feeds_loss = backward_reach(graph, loss);

    let mut emitter = Emitter::new(graph, opset);
    let gradient_names: Vec<String> = wrt.iter().map(|w| format!("{w}_grad")).collect();
    for name in &gradient_names {
        if !emitter.claim(name) {
            return Err(Error::Config(format!(
                "cannot name a gradient {name:?}: the graph already has a value of that name"
            )));
        }
    }

    let mut pending: HashMap<String, Vec<String>> = HashMap::new();
    emitter.set_scope(format!("{loss}_Grad"));
    let loss_shape = emitter.op("Shape", &[loss]);
    let seed = match shapes.dtype(loss) {
        Some(dtype) => emitter.filled(&loss_shape, 1.0, dtype)?,
        None => {
            let ones = emitter.filled(&loss_shape, 1.0, DataType::Float)?;
            emitter.op("CastLike", &[&ones, loss])
        }
    };
    pending.insert(loss.to_owned(), vec![seed]);

    walk_backward(
        graph,
        &shapes,
        &requires_gradient,
        &feeds_loss,
        &mut emitter,
        &mut pending,
    )?;

    for (tensor, name) in wrt.iter().zip(&gradient_names) {
        emitter.set_scope(format!("{tensor}_Grad"));
        let contributions = pending.remove(tensor).unwrap_or_default();
        let inputs: Vec<&str> = contributions.iter().map(String::as_str).collect();
        match inputs.len() {
            0 => {
                let dtype = shapes.dtype(tensor).unwrap_or(DataType::Float);
                let shape = emitter.op("Shape", &[tensor]);
                let zeros = vec![tensor_attribute("value", float_fill(0.0, dtype)?)];
                emitter.node_into("ConstantOfShape", &[&shape], zeros, name);
            }
            1 => emitter.node_into("Identity", &inputs, Vec::new(), name),
            _ => emitter.node_into("Sum", &inputs, Vec::new(), name),
        }
    }

    let backward = emitter.into_nodes();
    let training = training_model(model, &shapes, loss, wrt, &gradient_names, backward)?;
    Ok(GradientGraph {
        model: training,
        loss: loss.to_owned(),
        gradients: wrt.iter().cloned().zip(gradient_names).collect(),
    })
}

/// Differentiates, in reverse order, every node with an output that both depends on a `wrt`
/// tensor and feeds the loss, moving gradients from `pending` (by value name) to the node's
/// inputs.
fn walk_backward(
    graph: &Graph,
    shapes: &ShapeMap,
    requires_gradient: &HashSet<String>,
    feeds_loss: &HashSet<String>,
    emitter: &mut Emitter,
    pending: &mut HashMap<String, Vec<String>>,
) -> Result<()> {
    let scopes = node_scopes(graph);
    for (position, node) in graph.nodes.iter().enumerate().rev() {
        let on_path = node
            .outputs
            .iter()
            .any(|o| requires_gradient.contains(o) && feeds_loss.contains(o));
        if !on_path {
            continue;
        }
        emitter.set_scope(scopes[position].clone());
        let output_gradients: Vec<Option<String>> = node
            .outputs
            .iter()
            .map(|output| accumulate(emitter, pending, output))
            .collect();
        if output_gradients.iter().all(Option::is_none) {
            continue;
        }
        let rule = match rules::rule(&node.op_type) {
            Some(Rule::Differentiable(rule)) if is_default_domain(node) => rule,
            Some(Rule::NoGradient) if is_default_domain(node) => continue,
            _ => return Err(missing_rule(node)),
        };
        let wanted: Vec<bool> = node
            .inputs
            .iter()
            .map(|input| !input.is_empty() && requires_gradient.contains(input))
            .collect();
        let gradients = {
            let mut context =
                RuleContext::new(node, shapes, output_gradients, wanted.clone(), emitter);
            rule(&mut context)?
        };
        for (slot, gradient) in gradients.into_iter().enumerate() {
            let (Some(gradient), Some(true)) = (gradient, wanted.get(slot)) else {
                continue;
            };
            let input = &node.inputs[slot];
            let value = sum_to_input(emitter, shapes, node, input, gradient);
            pending.entry(input.clone()).or_default().push(value);
        }
    }
    Ok(())
}

/// The forward model with the `backward` nodes the loss and gradients need, the `wrt` tensors
/// moved from initializers to graph inputs, and the loss and gradients as outputs.
fn training_model(
    model: &Model,
    shapes: &ShapeMap,
    loss: &str,
    wrt: &[String],
    gradient_names: &[String],
    backward: Vec<Node>,
) -> Result<Model> {
    let mut training = model.clone();
    let mut roots: HashSet<String> = gradient_names.iter().cloned().collect();
    roots.insert(loss.to_owned());
    training.graph.nodes.extend(live_nodes(backward, roots));
    training.graph.initializers_to_inputs(wrt);
    let loss_dtype = shapes.dtype(loss).ok_or_else(|| {
        Error::Config(format!("the element type of the loss {loss:?} is unknown"))
    })?;
    let mut outputs = vec![value_info(loss, loss_dtype, shapes.shape(loss))];
    for (tensor, name) in wrt.iter().zip(gradient_names) {
        let dtype = shapes.dtype(tensor).unwrap_or(DataType::Float);
        outputs.push(value_info(name, dtype, shapes.shape(tensor)));
    }
    training.graph.outputs = outputs;
    training.graph.validate()?;
    Ok(training)
}

fn is_default_domain(node: &Node) -> bool {
    node.domain.is_empty() || node.domain == "ai.onnx"
}

fn missing_rule(node: &Node) -> Error {
    let op = if is_default_domain(node) {
        node.op_type.clone()
    } else {
        format!("{}.{}", node.domain, node.op_type)
    };
    Error::InvalidGraph(format!(
        "failed to compute gradient for node {:?} ({op}): no gradient rule for {op}",
        node.name
    ))
}

fn check_loss(graph: &Graph, shapes: &ShapeMap, loss: &str) -> Result<()> {
    if !graph.defined_values().contains(loss) {
        return Err(Error::Config(format!(
            "the loss {loss:?} is not a value of the graph"
        )));
    }
    match shapes.dtype(loss) {
        Some(dtype) if dtype.is_float() => {}
        Some(dtype) => {
            return Err(Error::Config(format!(
                "the loss {loss:?} is {dtype}; it must be a floating-point value"
            )))
        }
        None => {}
    }
    if let Some(shape) = shapes.shape(loss) {
        if shape.iter().any(|d| *d != Dim::Fixed(1)) {
            let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
            return Err(Error::Config(format!(
                "the loss {loss:?} has shape [{}]; it must be a scalar",
                dims.join(", ")
            )));
        }
    }
    Ok(())
}

fn check_wrt(graph: &Graph, shapes: &ShapeMap, wrt: &[String]) -> Result<()> {
    let mut seen = HashSet::new();
    for tensor in wrt {
        if !seen.insert(tensor.as_str()) {
            return Err(Error::Config(format!(
                "{tensor:?} is listed twice among the tensors to differentiate"
            )));
        }
        let is_source =
            graph.initializer(tensor).is_some() || graph.inputs.iter().any(|i| &i.name == tensor);
        if !is_source {
            return Err(Error::Config(format!(
                "cannot differentiate with respect to {tensor:?}: it is not an initializer or a \
                 graph input"
            )));
        }
        match shapes.dtype(tensor) {
            Some(dtype) if dtype.is_float() => {}
            other => {
                let dtype = other.map_or_else(|| "of unknown type".to_owned(), |d| d.to_string());
                return Err(Error::Config(format!(
                    "cannot differentiate with respect to {tensor:?}: it is {dtype}, not a \
                     floating-point tensor"
                )));
            }
        }
    }
    Ok(())
}

/// The values that depend differentiably on a `wrt` tensor: outputs of nodes reading one, except
/// through ops without gradient and into non-float values.
fn forward_reach(graph: &Graph, shapes: &ShapeMap, wrt: &[String]) -> HashSet<String> {
    let mut reached: HashSet<String> = wrt.iter().cloned().collect();
    for node in &graph.nodes {
        if !node.inputs.iter().any(|i| reached.contains(i)) {
            continue;
        }
        if is_default_domain(node) && matches!(rules::rule(&node.op_type), Some(Rule::NoGradient)) {
            continue;
        }
        for output in node.outputs.iter().filter(|o| !o.is_empty()) {
            if shapes.dtype(output).is_none_or(DataType::is_float) {
                reached.insert(output.clone());
            }
        }
    }
    reached
}

/// The values `loss` is computed from (including `loss`).
fn backward_reach(graph: &Graph, loss: &str) -> HashSet<String> {
    let mut needed: HashSet<String> = HashSet::from([loss.to_owned()]);
    for node in graph.nodes.iter().rev() {
        if node.outputs.iter().any(|o| needed.contains(o)) {
            needed.extend(node.inputs.iter().filter(|i| !i.is_empty()).cloned());
        }
    }
    needed
}

/// The scope of each node's backward nodes: `<node name>_Grad`, or `<op>_<position>_Grad` for
/// nodes whose name is empty or shared.
fn node_scopes(graph: &Graph) -> Vec<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for node in &graph.nodes {
        *counts.entry(node.name.as_str()).or_default() += 1;
    }
    graph
        .nodes
        .iter()
        .enumerate()
        .map(|(position, node)| {
            if !node.name.is_empty() && counts.get(node.name.as_str()) == Some(&1) {
                format!("{}_Grad", node.name)
            } else {
                format!("{}_{position}_Grad", node.op_type)
            }
        })
        .collect()
}

/// The total gradient of `value`: its one contribution, or a `Sum` of several named
/// `<value>_grad`; `None` when no gradient reached it.
fn accumulate(
    emitter: &mut Emitter,
    pending: &mut HashMap<String, Vec<String>>,
    value: &str,
) -> Option<String> {
    let mut contributions = pending.remove(value)?;
    match contributions.len() {
        0 => None,
        1 => contributions.pop(),
        _ => {
            let name = emitter.claim_unique(&format!("{value}_grad"));
            let inputs: Vec<&str> = contributions.iter().map(String::as_str).collect();
            emitter.node_into("Sum", &inputs, Vec::new(), &name);
            Some(name)
        }
    }
}

/// A rule's gradient for `input`, summed over the axes broadcasting added or widened.
fn sum_to_input(
    emitter: &mut Emitter,
    shapes: &ShapeMap,
    node: &Node,
    input: &str,
    gradient: Gradient,
) -> String {
    let (value, from) = match gradient {
        Gradient::Exact(value) => return value,
        Gradient::Broadcast(value) => {
            let shape = node.outputs.first().and_then(|o| shapes.shape(o));
            (value, shape.map(<[Dim]>::to_vec))
        }
        Gradient::Shaped(value, shape) => (value, shape),
    };
    let to = shapes.shape(input);
    if let Some((leading, widened)) = from
        .as_deref()
        .zip(to)
        .and_then(|(f, t)| static_reduction(f, t))
    {
        let mut reduced = value;
        if !leading.is_empty() {
            reduced = emitter.reduce("ReduceSum", &reduced, Some(&leading), false);
        }
        if !widened.is_empty() {
            reduced = emitter.reduce("ReduceSum", &reduced, Some(&widened), true);
        }
        return reduced;
    }
    runtime_reduction(emitter, &value, input)
}

/// The axes to sum when a gradient of shape `from` must become shape `to`: the leading axes
/// broadcasting added (summed away) and the axes where `to` has size 1 (summed, kept). `None`
/// when the static shapes cannot decide.
fn static_reduction(from: &[Dim], to: &[Dim]) -> Option<(Vec<i64>, Vec<i64>)> {
    let extra = from.len().checked_sub(to.len())?;
    let mut widened = Vec::new();
    for (axis, (f, t)) in from[extra..].iter().zip(to).enumerate() {
        if same_dim(f, t) {
            continue;
        }
        if *t == Dim::Fixed(1) {
            widened.push(axis as i64);
            continue;
        }
        return None;
    }
    Some(((0..extra as i64).collect(), widened))
}

fn same_dim(a: &Dim, b: &Dim) -> bool {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x == y,
        (Dim::Symbol(x), Dim::Symbol(y)) => x == y,
        _ => false,
    }
}

/// Sums `gradient` to the run-time shape of `target`: the target's shape is left-padded with
/// ones to the gradient's rank, every axis where the two differ is summed (kept), and the result
/// is reshaped to the target's shape. Needs no static rank or shape.
fn runtime_reduction(emitter: &mut Emitter, gradient: &str, target: &str) -> String {
    let gradient_shape = emitter.op("Shape", &[gradient]);
    let target_shape = emitter.op("Shape", &[target]);
    let gradient_rank = emitter.op("Size", &[&gradient_shape]);
    let target_rank = emitter.op("Size", &[&target_shape]);
    let extra = emitter.op("Sub", &[&gradient_rank, &target_rank]);
    let extra = emitter.reshape_to(&extra, &[1]);
    let ones = emitter.filled_int64(&extra, 1);
    let padded = emitter.op_with(
        "Concat",
        &[&ones, &target_shape],
        vec![int_attribute("axis", 0)],
    );
    let equal = emitter.op("Equal", &[&padded, &gradient_shape]);
    let differ = emitter.op("Not", &[&equal]);
    let positions = emitter.op("NonZero", &[&differ]);
    let axes = emitter.reshape_to(&positions, &[-1]);
    let summed = emitter.op_with(
        "ReduceSum",
        &[gradient, &axes],
        vec![
            int_attribute("keepdims", 1),
            int_attribute("noop_with_empty_axes", 1),
        ],
    );
    emitter.op("Reshape", &[&summed, &target_shape])
}

/// The nodes, in order, that the `roots` values depend on.
fn live_nodes(nodes: Vec<Node>, mut roots: HashSet<String>) -> Vec<Node> {
    let mut keep = vec![false; nodes.len()];
    for (position, node) in nodes.iter().enumerate().rev() {
        if node.outputs.iter().any(|o| roots.contains(o)) {
            keep[position] = true;
            roots.extend(node.inputs.iter().filter(|i| !i.is_empty()).cloned());
        }
    }
    nodes
        .into_iter()
        .zip(keep)
        .filter_map(|(node, kept)| kept.then_some(node))
        .collect()
}

/// A tensor value declaration; the shape is left undeclared when unknown.
fn value_info(name: &str, dtype: DataType, shape: Option<&[Dim]>) -> ValueInfo {
    let mut info = ValueInfo::tensor(name, dtype, shape.unwrap_or(&[]));
    if shape.is_none() {
        if let Some(onnx_protobuf::type_proto::Value::TensorType(tensor)) =
            info.proto.type_.as_mut().and_then(|t| t.value.as_mut())
        {
            tensor.shape.clear();
        }
    }
    info
}
