//! `graft merge`: folds grafted branches back into the base weights, following the folds the
//! plugins recorded, so that the merged model has the base model's topology.

use std::collections::{HashMap, HashSet};

use graft_plugin_sdk::{Fold, WeightLayout};

use crate::ir::{Graph, Model, Tensor};
use crate::patch::GraftRecord;
use crate::{Error, Result};

/// What a merge did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct MergeReport {
    /// Base weights that were updated.
    pub updated_weights: Vec<String>,
    /// Graph nodes removed (the branches).
    pub removed_nodes: usize,
    /// Parameters dropped from the graph.
    pub removed_parameters: usize,
    /// Bytes of base weights read and rewritten.
    pub bytes_touched: usize,
}

/// Folds every recorded branch of `model` into its base weights and removes the graft record.
/// Only the targeted weights are read and rewritten; every other tensor keeps its storage.
pub fn merge(model: &mut Model) -> Result<MergeReport> {
    let record = GraftRecord::read(model)?;
    if record.methods.is_empty() {
        return Err(Error::Config(
            "the model has no grafted methods to merge (it was not written by `graft apply`)"
                .into(),
        ));
    }
    let mut report = MergeReport::default();
    let mut redirects: HashMap<String, String> = HashMap::new();
    let resolve = |redirects: &HashMap<String, String>, name: &str| -> String {
        let mut current = name.to_owned();
        while let Some(next) = redirects.get(&current) {
            current = next.clone();
        }
        current
    };
    for fold in &record.folds {
        match fold {
            Fold::LowRank {
                weight,
                a,
                b,
                scale,
                layout,
                ..
            } => {
                let a_values = parameter_f32(&model.graph, a)?;
                let b_values = parameter_f32(&model.graph, b)?;
                let (a_dims, b_dims) = (dims_of(&model.graph, a)?, dims_of(&model.graph, b)?);
                let [n_in, rank] = matrix_dims(a, &a_dims)?;
                let [rank_b, n_out] = matrix_dims(b, &b_dims)?;
                if rank != rank_b {
                    return Err(Error::Tensor {
                        name: b.clone(),
                        reason: format!("rank {rank_b} does not match {a:?}'s rank {rank}"),
                    });
                }
                update_weight(
                    &mut model.graph,
                    weight,
                    *layout,
                    n_in,
                    n_out,
                    &mut report,
                    |w, stride_in, stride_out| {
                        for i in 0..n_in {
                            for k in 0..rank {
                                let coefficient = scale * a_values[i * rank + k];
                                if coefficient == 0.0 {
                                    continue;
                                }
                                let b_row = &b_values[k * n_out..(k + 1) * n_out];
                                for (j, &b_value) in b_row.iter().enumerate() {
                                    w[i * stride_in + j * stride_out] += coefficient * b_value;
                                }
                            }
                        }
                    },
                )?;
            }
            Fold::ScaleOutput {
                weight,
                bias,
                vector,
                layout,
                ..
            } => {
                let scale = parameter_f32(&model.graph, vector)?;
                let (n_in, n_out) = linear_dims(&model.graph, weight, *layout)?;
                check_len(vector, &scale, n_out)?;
                update_weight(
                    &mut model.graph,
                    weight,
                    *layout,
                    n_in,
                    n_out,
                    &mut report,
                    |w, stride_in, stride_out| {
                        for i in 0..n_in {
                            for (j, s) in scale.iter().enumerate() {
                                w[i * stride_in + j * stride_out] *= s;
                            }
                        }
                    },
                )?;
                if let Some(bias) = bias {
                    update_weight(
                        &mut model.graph,
                        bias,
                        WeightLayout::InOut,
                        1,
                        n_out,
                        &mut report,
                        |w, _, _| {
                            for (value, s) in w.iter_mut().zip(&scale) {
                                *value *= s;
                            }
                        },
                    )?;
                }
            }
            Fold::ScaleInput {
                weight,
                vector,
                layout,
                ..
            } => {
                let scale = parameter_f32(&model.graph, vector)?;
                let (n_in, n_out) = linear_dims(&model.graph, weight, *layout)?;
                check_len(vector, &scale, n_in)?;
                update_weight(
                    &mut model.graph,
                    weight,
                    *layout,
                    n_in,
                    n_out,
                    &mut report,
                    |w, stride_in, stride_out| {
                        for (i, s) in scale.iter().enumerate() {
                            for j in 0..n_out {
                                w[i * stride_in + j * stride_out] *= s;
                            }
                        }
                    },
                )?;
            }
            Fold::InPlace { .. } => {}
        }
        if let Some((branch_nodes, branch_output, base_output)) = branch_of(fold) {
            remove_branch(
                &mut model.graph,
                branch_nodes,
                &resolve(&redirects, branch_output),
                &resolve(&redirects, base_output),
                &mut report,
            );
            redirects.insert(branch_output.to_owned(), base_output.to_owned());
        }
    }
    collapse_output_identities(&mut model.graph);
    drop_unused_parameters(model, &record, &mut report);
    GraftRecord::default().write(model);
    model.graph.validate()?;
    Ok(report)
}

/// The nodes, output and base value of a fold's branch; `None` for in-place folds.
pub fn branch_of(fold: &Fold) -> Option<(&[String], &str, &str)> {
    match fold {
        Fold::LowRank {
            branch_nodes,
            branch_output,
            base_output,
            ..
        }
        | Fold::ScaleOutput {
            branch_nodes,
            branch_output,
            base_output,
            ..
        }
        | Fold::ScaleInput {
            branch_nodes,
            branch_output,
            base_output,
            ..
        } => Some((branch_nodes, branch_output, base_output)),
        Fold::InPlace { .. } => None,
    }
}

fn dims_of(graph: &Graph, name: &str) -> Result<Vec<i64>> {
    graph
        .initializer(name)
        .map(|t| t.dims.clone())
        .ok_or_else(|| Error::Tensor {
            name: name.to_owned(),
            reason: "the merge needs it, but the model has no initializer of that name".into(),
        })
}

fn matrix_dims(name: &str, dims: &[i64]) -> Result<[usize; 2]> {
    match dims {
        [rows, cols] if *rows >= 0 && *cols >= 0 => Ok([*rows as usize, *cols as usize]),
        other => Err(Error::Tensor {
            name: name.to_owned(),
            reason: format!("expected a matrix, found dims {other:?}"),
        }),
    }
}

/// (in_features, out_features) of a linear weight stored in `layout`.
fn linear_dims(graph: &Graph, weight: &str, layout: WeightLayout) -> Result<(usize, usize)> {
    let [rows, cols] = matrix_dims(weight, &dims_of(graph, weight)?)?;
    Ok(match layout {
        WeightLayout::InOut => (rows, cols),
        WeightLayout::OutIn => (cols, rows),
    })
}

fn check_len(name: &str, values: &[f32], expected: usize) -> Result<()> {
    if values.len() == expected {
        Ok(())
    } else {
        Err(Error::Tensor {
            name: name.to_owned(),
            reason: format!("has {} elements, the weight needs {expected}", values.len()),
        })
    }
}

fn parameter_f32(graph: &Graph, name: &str) -> Result<Vec<f32>> {
    let tensor = graph.initializer(name).ok_or_else(|| Error::Tensor {
        name: name.to_owned(),
        reason: "the merge needs it, but the model has no initializer of that name".into(),
    })?;
    tensor_f32(tensor)
}

/// A float tensor's values as f32 (float16, bfloat16 and double converted).
pub fn tensor_f32(tensor: &Tensor) -> Result<Vec<f32>> {
    let dtype = sdk_dtype(tensor)?;
    graft_plugin_sdk::bytes_to_f32(dtype, tensor.raw_bytes()?).ok_or_else(|| Error::Tensor {
        name: tensor.name.clone(),
        reason: format!(
            "{} is not a floating-point type graft can merge",
            tensor.dtype
        ),
    })
}

fn sdk_dtype(tensor: &Tensor) -> Result<graft_plugin_sdk::DType> {
    graft_plugin_sdk::DType::from_onnx_code(tensor.dtype.code()).ok_or_else(|| Error::Tensor {
        name: tensor.name.clone(),
        reason: format!("unsupported element type {}", tensor.dtype),
    })
}

/// Rewrites the weight `name` through `update`, which sees the values as f32 with the strides
/// of an (in, out) index: element (i, j) lives at `i * stride_in + j * stride_out`.
fn update_weight(
    graph: &mut Graph,
    name: &str,
    layout: WeightLayout,
    n_in: usize,
    n_out: usize,
    report: &mut MergeReport,
    update: impl FnOnce(&mut [f32], usize, usize),
) -> Result<()> {
    let index = graph
        .initializers
        .iter()
        .position(|t| t.name == name)
        .ok_or_else(|| Error::Tensor {
            name: name.to_owned(),
            reason: "the merge needs it, but the model has no initializer of that name".into(),
        })?;
    let tensor = &graph.initializers[index];
    let mut values = tensor_f32(tensor)?;
    if values.len() != n_in * n_out {
        return Err(Error::Tensor {
            name: name.to_owned(),
            reason: format!("has {} elements, expected {n_in}×{n_out}", values.len()),
        });
    }
    let (stride_in, stride_out) = match layout {
        WeightLayout::InOut => (n_out, 1),
        WeightLayout::OutIn => (1, n_in),
    };
    update(&mut values, stride_in, stride_out);
    let dtype = sdk_dtype(tensor)?;
    let bytes = graft_plugin_sdk::f32_to_bytes(dtype, &values).ok_or_else(|| Error::Tensor {
        name: name.to_owned(),
        reason: format!("cannot write {} values", tensor.dtype),
    })?;
    report.bytes_touched += bytes.len();
    if !report.updated_weights.iter().any(|w| w == name) {
        report.updated_weights.push(name.to_owned());
    }
    let updated = Tensor {
        data: crate::ir::TensorData::Raw(bytes.into()),
        ..tensor.clone()
    };
    graph.initializers[index] = updated;
    Ok(())
}

fn remove_branch(
    graph: &mut Graph,
    branch_nodes: &[String],
    branch_output: &str,
    base_output: &str,
    report: &mut MergeReport,
) {
    let doomed: HashSet<&str> = branch_nodes.iter().map(String::as_str).collect();
    let before = graph.nodes.len();
    graph.nodes.retain(|n| !doomed.contains(n.name.as_str()));
    report.removed_nodes += before - graph.nodes.len();
    for node in graph.nodes.iter_mut() {
        for input in node.inputs.iter_mut().filter(|i| *i == branch_output) {
            *input = base_output.to_owned();
        }
    }
}

/// Removes the Identity nodes `graft apply` added to keep a graph output's name when that
/// output's producer was rewired, renaming the producer's output back.
fn collapse_output_identities(graph: &mut Graph) {
    loop {
        let found = graph.nodes.iter().position(|n| {
            n.is("Identity") && n.name.starts_with("graft.output.") && n.inputs.len() == 1
        });
        let Some(position) = found else { break };
        let identity = graph.nodes.remove(position);
        let (source, target) = (&identity.inputs[0], &identity.outputs[0]);
        let other_readers = graph.nodes.iter().any(|n| n.inputs.contains(source))
            || graph.outputs.iter().any(|o| &o.name == source);
        let produced = graph.nodes.iter().any(|n| n.outputs.contains(source));
        if other_readers || !produced {
            graph.nodes.insert(position, identity);
            break;
        }
        for node in graph.nodes.iter_mut() {
            for output in node.outputs.iter_mut().filter(|o| *o == source) {
                *output = target.clone();
            }
        }
    }
}

fn drop_unused_parameters(model: &mut Model, record: &GraftRecord, report: &mut MergeReport) {
    let graph = &mut model.graph;
    let read: HashSet<&str> = graph
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .chain(graph.outputs.iter().map(|o| o.name.as_str()))
        .collect();
    let added: HashSet<&str> = record.parameters().collect();
    let dead: HashSet<String> = graph
        .initializers
        .iter()
        .filter(|t| added.contains(t.name.as_str()) && !read.contains(t.name.as_str()))
        .map(|t| t.name.clone())
        .collect();
    graph.initializers.retain(|t| !dead.contains(&t.name));
    report.removed_parameters = dead.len();
    let trainable: HashSet<&str> = record.trainable().collect();
    graph
        .inputs
        .retain(|input| !trainable.contains(input.name.as_str()) && !dead.contains(&input.name));
}
