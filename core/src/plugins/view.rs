//! The read-only [`GraphView`] a plugin receives: detected structure, tensor metadata and the
//! inferred type of every value.

use graft_plugin_sdk::{GraphView, TensorInfo, ValueInfo};

use crate::analysis::sites::detect_with_shapes;
use crate::ir::{Dim, Model};
use crate::Result;

/// Describes `model` for a plugin: the structure `graft inspect` reports, every initializer's
/// type and shape, every value's inferred type and shape, every node's name, and the record of
/// earlier methods.
pub fn graph_view(model: &Model) -> Result<GraphView> {
    let (structure, shapes) = detect_with_shapes(model)?;
    let tensors = model
        .graph
        .initializers
        .iter()
        .filter_map(|t| {
            Some(TensorInfo {
                name: t.name.clone(),
                dtype: t.dtype.sdk()?,
                shape: t.dims.clone(),
            })
        })
        .collect();
    let values = shapes
        .iter()
        .map(|(name, fact)| ValueInfo {
            name: name.to_owned(),
            dtype: fact.value_type.dtype.and_then(|d| d.sdk()),
            shape: fact
                .value_type
                .shape
                .as_ref()
                .map(|dims| dims.iter().map(sdk_dim).collect()),
        })
        .collect();
    Ok(GraphView {
        opset: model.opset(),
        producer: model.producer_name.clone(),
        stacks: structure.stacks,
        embeddings: structure.embeddings,
        heads: structure.heads,
        tensors,
        values,
        node_names: (model.graph.nodes.iter())
            .filter(|n| !n.name.is_empty())
            .map(|n| n.name.clone())
            .collect(),
        inputs: model.graph.inputs.iter().map(|v| v.name.clone()).collect(),
        outputs: model.graph.outputs.iter().map(|v| v.name.clone()).collect(),
        record: crate::patch::read_record(model)?,
        input_roles: structure.inputs,
    })
}

fn sdk_dim(dim: &Dim) -> graft_plugin_sdk::Dim {
    match dim {
        Dim::Fixed(n) => graft_plugin_sdk::Dim::Fixed(*n),
        Dim::Symbol(s) => graft_plugin_sdk::Dim::Symbolic(s.clone()),
        Dim::Unknown => graft_plugin_sdk::Dim::Unknown,
    }
}
