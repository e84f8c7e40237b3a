//! The gradient rules: one table from op type to a rule that, given a node, its inputs, outputs
//! and output gradients, emits the nodes computing one gradient (or none) per input.
//!
//! Rules never reduce a broadcast gradient or sum fan-out themselves: a rule states the shape its
//! gradient has ([`Gradient`]) and the driver reduces it to the input's shape.

mod elementwise;
mod linalg;
mod movement;
mod normalization;

use onnx_protobuf::AttributeProto;

use super::emitter::Emitter;
use crate::analysis::shapes::normalize_axis;
use crate::analysis::ShapeMap;
use crate::ir::{DataType, Dim, Node};
use crate::{Error, Result};

/// The gradient a rule computes for one input, with the shape it has.
pub(crate) enum Gradient {
    /// Has exactly the input's shape.
    Exact(String),
    /// Has the shape of the node's first output (the input was broadcast to it).
    Broadcast(String),
    /// Has the given shape (`None` when unknown); the driver reduces it to the input's shape.
    Shaped(String, Option<Vec<Dim>>),
}

/// One optional gradient per input slot.
pub(crate) type Gradients = Vec<Option<Gradient>>;

/// A differentiation rule.
pub(crate) type RuleFn = fn(&mut RuleContext) -> Result<Gradients>;

/// What the table knows about an op type.
pub(crate) enum Rule {
    /// Gradients flow through the op; the function emits them.
    Differentiable(RuleFn),
    /// No gradient flows through the op by its nature: its outputs are integers, booleans or
    /// shapes, or it is piecewise constant (its gradient is zero wherever it exists).
    NoGradient,
}

/// The rule for a default-domain op type; `None` when the table has none.
pub(crate) fn rule(op_type: &str) -> Option<Rule> {
    use elementwise as e;
    use linalg as l;
    use movement as m;
    use normalization as n;
    let differentiable: RuleFn = match op_type {
        "Add" => e::add,
        "Sub" => e::sub,
        "Mul" => e::mul,
        "Div" => e::div,
        "Neg" => e::neg,
        "Pow" => e::pow,
        "Sqrt" => e::sqrt,
        "Reciprocal" => e::reciprocal,
        "Exp" => e::exp,
        "Log" => e::log,
        "Tanh" => e::tanh,
        "Sigmoid" => e::sigmoid,
        "Relu" => e::relu,
        "LeakyRelu" => e::leaky_relu,
        "Erf" => e::erf,
        "Gelu" => e::gelu,
        "Sin" => e::sin,
        "Cos" => e::cos,
        "Abs" => e::abs,
        "Max" | "Min" => e::max_min,
        "Sum" => e::sum,
        "Mean" => e::mean,
        "Clip" => e::clip,
        "Where" => e::select,
        "Cast" => e::cast,
        "CastLike" => e::cast_like,
        "Identity" => e::identity,
        "Dropout" => e::dropout,
        "MatMul" => l::matmul,
        "Gemm" => l::gemm,
        "Conv" => l::conv,
        "Transpose" => m::transpose,
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => m::reshape,
        "Expand" => m::expand,
        "Concat" => m::concat,
        "Split" => m::split,
        "Slice" => m::slice,
        "Gather" => m::gather,
        "GatherElements" => m::gather_elements,
        "GatherND" => m::gather_nd,
        "Softmax" => n::softmax,
        "LogSoftmax" => n::log_softmax,
        "LayerNormalization" => n::layer_normalization,
        "ReduceSum" | "ReduceMean" => n::reduce_sum_mean,
        "Shape" | "Size" | "Constant" | "ConstantOfShape" | "Range" | "EyeLike" | "Equal"
        | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "And" | "Or" | "Xor" | "Not"
        | "IsNaN" | "IsInf" | "ArgMax" | "ArgMin" | "NonZero" | "OneHot" | "Floor" | "Ceil"
        | "Round" | "Sign" | "Hardmax" | "Bernoulli" | "Multinomial" | "RandomNormal"
        | "RandomNormalLike" | "RandomUniform" | "RandomUniformLike" | "BitShift"
        | "BitwiseAnd" | "BitwiseOr" | "BitwiseXor" | "BitwiseNot" => {
            return Some(Rule::NoGradient)
        }
        _ => return None,
    };
    Some(Rule::Differentiable(differentiable))
}

/// What a rule sees: the node, facts about its values, its output gradients (ORT's `I(i)`,
/// `O(i)`, `GO(i)`), which inputs need a gradient, and an emitter for new nodes.
pub(crate) struct RuleContext<'a> {
    /// The node being differentiated.
    pub node: &'a Node,
    shapes: &'a ShapeMap,
    output_gradients: Vec<Option<String>>,
    wanted: Vec<bool>,
    emitter: &'a mut Emitter,
}

impl<'a> RuleContext<'a> {
    /// A context for `node`; `output_gradients` and `wanted` are indexed by output and input slot.
    pub fn new(
        node: &'a Node,
        shapes: &'a ShapeMap,
        output_gradients: Vec<Option<String>>,
        wanted: Vec<bool>,
        emitter: &'a mut Emitter,
    ) -> Self {
        RuleContext {
            node,
            shapes,
            output_gradients,
            wanted,
            emitter,
        }
    }

    /// An error naming the node: its gradient cannot be built, for `reason`.
    pub fn unsupported(&self, reason: impl std::fmt::Display) -> Error {
        Error::InvalidGraph(format!(
            "failed to compute gradient for node {:?} ({}): {reason}",
            self.node.name, self.node.op_type
        ))
    }

    /// The model's default-domain opset.
    pub fn opset(&self) -> i64 {
        self.emitter.opset()
    }

    /// Input `slot` (`I(slot)`); an error when it is omitted.
    pub fn input(&self, slot: usize) -> Result<&'a str> {
        let node: &'a Node = self.node;
        node.input(slot)
            .ok_or_else(|| self.unsupported(format_args!("input {slot} is missing")))
    }

    /// Output `slot` (`O(slot)`); an error when it is omitted.
    pub fn output(&self, slot: usize) -> Result<&'a str> {
        let node: &'a Node = self.node;
        node.outputs
            .get(slot)
            .map(String::as_str)
            .filter(|o| !o.is_empty())
            .ok_or_else(|| self.unsupported(format_args!("output {slot} is missing")))
    }

    /// Whether a gradient flowed into output `slot`.
    pub fn has_output_gradient(&self, slot: usize) -> bool {
        self.output_gradients.get(slot).is_some_and(Option::is_some)
    }

    /// The gradient of output `slot` (`GO(slot)`), or zeros of its shape when none flowed.
    pub fn output_gradient(&mut self, slot: usize) -> Result<String> {
        if let Some(Some(gradient)) = self.output_gradients.get(slot) {
            return Ok(gradient.clone());
        }
        let output = self.output(slot)?;
        let dtype = self.dtype(output)?;
        self.emitter.zeros_like(output, dtype)
    }

    /// Whether input `slot` needs a gradient (it lies on a path from a differentiated tensor).
    pub fn wants(&self, slot: usize) -> bool {
        self.wanted.get(slot).copied().unwrap_or(false)
    }

    /// The element type of `value`; an error when inference could not tell it.
    pub fn dtype(&self, value: &str) -> Result<DataType> {
        self.shapes.dtype(value).ok_or_else(|| {
            self.unsupported(format_args!("the element type of {value:?} is unknown"))
        })
    }

    /// The element type of `value`, when inference could tell it.
    pub fn known_dtype(&self, value: &str) -> Option<DataType> {
        self.shapes.dtype(value)
    }

    /// The (possibly symbolic) shape of `value`, when its rank is known.
    pub fn shape(&self, value: &str) -> Option<&'a [Dim]> {
        let shapes: &'a ShapeMap = self.shapes;
        shapes.shape(value)
    }

    /// The rank of `value`; an error when inference could not tell it.
    pub fn rank(&self, value: &str) -> Result<usize> {
        self.shapes
            .rank(value)
            .ok_or_else(|| self.unsupported(format_args!("the rank of {value:?} is unknown")))
    }

    /// The elements of a constant integer value, when inference folded all of them.
    pub fn constant_ints(&self, value: &str) -> Option<Vec<i64>> {
        self.shapes
            .integer_value(value)?
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Some(*n),
                _ => None,
            })
            .collect()
    }

    /// The node's integer attribute `name`, or `default`.
    pub fn attr_int(&self, name: &str, default: i64) -> i64 {
        self.node.attr_int(name, default)
    }

    /// The node's float attribute `name`, or `default`.
    pub fn attr_float(&self, name: &str, default: f32) -> f32 {
        self.node.attr_float(name, default)
    }

    /// An axis attribute normalized into `0..rank`.
    pub fn axis(&self, name: &str, default: i64, rank: usize) -> Result<usize> {
        let axis = self.attr_int(name, default);
        normalize_axis(axis, rank).ok_or_else(|| {
            self.unsupported(format_args!("axis {axis} is out of range for rank {rank}"))
        })
    }

    /// Emits a single-output node without attributes.
    pub fn op(&mut self, op_type: &str, inputs: &[&str]) -> String {
        self.emitter.op(op_type, inputs)
    }

    /// Emits a single-output node with attributes.
    pub fn op_with(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> String {
        self.emitter.op_with(op_type, inputs, attributes)
    }

    /// Emits a node with several outputs.
    pub fn node_outputs(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        n_outputs: usize,
    ) -> Vec<String> {
        self.emitter.node(op_type, inputs, attributes, n_outputs)
    }

    /// A rank-0 constant with the element type of `like`.
    pub fn scalar(&mut self, value: f64, like: &str) -> Result<String> {
        let dtype = self.dtype(like)?;
        self.emitter.scalar(value, dtype)
    }

    /// A rank-1 int64 constant.
    pub fn ints(&mut self, values: &[i64]) -> String {
        self.emitter.ints(values)
    }

    /// A rank-0 int64 constant.
    pub fn int_scalar(&mut self, value: i64) -> String {
        self.emitter.int_scalar(value)
    }

    /// Zeros of the run-time shape and the element type of `like`.
    pub fn zeros_like(&mut self, like: &str) -> Result<String> {
        let dtype = self.dtype(like)?;
        self.emitter.zeros_like(like, dtype)
    }

    /// Zeros of `shape` (a rank-1 int64 value) with the element type of `like`.
    pub fn zeros_of_shape(&mut self, shape: &str, like: &str) -> Result<String> {
        let dtype = self.dtype(like)?;
        self.emitter.filled(shape, 0.0, dtype)
    }

    /// `Shape(value)[start..end]`.
    pub fn shape_slice(&mut self, value: &str, start: i64, end: Option<i64>) -> String {
        self.emitter.shape_slice(value, start, end)
    }

    /// A reduction over constant `axes` (all when `None`).
    pub fn reduce(
        &mut self,
        op_type: &str,
        x: &str,
        axes: Option<&[i64]>,
        keepdims: bool,
    ) -> String {
        self.emitter.reduce(op_type, x, axes, keepdims)
    }

    /// `Unsqueeze(x, axes)`.
    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        self.emitter.unsqueeze(x, axes)
    }

    /// `Squeeze(x, axes)`.
    pub fn squeeze(&mut self, x: &str, axes: &[i64]) -> String {
        self.emitter.squeeze(x, axes)
    }

    /// `Transpose(x, perm)`.
    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.emitter.transpose(x, perm)
    }

    /// `Reshape(x, shape)` with a constant shape.
    pub fn reshape_to(&mut self, x: &str, shape: &[i64]) -> String {
        self.emitter.reshape_to(x, shape)
    }

    /// `Reshape(x, Shape(like))`.
    pub fn reshape_like(&mut self, x: &str, like: &str) -> String {
        self.emitter.reshape_like(x, like)
    }

    /// `Cast(x, to = dtype of like)`, or `x` itself when the types already agree.
    pub fn cast_like(&mut self, x: &str, like: &str) -> String {
        match (self.shapes.dtype(x), self.shapes.dtype(like)) {
            (Some(a), Some(b)) if a == b => x.to_owned(),
            _ => self.op("CastLike", &[x, like]),
        }
    }
}

/// The permutation that undoes `perm`.
pub(crate) fn inverse_permutation(perm: &[i64]) -> Vec<i64> {
    let mut inverse = vec![0; perm.len()];
    for (position, &axis) in perm.iter().enumerate() {
        if let Some(slot) = usize::try_from(axis).ok().and_then(|a| inverse.get_mut(a)) {
            *slot = position as i64;
        }
    }
    inverse
}

/// The identity permutation of `rank` axes with the last two swapped.
pub(crate) fn swap_last_two(rank: usize) -> Vec<i64> {
    let mut perm: Vec<i64> = (0..rank as i64).collect();
    if rank >= 2 {
        perm.swap(rank - 1, rank - 2);
    }
    perm
}
