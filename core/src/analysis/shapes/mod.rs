//! Shape and type inference: every value of a graph gets a [`ValueType`] whose symbolic
//! dimensions (`batch`, `sequence`) stay symbolic, and small integer tensors are folded so that
//! shape arithmetic (`Shape → Gather → Unsqueeze → Concat → Reshape`) yields real targets such as
//! `[batch, sequence, 4, 8]`.
//!
//! Rules live in one table keyed by op type, filled by one `register` per op family (tract's
//! layout): adding an op touches one place. An op without a rule, or whose inputs are not known
//! well enough, gets unknown outputs (or the type the graph declares for them); inference never
//! fails because of an op.

mod elementwise;
mod generators;
mod linalg;
mod movement;
mod reduce;
pub mod symbolic;

pub(crate) use reduce::reduce_axes_are_input;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;

use crate::ir::{DataType, Dim, Model, Node, Tensor, ValueType};
use crate::Result;

/// The largest integer tensor, in elements, whose values inference folds.
pub const MAX_FOLDED_ELEMENTS: usize = 64;

/// The largest rank inference builds from a shape tensor's length; longer shape tensors (only a
/// malformed model has them) leave the rank unknown.
pub const MAX_RANK: usize = 64;

/// What inference learned about one value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    /// Element type and shape; either may be unknown.
    pub value_type: ValueType,
    /// The elements (row-major) of a small integer or boolean tensor, when inference could fold
    /// them. Elements are [`Dim`]s so that sizes read from shapes stay symbolic; booleans are 0/1.
    pub value: Option<Vec<Dim>>,
    /// Whether the value depends on no graph input (initializers and constants only).
    pub constant: bool,
}

impl Fact {
    /// A fact with nothing known.
    pub fn unknown() -> Self {
        Fact::new(None, None)
    }

    /// A non-constant fact with the given type and shape and no folded value.
    pub fn new(dtype: Option<DataType>, shape: Option<Vec<Dim>>) -> Self {
        Fact {
            value_type: ValueType { dtype, shape },
            value: None,
            constant: false,
        }
    }

    /// This fact with folded elements attached; elements are dropped when there are too many.
    pub fn with_value(mut self, value: Option<Vec<Dim>>) -> Self {
        self.value = value.filter(|v| v.len() <= MAX_FOLDED_ELEMENTS);
        self
    }

    /// The fact of an initializer: its type and dimensions, and its values when it is a small
    /// integer tensor.
    pub fn of_tensor(tensor: &Tensor) -> Self {
        let shape = tensor.dims.iter().map(|&d| Dim::Fixed(d)).collect();
        let value = if tensor.n_elements() <= MAX_FOLDED_ELEMENTS {
            integer_elements(tensor.dtype, tensor.raw_bytes().ok())
        } else {
            None
        };
        let mut fact = Fact::new(Some(tensor.dtype), Some(shape)).with_value(value);
        fact.constant = true;
        fact
    }
}

/// Decodes little-endian integer or boolean bytes into fixed elements; `None` for other types.
pub(crate) fn integer_elements(dtype: DataType, bytes: Option<&[u8]>) -> Option<Vec<Dim>> {
    let bytes = bytes?;
    let values: Vec<i64> = match dtype {
        DataType::Int64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        DataType::Int32 => bytes
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DataType::Uint8 | DataType::Bool => bytes.iter().map(|&b| i64::from(b)).collect(),
        DataType::Int8 => bytes.iter().map(|&b| i64::from(b as i8)).collect(),
        _ => return None,
    };
    Some(values.into_iter().map(Dim::Fixed).collect())
}

/// Two inputs of a node whose shapes its op cannot combine: fixed sizes that differ where they
/// must agree (a `MatMul`'s inner dimension, a broadcast axis, a `Concat`'s other axes). Symbolic
/// and unknown sizes never conflict: only the run time knows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeConflict {
    /// The node's name.
    pub node: String,
    /// Its op type.
    pub op_type: String,
    /// The two inputs that do not fit, in input order: value name and shape.
    pub inputs: [(String, Vec<Dim>); 2],
    /// Why they do not fit, e.g. "inner dimensions 32 and 16 differ".
    pub reason: String,
}

impl std::fmt::Display for ShapeConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shape = |dims: &[Dim]| {
            let dims: Vec<String> = dims.iter().map(Dim::to_string).collect();
            format!("[{}]", dims.join(", "))
        };
        let [(left, left_shape), (right, right_shape)] = &self.inputs;
        write!(
            f,
            "node {:?} ({}) cannot combine {left:?} {} with {right:?} {}: {}",
            self.node,
            self.op_type,
            shape(left_shape),
            shape(right_shape),
            self.reason
        )
    }
}

/// The inferred facts of a graph's values, by value name, and the shape conflicts found on the
/// way.
#[derive(Clone, Debug, Default)]
pub struct ShapeMap {
    facts: HashMap<String, Fact>,
    conflicts: Vec<ShapeConflict>,
}

impl ShapeMap {
    /// Everything known about `value`; `None` for names the graph does not define.
    pub fn fact(&self, value: &str) -> Option<&Fact> {
        self.facts.get(value)
    }

    /// The element type and shape of `value`.
    pub fn value_type(&self, value: &str) -> Option<&ValueType> {
        self.facts.get(value).map(|f| &f.value_type)
    }

    /// The shape of `value`, when its rank is known.
    pub fn shape(&self, value: &str) -> Option<&[Dim]> {
        self.value_type(value)?.shape.as_deref()
    }

    /// The element type of `value`, when known.
    pub fn dtype(&self, value: &str) -> Option<DataType> {
        self.value_type(value)?.dtype
    }

    /// The rank of `value`, when known.
    pub fn rank(&self, value: &str) -> Option<usize> {
        self.shape(value).map(<[Dim]>::len)
    }

    /// The folded elements of a small integer tensor (see [`Fact::value`]).
    pub fn integer_value(&self, value: &str) -> Option<&[Dim]> {
        self.facts.get(value)?.value.as_deref()
    }

    /// Whether `value` depends on no graph input. Unknown names are not constant.
    pub fn is_constant(&self, value: &str) -> bool {
        self.facts.get(value).is_some_and(|f| f.constant)
    }

    /// The number of values with a fact.
    pub fn len(&self) -> usize {
        self.facts.len()
    }

    /// Whether no value has a fact.
    pub fn is_empty(&self) -> bool {
        self.facts.is_empty()
    }

    /// Every (value name, fact) pair, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Fact)> {
        self.facts.iter().map(|(name, fact)| (name.as_str(), fact))
    }

    /// The nodes whose input shapes their op cannot combine, in node order (at most one
    /// conflict per node).
    pub fn conflicts(&self) -> &[ShapeConflict] {
        &self.conflicts
    }
}

/// Infers the type and shape of every value in `model`'s main graph, in node order.
///
/// Graph inputs and initializers seed the map; each node's outputs come from its op's rule.
/// Where a rule leaves an output's type, shape or a dimension unknown, the graph's own
/// `value_info` for that output (if any) fills the gap. Unknown ops and ops of other domains
/// never cause an error, and neither do input shapes an op cannot combine: the rule still
/// infers what it can, and the map lists the node among its [`ShapeMap::conflicts`].
pub fn infer_shapes(model: &Model) -> Result<ShapeMap> {
    let graph = &model.graph;
    let opset = model.opset();
    let mut facts: HashMap<String, Fact> = HashMap::new();
    for input in &graph.inputs {
        if let Some(value_type) = input.value_type() {
            facts.insert(
                input.name.clone(),
                Fact {
                    value_type,
                    value: None,
                    constant: false,
                },
            );
        }
    }
    for tensor in &graph.initializers {
        facts.insert(tensor.name.clone(), Fact::of_tensor(tensor));
    }
    let declared: HashMap<&str, ValueType> = graph
        .value_infos
        .iter()
        .filter_map(|info| Some((info.name.as_str(), info.value_type()?)))
        .collect();
    let table = rules();
    let mut conflicts = Vec::new();
    for node in &graph.nodes {
        let inputs: Vec<Option<&Fact>> = node
            .inputs
            .iter()
            .map(|name| facts.get(name.as_str()).filter(|_| !name.is_empty()))
            .collect();
        let present = node.inputs.iter().filter(|name| !name.is_empty()).count();
        let inputs_constant = present > 0
            && node
                .inputs
                .iter()
                .zip(&inputs)
                .all(|(name, fact)| name.is_empty() || fact.is_some_and(|f| f.constant));
        let default_domain = node.domain.is_empty() || node.domain == "ai.onnx";
        let outputs = match table.get(node.op_type.as_str()) {
            Some(rule) if default_domain => {
                let context = OpContext {
                    node,
                    opset,
                    inputs,
                    conflict: RefCell::new(None),
                };
                let outputs = rule(&context);
                conflicts.extend(context.conflict());
                outputs
            }
            _ => Vec::new(),
        };
        for (slot, name) in node.outputs.iter().enumerate() {
            if name.is_empty() {
                continue;
            }
            let mut fact = outputs.get(slot).cloned().unwrap_or_else(Fact::unknown);
            if let Some(declared) = declared.get(name.as_str()) {
                if fact.value_type.dtype.is_none() {
                    fact.value_type.dtype = declared.dtype;
                }
                match (&mut fact.value_type.shape, &declared.shape) {
                    (None, declared_shape) => fact.value_type.shape.clone_from(declared_shape),
                    (Some(inferred), Some(declared_shape))
                        if inferred.len() == declared_shape.len() =>
                    {
                        for (dim, declared_dim) in inferred.iter_mut().zip(declared_shape) {
                            if *dim == Dim::Unknown {
                                dim.clone_from(declared_dim);
                            }
                        }
                    }
                    _ => {}
                }
            }
            let fully_folded = fact
                .value
                .as_ref()
                .is_some_and(|v| v.iter().all(|d| matches!(d, Dim::Fixed(_))));
            fact.constant = fact.constant
                || fully_folded
                || (inputs_constant && !is_random(&node.op_type))
                || (node.op_type == "Constant" && default_domain);
            facts.insert(name.clone(), fact);
        }
    }
    Ok(ShapeMap { facts, conflicts })
}

fn is_random(op_type: &str) -> bool {
    op_type.starts_with("Random") || op_type == "Multinomial" || op_type == "Bernoulli"
}

/// A shape rule: the facts of a node's outputs (in slot order) from its context. Outputs the
/// rule leaves out are unknown.
pub(super) type Rule = fn(&OpContext) -> Vec<Fact>;

/// The rule table, keyed by default-domain op type.
pub(super) type RuleTable = HashMap<&'static str, Rule>;

fn rules() -> &'static RuleTable {
    static TABLE: OnceLock<RuleTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = RuleTable::new();
        elementwise::register(&mut table);
        generators::register(&mut table);
        linalg::register(&mut table);
        movement::register(&mut table);
        reduce::register(&mut table);
        table
    })
}

/// What a rule sees: the node, the model's opset, and the facts of its inputs; and where the
/// rule reports inputs that cannot be combined.
pub(super) struct OpContext<'a> {
    pub node: &'a Node,
    pub opset: i64,
    inputs: Vec<Option<&'a Fact>>,
    conflict: RefCell<Option<(usize, usize, String)>>,
}

impl<'a> OpContext<'a> {
    /// Reports that the shapes of inputs `left` and `right` (both known) cannot be combined,
    /// and why. The first report of a node is kept.
    pub fn report_conflict(&self, left: usize, right: usize, reason: String) {
        self.conflict
            .borrow_mut()
            .get_or_insert((left, right, reason));
    }

    /// The conflict the rule reported, with the names and shapes of the two inputs.
    fn conflict(&self) -> Option<ShapeConflict> {
        let (left, right, reason) = self.conflict.borrow_mut().take()?;
        let input = |slot: usize| {
            let name = self.node.input(slot).unwrap_or_default().to_owned();
            (
                name,
                self.shape(slot).map(<[Dim]>::to_vec).unwrap_or_default(),
            )
        };
        Some(ShapeConflict {
            node: self.node.name.clone(),
            op_type: self.node.op_type.clone(),
            inputs: [input(left), input(right)],
            reason,
        })
    }

    /// The fact of input `slot`; `None` when omitted or unknown.
    pub fn fact(&self, slot: usize) -> Option<&'a Fact> {
        self.inputs.get(slot).copied().flatten()
    }

    /// Whether input `slot` is present (named) on the node.
    pub fn has_input(&self, slot: usize) -> bool {
        self.node.input(slot).is_some()
    }

    /// The element type of input `slot`.
    pub fn dtype(&self, slot: usize) -> Option<DataType> {
        self.fact(slot)?.value_type.dtype
    }

    /// The shape of input `slot`.
    pub fn shape(&self, slot: usize) -> Option<&'a [Dim]> {
        self.fact(slot)?.value_type.shape.as_deref()
    }

    /// The rank of input `slot`.
    pub fn rank(&self, slot: usize) -> Option<usize> {
        self.shape(slot).map(<[Dim]>::len)
    }

    /// The folded elements of input `slot`.
    pub fn value(&self, slot: usize) -> Option<&'a [Dim]> {
        self.fact(slot)?.value.as_deref()
    }

    /// The elements of input `slot` when all are fixed integers.
    pub fn fixed_values(&self, slot: usize) -> Option<Vec<i64>> {
        self.value(slot)?
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Some(*n),
                _ => None,
            })
            .collect()
    }

    /// An integer-list operand that moved from an attribute to an input across opsets (`axes`,
    /// `split`, ...): the input at `slot` when present, else the attribute.
    pub fn ints_from_input_or_attribute(&self, attribute: &str, slot: usize) -> Option<Vec<i64>> {
        if self.has_input(slot) {
            self.fixed_values(slot)
        } else {
            self.node.attr_ints(attribute).map(<[i64]>::to_vec)
        }
    }
}

/// `n` unknown dimensions, when `n` (a shape tensor's length) is a plausible rank.
pub(super) fn unknown_dims(n: i64) -> Option<Vec<Dim>> {
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_RANK)
        .map(|n| vec![Dim::Unknown; n])
}

/// `axis` (possibly negative) as an index into a shape of `rank` dimensions.
pub(crate) fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let rank = i64::try_from(rank).ok()?;
    let axis = if axis < 0 { axis + rank } else { axis };
    (0..rank).contains(&axis).then_some(axis as usize)
}

/// The number of elements of a shape, when all its dimensions are fixed.
pub(crate) fn fixed_size(shape: &[Dim]) -> Option<usize> {
    shape.iter().try_fold(1usize, |total, dim| match dim {
        Dim::Fixed(n) => usize::try_from(*n).ok().and_then(|n| total.checked_mul(n)),
        _ => None,
    })
}
