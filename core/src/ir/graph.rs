//! The editable model: a graph of ONNX nodes wired by value names, initializers as [`Tensor`]s,
//! and everything else a model file carries, kept so that a load → save round trip loses nothing.

use std::collections::HashSet;
use std::path::PathBuf;

use onnx_protobuf::{
    AttributeProto, FunctionProto, SparseTensorProto, StringStringEntryProto, TensorAnnotation,
    TrainingInfoProto, ValueInfoProto,
};

use super::{DataType, Tensor};
use crate::{Error, Result};

/// An ONNX node. Inputs and outputs are value names; an empty input name is an omitted optional
/// input. Attributes are kept in their ONNX form so that subgraphs and unknown attribute types
/// survive unchanged.
#[derive(Clone, Debug, Default)]
pub struct Node {
    /// The node's name (may be empty in the file; never relied upon).
    pub name: String,
    /// The operator type, e.g. `MatMul`.
    pub op_type: String,
    /// The operator domain; empty for the default ONNX domain.
    pub domain: String,
    /// The `overload` field of ONNX 1.16+ (function overloads).
    pub overload: String,
    /// Input value names, in slot order.
    pub inputs: Vec<String>,
    /// Output value names, in slot order.
    pub outputs: Vec<String>,
    /// Attributes in ONNX form.
    pub attributes: Vec<AttributeProto>,
    /// `doc_string`, kept for the round trip.
    pub doc_string: String,
    /// Node metadata (dynamo's `pkg.torch.onnx.name_scopes` lives here).
    pub metadata: Vec<(String, String)>,
}

impl Node {
    /// A default-domain node with no attributes.
    pub fn new(
        name: impl Into<String>,
        op_type: impl Into<String>,
        inputs: Vec<String>,
        outputs: Vec<String>,
    ) -> Self {
        Node {
            name: name.into(),
            op_type: op_type.into(),
            inputs,
            outputs,
            ..Node::default()
        }
    }

    /// The attribute called `name`, if present.
    pub fn attribute(&self, name: &str) -> Option<&AttributeProto> {
        self.attributes.iter().find(|a| a.name == name)
    }

    /// An integer attribute, or `default` when absent.
    pub fn attr_int(&self, name: &str, default: i64) -> i64 {
        self.attribute(name).map_or(default, |a| a.i)
    }

    /// A float attribute, or `default` when absent.
    pub fn attr_float(&self, name: &str, default: f32) -> f32 {
        self.attribute(name).map_or(default, |a| a.f)
    }

    /// An integer-list attribute, or `None` when absent.
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attribute(name).map(|a| a.ints.as_slice())
    }

    /// A string attribute (lossy UTF-8), or `None` when absent.
    pub fn attr_string(&self, name: &str) -> Option<String> {
        self.attribute(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }

    /// The value of a node metadata entry.
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The input at `slot` if it is present (not omitted).
    pub fn input(&self, slot: usize) -> Option<&str> {
        self.inputs
            .get(slot)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Whether this is a default-domain node of type `op_type`.
    pub fn is(&self, op_type: &str) -> bool {
        self.op_type == op_type && (self.domain.is_empty() || self.domain == "ai.onnx")
    }
}

/// A symbolic or fixed dimension.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A known size.
    Fixed(i64),
    /// A named symbolic size (`batch`, `sequence_length`, ...).
    Symbol(String),
    /// A size nobody named.
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// The element type and (possibly partial) shape of a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueType {
    /// The element type, when known.
    pub dtype: Option<DataType>,
    /// The shape, when the rank is known.
    pub shape: Option<Vec<Dim>>,
}

/// A graph input, output or annotated intermediate value. The original message is kept so that
/// non-tensor types (sequences, maps, optionals), denotations and metadata round-trip.
#[derive(Clone, Debug)]
pub struct ValueInfo {
    /// The value's name.
    pub name: String,
    /// The ONNX message as loaded or built.
    pub proto: ValueInfoProto,
}

impl ValueInfo {
    /// A tensor value with the given element type and shape.
    pub fn tensor(name: impl Into<String>, dtype: DataType, shape: &[Dim]) -> Self {
        use onnx_protobuf::tensor_shape_proto::{dimension::Value, Dimension};
        let name = name.into();
        let mut proto = ValueInfoProto::new();
        proto.name = name.clone();
        let mut tensor = onnx_protobuf::type_proto::Tensor::new();
        tensor.elem_type = dtype.code();
        let mut shape_proto = onnx_protobuf::TensorShapeProto::new();
        for dim in shape {
            let mut d = Dimension::new();
            d.value = match dim {
                Dim::Fixed(n) => Some(Value::DimValue(*n)),
                Dim::Symbol(s) => Some(Value::DimParam(s.clone())),
                Dim::Unknown => None,
            };
            shape_proto.dim.push(d);
        }
        tensor.shape = Some(shape_proto).into();
        let mut ty = onnx_protobuf::TypeProto::new();
        ty.value = Some(onnx_protobuf::type_proto::Value::TensorType(tensor));
        proto.type_ = Some(ty).into();
        ValueInfo { name, proto }
    }

    /// The tensor type this value declares; `None` for non-tensor or untyped values.
    pub fn value_type(&self) -> Option<ValueType> {
        use onnx_protobuf::tensor_shape_proto::dimension::Value;
        let ty = self.proto.type_.as_ref()?;
        let Some(onnx_protobuf::type_proto::Value::TensorType(tensor)) = &ty.value else {
            return None;
        };
        let shape = tensor.shape.as_ref().map(|shape| {
            shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(Value::DimValue(n)) => Dim::Fixed(*n),
                    Some(Value::DimParam(s)) => Dim::Symbol(s.clone()),
                    _ => Dim::Unknown,
                })
                .collect()
        });
        Some(ValueType {
            dtype: DataType::from_code(tensor.elem_type),
            shape,
        })
    }
}

/// An ONNX graph. Nodes are kept in the file's order, which ONNX requires to be topological.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// The graph's name.
    pub name: String,
    /// `doc_string`, kept for the round trip.
    pub doc_string: String,
    /// Nodes in topological order.
    pub nodes: Vec<Node>,
    /// Graph inputs (including, in IR < 4 files, inputs that initializers back).
    pub inputs: Vec<ValueInfo>,
    /// Graph outputs.
    pub outputs: Vec<ValueInfo>,
    /// Type annotations of intermediate values.
    pub value_infos: Vec<ValueInfo>,
    /// Initializers by position; [`Graph::initializer`] looks one up by name.
    pub initializers: Vec<Tensor>,
    /// Sparse initializers, kept as loaded.
    pub sparse_initializers: Vec<SparseTensorProto>,
    /// Quantization annotations, kept as loaded.
    pub quantization_annotations: Vec<TensorAnnotation>,
    /// Graph metadata.
    pub metadata: Vec<(String, String)>,
}

impl Graph {
    /// The initializer called `name`.
    pub fn initializer(&self, name: &str) -> Option<&Tensor> {
        self.initializers.iter().find(|t| t.name == name)
    }

    /// The initializer named `name`, to change.
    pub fn initializer_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.initializers.iter_mut().find(|t| t.name == name)
    }

    /// Every value name defined in the graph: inputs, initializers and node outputs.
    pub fn defined_values(&self) -> HashSet<&str> {
        let mut defined: HashSet<&str> = self.inputs.iter().map(|v| v.name.as_str()).collect();
        defined.extend(self.initializers.iter().map(|t| t.name.as_str()));
        for node in &self.nodes {
            defined.extend(
                node.outputs
                    .iter()
                    .filter(|o| !o.is_empty())
                    .map(String::as_str),
            );
        }
        defined
    }

    /// Turns each of `names` that is an initializer into a graph input of the same element type
    /// and fixed shape (unless an input of that name exists already), so that its values are fed
    /// at run time. Other names are left alone.
    pub fn initializers_to_inputs<S: AsRef<str>>(&mut self, names: &[S]) {
        for name in names.iter().map(AsRef::as_ref) {
            let Some(position) = self.initializers.iter().position(|t| t.name == name) else {
                continue;
            };
            let initializer = self.initializers.remove(position);
            if !self.inputs.iter().any(|i| i.name == name) {
                let dims: Vec<Dim> = initializer.dims.iter().map(|&d| Dim::Fixed(d)).collect();
                (self.inputs).push(ValueInfo::tensor(name, initializer.dtype, &dims));
            }
        }
    }

    /// Every name a new value or node must not take: the defined values and the node names.
    pub fn taken_names(&self) -> HashSet<String> {
        let defined = self.defined_values().into_iter().map(str::to_owned);
        let nodes = self.nodes.iter().map(|n| n.name.clone());
        defined.chain(nodes).filter(|n| !n.is_empty()).collect()
    }

    /// `stem` if `taken` says it is free, else the first free one of `stem.1`, `stem.2`, …
    pub fn first_free_name(stem: &str, taken: impl Fn(&str) -> bool) -> String {
        (0..)
            .map(|i| match i {
                0 => stem.to_owned(),
                i => format!("{stem}.{i}"),
            })
            .find(|name| !taken(name))
            .expect("an unbounded search finds a free name")
    }

    /// Every value name something reads: node inputs and graph outputs (subgraph bodies not
    /// included).
    pub fn read_values(&self) -> HashSet<&str> {
        (self.nodes.iter())
            .flat_map(|n| n.inputs.iter().map(String::as_str))
            .chain(self.outputs.iter().map(|o| o.name.as_str()))
            .collect()
    }

    /// Checks that every node input is defined before use, that no value is defined twice, and
    /// that every graph output is defined. Subgraph bodies (If/Loop/Scan) may read outer values,
    /// so only this graph's own wiring is checked.
    pub fn validate(&self) -> Result<()> {
        let mut defined: HashSet<&str> = HashSet::new();
        for input in &self.inputs {
            defined.insert(&input.name);
        }
        for tensor in &self.initializers {
            // IR < 4 lists initializers among the inputs too; that is not a clash.
            defined.insert(&tensor.name);
        }
        for node in &self.nodes {
            for input in node.inputs.iter().filter(|i| !i.is_empty()) {
                if !defined.contains(input.as_str()) {
                    return Err(Error::InvalidGraph(format!(
                        "node {:?} ({}) reads {input:?}, which is not defined before it",
                        node.name, node.op_type
                    )));
                }
            }
            for output in node.outputs.iter().filter(|o| !o.is_empty()) {
                if !defined.insert(output) {
                    return Err(Error::InvalidGraph(format!(
                        "node {:?} ({}) defines {output:?}, which is already defined",
                        node.name, node.op_type
                    )));
                }
            }
        }
        for output in &self.outputs {
            if !defined.contains(output.name.as_str()) {
                return Err(Error::InvalidGraph(format!(
                    "graph output {:?} is not defined",
                    output.name
                )));
            }
        }
        Ok(())
    }
}

/// A whole ONNX model: the graph plus the file-level fields.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// ONNX IR version.
    pub ir_version: i64,
    /// Operator-set imports as (domain, version); the default domain is `""`.
    pub opset_imports: Vec<(String, i64)>,
    /// Producer name (e.g. `pytorch`).
    pub producer_name: String,
    /// Producer version.
    pub producer_version: String,
    /// Model domain.
    pub domain: String,
    /// Model version.
    pub model_version: i64,
    /// `doc_string`.
    pub doc_string: String,
    /// Model metadata; graft records trainable tensors and methods here.
    pub metadata: Vec<(String, String)>,
    /// The main graph.
    pub graph: Graph,
    /// Model-local functions, kept as loaded.
    pub functions: Vec<FunctionProto>,
    /// Training info, kept as loaded.
    pub training_info: Vec<TrainingInfoProto>,
    /// The folder the model was loaded from; external-data locations are relative to it.
    pub base_dir: Option<PathBuf>,
}

impl Model {
    /// The default-domain opset version (0 if the model does not import it).
    pub fn opset(&self) -> i64 {
        self.opset_imports
            .iter()
            .find(|(domain, _)| domain.is_empty() || domain == "ai.onnx")
            .map_or(0, |(_, version)| *version)
    }

    /// The value of a model metadata entry.
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets (replacing) a model metadata entry.
    pub fn set_metadata(&mut self, key: &str, value: String) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_owned(), value)),
        }
    }

    /// Total number of elements in floating-point initializers (the model's parameters).
    pub fn n_params(&self) -> usize {
        self.graph
            .initializers
            .iter()
            .filter(|t| t.dtype.is_float())
            .map(Tensor::n_elements)
            .sum()
    }
}

pub(crate) fn entries_from_proto(entries: &[StringStringEntryProto]) -> Vec<(String, String)> {
    entries
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect()
}

pub(crate) fn entries_to_proto(entries: &[(String, String)]) -> Vec<StringStringEntryProto> {
    entries
        .iter()
        .map(|(key, value)| {
            let mut entry = StringStringEntryProto::new();
            entry.key = key.clone();
            entry.value = value.clone();
            entry
        })
        .collect()
}
