//! Checking that a saved model and its external data are intact and consistent.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::checksum;
use crate::ir::{Model, TensorData};
use crate::Result;

/// What [`verify`] found in a model that loads.
#[derive(Clone, Debug, Serialize)]
pub struct Verification {
    /// The model file checked.
    pub model: PathBuf,
    /// Nodes of the main graph.
    pub nodes: usize,
    /// Initializers of the main graph.
    pub initializers: usize,
    /// Bytes of tensor data stored in the model file itself.
    pub inline_bytes: u64,
    /// Each external-data file the model reads.
    pub external_files: Vec<ExternalFileUse>,
    /// Initializers whose checksum was recorded and matches.
    pub checksums_matched: usize,
    /// Initializers without a recorded checksum (saved by another tool, or left in place in an
    /// external file that had none); only their sizes and offsets were checked.
    pub checksums_missing: Vec<String>,
    /// Everything wrong, one sentence each; empty when the model is intact.
    pub problems: Vec<String>,
}

/// One external-data file as the model uses it.
#[derive(Clone, Debug, Serialize)]
pub struct ExternalFileUse {
    /// The location as the model writes it (relative to the model's folder).
    pub location: String,
    /// The file's size.
    pub file_bytes: u64,
    /// How many tensors it holds.
    pub tensors: usize,
    /// The bytes those tensors take.
    pub tensor_bytes: u64,
}

impl Verification {
    /// Whether nothing is wrong.
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the model at `path`: it must load (protobuf, external-data locations confined to the
/// model's folder, every tensor's size matching its type and dims and lying inside its file,
/// no cycle — failures are returned as errors, as by [`load`](super::load)), its graph must be
/// wired in topological order, and every tensor with a checksum recorded at save time (see
/// [`checksum`]) must still match it. Problems of the last two kinds are listed in the
/// returned [`Verification`] rather than returned as errors, so that all of them are reported.
pub fn verify(path: &Path) -> Result<Verification> {
    let model = super::load(path)?;
    Ok(check(&model, path))
}

/// The checks of [`verify`] on a loaded `model` (named `path` in the report).
fn check(model: &Model, path: &Path) -> Verification {
    let mut problems = Vec::new();
    if let Err(error) = model.graph.validate() {
        problems.push(format!("the graph is miswired: {error}"));
    }
    let recorded = checksum::recorded(model).unwrap_or_else(|error| {
        problems.push(error.to_string());
        HashMap::new()
    });
    let mut inline_bytes = 0u64;
    let mut files: BTreeMap<String, ExternalFileUse> = BTreeMap::new();
    let mut checksums_matched = 0;
    let mut checksums_missing = Vec::new();
    for tensor in &model.graph.initializers {
        let where_stored = match &tensor.data {
            TensorData::External {
                file,
                location,
                offset,
                length,
            } => {
                let entry = files
                    .entry(location.clone())
                    .or_insert_with(|| ExternalFileUse {
                        location: location.clone(),
                        file_bytes: file.len() as u64,
                        tensors: 0,
                        tensor_bytes: 0,
                    });
                entry.tensors += 1;
                entry.tensor_bytes += *length as u64;
                format!("bytes {offset}..{} of {location}", offset + length)
            }
            _ => {
                inline_bytes += tensor.byte_len() as u64;
                "inline".to_owned()
            }
        };
        let Some(&expected) = recorded.get(&tensor.name) else {
            checksums_missing.push(tensor.name.clone());
            continue;
        };
        match checksum::tensor_crc32(tensor) {
            Ok(actual) if actual == expected => checksums_matched += 1,
            Ok(actual) => problems.push(format!(
                "tensor {:?} ({where_stored}) has checksum {actual:08x}, but {expected:08x} was \
                 recorded when the model was saved: its bytes changed since",
                tensor.name
            )),
            Err(error) => problems.push(format!("tensor {:?}: {error}", tensor.name)),
        }
    }
    let mut unknown: Vec<&String> = recorded
        .keys()
        .filter(|name| model.graph.initializer(name).is_none())
        .collect();
    unknown.sort();
    for name in unknown {
        problems.push(format!(
            "a checksum is recorded for tensor {name:?}, which the model does not have: it was \
             removed or renamed after the model was saved"
        ));
    }
    Verification {
        model: path.to_path_buf(),
        nodes: model.graph.nodes.len(),
        initializers: model.graph.initializers.len(),
        inline_bytes,
        external_files: files.into_values().collect(),
        checksums_matched,
        checksums_missing,
        problems,
    }
}
