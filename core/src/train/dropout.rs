//! Dropout in training graphs, with masks drawn by graft's own generator.
//!
//! Plugins insert standard ONNX `Dropout` nodes without a training-mode input, so exported and
//! evaluation graphs run them as the identity. A training graph replaces each of them by
//! `x · mask`, where `mask` is a graph input the host fills at every micro-batch with
//! `1/(1−p)` (kept, probability `1−p`) or 0, drawn from a generator seeded by the run's seed,
//! the step, the micro-batch and the node — the same masks on every execution provider, and
//! after `--resume` too. The mask's shape is the symbolic shape of `x`, evaluated with the
//! sizes of the batch's inputs.

use std::collections::{BTreeMap, HashSet};

use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};

use crate::analysis::shapes::symbolic;
use crate::ir::{DataType, Dim, Model, Node, ValueInfo};
use crate::patch::GraftRecord;
use crate::runtime::HostTensor;
use crate::{Error, Result};

/// One host-fed dropout mask of a training graph.
#[derive(Clone, Debug)]
pub struct DropoutMask {
    /// The mask's graph input.
    pub input: String,
    /// The node it replaced (for messages).
    pub node: String,
    /// The keep probability `1 − p`.
    pub keep: f64,
    /// The masked value's element type.
    pub dtype: DataType,
    /// The masked value's shape, in the symbols of the graph inputs.
    pub shape: Vec<Dim>,
}

/// Replaces every `Dropout` node the record's methods added by `Mul(x, mask)` with a new
/// graph input `mask`, and returns the masks. A node whose ratio is not a constant, whose
/// input shape is unknown, or whose mask output is read is refused with its name.
pub fn host_masks(model: &mut Model, record: &GraftRecord) -> Result<Vec<DropoutMask>> {
    let mut added: HashSet<&str> = record
        .methods
        .iter()
        .flat_map(|m| m.nodes.iter().map(String::as_str))
        .collect();
    // Records written before methods listed their nodes: the folds' branch nodes.
    added.extend(
        record
            .folds
            .iter()
            .filter_map(|f| f.branch())
            .flat_map(|b| b.nodes.iter().map(String::as_str)),
    );
    let positions: Vec<usize> = (model.graph.nodes.iter().enumerate())
        .filter(|(_, n)| n.is("Dropout") && added.contains(n.name.as_str()))
        .map(|(i, _)| i)
        .collect();
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let shapes = crate::analysis::infer_shapes(model)?;
    let read = model.graph.read_values();
    let refuse = |node: &Node, reason: String| {
        Error::InvalidGraph(format!("dropout node {:?}: {reason}", node.name))
    };
    let mut taken = model.graph.taken_names();
    let mut masks = Vec::new();
    let mut replaced = Vec::new();
    for position in positions {
        let node = &model.graph.nodes[position];
        if node
            .outputs
            .get(1)
            .is_some_and(|m| !m.is_empty() && read.contains(m.as_str()))
        {
            return Err(refuse(node, "its mask output is read".into()));
        }
        let x = &node.inputs[0];
        let ratio = match node.inputs.get(1).filter(|r| !r.is_empty()) {
            None => 0.5,
            Some(ratio) => constant_float(model, ratio)
                .ok_or_else(|| refuse(node, format!("its ratio {ratio:?} is not a constant")))?,
        };
        let (dtype, shape) = match (shapes.dtype(x), shapes.shape(x)) {
            (Some(dtype), Some(shape)) => (dtype, shape.to_vec()),
            _ => {
                return Err(refuse(
                    node,
                    format!("the shape of its input {x:?} is unknown"),
                ))
            }
        };
        let input =
            crate::ir::Graph::first_free_name(&format!("graft.dropout_mask.{}", node.name), |n| {
                taken.contains(n)
            });
        taken.insert(input.clone());
        let mut multiply = Node::new(
            node.name.clone(),
            "Mul",
            vec![x.clone(), input.clone()],
            vec![node.outputs[0].clone()],
        );
        multiply.doc_string = "graft: dropout with a host-fed mask".into();
        replaced.push((position, multiply));
        masks.push(DropoutMask {
            input,
            node: node.name.clone(),
            keep: 1.0 - ratio,
            dtype,
            shape,
        });
    }
    for (position, node) in replaced {
        model.graph.nodes[position] = node;
    }
    for mask in &masks {
        model
            .graph
            .inputs
            .push(ValueInfo::tensor(&mask.input, mask.dtype, &mask.shape));
    }
    Ok(masks)
}

/// The float value of a `Constant` node output or a scalar initializer.
fn constant_float(model: &Model, value: &str) -> Option<f64> {
    if let Some(tensor) = model.graph.initializer(value) {
        return tensor.float_values().ok()?.first().map(|&v| v as f64);
    }
    let node = model
        .graph
        .nodes
        .iter()
        .find(|n| n.is("Constant") && n.outputs.first().is_some_and(|o| o == value))?;
    let attribute = node.attributes.first()?;
    match attribute.name.as_str() {
        "value_float" => Some(attribute.f as f64),
        _ => None,
    }
}

/// The masks for one micro-batch: shapes from the sizes the batch's `feeds` give the symbols
/// of `inputs` (the training graph's declared inputs), values drawn from a generator seeded by
/// `seed`, `step`, `micro` and the mask's position.
pub fn mask_feeds(
    masks: &[DropoutMask],
    inputs: &[ValueInfo],
    feeds: &[(String, HostTensor)],
    seed: u64,
    step: u64,
    micro: usize,
) -> Result<Vec<(String, HostTensor)>> {
    if masks.is_empty() {
        return Ok(Vec::new());
    }
    let mut sizes: BTreeMap<String, i64> = BTreeMap::new();
    for (name, tensor) in feeds {
        let Some(declared) = inputs
            .iter()
            .find(|i| &i.name == name)
            .and_then(ValueInfo::value_type)
            .and_then(|t| t.shape)
        else {
            continue;
        };
        for (dim, &size) in declared.iter().zip(tensor.shape()) {
            if let Dim::Symbol(symbol) = dim {
                sizes.insert(symbol.clone(), size as i64);
            }
        }
    }
    masks
        .iter()
        .enumerate()
        .map(|(index, mask)| {
            let shape = mask
                .shape
                .iter()
                .map(|dim| {
                    symbolic::evaluate(dim, &sizes)
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| {
                            Error::Runtime(format!(
                                "dropout node {:?}: cannot size its mask: dimension {dim:?} is not \
                                 given by the batch's inputs",
                                mask.node
                            ))
                        })
                })
                .collect::<Result<Vec<usize>>>()?;
            let count: usize = shape.iter().product();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(super::participation::mix(&[
                seed,
                step,
                micro as u64,
                index as u64,
            ]));
            let scale = 1.0 / mask.keep;
            let values: Vec<f64> = (0..count)
                .map(|_| {
                    if rng.gen::<f64>() < mask.keep {
                        scale
                    } else {
                        0.0
                    }
                })
                .collect();
            let tensor = match mask.dtype {
                DataType::Double => HostTensor::F64(
                    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(shape_error)?,
                ),
                DataType::Float => HostTensor::F32(
                    ArrayD::from_shape_vec(
                        IxDyn(&shape),
                        values.iter().map(|&v| v as f32).collect(),
                    )
                    .map_err(shape_error)?,
                ),
                other => {
                    return Err(Error::Runtime(format!(
                        "dropout node {:?}: masks for {other} values are not supported yet",
                        mask.node
                    )))
                }
            };
            Ok((mask.input.clone(), tensor))
        })
        .collect()
}

fn shape_error(e: ndarray::ShapeError) -> Error {
    Error::Runtime(format!("dropout mask: {e}"))
}
