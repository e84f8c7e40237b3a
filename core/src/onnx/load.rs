//! Parsing ONNX model files into the IR, with external data mapped (never read) on load.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{GraphProto, Message, ModelProto, NodeProto, TensorProto};

use crate::ir::{
    entries_from_proto, DataType, Graph, MappedFile, Model, Node, Tensor, TensorData, ValueInfo,
};
use crate::{Error, Result};

/// Loads the ONNX model at `path`. External data is resolved relative to the model's folder and
/// mapped, not read. Fails with a message naming the file for anything that is not a valid model:
/// empty or truncated files, missing external data, or external-data locations that leave the
/// model's folder (absolute paths, `..`, symbolic links), anything that is not a regular file
/// (a FIFO or a device, as the model or as its external data), and a graph with a cycle.
pub fn load(path: &Path) -> Result<Model> {
    let bytes = crate::input_file::read(path)?;
    let base_dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."));
    load_from_bytes(&bytes, Some(base_dir), path)
}

/// Parses a model from memory. `base_dir` is where external data lives (`None` refuses external
/// data); `path` names the model in error messages.
pub fn load_from_bytes(bytes: &[u8], base_dir: Option<&Path>, path: &Path) -> Result<Model> {
    let invalid = |reason: String| Error::InvalidModel {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.is_empty() {
        return Err(invalid("the file is empty".into()));
    }
    let proto = ModelProto::parse_from_bytes(bytes).map_err(|e| {
        invalid(format!(
            "protobuf decoding failed ({e}); the file is truncated or not ONNX"
        ))
    })?;
    if proto.ir_version <= 0 {
        return Err(invalid(format!(
            "ir_version is {}, expected ≥ 1",
            proto.ir_version
        )));
    }
    let Some(graph_proto) = proto.graph.into_option() else {
        return Err(invalid("the model has no graph".into()));
    };
    let mut loader = TensorLoader {
        model_path: path.to_path_buf(),
        base_dir: base_dir.map(Path::to_path_buf),
        base: None,
        mapped: HashMap::new(),
    };
    let graph = loader.graph(graph_proto)?;
    if let Some(node) = crate::patch::node_on_cycle(&graph) {
        return Err(invalid(format!(
            "the graph has a cycle through node {:?} ({}); an ONNX graph must have none",
            node.name, node.op_type
        )));
    }
    Ok(Model {
        ir_version: proto.ir_version,
        opset_imports: proto
            .opset_import
            .iter()
            .map(|o| (o.domain.clone(), o.version))
            .collect(),
        producer_name: proto.producer_name,
        producer_version: proto.producer_version,
        domain: proto.domain,
        model_version: proto.model_version,
        doc_string: proto.doc_string,
        metadata: entries_from_proto(&proto.metadata_props),
        graph,
        functions: proto.functions,
        training_info: proto.training_info,
        base_dir: base_dir.map(Path::to_path_buf),
    })
}

struct TensorLoader {
    model_path: PathBuf,
    base_dir: Option<PathBuf>,
    /// The model's folder, resolved and opened (on the first external tensor).
    base: Option<(PathBuf, std::fs::File)>,
    /// The external-data files mapped so far, by (device, inode).
    mapped: HashMap<(u64, u64), Arc<MappedFile>>,
}

impl TensorLoader {
    fn graph(&mut self, proto: GraphProto) -> Result<Graph> {
        let initializers = proto
            .initializer
            .into_iter()
            .map(|t| self.tensor(t))
            .collect::<Result<Vec<_>>>()?;
        let value_info = |v: onnx_protobuf::ValueInfoProto| ValueInfo {
            name: v.name.clone(),
            proto: v,
        };
        Ok(Graph {
            name: proto.name,
            doc_string: proto.doc_string,
            nodes: proto.node.into_iter().map(node_from_proto).collect(),
            inputs: proto.input.into_iter().map(value_info).collect(),
            outputs: proto.output.into_iter().map(value_info).collect(),
            value_infos: proto.value_info.into_iter().map(value_info).collect(),
            initializers,
            sparse_initializers: proto.sparse_initializer,
            quantization_annotations: proto.quantization_annotation,
            metadata: entries_from_proto(&proto.metadata_props),
        })
    }

    fn invalid(&self, reason: String) -> Error {
        Error::InvalidModel {
            path: self.model_path.clone(),
            reason,
        }
    }

    fn tensor(&mut self, mut proto: TensorProto) -> Result<Tensor> {
        let name = proto.name.clone();
        let Some(dtype) = DataType::from_code(proto.data_type) else {
            return Err(self.invalid(format!("initializer {name:?} has no data type")));
        };
        let mut n_elements: usize = 1;
        for &dim in &proto.dims {
            n_elements = usize::try_from(dim)
                .ok()
                .and_then(|d| n_elements.checked_mul(d))
                .filter(|&n| {
                    dtype
                        .size_bits()
                        .is_none_or(|bits| n.checked_mul(bits).is_some())
                })
                .ok_or_else(|| {
                    self.invalid(format!(
                        "initializer {name:?} has invalid dims {:?}",
                        proto.dims
                    ))
                })?;
        }
        let expected_bytes = dtype.storage_bytes(n_elements);
        let external = proto.data_location.enum_value() == Ok(DataLocation::EXTERNAL);
        let data = if external {
            self.external(&proto, expected_bytes)?
        } else if !proto.raw_data.is_empty() || n_elements == 0 {
            if let Some(expected) = expected_bytes {
                if proto.raw_data.len() != expected {
                    return Err(self.invalid(format!(
                        "initializer {name:?} holds {} bytes, but {dtype} {:?} needs {expected}",
                        proto.raw_data.len(),
                        proto.dims
                    )));
                }
            }
            TensorData::Raw(std::mem::take(&mut proto.raw_data).into())
        } else {
            match typed_fields_to_raw(&proto, dtype) {
                Some(bytes) if Some(bytes.len()) == expected_bytes => TensorData::Raw(bytes.into()),
                Some(bytes) => {
                    return Err(self.invalid(format!(
                        "initializer {name:?} holds {} bytes of {dtype}, but dims {:?} need {}",
                        bytes.len(),
                        proto.dims,
                        expected_bytes.unwrap_or(0)
                    )))
                }
                None => TensorData::Opaque(Box::new(proto.clone())),
            }
        };
        Ok(Tensor {
            name,
            dtype,
            dims: proto.dims,
            data,
            doc_string: proto.doc_string,
        })
    }

    fn external(
        &mut self,
        proto: &TensorProto,
        expected_bytes: Option<usize>,
    ) -> Result<TensorData> {
        let entry = |key: &str| {
            proto
                .external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.clone())
        };
        let location = entry("location").unwrap_or_default();
        let fail = |reason: String| Error::ExternalData {
            model: self.model_path.clone(),
            tensor: proto.name.clone(),
            location: location.clone(),
            reason,
        };
        let parse_number = |key: &str| -> Result<Option<usize>> {
            entry(key)
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| fail(format!("{key} {v:?} is not a number")))
                })
                .transpose()
        };
        let offset = parse_number("offset")?.unwrap_or(0);
        let length = parse_number("length")?;
        let Some(base_dir) = &self.base_dir else {
            return Err(fail(
                "the model was not loaded from a file, so external data cannot be resolved".into(),
            ));
        };
        let relative = Path::new(&location);
        if location.is_empty() {
            return Err(fail("the location is empty".into()));
        }
        if relative.is_absolute()
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(fail(
                "the location must be a relative path inside the model's folder".into(),
            ));
        }
        let joined = base_dir.join(relative);
        if self.base.is_none() {
            let base = base_dir
                .canonicalize()
                .map_err(|e| fail(format!("cannot resolve the model's folder: {e}")))?;
            let handle = std::fs::File::open(&base)
                .map_err(|e| fail(format!("cannot open the model's folder: {e}")))?;
            self.base = Some((base, handle));
        }
        let Some((base, base_handle)) = &self.base else {
            unreachable!("the model's folder was opened above")
        };
        let opened = crate::input_file::open_beneath(base_handle, relative).map_err(|e| match e
            .raw_os_error()
        {
            Some(libc::EXDEV) => fail("it leads outside the model's folder".into()),
            Some(libc::ELOOP) => fail(
                "it is or passes through a symbolic link; graft follows no links in \
                     external-data locations, so that no file outside the model's folder can \
                     be swapped in"
                    .into(),
            ),
            _ => fail(format!("cannot open {}: {e}", joined.display())),
        })?;
        crate::input_file::check_regular(&opened, &joined).map_err(|e| fail(e.to_string()))?;
        let resolved: PathBuf = base.join(
            relative
                .components()
                .filter(|c| matches!(c, Component::Normal(_)))
                .collect::<PathBuf>(),
        );
        let identity = {
            use std::os::unix::fs::MetadataExt;
            let metadata = opened
                .metadata()
                .map_err(|e| fail(format!("cannot open {}: {e}", joined.display())))?;
            (metadata.dev(), metadata.ino())
        };
        let file = match self.mapped.get(&identity) {
            Some(file) => file.clone(),
            None => {
                let file = Arc::new(
                    MappedFile::map(opened, resolved)
                        .map_err(|e| fail(format!("cannot map: {e}")))?,
                );
                self.mapped.insert(identity, file.clone());
                file
            }
        };
        let length = match length.or(expected_bytes) {
            Some(length) => length,
            None => file.len().saturating_sub(offset),
        };
        if let Some(expected) = expected_bytes {
            if length != expected {
                return Err(fail(format!(
                    "length {length} does not match the {expected} bytes its type and dims need"
                )));
            }
        }
        if offset
            .checked_add(length)
            .is_none_or(|end| end > file.len())
        {
            return Err(fail(format!(
                "bytes {offset}..{} lie beyond the end of the {}-byte file",
                offset.saturating_add(length),
                file.len()
            )));
        }
        Ok(TensorData::External {
            file,
            location,
            offset,
            length,
        })
    }
}

fn node_from_proto(proto: NodeProto) -> Node {
    Node {
        name: proto.name,
        op_type: proto.op_type,
        domain: proto.domain,
        overload: proto.overload,
        inputs: proto.input,
        outputs: proto.output,
        attributes: proto.attribute,
        doc_string: proto.doc_string,
        metadata: entries_from_proto(&proto.metadata_props),
    }
}

/// Converts ONNX typed data fields to raw little-endian bytes, for the types whose field layout
/// is unambiguous; `None` leaves the tensor opaque.
fn typed_fields_to_raw(proto: &TensorProto, dtype: DataType) -> Option<Vec<u8>> {
    fn bytes<T: Copy, const N: usize>(values: &[T], to_le: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|&v| to_le(v)).collect()
    }
    Some(match dtype {
        DataType::Float => bytes(&proto.float_data, f32::to_le_bytes),
        DataType::Double => bytes(&proto.double_data, f64::to_le_bytes),
        DataType::Int32 => bytes(&proto.int32_data, i32::to_le_bytes),
        DataType::Int64 => bytes(&proto.int64_data, i64::to_le_bytes),
        DataType::Uint64 => bytes(&proto.uint64_data, u64::to_le_bytes),
        DataType::Uint32 => bytes(&proto.uint64_data, |v| (v as u32).to_le_bytes()),
        DataType::Int8
        | DataType::Uint8
        | DataType::Bool
        | DataType::Float8e4m3fn
        | DataType::Float8e4m3fnuz
        | DataType::Float8e5m2
        | DataType::Float8e5m2fnuz => bytes(&proto.int32_data, |v| [v as u8]),
        DataType::Int16 | DataType::Uint16 | DataType::Float16 | DataType::Bfloat16 => {
            bytes(&proto.int32_data, |v| (v as u16).to_le_bytes())
        }
        _ => return None,
    })
}
