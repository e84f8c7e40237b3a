//! Writing the IR back to ONNX files, atomically, with tensor data inline or external.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{
    GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto,
};

use super::checksum;
use crate::atomic_file::{AtomicFile, NewFile};
use crate::ir::{entries_to_proto, Graph, Model, Node, Tensor, TensorData};
use crate::{Error, Result};

/// Protobuf cannot encode a message of 2 GiB or more; above this many bytes of tensor data graft
/// moves tensors to an external file on its own.
const INLINE_LIMIT_BYTES: usize = 1 << 30;

/// Tensors smaller than this stay inline when data goes external (as the `onnx` package does).
const EXTERNAL_THRESHOLD_BYTES: usize = 1024;

/// Where tensor bytes go when a model is saved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DataPlacement {
    /// Keep tensors that already live in an external file in the output's folder where they are
    /// (nothing is read or copied); write everything else inline, unless that would exceed what
    /// protobuf can hold, in which case large tensors go to `<output file name>.data`.
    #[default]
    Auto,
    /// Every tensor inline; fails if the model would exceed protobuf's 2 GiB limit.
    Inline,
    /// Every tensor of at least 1 KiB in this file (a plain file name, written beside the model).
    External(String),
}

/// Options for [`save`].
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    /// Where tensor bytes go.
    pub placement: DataPlacement,
}

/// Writes `model` to `path`. Each file is written to a temporary file in the destination folder
/// and put in place whole, the external data (if any) before the model that reads it, so a
/// failure or a kill never leaves a half-written output and never a model reading data that
/// was not written for it.
///
/// Refused with [`Error::Config`] before anything is written: an output path that is one of the
/// external-data files the model reads (writing it would destroy the weights of every model
/// reading that file), and an external-data name equal to the model's own file name. An
/// external-data file is never overwritten: when a file of that name exists with other bytes,
/// the save fails ([`DataPlacement::External`]) or picks the next free name
/// `<output>.<n>.data` ([`DataPlacement::Auto`]); one with the same bytes is kept as it is.
///
/// Every initializer's checksum is recorded in the model's metadata (see
/// [`checksum`](super::checksum)) for [`verify`](super::verify); tensors left in place in an
/// existing external file are not read for it: they keep the checksum the model already
/// recorded, if any.
pub fn save(model: &Model, path: &Path, options: &SaveOptions) -> Result<()> {
    let out_dir = crate::atomic_file::parent_dir(path).to_path_buf();
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model.onnx")
        .to_owned();
    refuse_overwriting_read_data(model, path)?;
    let total_bytes: usize = model.graph.initializers.iter().map(Tensor::byte_len).sum();
    let out_dir_canonical = out_dir.canonicalize().ok();
    let in_out_dir = |tensor: &Tensor| match &tensor.data {
        TensorData::External { file, .. } => out_dir_canonical.as_deref() == file.path.parent(),
        _ => false,
    };
    let (mut writer, data_names) = match &options.placement {
        DataPlacement::Inline => {
            if total_bytes >= INLINE_LIMIT_BYTES * 2 - (64 << 20) {
                return Err(Error::Config(format!(
                    "{}: {total_bytes} bytes of tensors do not fit in one protobuf message; use external data",
                    path.display()
                )));
            }
            (DataWriter::inline(), Vec::new())
        }
        DataPlacement::External(name) => {
            if *name == file_name {
                return Err(Error::Config(format!(
                    "{}: the external data file cannot be the model file itself; choose another name",
                    path.display()
                )));
            }
            (DataWriter::external(path, name, false)?, vec![name.clone()])
        }
        DataPlacement::Auto => {
            let inline_bytes: usize = model
                .graph
                .initializers
                .iter()
                .filter(|t| !in_out_dir(t))
                .map(Tensor::byte_len)
                .sum();
            if inline_bytes > INLINE_LIMIT_BYTES {
                let names: Vec<String> = std::iter::once(format!("{file_name}.data"))
                    .chain((1..100).map(|n| format!("{file_name}.{n}.data")))
                    .collect();
                (DataWriter::external(path, &names[0], true)?, names)
            } else {
                let writer = DataWriter {
                    keep_existing: true,
                    ..DataWriter::inline()
                };
                (writer, Vec::new())
            }
        }
    };
    writer.out_dir_canonical = out_dir_canonical.clone();
    writer.checksums.previous = checksum::recorded(model).unwrap_or_default();
    let mut proto = model_to_proto(model, &mut writer)?;
    if let Some((mut data, written)) = writer.finish() {
        crate::pause::point(&format!("data-written:{file_name}"));
        let chosen = link_data_file(&mut data, &out_dir, &data_names, &options.placement)?;
        if chosen != data_names[0] {
            relocate(&mut proto, &written, &chosen);
        }
        crate::pause::point(&format!("data-committed:{file_name}"));
    }
    let bytes = proto
        .write_to_bytes()
        .map_err(|e| Error::Config(format!("{}: cannot encode the model: {e}", path.display())))?;
    let mut file = AtomicFile::create(path)?;
    file.write_all(&bytes)?;
    file.commit()
}

/// Fails when `path` is (by device and inode) one of the external-data files `model` reads.
fn refuse_overwriting_read_data(model: &Model, path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(existing) = std::fs::metadata(path) else {
        return Ok(());
    };
    let read = model
        .graph
        .initializers
        .iter()
        .find_map(|tensor| match &tensor.data {
            TensorData::External { file, location, .. }
                if file.identity() == (existing.dev(), existing.ino()) =>
            {
                Some((tensor.name.clone(), location.clone()))
            }
            _ => None,
        });
    match read {
        Some((tensor, location)) => Err(Error::Config(format!(
            "{}: is the external-data file {location:?} that the model reads (tensor \
             {tensor:?}, and every model saved beside it); writing the output there would \
             destroy those weights: choose another output path",
            path.display()
        ))),
        None => Ok(()),
    }
}

/// Gives the written external data the first of `names` that is free or already holds the same
/// bytes; returns that name.
fn link_data_file(
    data: &mut AtomicFile,
    out_dir: &Path,
    names: &[String],
    placement: &DataPlacement,
) -> Result<String> {
    for name in names {
        match data.link_new(name)? {
            NewFile::Created | NewFile::Identical => return Ok(name.clone()),
            NewFile::Differs if matches!(placement, DataPlacement::Auto) => continue,
            NewFile::Differs => break,
        }
    }
    Err(Error::Config(format!(
        "{}: already exists with other contents; graft never overwrites an external-data file \
         (other models may read it, and a model cannot be replaced together with its data): \
         remove it or choose another external-data name",
        out_dir
            .join(names.last().map_or("", String::as_str))
            .display()
    )))
}

/// Points the external data of the tensors `written` at `location`.
fn relocate(proto: &mut ModelProto, written: &[String], location: &str) {
    let Some(graph) = proto.graph.as_mut() else {
        return;
    };
    for tensor in graph
        .initializer
        .iter_mut()
        .filter(|t| written.contains(&t.name))
    {
        for entry in tensor
            .external_data
            .iter_mut()
            .filter(|e| e.key == "location")
        {
            entry.value = location.to_owned();
        }
    }
}

/// Replaces the checksum entry of `proto`'s metadata with `checksums` (none when empty).
fn record_checksums(proto: &mut ModelProto, checksums: &BTreeMap<String, u32>) {
    proto
        .metadata_props
        .retain(|entry| entry.key != checksum::METADATA_KEY);
    if !checksums.is_empty() {
        let mut entry = StringStringEntryProto::new();
        entry.key = checksum::METADATA_KEY.to_owned();
        entry.value = checksum::to_metadata(checksums);
        proto.metadata_props.push(entry);
    }
}

/// Decides, tensor by tensor, whether bytes go inline, stay where they are, or go to the
/// external file being written.
struct DataWriter {
    keep_existing: bool,
    external: Option<ExternalFile>,
    out_dir_canonical: Option<PathBuf>,
    /// The checksums being recorded.
    checksums: Checksums,
}

/// The checksums of a save: those the model recorded before, and those of the output.
#[derive(Default)]
struct Checksums {
    previous: HashMap<String, u32>,
    written: BTreeMap<String, u32>,
}

impl Checksums {
    /// Records `crc` as the checksum of `tensor`.
    fn record(&mut self, tensor: &Tensor, crc: u32) {
        self.written.insert(tensor.name.clone(), crc);
    }

    /// Keeps the checksum recorded before for `tensor`, whose bytes stay where they were.
    fn keep(&mut self, tensor: &Tensor) {
        if let Some(&crc) = self.previous.get(&tensor.name) {
            self.written.insert(tensor.name.clone(), crc);
        }
    }
}

/// The external-data file being written.
struct ExternalFile {
    name: String,
    file: AtomicFile,
    position: usize,
    /// The tensors written to it.
    written: Vec<String>,
}

impl DataWriter {
    fn inline() -> Self {
        DataWriter {
            keep_existing: false,
            external: None,
            out_dir_canonical: None,
            checksums: Checksums::default(),
        }
    }

    /// A writer of an external-data file `name` beside the model file `model_path`.
    fn external(model_path: &Path, name: &str, keep_existing: bool) -> Result<Self> {
        if name.is_empty() || Path::new(name).file_name().and_then(|n| n.to_str()) != Some(name) {
            return Err(Error::Config(format!(
                "external data file {name:?} must be a plain file name (it is written beside the model)"
            )));
        }
        let file = AtomicFile::create(&model_path.with_file_name(name))?;
        Ok(DataWriter {
            keep_existing,
            external: Some(ExternalFile {
                name: name.to_owned(),
                file,
                position: 0,
                written: Vec::new(),
            }),
            out_dir_canonical: None,
            checksums: Checksums::default(),
        })
    }

    fn place(&mut self, tensor: &Tensor, proto: &mut TensorProto) -> Result<()> {
        if let TensorData::External {
            file,
            location,
            offset,
            length,
        } = &tensor.data
        {
            let same_dir = self.out_dir_canonical.as_deref() == file.path.parent();
            if self.keep_existing && same_dir {
                set_external(proto, location, *offset, *length);
                self.checksums.keep(tensor);
                return Ok(());
            }
        }
        let bytes = tensor.raw_bytes()?;
        self.checksums.record(tensor, checksum::crc32(bytes));
        match &mut self.external {
            Some(external) if bytes.len() >= EXTERNAL_THRESHOLD_BYTES => {
                let alignment = if bytes.len() >= 1 << 20 { 4096 } else { 64 };
                let padding = external.position.next_multiple_of(alignment) - external.position;
                external.file.write_all(&vec![0; padding])?;
                external.position += padding;
                external.file.write_all(bytes)?;
                set_external(proto, &external.name, external.position, bytes.len());
                external.position += bytes.len();
                external.written.push(tensor.name.clone());
            }
            _ => proto.raw_data = bytes.to_vec(),
        }
        Ok(())
    }

    /// The external-data file written, if any, and the tensors in it.
    fn finish(self) -> Option<(AtomicFile, Vec<String>)> {
        self.external.map(|e| (e.file, e.written))
    }
}

fn set_external(proto: &mut TensorProto, location: &str, offset: usize, length: usize) {
    proto.data_location = DataLocation::EXTERNAL.into();
    proto.external_data = entries_to_proto(&[
        ("location".into(), location.into()),
        ("offset".into(), offset.to_string()),
        ("length".into(), length.to_string()),
    ]);
}

/// The model message, its tensors placed by `writer` and their checksums recorded in its
/// metadata (see [`checksum`](super::checksum)).
fn model_to_proto(model: &Model, writer: &mut DataWriter) -> Result<ModelProto> {
    let mut proto = ModelProto::new();
    proto.ir_version = model.ir_version;
    proto.opset_import = model
        .opset_imports
        .iter()
        .map(|(domain, version)| {
            let mut opset = OperatorSetIdProto::new();
            opset.domain = domain.clone();
            opset.version = *version;
            opset
        })
        .collect();
    proto.producer_name = model.producer_name.clone();
    proto.producer_version = model.producer_version.clone();
    proto.domain = model.domain.clone();
    proto.model_version = model.model_version;
    proto.doc_string = model.doc_string.clone();
    proto.metadata_props = entries_to_proto(&model.metadata);
    proto.graph = Some(graph_to_proto(&model.graph, writer)?).into();
    proto.functions = model.functions.clone();
    proto.training_info = model.training_info.clone();
    record_checksums(&mut proto, &writer.checksums.written);
    Ok(proto)
}

fn graph_to_proto(graph: &Graph, writer: &mut DataWriter) -> Result<GraphProto> {
    let mut proto = GraphProto::new();
    proto.name = graph.name.clone();
    proto.doc_string = graph.doc_string.clone();
    proto.node = graph.nodes.iter().map(node_to_proto).collect();
    proto.input = graph.inputs.iter().map(|v| v.proto.clone()).collect();
    proto.output = graph.outputs.iter().map(|v| v.proto.clone()).collect();
    proto.value_info = graph.value_infos.iter().map(|v| v.proto.clone()).collect();
    proto.initializer = graph
        .initializers
        .iter()
        .map(|t| tensor_to_proto(t, writer))
        .collect::<Result<_>>()?;
    proto.sparse_initializer = graph.sparse_initializers.clone();
    proto.quantization_annotation = graph.quantization_annotations.clone();
    proto.metadata_props = entries_to_proto(&graph.metadata);
    Ok(proto)
}

fn node_to_proto(node: &Node) -> NodeProto {
    let mut proto = NodeProto::new();
    proto.name = node.name.clone();
    proto.op_type = node.op_type.clone();
    proto.domain = node.domain.clone();
    proto.overload = node.overload.clone();
    proto.input = node.inputs.clone();
    proto.output = node.outputs.clone();
    proto.attribute = node.attributes.clone();
    proto.doc_string = node.doc_string.clone();
    proto.metadata_props = entries_to_proto(&node.metadata);
    proto
}

/// The ONNX message for one tensor, with its bytes placed by `writer`.
fn tensor_to_proto(tensor: &Tensor, writer: &mut DataWriter) -> Result<TensorProto> {
    if let TensorData::Opaque(proto) = &tensor.data {
        writer
            .checksums
            .record(tensor, checksum::tensor_crc32(tensor)?);
        return Ok((**proto).clone());
    }
    let mut proto = TensorProto::new();
    proto.name = tensor.name.clone();
    proto.data_type = tensor.dtype.code();
    proto.dims = tensor.dims.clone();
    proto.doc_string = tensor.doc_string.clone();
    writer.place(tensor, &mut proto)?;
    Ok(proto)
}

/// The model serialized with every tensor inline (for in-memory sessions, files written as
/// bytes, and tests; fails above protobuf's 2 GiB limit), with its tensors' checksums recorded
/// as [`save`] records them.
pub fn to_bytes(model: &Model) -> Result<Vec<u8>> {
    let proto = model_to_proto(model, &mut DataWriter::inline())?;
    proto
        .write_to_bytes()
        .map_err(|e| Error::Config(format!("cannot encode the model: {e}")))
}
