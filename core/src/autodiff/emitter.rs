//! Emitting new nodes under a name scope: unique node and value names, typed constants, zero
//! tensors, and the opset-dependent forms of reductions and axis operands.

use std::collections::HashSet;

use onnx_protobuf::{AttributeProto, TensorProto};

use crate::analysis::shapes::reduce_axes_are_input;
use crate::ir::attributes::{int_attribute, ints_attribute, tensor_attribute};
use crate::ir::{DataType, Graph, Node};
use crate::{Error, Result};

/// Appends default-domain nodes to a list, naming each `<scope>/<n>` and its outputs
/// `<scope>/<n>:<slot>`, never reusing a name already present in the graph.
pub(crate) struct Emitter {
    nodes: Vec<Node>,
    taken: HashSet<String>,
    scope: String,
    counter: usize,
    opset: i64,
}

impl Emitter {
    /// An emitter of nodes to add to `graph`, at default-domain `opset`: every value and node
    /// name the graph already has is taken.
    pub fn new(graph: &Graph, opset: i64) -> Self {
        Emitter {
            nodes: Vec::new(),
            taken: graph.taken_names(),
            scope: String::new(),
            counter: 0,
            opset,
        }
    }

    /// Names the following nodes `<scope>/<n>`, counting from 0.
    pub fn set_scope(&mut self, scope: String) {
        self.scope = scope;
        self.counter = 0;
    }

    /// The default-domain opset the nodes are built for.
    pub fn opset(&self) -> i64 {
        self.opset
    }

    /// The emitted nodes, in emission order (which is topological).
    pub fn into_nodes(self) -> Vec<Node> {
        self.nodes
    }

    /// Whether `name` is free; claims it if so.
    pub fn claim(&mut self, name: &str) -> bool {
        self.taken.insert(name.to_owned())
    }

    /// A free name derived from `stem` (`stem`, `stem.1`, `stem.2`, ...), claimed.
    pub fn claim_unique(&mut self, stem: &str) -> String {
        let name = Graph::first_free_name(stem, |name| self.taken.contains(name));
        self.taken.insert(name.clone());
        name
    }

    fn fresh_node_name(&mut self) -> String {
        loop {
            let name = format!("{}/{}", self.scope, self.counter);
            self.counter += 1;
            if !self.taken.contains(&name) && !self.taken.contains(&format!("{name}:0")) {
                self.taken.insert(name.clone());
                return name;
            }
        }
    }

    /// Emits a node with `n_outputs` fresh outputs and returns their names.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        n_outputs: usize,
    ) -> Vec<String> {
        let name = self.fresh_node_name();
        let outputs: Vec<String> = (0..n_outputs)
            .map(|slot| self.claim_unique(&format!("{name}:{slot}")))
            .collect();
        self.push(name, op_type, inputs, attributes, outputs.clone());
        outputs
    }

    /// Emits a node whose single output is `output`, a name the caller has already claimed.
    pub fn node_into(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        output: &str,
    ) {
        let name = self.fresh_node_name();
        self.push(name, op_type, inputs, attributes, vec![output.to_owned()]);
    }

    fn push(
        &mut self,
        name: String,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        outputs: Vec<String>,
    ) {
        let mut node = Node::new(
            name,
            op_type,
            inputs.iter().map(|i| (*i).to_owned()).collect(),
            outputs,
        );
        node.attributes = attributes;
        self.nodes.push(node);
    }

    /// Emits a single-output node without attributes.
    pub fn op(&mut self, op_type: &str, inputs: &[&str]) -> String {
        self.op_with(op_type, inputs, Vec::new())
    }

    /// Emits a single-output node with attributes.
    pub fn op_with(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> String {
        self.node(op_type, inputs, attributes, 1).remove(0)
    }

    /// A rank-0 constant of a floating-point `dtype`.
    pub fn scalar(&mut self, value: f64, dtype: DataType) -> Result<String> {
        let tensor = float_tensor(value, dtype, &[])?;
        Ok(self.op_with("Constant", &[], vec![tensor_attribute("value", tensor)]))
    }

    /// A rank-1 int64 constant.
    pub fn ints(&mut self, values: &[i64]) -> String {
        let tensor = int64_tensor(values, &[values.len() as i64]);
        self.op_with("Constant", &[], vec![tensor_attribute("value", tensor)])
    }

    /// A rank-0 int64 constant.
    pub fn int_scalar(&mut self, value: i64) -> String {
        let tensor = int64_tensor(&[value], &[]);
        self.op_with("Constant", &[], vec![tensor_attribute("value", tensor)])
    }

    /// A tensor of `shape` (a rank-1 int64 value) filled with `value` of a floating-point `dtype`.
    pub fn filled(&mut self, shape: &str, value: f64, dtype: DataType) -> Result<String> {
        let tensor = float_tensor(value, dtype, &[1])?;
        Ok(self.op_with(
            "ConstantOfShape",
            &[shape],
            vec![tensor_attribute("value", tensor)],
        ))
    }

    /// An int64 tensor of `shape` (a rank-1 int64 value) filled with `value`.
    pub fn filled_int64(&mut self, shape: &str, value: i64) -> String {
        self.op_with(
            "ConstantOfShape",
            &[shape],
            vec![tensor_attribute("value", int64_fill(value))],
        )
    }

    /// Zeros of `value`'s run-time shape, of a floating-point `dtype`.
    pub fn zeros_like(&mut self, value: &str, dtype: DataType) -> Result<String> {
        let shape = self.op("Shape", &[value]);
        self.filled(&shape, 0.0, dtype)
    }

    /// `Shape(value)[start..end]` (`end` omitted means to the last dimension).
    pub fn shape_slice(&mut self, value: &str, start: i64, end: Option<i64>) -> String {
        let mut attributes = vec![int_attribute("start", start)];
        if let Some(end) = end {
            attributes.push(int_attribute("end", end));
        }
        self.op_with("Shape", &[value], attributes)
    }

    /// A reduction (`ReduceSum`, `ReduceMean`, ...) over `axes` (all axes when `None`), passing
    /// the axes as an input or an attribute as the opset requires.
    pub fn reduce(
        &mut self,
        op_type: &str,
        x: &str,
        axes: Option<&[i64]>,
        keepdims: bool,
    ) -> String {
        let keep = int_attribute("keepdims", i64::from(keepdims));
        let axes_are_input = reduce_axes_are_input(op_type, self.opset);
        match axes {
            None => self.op_with(op_type, &[x], vec![keep]),
            Some(axes) if axes_are_input => {
                let axes = self.ints(axes);
                self.op_with(op_type, &[x, &axes], vec![keep])
            }
            Some(axes) => self.op_with(op_type, &[x], vec![keep, ints_attribute("axes", axes)]),
        }
    }

    /// `Unsqueeze(x, axes)`.
    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let axes = self.ints(axes);
        self.op("Unsqueeze", &[x, &axes])
    }

    /// `Squeeze(x, axes)`.
    pub fn squeeze(&mut self, x: &str, axes: &[i64]) -> String {
        let axes = self.ints(axes);
        self.op("Squeeze", &[x, &axes])
    }

    /// `Transpose(x, perm)`.
    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op_with("Transpose", &[x], vec![ints_attribute("perm", perm)])
    }

    /// `Reshape(x, shape)` with a constant target shape.
    pub fn reshape_to(&mut self, x: &str, shape: &[i64]) -> String {
        let shape = self.ints(shape);
        self.op("Reshape", &[x, &shape])
    }

    /// `Reshape(x, Shape(like))`.
    pub fn reshape_like(&mut self, x: &str, like: &str) -> String {
        let shape = self.op("Shape", &[like]);
        self.op("Reshape", &[x, &shape])
    }
}

fn int64_tensor(values: &[i64], dims: &[i64]) -> TensorProto {
    let mut tensor = TensorProto::new();
    tensor.data_type = DataType::Int64.code();
    tensor.dims = dims.to_vec();
    tensor.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor
}

/// A tensor of `dims` (at most one element) holding `value` in a floating-point `dtype`.
fn float_tensor(value: f64, dtype: DataType, dims: &[i64]) -> Result<TensorProto> {
    let raw_data = match dtype {
        DataType::Float => (value as f32).to_le_bytes().to_vec(),
        DataType::Double => value.to_le_bytes().to_vec(),
        DataType::Float16 => half::f16::from_f64(value).to_le_bytes().to_vec(),
        DataType::Bfloat16 => half::bf16::from_f64(value).to_le_bytes().to_vec(),
        other => {
            return Err(Error::InvalidGraph(format!(
                "cannot build a {other} constant for a gradient: gradients flow through float, \
                 double, float16 and bfloat16 values only"
            )))
        }
    };
    let mut tensor = TensorProto::new();
    tensor.data_type = dtype.code();
    tensor.dims = dims.to_vec();
    tensor.raw_data = raw_data;
    Ok(tensor)
}

/// A one-element float tensor, the `value` of a `ConstantOfShape` of a floating-point `dtype`.
pub(crate) fn float_fill(value: f64, dtype: DataType) -> Result<TensorProto> {
    float_tensor(value, dtype, &[1])
}

/// A one-element int64 tensor, the `value` of a `ConstantOfShape` filled with an integer.
fn int64_fill(value: i64) -> TensorProto {
    int64_tensor(&[value], &[1])
}
