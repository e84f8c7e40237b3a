//! The weights of a Hugging Face checkpoint folder: `model.safetensors`, or the shards a
//! `model.safetensors.index.json` lists. Files are memory-mapped; a float32 tensor becomes an
//! initializer that refers to its bytes in the file (external data, nothing copied), a float16
//! or bfloat16 one is converted to float32 in memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};

use crate::ir::{DataType, MappedFile, Tensor, TensorData};
use crate::{Error, Result};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives.
struct Entry {
    file: Arc<MappedFile>,
    /// The file name, relative to the checkpoint folder.
    location: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the file.
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint, by name.
pub struct Checkpoint {
    dir: PathBuf,
    entries: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Maps the checkpoint's safetensors files in `dir`. Fails with a message naming the file
    /// when there is none, when the index names a file that is missing, or when a file is not
    /// valid safetensors.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = if dir.join(INDEX_FILE).is_file() {
            shard_files(dir)?
        } else if dir.join(SINGLE_FILE).is_file() {
            vec![SINGLE_FILE.to_owned()]
        } else {
            return Err(Error::Config(format!(
                "{}: no {SINGLE_FILE} or {INDEX_FILE} (graft reads safetensors checkpoints; \
                 convert a pytorch_model.bin with transformers' save_pretrained first)",
                dir.display()
            )));
        };
        let mut entries = HashMap::new();
        for location in files {
            let path = dir.join(&location);
            let file = Arc::new(MappedFile::open(path.clone())?);
            let bad = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
            let (header_len, metadata) = SafeTensors::read_metadata(file.bytes())
                .map_err(|e| bad(format!("not a valid safetensors file: {e:?}")))?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                let entry = Entry {
                    file: Arc::clone(&file),
                    location: location.clone(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + start,
                    end: data_start + end,
                };
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(bad(format!("tensor {name:?} is stored in two files")));
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            entries,
        })
    }

    /// Whether the checkpoint holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Tensor `name` as a float32 initializer of that name: a reference into the mapped file
    /// for float32 data, converted values for float16/bfloat16. Fails naming the tensor when it
    /// is missing or of another element type.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| {
            Error::Config(format!(
                "{}: the checkpoint has no tensor {name:?}, which this architecture needs",
                self.dir.display()
            ))
        })?;
        let dims: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
        let bytes = &entry.file.bytes()[entry.start..entry.end];
        let source = match entry.dtype {
            Dtype::F32 => {
                return Ok(Tensor {
                    name: name.to_owned(),
                    dtype: DataType::Float,
                    dims,
                    data: TensorData::External {
                        file: Arc::clone(&entry.file),
                        location: entry.location.clone(),
                        offset: entry.start,
                        length: entry.end - entry.start,
                    },
                    doc_string: String::new(),
                })
            }
            Dtype::F16 => graft_plugin_sdk::DType::Float16,
            Dtype::BF16 => graft_plugin_sdk::DType::Bfloat16,
            other => {
                return Err(Error::Tensor {
                    name: name.to_owned(),
                    reason: format!(
                        "is {other:?} in {}; graft imports float32, float16 and bfloat16 weights",
                        entry.location
                    ),
                })
            }
        };
        let values =
            graft_plugin_sdk::bytes_to_f32(source, bytes).ok_or_else(|| Error::Tensor {
                name: name.to_owned(),
                reason: format!(
                    "its byte length does not match its shape in {}",
                    entry.location
                ),
            })?;
        Ok(Tensor::from_f32(name, dims, &values))
    }

    /// The element types stored, with how many tensors of each (for the import summary).
    pub fn dtypes(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for entry in self.entries.values() {
            *counts.entry(format!("{:?}", entry.dtype)).or_insert(0) += 1;
        }
        counts
    }

    /// The names of the checkpoint's files.
    pub fn files(&self) -> Vec<String> {
        let mut files: Vec<String> = self.entries.values().map(|e| e.location.clone()).collect();
        files.sort();
        files.dedup();
        files
    }
}

/// The shard files `model.safetensors.index.json` names (its `weight_map` values), each a plain
/// file name inside the folder.
fn shard_files(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join(INDEX_FILE);
    let bad = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
    let text = crate::input_file::read_to_string(&path)?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("has no \"weight_map\" object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a file name")))?;
        let plain = Path::new(file).file_name().and_then(|n| n.to_str()) == Some(file);
        if !plain {
            return Err(bad(format!(
                "weight_map[{tensor:?}] = {file:?} is not a file name inside the folder"
            )));
        }
        if !dir.join(file).is_file() {
            return Err(bad(format!("names {file:?}, which is not in the folder")));
        }
        files.push(file.to_owned());
    }
    files.sort();
    files.dedup();
    Ok(files)
}
