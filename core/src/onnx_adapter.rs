//! ONNX Runtime's adapter files (`.onnx_adapter`): named tensors that ONNX Runtime feeds as
//! graph inputs at run time (`RunOptions::add_adapter`), so one loaded model serves many
//! trained adapters. Reading, writing and checking them, and `graft export --format onnx-adapter`.
//!
//! The file is a FlatBuffer with ONNX Runtime's schema (`onnxruntime/lora/adapter_format/
//! adapter_schema.fbs`, file identifier `TORT`, format version 1):
//!
//! ```text
//! table Parameter { name:string; dims:[int64]; data_type:TensorDataType (int32, ONNX codes);
//!                   raw_data:[uint8] (force_align: 8); }
//! table Adapter   { format_version:int; adapter_version:int; model_version:int;
//!                   parameters:[Parameter]; }
//! ```

use std::path::Path;

use flatbuffers::{
    FlatBufferBuilder, Follow, ForwardsUOffset, InvalidFlatbuffer, Table, Vector, Verifiable,
    Verifier, WIPOffset,
};
use graft_plugin_sdk::Fold;

use crate::ir::{DataType, Model, Tensor, TensorData};
use crate::{Error, Result};

/// The FlatBuffers file identifier of adapter files.
pub const FILE_IDENTIFIER: &str = "TORT";

/// The adapter format version this module reads and writes (the only one ONNX Runtime knows).
pub const FORMAT_VERSION: i32 = 1;

/// The file names `graft export --format onnx-adapter` writes into its output folder.
pub const MODEL_FILE: &str = "model.onnx";
/// See [`MODEL_FILE`].
pub const ADAPTER_FILE: &str = "adapter.onnx_adapter";

/// One named tensor of an adapter file.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterParameter {
    /// The graph input it is fed to.
    pub name: String,
    /// Its dimensions.
    pub dims: Vec<i64>,
    /// Its element type.
    pub dtype: DataType,
    /// Its values, raw little-endian.
    pub raw_data: Vec<u8>,
}

/// The contents of an `.onnx_adapter` file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OnnxAdapter {
    /// A version number of the adapter, free for its author.
    pub adapter_version: i32,
    /// A version number of the model it fits, free for its author.
    pub model_version: i32,
    /// The tensors.
    pub parameters: Vec<AdapterParameter>,
}

/// Whether `bytes` start like an adapter file (FlatBuffer with the `TORT` identifier).
pub fn is_onnx_adapter(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[4..8] == FILE_IDENTIFIER.as_bytes()
}

mod fields {
    use flatbuffers::VOffsetT;

    pub const PARAMETER_NAME: VOffsetT = 4;
    pub const PARAMETER_DIMS: VOffsetT = 6;
    pub const PARAMETER_DATA_TYPE: VOffsetT = 8;
    pub const PARAMETER_RAW_DATA: VOffsetT = 10;
    pub const ADAPTER_FORMAT_VERSION: VOffsetT = 4;
    pub const ADAPTER_ADAPTER_VERSION: VOffsetT = 6;
    pub const ADAPTER_MODEL_VERSION: VOffsetT = 8;
    pub const ADAPTER_PARAMETERS: VOffsetT = 10;
}

struct ParameterTable<'a>(Table<'a>);

impl<'a> Follow<'a> for ParameterTable<'a> {
    type Inner = Self;
    unsafe fn follow(buf: &'a [u8], loc: usize) -> Self {
        // SAFETY: forwarded contract of `Follow::follow`: `loc` holds a table.
        ParameterTable(unsafe { Table::new(buf, loc) })
    }
}

impl Verifiable for ParameterTable<'_> {
    fn run_verifier(v: &mut Verifier, pos: usize) -> std::result::Result<(), InvalidFlatbuffer> {
        use fields::*;
        v.visit_table(pos)?
            .visit_field::<ForwardsUOffset<&str>>("name", PARAMETER_NAME, false)?
            .visit_field::<ForwardsUOffset<Vector<i64>>>("dims", PARAMETER_DIMS, false)?
            .visit_field::<i32>("data_type", PARAMETER_DATA_TYPE, false)?
            .visit_field::<ForwardsUOffset<Vector<u8>>>("raw_data", PARAMETER_RAW_DATA, false)?
            .finish();
        Ok(())
    }
}

struct AdapterTable<'a>(Table<'a>);

impl<'a> Follow<'a> for AdapterTable<'a> {
    type Inner = Self;
    unsafe fn follow(buf: &'a [u8], loc: usize) -> Self {
        // SAFETY: forwarded contract of `Follow::follow`: `loc` holds a table.
        AdapterTable(unsafe { Table::new(buf, loc) })
    }
}

impl Verifiable for AdapterTable<'_> {
    fn run_verifier(v: &mut Verifier, pos: usize) -> std::result::Result<(), InvalidFlatbuffer> {
        use fields::*;
        v.visit_table(pos)?
            .visit_field::<i32>("format_version", ADAPTER_FORMAT_VERSION, false)?
            .visit_field::<i32>("adapter_version", ADAPTER_ADAPTER_VERSION, false)?
            .visit_field::<i32>("model_version", ADAPTER_MODEL_VERSION, false)?
            .visit_field::<ForwardsUOffset<Vector<ForwardsUOffset<ParameterTable>>>>(
                "parameters",
                ADAPTER_PARAMETERS,
                false,
            )?
            .finish();
        Ok(())
    }
}

impl OnnxAdapter {
    /// Encodes the adapter as ONNX Runtime writes it; every `raw_data` starts 8-byte aligned
    /// within the buffer, as the schema's `force_align: 8` asks.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut builder = FlatBufferBuilder::new();
        let mut parameters = Vec::with_capacity(self.parameters.len());
        for parameter in &self.parameters {
            let name = builder.create_string(&parameter.name);
            let dims = builder.create_vector(&parameter.dims);
            let data_len = parameter.raw_data.len();
            let used = builder.unfinished_data().len();
            if !(used + padding_to(used + data_len, 4) + data_len).is_multiple_of(8) {
                builder.push(0u32);
            }
            let raw_data = builder.create_vector(&parameter.raw_data);
            let table = builder.start_table();
            builder.push_slot_always(fields::PARAMETER_RAW_DATA, raw_data);
            builder.push_slot::<i32>(fields::PARAMETER_DATA_TYPE, parameter.dtype.code(), 0);
            builder.push_slot_always(fields::PARAMETER_DIMS, dims);
            builder.push_slot_always(fields::PARAMETER_NAME, name);
            parameters.push(builder.end_table(table));
        }
        let parameters = builder.create_vector(&parameters);
        let table = builder.start_table();
        builder.push_slot_always(fields::ADAPTER_PARAMETERS, parameters);
        builder.push_slot::<i32>(fields::ADAPTER_MODEL_VERSION, self.model_version, 0);
        builder.push_slot::<i32>(fields::ADAPTER_ADAPTER_VERSION, self.adapter_version, 0);
        builder.push_slot::<i32>(fields::ADAPTER_FORMAT_VERSION, FORMAT_VERSION, 0);
        let root: WIPOffset<AdapterTable> = WIPOffset::new(builder.end_table(table).value());
        builder.finish(root, Some(FILE_IDENTIFIER));
        builder.finished_data().to_vec()
    }

    /// Decodes and verifies an adapter file's bytes; `source` names them in errors.
    pub fn from_bytes(bytes: &[u8], source: &Path) -> Result<Self> {
        let fail = |reason: String| {
            Error::Config(format!(
                "{}: not a valid ONNX Runtime adapter file: {reason}",
                source.display()
            ))
        };
        if !is_onnx_adapter(bytes) {
            return Err(fail(format!(
                "it lacks the {FILE_IDENTIFIER:?} FlatBuffers identifier"
            )));
        }
        let adapter = flatbuffers::root::<AdapterTable>(bytes).map_err(|e| fail(e.to_string()))?;
        use fields::*;
        // SAFETY (all `get` calls below): the verifier checked every field against the types
        // the schema gives them, which are the types read here.
        let format_version =
            unsafe { adapter.0.get::<i32>(ADAPTER_FORMAT_VERSION, Some(0)) }.unwrap_or(0);
        if format_version != FORMAT_VERSION {
            return Err(fail(format!(
                "format version {format_version}; graft reads version {FORMAT_VERSION}"
            )));
        }
        let adapter_version =
            unsafe { adapter.0.get::<i32>(ADAPTER_ADAPTER_VERSION, Some(0)) }.unwrap_or(0);
        let model_version =
            unsafe { adapter.0.get::<i32>(ADAPTER_MODEL_VERSION, Some(0)) }.unwrap_or(0);
        let tables = unsafe {
            adapter
                .0
                .get::<ForwardsUOffset<Vector<ForwardsUOffset<ParameterTable>>>>(
                    ADAPTER_PARAMETERS,
                    None,
                )
        };
        let mut parameters = Vec::new();
        for (index, table) in tables.iter().flat_map(|v| v.iter()).enumerate() {
            let name = unsafe { table.0.get::<ForwardsUOffset<&str>>(PARAMETER_NAME, None) }
                .ok_or_else(|| fail(format!("parameter {index} has no name")))?;
            let dims = unsafe {
                table
                    .0
                    .get::<ForwardsUOffset<Vector<i64>>>(PARAMETER_DIMS, None)
            }
            .map(|d| d.iter().collect())
            .unwrap_or_default();
            let code = unsafe { table.0.get::<i32>(PARAMETER_DATA_TYPE, Some(0)) }.unwrap_or(0);
            let dtype = DataType::from_code(code)
                .ok_or_else(|| fail(format!("parameter {name:?} has no element type")))?;
            let raw_data = unsafe {
                table
                    .0
                    .get::<ForwardsUOffset<Vector<u8>>>(PARAMETER_RAW_DATA, None)
            }
            .map(|d| d.bytes().to_vec())
            .unwrap_or_default();
            parameters.push(AdapterParameter {
                name: name.to_owned(),
                dims,
                dtype,
                raw_data,
            });
        }
        Ok(OnnxAdapter {
            adapter_version,
            model_version,
            parameters,
        })
    }

    /// Reads an adapter file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = crate::input_file::read(path)?;
        Self::from_bytes(&bytes, path)
    }

    /// Writes the adapter file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::atomic_file::write_atomically(path, &self.to_bytes())
    }

    /// The adapter holding the current values of every trainable tensor of a patched model.
    pub fn from_trainable(model: &Model) -> Result<Self> {
        let record = crate::patch::read_record(model)?;
        let mut parameters = Vec::new();
        for name in record.trainable() {
            let tensor = model.graph.initializer(name).ok_or_else(|| Error::Tensor {
                name: name.to_owned(),
                reason: "trainable tensor missing from the model".into(),
            })?;
            parameters.push(AdapterParameter {
                name: name.to_owned(),
                dims: tensor.dims.clone(),
                dtype: tensor.dtype,
                raw_data: tensor.raw_bytes()?.to_vec(),
            });
        }
        Ok(OnnxAdapter {
            parameters,
            ..OnnxAdapter::default()
        })
    }

    /// Checks that every parameter overrides an initializer that `model` lists as a graph
    /// input (the tensors ONNX Runtime lets a run replace), with the same element type and
    /// dimensions. `source` names the adapter in errors.
    pub fn check_against(&self, model: &Model, source: &Path) -> Result<()> {
        let fail = |reason: String| Error::Config(format!("{}: {reason}", source.display()));
        let overridable: Vec<&Tensor> = model
            .graph
            .initializers
            .iter()
            .filter(|t| model.graph.inputs.iter().any(|i| i.name == t.name))
            .collect();
        for parameter in &self.parameters {
            let Some(target) = overridable.iter().find(|t| t.name == parameter.name) else {
                let names: Vec<&str> = overridable
                    .iter()
                    .take(8)
                    .map(|t| t.name.as_str())
                    .collect();
                return Err(fail(if names.is_empty() {
                    format!(
                        "tensor {:?} does not match the model: it has no overridable \
                         initializers (export one with `graft export --format onnx-adapter`)",
                        parameter.name
                    )
                } else {
                    format!(
                        "tensor {:?} is not an overridable initializer of the model (they are \
                         named like {})",
                        parameter.name,
                        names.join(", ")
                    )
                }));
            };
            if target.dtype != parameter.dtype || target.dims != parameter.dims {
                return Err(fail(format!(
                    "tensor {:?} is {} {:?}, the model's is {} {:?}",
                    parameter.name, parameter.dtype, parameter.dims, target.dtype, target.dims
                )));
            }
            let expected = target.dtype.storage_bytes(target.n_elements());
            if expected.is_some_and(|n| n != parameter.raw_data.len()) {
                return Err(fail(format!(
                    "tensor {:?} carries {} bytes, {} {:?} needs {}",
                    parameter.name,
                    parameter.raw_data.len(),
                    target.dtype,
                    target.dims,
                    expected.unwrap_or(0)
                )));
            }
        }
        Ok(())
    }

    /// Replaces the values of the model's initializers with the adapter's, after
    /// [`OnnxAdapter::check_against`]. Returns how many tensors were replaced.
    pub fn load_into(&self, model: &mut Model, source: &Path) -> Result<usize> {
        self.check_against(model, source)?;
        for parameter in &self.parameters {
            if let Some(target) = model
                .graph
                .initializers
                .iter_mut()
                .find(|t| t.name == parameter.name)
            {
                target.data = TensorData::Raw(parameter.raw_data.clone().into());
            }
        }
        Ok(self.parameters.len())
    }
}

fn padding_to(length: usize, alignment: usize) -> usize {
    (alignment - length % alignment) % alignment
}

/// What [`export`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportReport {
    /// Tensors in the adapter file.
    pub n_parameters: usize,
    /// Bytes of tensor data in the adapter file.
    pub adapter_bytes: usize,
}

/// Writes a patched model for ONNX Runtime's multi-adapter serving into `dir`:
/// `model.onnx`, the patched graph whose trainable tensors are overridable initializers holding
/// neutral defaults (so that the graph alone computes the base model), and
/// `adapter.onnx_adapter`, the trainable tensors' current values, fed by name at run time.
///
/// Neutral defaults: low-rank factors are zero and scale vectors one; tensors trained in place
/// (BitFit) and trainable tensors without a fold keep the values `model` stores, which are the
/// base values when trained values are loaded afterwards rather than stored in the model.
/// `dir` (created if needed) should be a fresh folder: the two files are written one after
/// the other, each atomically; `graft export` writes them into a
/// [`StagedFolder`](crate::staged_folder::StagedFolder) so that they replace an earlier export
/// as one set. A failure leaves no temporary file, and never removes an existing file.
pub fn export(model: &Model, dir: &Path) -> Result<ExportReport> {
    let record = crate::patch::read_record(model)?;
    if record.trainable().next().is_none() {
        return Err(Error::Config(
            "the model has no trainable tensors to export (it was not written by `graft apply`)"
                .into(),
        ));
    }
    let adapter = OnnxAdapter::from_trainable(model)?;
    let mut graph_model = model.clone();
    for fold in &record.folds {
        let (neutral, names): (f32, Vec<&str>) = match fold {
            Fold::LowRank { a, b, .. } => (0.0, vec![a, b]),
            Fold::ScaleOutput { vector, .. } | Fold::ScaleInput { vector, .. } => {
                (1.0, vec![vector])
            }
            Fold::InPlace { .. } => continue,
            Fold::Delta { weight, .. } => {
                return Err(Error::Config(format!(
                    "the branch on {weight:?} is a delta fold, which has no neutral value an \
                     ONNX Runtime adapter could default to; export it as a patched graph or merge it"
                )))
            }
            Fold::Bake { value, .. } => {
                return Err(Error::Config(format!(
                    "{value:?} is computed by a subgraph to bake; merge the model before an \
                     ONNX Runtime adapter export"
                )))
            }
        };
        for name in names {
            set_constant(&mut graph_model, name, neutral)?;
        }
    }
    let model_bytes = crate::onnx::to_bytes(&graph_model)?;
    let adapter_bytes = adapter.to_bytes();

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::atomic_file::write_atomically(&dir.join(ADAPTER_FILE), &adapter_bytes)?;
    crate::pause::point(&format!("file-written:{ADAPTER_FILE}"));
    crate::atomic_file::write_atomically(&dir.join(MODEL_FILE), &model_bytes)?;
    Ok(ExportReport {
        n_parameters: adapter.parameters.len(),
        adapter_bytes: adapter.parameters.iter().map(|p| p.raw_data.len()).sum(),
    })
}

/// Fills the initializer `name` with `value`, in its own floating-point type.
fn set_constant(model: &mut Model, name: &str, value: f32) -> Result<()> {
    let tensor = model
        .graph
        .initializer_mut(name)
        .ok_or_else(|| Error::Tensor {
            name: name.to_owned(),
            reason: "a recorded fold names it, but the model has no initializer of that name"
                .into(),
        })?;
    let values = vec![value; tensor.n_elements()];
    tensor.set_float_values(tensor.dims.clone(), &values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OnnxAdapter {
        OnnxAdapter {
            adapter_version: 3,
            model_version: 7,
            parameters: vec![
                AdapterParameter {
                    name: "lora.a".into(),
                    dims: vec![3, 2],
                    dtype: DataType::Float,
                    raw_data: (0..24).collect(),
                },
                AdapterParameter {
                    name: "odd".into(),
                    dims: vec![5],
                    dtype: DataType::Uint8,
                    raw_data: vec![1, 2, 3, 4, 5],
                },
                AdapterParameter {
                    name: "scalar".into(),
                    dims: vec![],
                    dtype: DataType::Double,
                    raw_data: 2.5f64.to_le_bytes().to_vec(),
                },
            ],
        }
    }

    #[test]
    fn round_trips_with_aligned_data() {
        let adapter = sample();
        let bytes = adapter.to_bytes();
        assert!(is_onnx_adapter(&bytes));
        let back = OnnxAdapter::from_bytes(&bytes, Path::new("mem")).unwrap();
        assert_eq!(back, adapter);
        let root = flatbuffers::root::<AdapterTable>(&bytes).unwrap();
        let tables = unsafe {
            root.0
                .get::<ForwardsUOffset<Vector<ForwardsUOffset<ParameterTable>>>>(
                    fields::ADAPTER_PARAMETERS,
                    None,
                )
        };
        for table in tables.unwrap().iter() {
            let data = unsafe {
                table
                    .0
                    .get::<ForwardsUOffset<Vector<u8>>>(fields::PARAMETER_RAW_DATA, None)
            }
            .unwrap();
            let offset = data.bytes().as_ptr() as usize - bytes.as_ptr() as usize;
            assert_eq!(offset % 8, 0, "raw_data at offset {offset}");
        }
    }

    #[test]
    fn rejects_corrupt_files_with_their_name() {
        let mut bytes = sample().to_bytes();
        let error = OnnxAdapter::from_bytes(&bytes[..bytes.len() / 2], Path::new("a.onnx_adapter"))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("a.onnx_adapter: not a valid"), "{error}");
        bytes[4] = b'X';
        let error = OnnxAdapter::from_bytes(&bytes, Path::new("b"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"TORT\""), "{error}");
    }
}
