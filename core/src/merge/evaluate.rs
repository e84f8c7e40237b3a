//! Evaluating a subgraph that depends only on parameters and constants (a delta fold's side
//! subgraph, a value to bake) once, at merge time, in tract — the pure-Rust second runtime, so
//! that merging needs no ONNX Runtime.

use std::collections::HashSet;

use crate::ir::{Graph, Model, Node, Tensor, ValueInfo};
use crate::runtime::{HostTensor, TractSession};
use crate::{Error, Result};

/// The value `value` computed by `nodes` (in topological order) from initializers of `model`,
/// as a float32 tensor named `value` with the element type `value` has in that subgraph.
/// Errors name `value` when the nodes read a graph input or anything else that is not an
/// initializer.
pub(super) fn evaluate(model: &Model, nodes: Vec<Node>, value: &str) -> Result<Tensor> {
    let fail = |reason: String| Error::Tensor {
        name: value.to_owned(),
        reason,
    };
    let produced: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .collect();
    let mut read: Vec<&str> = nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .filter(|i| !i.is_empty() && !produced.contains(i))
        .collect();
    read.sort_unstable();
    read.dedup();
    let mut initializers = Vec::new();
    for name in read {
        let tensor = model.graph.initializer(name).ok_or_else(|| {
            fail(format!(
                "it is computed from {name:?}, which is not an initializer of the model; only \
                 values computed from parameters and constants can be folded or baked"
            ))
        })?;
        initializers.push(tensor.clone());
    }
    // Only the file-level fields the subgraph needs; cloning the whole model would copy every
    // node of the graph once per fold.
    let mut sub = Model {
        ir_version: model.ir_version,
        opset_imports: model.opset_imports.clone(),
        functions: model.functions.clone(),
        graph: Graph {
            nodes,
            initializers,
            ..Graph::default()
        },
        ..Model::default()
    };
    let dtype = crate::analysis::infer_shapes(&sub)?
        .dtype(value)
        .ok_or_else(|| fail("its element type is unknown".into()))?;
    sub.graph.outputs = vec![ValueInfo::tensor(value, dtype, &[])];
    let mut session = TractSession::from_bytes(&crate::onnx::to_bytes(&sub)?)?;
    let outputs = session.run(&[])?;
    let (_, result) = outputs
        .into_iter()
        .next()
        .ok_or_else(|| fail("tract returned no value".into()))?;
    let dims: Vec<i64> = result.shape().iter().map(|&d| d as i64).collect();
    let values: Vec<f32> = match &result {
        HostTensor::F32(array) => array.iter().copied().collect(),
        other => other.to_f64().into_iter().map(|v| v as f32).collect(),
    };
    let mut tensor = Tensor::from_raw(value, dtype, Vec::new(), Vec::new());
    tensor.set_float_values(dims, &values)?;
    Ok(tensor)
}
