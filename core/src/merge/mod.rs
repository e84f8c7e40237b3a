//! `graft merge`: folds grafted branches back into the base weights, following the folds the
//! plugins recorded, so that the merged model has the base model's topology.

use std::collections::{HashMap, HashSet};

use graft_plugin_sdk::{Fold, WeightLayout};

use crate::ir::{Graph, Model, Tensor};
use crate::patch::GraftRecord;
use crate::{Error, Result};
use rows::{add_low_rank_columns, multiply, update_weight, LowRankRows};

pub use requantize::RequantizedWeight;

mod evaluate;
mod requantize;
mod rows;

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
    /// Weights written back into their quantized storage ([`MergeOptions::requantize`]), with
    /// their error against merging into float.
    pub requantized: Vec<RequantizedWeight>,
}

/// How [`merge_with`] merges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeOptions {
    /// Write every weight that a method stores quantized (QLoRA's NF4) back into its codes and
    /// block scales, in the same block layout, after folding the updates into it, instead of
    /// merging it into float. Errors when the model has no quantized weight.
    pub requantize: bool,
}

/// Folds every recorded branch of `model` into its base weights and removes the graft record.
/// Only the targeted weights are read and rewritten; every other tensor keeps its storage.
/// Quantized weights are merged into float ([`merge_with`] can requantize them).
pub fn merge(model: &mut Model) -> Result<MergeReport> {
    merge_with(model, &MergeOptions::default())
}

/// [`merge`] as `options` say.
pub fn merge_with(model: &mut Model, options: &MergeOptions) -> Result<MergeReport> {
    let record = crate::patch::read_record(model)?;
    if record.methods.is_empty() {
        return Err(Error::Config(
            "the model has no grafted methods to merge (it was not written by `graft apply`)"
                .into(),
        ));
    }
    let quantized = |fold: &Fold| {
        matches!(
            fold,
            Fold::Bake {
                storage: Some(_),
                ..
            }
        )
    };
    if options.requantize && !record.folds.iter().any(quantized) {
        return Err(Error::Config(
            "--requantize: the model stores no weight quantized (methods such as qlora do); \
             merge without it"
                .into(),
        ));
    }
    let mut requantize = Vec::new();
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
                add_low_rank(
                    &mut model.graph,
                    weight,
                    *layout,
                    *scale,
                    (&a_values, &b_values),
                    [n_in, rank, n_out],
                    &mut report,
                )?;
            }
            Fold::ScaleOutput {
                weight,
                bias,
                vector,
                layout,
                ..
            } => {
                let scale = scale_weight(
                    &mut model.graph,
                    weight,
                    *layout,
                    vector,
                    Axis::Output,
                    &mut report,
                )?;
                if let Some(bias) = bias {
                    update_weight(
                        &mut model.graph,
                        bias,
                        WeightLayout::InOut,
                        [1, scale.len()],
                        &mut report,
                        |_: usize, rows: &mut [f32]| multiply(rows, &scale),
                    )?;
                }
            }
            Fold::ScaleInput {
                weight,
                vector,
                layout,
                ..
            } => {
                scale_weight(
                    &mut model.graph,
                    weight,
                    *layout,
                    vector,
                    Axis::Input,
                    &mut report,
                )?;
            }
            Fold::Delta {
                weight,
                layout,
                delta_nodes,
                delta,
                ..
            } => {
                let nodes = delta_nodes
                    .iter()
                    .map(crate::patch::node_from_patch)
                    .collect();
                let values = evaluate::evaluate(model, nodes, delta)?.float_values()?;
                add_dense(&mut model.graph, weight, *layout, &values, &mut report)?;
            }
            Fold::Bake {
                value,
                nodes,
                storage,
            } => {
                let baked = bake(model, value, nodes)?;
                match storage {
                    // Later folds update the baked value; its nodes stay to dequantize the
                    // rewritten storage, which replaces the value below.
                    Some(storage) if options.requantize => {
                        requantize.push((value.as_str(), storage))
                    }
                    _ => {
                        model.graph.nodes.retain(|n| !nodes.contains(&n.name));
                        report.removed_nodes += nodes.len();
                    }
                }
                model.graph.initializers.push(baked);
            }
            Fold::InPlace { .. } => {}
        }
        if let Some(branch) = fold.branch() {
            remove_branch(
                &mut model.graph,
                branch.nodes,
                &resolve(&redirects, branch.output),
                &resolve(&redirects, branch.base_output),
                &mut report,
            );
            redirects.insert(branch.output.to_owned(), branch.base_output.to_owned());
        }
    }
    for (value, storage) in requantize {
        let (weight, written) = requantize::requantize(&mut model.graph, value, storage)?;
        report.bytes_touched += written;
        report.requantized.push(weight);
    }
    collapse_output_identities(&mut model.graph);
    drop_unread_method_nodes(&mut model.graph, &record, &mut report);
    refuse_unfolded_methods(&model.graph, &record)?;
    drop_unused_parameters(model, &record, &mut report);
    crate::patch::write_record(&Default::default(), model);
    model.graph.validate()?;
    Ok(report)
}

/// The axis of a linear weight that a scale vector multiplies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Axis {
    /// Output features (IA3 on keys and values: `(x·W) ⊙ s`).
    Output,
    /// Input features (IA3 on the FFN down projection: `(x ⊙ s)·W`).
    Input,
}

/// Multiplies the weight's `axis` by the parameter `vector`, whatever the storage layout, and
/// returns the vector's values.
fn scale_weight(
    graph: &mut Graph,
    weight: &str,
    layout: WeightLayout,
    vector: &str,
    axis: Axis,
    report: &mut MergeReport,
) -> Result<Vec<f32>> {
    let scale = parameter_f32(graph, vector)?;
    let (n_in, n_out) = linear_dims(graph, weight, layout)?;
    check_len(
        vector,
        &scale,
        if axis == Axis::Output { n_out } else { n_in },
    )?;
    // Stored rows are inputs for in_out and outputs for out_in; the other axis runs along a row.
    let along_rows = (axis == Axis::Output) == (layout == WeightLayout::InOut);
    let update = |first: usize, rows: &mut [f32]| {
        let row_len = if layout == WeightLayout::InOut {
            n_out
        } else {
            n_in
        };
        for (offset, row) in rows.chunks_exact_mut(row_len.max(1)).enumerate() {
            if along_rows {
                multiply(row, &scale)
            } else {
                row.iter_mut().for_each(|w| *w *= scale[first + offset])
            }
        }
    };
    update_weight(graph, weight, layout, [n_in, n_out], report, update)?;
    Ok(scale)
}

/// Adds the dense `[in, out]` matrix `delta` (row-major) to the weight `name`, whatever its
/// layout.
fn add_dense(
    graph: &mut Graph,
    name: &str,
    layout: WeightLayout,
    delta: &[f32],
    report: &mut MergeReport,
) -> Result<()> {
    let (n_in, n_out) = linear_dims(graph, name, layout)?;
    check_len(name, delta, n_in * n_out)?;
    let update = |first: usize, rows: &mut [f32]| match layout {
        WeightLayout::InOut => {
            let start = first * n_out;
            for (w, d) in rows.iter_mut().zip(&delta[start..]) {
                *w += d;
            }
        }
        WeightLayout::OutIn => {
            for (offset, row) in rows.chunks_exact_mut(n_in.max(1)).enumerate() {
                let output = first + offset;
                for (input, w) in row.iter_mut().enumerate() {
                    *w += delta[input * n_out + output];
                }
            }
        }
    };
    update_weight(graph, name, layout, [n_in, n_out], report, update)
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
    tensor.float_values()
}

/// Adds `scale · A · B` to the weight `name` (A `[n_in, rank]`, B `[rank, n_out]`, row-major):
/// element (i, j) gets the delta `Σ_k (scale · A[i, k]) · B[k, j]` added once, the delta summed
/// in f32 from −0 by one fused multiply-add per term in order of k, skipping the k whose
/// coefficient `scale · A[i, k]` is zero.
fn add_low_rank(
    graph: &mut Graph,
    name: &str,
    layout: WeightLayout,
    scale: f32,
    (a_values, b_values): (&[f32], &[f32]),
    [n_in, rank, n_out]: [usize; 3],
    report: &mut MergeReport,
) -> Result<()> {
    let scaled_a: Vec<f32> = a_values.iter().map(|a| scale * a).collect();
    match layout {
        WeightLayout::InOut => {
            let b_rows: Vec<&[f32]> = b_values.chunks_exact(n_out.max(1)).collect();
            let update = LowRankRows {
                coefficients: &scaled_a,
                b: &b_rows,
            };
            update_weight(graph, name, layout, [n_in, n_out], report, update)
        }
        WeightLayout::OutIn => {
            let scaled_a_columns: Vec<Vec<f32>> = (0..rank)
                .map(|k| scaled_a.iter().skip(k).step_by(rank).copied().collect())
                .collect();
            let columns: Vec<&[f32]> = scaled_a_columns.iter().map(Vec::as_slice).collect();
            let b_transposed: Vec<f32> = (0..n_out)
                .flat_map(|j| (0..rank).map(move |k| b_values[k * n_out + j]))
                .collect();
            let update = |first: usize, rows: &mut [f32]| {
                add_low_rank_columns(rows, &columns, &b_transposed[first * rank..])
            };
            update_weight(graph, name, layout, [n_in, n_out], report, update)
        }
    }
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

/// Removes the nodes the methods added whose outputs nothing reads any more (a loss term's
/// subgraph, which only the training graph used), until none is left.
fn drop_unread_method_nodes(graph: &mut Graph, record: &GraftRecord, report: &mut MergeReport) {
    let added: HashSet<&str> = record
        .methods
        .iter()
        .flat_map(|m| m.nodes.iter().map(String::as_str))
        .collect();
    loop {
        let mut read: HashSet<String> =
            graph.read_values().into_iter().map(str::to_owned).collect();
        read.extend(graph.outputs.iter().map(|o| o.name.clone()));
        let before = graph.nodes.len();
        graph.nodes.retain(|node| {
            !added.contains(node.name.as_str())
                || node.outputs.iter().any(|o| read.contains(o.as_str()))
        });
        let removed = before - graph.nodes.len();
        if removed == 0 {
            break;
        }
        report.removed_nodes += removed;
    }
}

/// Errors when a method records no fold for any of its nodes and those nodes still compute
/// the model's outputs: the method is not linear in its input (a bottleneck adapter), so no
/// weight can absorb it. A method whose folds leave some of its nodes (a baked prompt table
/// still concatenated to the sequence) merges as far as its folds go.
fn refuse_unfolded_methods(graph: &Graph, record: &GraftRecord) -> Result<()> {
    let remaining: HashSet<&str> = graph.nodes.iter().map(|n| n.name.as_str()).collect();
    let folded: HashSet<&str> = record
        .folds
        .iter()
        .flat_map(|f| f.removed_nodes())
        .map(String::as_str)
        .collect();
    let unfolded: Vec<String> = record
        .methods
        .iter()
        .filter(|m| !m.nodes.iter().any(|n| folded.contains(n.as_str())))
        .filter_map(|m| {
            let left = m
                .nodes
                .iter()
                .filter(|n| remaining.contains(n.as_str()))
                .count();
            (left > 0).then(|| format!("{} ({left} of its {} nodes)", m.method, m.nodes.len()))
        })
        .collect();
    if unfolded.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "cannot merge {}: the method is not linear in its input, so no base weight can absorb \
         it. Keep it as a patched graph with the trained values stored in it (`graft export \
         --format onnx`), or export its files (`graft export --format adapterhub` for \
         adapters, `--format onnx-adapter` for ONNX Runtime)",
        unfolded.join(", ")
    )))
}

fn drop_unused_parameters(model: &mut Model, record: &GraftRecord, report: &mut MergeReport) {
    let graph = &mut model.graph;
    let read = graph.read_values();
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

/// The value `value` of a bake fold, computed once by its `nodes` from the model's current
/// parameters (see [`Fold::Bake`]), as an initializer named `value`.
pub(crate) fn bake(model: &Model, value: &str, nodes: &[String]) -> Result<Tensor> {
    let subgraph: Vec<_> = model
        .graph
        .nodes
        .iter()
        .filter(|n| nodes.contains(&n.name))
        .cloned()
        .collect();
    evaluate::evaluate(model, subgraph, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DataType, Tensor};
    use graft_plugin_sdk::DType;

    /// The definition, over the whole matrix in f32: element (i, j) sits at
    /// `i · stride_in + j · stride_out`.
    fn reference_low_rank(
        values: &mut [f32],
        layout: WeightLayout,
        scale: f32,
        (a, b): (&[f32], &[f32]),
        [n_in, rank, n_out]: [usize; 3],
    ) {
        let (stride_in, stride_out) = match layout {
            WeightLayout::InOut => (n_out, 1),
            WeightLayout::OutIn => (1, n_in),
        };
        for i in 0..n_in {
            for j in 0..n_out {
                let mut delta = -0.0f32;
                for k in 0..rank {
                    let coefficient = scale * a[i * rank + k];
                    if coefficient != 0.0 {
                        delta = coefficient.mul_add(b[k * n_out + j], delta);
                    }
                }
                values[i * stride_in + j * stride_out] += delta;
            }
        }
    }

    fn noise(n: usize, seed: u64, magnitude: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * magnitude
            })
            .collect()
    }

    /// Merges a random rank-3 update into an `n_in × n_out` weight of every type and layout,
    /// in place (`shared` false) or into a new buffer (another owner holds the weight's bytes),
    /// and checks the bits against [`reference_low_rank`].
    fn check_low_rank_merge([n_in, n_out]: [usize; 2], shared: bool) {
        let rank = 3;
        let mut a = noise(n_in * rank, 1, 2.0);
        a[4] = 0.0;
        a[5] = -0.0;
        let mut b = noise(rank * n_out, 2, 2.0);
        b[2 * n_out + 3] = f32::INFINITY;
        a.iter_mut().skip(2).step_by(rank).for_each(|v| *v = 0.0);
        for (dtype, code) in [
            (DataType::Float16, DType::Float16),
            (DataType::Float, DType::Float),
            (DataType::Bfloat16, DType::Bfloat16),
            (DataType::Double, DType::Double),
        ] {
            for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
                let mut weight = noise(n_in * n_out, 3, 1e-3);
                weight[0] = -0.0;
                weight[1] = 3e-8;
                weight[2] = 65504.0;
                let bytes = graft_plugin_sdk::f32_to_bytes(code, &weight).unwrap();
                let dims = match layout {
                    WeightLayout::InOut => vec![n_in as i64, n_out as i64],
                    WeightLayout::OutIn => vec![n_out as i64, n_in as i64],
                };
                let mut graph = Graph {
                    initializers: vec![Tensor::from_raw("w", dtype, dims, bytes.clone())],
                    ..Graph::default()
                };
                let other_owner = shared.then(|| graph.initializers[0].clone());
                let shapes = [n_in, rank, n_out];
                let mut report = MergeReport::default();
                add_low_rank(&mut graph, "w", layout, 0.5, (&a, &b), shapes, &mut report).unwrap();

                let mut expected = graft_plugin_sdk::bytes_to_f32(code, &bytes).unwrap();
                reference_low_rank(&mut expected, layout, 0.5, (&a, &b), shapes);
                let expected = graft_plugin_sdk::f32_to_bytes(code, &expected).unwrap();
                let merged = graph.initializers[0].raw_bytes().unwrap();
                assert!(merged == expected, "{dtype} {layout:?} shared {shared}");
                assert_eq!(report.bytes_touched, expected.len());
                if let Some(other) = other_owner {
                    assert_eq!(other.raw_bytes().unwrap(), bytes, "the other owner's bytes");
                }
            }
        }
    }

    #[test]
    fn row_wise_low_rank_updates_equal_the_definition_bit_for_bit() {
        for shared in [false, true] {
            check_low_rank_merge([37, 19], shared);
        }
    }

    /// Large enough that the rows are shared out across threads (where the machine has more
    /// than one core), with rows that do not fill whole vector tiles, and rows that span more
    /// than one panel of the fused float16 kernel.
    #[test]
    fn multithreaded_merges_equal_the_definition_bit_for_bit() {
        for shared in [false, true] {
            check_low_rank_merge([1031, 1100], shared);
        }
        // Rows wider than one panel of the fused float16 kernel (2688 columns at rank 3), with
        // a partial last panel and a tail past the last whole tile.
        check_low_rank_merge([67, 2900], false);
    }
}
