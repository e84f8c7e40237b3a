//! `PatchBuilder`: helpers that emit the standard insertions (low-rank branches, scalings,
//! adapters, soft prompts, prefixes, gates, dequantization) as patch edits.
//!
//! Every helper emits ONNX default-domain ops with opset-17 semantics (`Constant` with
//! `value_int(s)`/`value_float(s)`, `Cast`, `MatMul`, `Add`, `Mul`, `Dropout`, `Erf`, `Relu`,
//! `Sigmoid`, `Tanh`, `Shape`, `Gather`, `Unsqueeze`, `Concat`, `Expand`, `Reshape`,
//! `BitShift`), reads nothing but the [`GraphView`], and returns the names it created.
//!
//! This file holds the builder's core (naming, seeds, parameters, payloads, nodes, rewires,
//! folds, value types, blocks); each insertion family has its own file: `linear` (low-rank
//! branches and scalings of linear sites), `residual` (bottleneck adapters and gates),
//! `sequence` (soft prompts, prefixes and masks), `quant` (dequantized weights) and
//! `trainable` (tensors trained in place).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::graph::{GraphView, Site};
use crate::patch::{
    AttributeValue, Fold, Init, NewNode, NewParameter, NewValue, OutputRewire, Patch, Rewire,
};
use crate::protocol::{PatchReply, TensorPayload};
use crate::training::{HostInput, HostInputKind};
use std::collections::{BTreeMap, BTreeSet};

mod linear;
mod quant;
mod residual;
mod sequence;
mod trainable;

pub use linear::{DeltaNames, LowRankNames, ScaleNames};
pub use quant::DequantNames;
pub use residual::{Activation, Bottleneck, BottleneckNames, GateNames, Placement, ResidualNames};
pub use sequence::{MaskNames, PrefixNames, PromptNames, SequenceFill};

/// Accumulates a [`Patch`] (and its [`Init::Data`] payloads) for one graph.
///
/// Names: each insertion reserves a *stem* `<prefix>.<site label, node or value name>` that
/// no existing name equals or starts with followed by `.` (suffixing `_2`, `_3`, ... when
/// needed), and names everything it creates `<stem>.<part>`; a node's single output is
/// `<node name>.out`. Every name is checked against the view and the patch, so names are
/// unique.
///
/// Composition: helpers apply in call order. Each helper reads a value as left by the
/// earlier helpers ([`PatchBuilder::current`]) and rewires that head of the chain, so
/// several insertions on the same value stack (for example a low-rank branch, then an
/// output scale) and their folds merge correctly in order.
///
/// Blocks: [`PatchBuilder::block`] runs a closure and returns, beside its result, the names
/// of the nodes it added, in order. That list is what a [`Fold`]'s `branch_nodes` (or a
/// plugin's own bookkeeping of a subgraph) needs; every helper's `nodes` field comes from it.
///
/// Operands: where a helper creates its own parameter, a `_by` variant
/// ([`PatchBuilder::scale_output_by`], [`PatchBuilder::scale_input_by`],
/// [`PatchBuilder::gate_by`]) reads a value the caller passes instead — a parameter it added
/// with [`PatchBuilder::parameter`], or any node output — and creates none.
#[derive(Debug, Clone)]
pub struct PatchBuilder<'g> {
    graph: &'g GraphView,
    prefix: String,
    patch: Patch,
    tensors: Vec<TensorPayload>,
    used: BTreeSet<String>,
    heads: BTreeMap<String, String>,
    restricted: BTreeMap<(String, String), String>,
    default_dtype: Option<DType>,
    /// Element types of values this patch computes that the builder knows (a dequantized
    /// weight), for helpers that read them as weights.
    computed_dtypes: BTreeMap<String, DType>,
    seed: u64,
    seeds_drawn: u64,
}

fn attr_int(name: &str, v: i64) -> (&str, AttributeValue) {
    (name, AttributeValue::Int(v))
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl<'g> PatchBuilder<'g> {
    /// A builder for `graph` whose names start with `prefix` (the method's name, e.g.
    /// `"lora"`), with base seed 0.
    pub fn new(graph: &'g GraphView, prefix: &str) -> PatchBuilder<'g> {
        let default_dtype = graph
            .sites()
            .find_map(|s| graph.tensor(&s.site.weight).map(|t| t.dtype))
            .filter(|d| d.is_float());
        PatchBuilder {
            graph,
            prefix: prefix.to_string(),
            patch: Patch::default(),
            tensors: Vec::new(),
            used: graph.known_names().into_iter().map(String::from).collect(),
            heads: BTreeMap::new(),
            restricted: BTreeMap::new(),
            default_dtype,
            computed_dtypes: BTreeMap::new(),
            seed: 0,
            seeds_drawn: 0,
        }
    }

    /// Sets the base seed [`PatchBuilder::next_seed`] derives from (usually a config key).
    pub fn with_seed(mut self, seed: u64) -> PatchBuilder<'g> {
        self.seed = seed;
        self.seeds_drawn = 0;
        self
    }

    /// Sets the element type used for values whose type the view does not know. Without
    /// it, the type of the first site's weight (if a float type) is used.
    pub fn with_default_dtype(mut self, dtype: DType) -> PatchBuilder<'g> {
        self.default_dtype = Some(dtype);
        self
    }

    /// A fresh seed for a random [`Init`]: the `n`-th call returns a fixed mix of the base
    /// seed and `n`, so the same calls in the same order give the same seeds.
    pub fn next_seed(&mut self) -> u64 {
        self.seeds_drawn += 1;
        splitmix64(self.seed ^ splitmix64(self.seeds_drawn))
    }

    /// The graph being patched.
    pub fn graph(&self) -> &'g GraphView {
        self.graph
    }

    /// The patch so far.
    pub fn patch(&self) -> &Patch {
        &self.patch
    }

    /// Ends building: the patch and its payloads.
    pub fn finish(self) -> PatchReply {
        PatchReply {
            patch: self.patch,
            tensors: self.tensors,
        }
    }

    /// Reserves and returns a stem: `hint`, or `hint_2`, `hint_3`, ..., the first that no
    /// known name equals or starts with followed by `.`.
    pub fn stem(&mut self, hint: &str) -> String {
        let candidate = first_free(hint, |c| self.used.contains(c) || self.has_name_under(c));
        self.used.insert(candidate.clone());
        candidate
    }

    /// Reserves and returns `name`, or `name_2`, `name_3`, ..., the first unused.
    pub fn claim(&mut self, name: &str) -> String {
        let candidate = first_free(name, |c| self.used.contains(c));
        self.used.insert(candidate.clone());
        candidate
    }

    /// Adds a new initializer named `name` (or a suffixed variant, see
    /// [`PatchBuilder::claim`]) and returns its name.
    pub fn parameter(
        &mut self,
        name: &str,
        dtype: DType,
        shape: Vec<usize>,
        init: Init,
        trainable: bool,
    ) -> String {
        let name = self.claim(name);
        self.patch.parameters.push(NewParameter {
            name: name.clone(),
            dtype,
            shape,
            init,
            trainable,
        });
        name
    }

    /// Stores `data` (raw little-endian bytes of `dtype` and `shape`) as a payload under a
    /// unique key derived from `key`, returning the [`Init::Data`] that names it. Errors
    /// when the byte count does not match.
    pub fn data(
        &mut self,
        key: &str,
        dtype: DType,
        shape: Vec<usize>,
        data: Vec<u8>,
    ) -> Result<Init> {
        if dtype.byte_len_of_shape(&shape) != Some(data.len()) {
            return Err(Error::Build(format!(
                "payload \"{key}\": {} bytes do not hold {dtype} {shape:?}",
                data.len()
            )));
        }
        let candidate = first_free(key, |c| self.tensors.iter().any(|t| t.key == c));
        self.tensors.push(TensorPayload {
            key: candidate.clone(),
            dtype,
            shape,
            data,
        });
        Ok(Init::Data { key: candidate })
    }

    /// Adds `node` as given. Errors if its name or a non-empty output name is already taken.
    pub fn add_node(&mut self, node: NewNode) -> Result<()> {
        for name in std::iter::once(&node.name).chain(node.outputs.iter().filter(|o| !o.is_empty()))
        {
            if self.used.contains(name) {
                return Err(Error::Build(format!("name \"{name}\" is already taken")));
            }
        }
        self.used.insert(node.name.clone());
        self.used
            .extend(node.outputs.iter().filter(|o| !o.is_empty()).cloned());
        self.patch.nodes.push(node);
        Ok(())
    }

    /// Adds a single-output default-domain node named `name` (claimed) reading `inputs`, and
    /// returns its output `<node>.out`.
    pub fn op(
        &mut self,
        name: &str,
        op_type: &str,
        inputs: &[&str],
        attributes: &[(&str, AttributeValue)],
    ) -> String {
        let name = self.claim(name);
        let output = self.claim(&format!("{name}.out"));
        self.patch.nodes.push(NewNode {
            name,
            op_type: op_type.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![output.clone()],
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        });
        output
    }

    /// Emits `Constant(value_ints)`: a 1-D `int64` tensor. Returns its output.
    pub fn constant_ints(&mut self, name: &str, values: &[i64]) -> String {
        self.op(
            name,
            "Constant",
            &[],
            &[("value_ints", AttributeValue::Ints(values.to_vec()))],
        )
    }

    /// Emits a scalar of `dtype` holding `value`: `Constant(value_float)` (or `value_int` for
    /// integer and bool types), followed by `Cast(to = dtype)` unless that is already `float`
    /// (`int64`). Returns its output.
    pub fn constant_scalar(&mut self, name: &str, value: f64, dtype: DType) -> String {
        let (constant, base) = if dtype.is_float() {
            (
                self.op(
                    name,
                    "Constant",
                    &[],
                    &[("value_float", AttributeValue::Float(value as f32))],
                ),
                DType::Float,
            )
        } else {
            (
                self.op(
                    name,
                    "Constant",
                    &[],
                    &[("value_int", AttributeValue::Int(value as i64))],
                ),
                DType::Int64,
            )
        };
        if dtype == base {
            constant
        } else {
            self.op(
                &format!("{name}.cast"),
                "Cast",
                &[&constant],
                &[attr_int("to", dtype.onnx_code() as i64)],
            )
        }
    }

    /// The value that now stands for `value`: `value` followed through this builder's
    /// unrestricted rewires.
    pub fn current(&self, value: &str) -> String {
        let mut v = value;
        while let Some(next) = self.heads.get(v) {
            v = next;
        }
        v.to_string()
    }

    /// The value node `consumer` now reads in place of `value`, following both unrestricted
    /// rewires and rewires restricted to `consumer`.
    pub fn current_for(&self, value: &str, consumer: &str) -> String {
        let mut v = value.to_string();
        loop {
            if let Some(next) = self.restricted.get(&(v.clone(), consumer.to_string())) {
                v = next.clone();
            } else if let Some(next) = self.heads.get(&v) {
                v = next.clone();
            } else {
                return v;
            }
        }
    }

    /// Rewires every consumer of [`current`](PatchBuilder::current)`(value)` (graph outputs
    /// included, the patch's own nodes excluded) to `replacement`, and records `replacement`
    /// as the new head of `value`'s chain.
    pub fn rewire(&mut self, value: &str, replacement: &str) {
        let from = self.current(value);
        self.heads.insert(from.clone(), replacement.to_string());
        self.patch.rewires.push(Rewire {
            value: from,
            replacement: replacement.into(),
            keep: vec![],
            only: vec![],
        });
    }

    /// Makes the graph output `output` return `replacement` under its own name; every node,
    /// and later builder calls, still read `output`'s original value.
    pub fn rewire_graph_output(&mut self, output: &str, replacement: &str) {
        self.patch.output_rewires.push(OutputRewire {
            output: output.into(),
            replacement: replacement.into(),
        });
    }

    /// Rewires only the nodes `consumers` from `value` (as given) to `replacement`.
    pub fn rewire_only(&mut self, value: &str, replacement: &str, consumers: &[&str]) {
        for c in consumers {
            self.restricted
                .insert((value.to_string(), c.to_string()), replacement.to_string());
        }
        self.patch.rewires.push(Rewire {
            value: value.into(),
            replacement: replacement.into(),
            keep: vec![],
            only: consumers.iter().map(|c| c.to_string()).collect(),
        });
    }

    /// Runs `build` on this builder and returns its result with the names of the nodes it
    /// added, in the order they were added. Nodes only ever accumulate, so these are exactly
    /// the patch's nodes from the first `build` added to the last; blocks nest (an outer
    /// block's list contains an inner block's nodes where they were added), and parameters,
    /// rewires and folds are not listed. When `build` fails its error is returned as is; what
    /// it added before failing stays in the builder, which does not roll back.
    ///
    /// ```
    /// # use graft_plugin_sdk::{GraphView, PatchBuilder, DType};
    /// let graph = GraphView::default();
    /// let mut b = PatchBuilder::new(&graph, "demo").with_default_dtype(DType::Float);
    /// let (output, nodes) = b.block(|b| {
    ///     let two = b.constant_scalar("demo.two", 2.0, DType::Float);
    ///     Ok(b.op("demo.double", "Mul", &[&two, &two], &[]))
    /// })?;
    /// assert_eq!(output, "demo.double.out");
    /// assert_eq!(nodes, ["demo.two", "demo.double"]);
    /// # Ok::<(), graft_plugin_sdk::Error>(())
    /// ```
    pub fn block<T>(
        &mut self,
        build: impl FnOnce(&mut PatchBuilder<'g>) -> Result<T>,
    ) -> Result<(T, Vec<String>)> {
        let first = self.patch.nodes.len();
        let value = build(self)?;
        let nodes = self.patch.nodes[first..]
            .iter()
            .map(|n| n.name.clone())
            .collect();
        Ok((value, nodes))
    }

    /// Appends a fold.
    pub fn fold(&mut self, fold: Fold) {
        self.patch.folds.push(fold);
    }

    /// Declares a new graph input (its name is claimed as given; errors if taken).
    pub fn graph_input(&mut self, value: NewValue) -> Result<()> {
        if !self.used.insert(value.name.clone()) {
            return Err(Error::Build(format!(
                "name \"{}\" is already taken",
                value.name
            )));
        }
        self.patch.graph_inputs.push(value);
        Ok(())
    }

    /// Declares an input the host feeds at every training and evaluation step (see
    /// [`HostInput`]; ABI 2) under `name` (claimed, see [`PatchBuilder::claim`]) and returns
    /// the name, which the patch's nodes read like any value. Outside training the input is
    /// an overridable initializer holding `default`, so an exported graph runs without the
    /// host and a caller may still feed it (a switch, a number of dropped layers).
    pub fn host_input(
        &mut self,
        name: &str,
        kind: HostInputKind,
        dtype: DType,
        shape: Vec<usize>,
        default: Init,
    ) -> String {
        let name = self.claim(name);
        self.patch.training.host_inputs.push(HostInput {
            name: name.clone(),
            kind,
            dtype,
            shape,
            default,
        });
        name
    }

    /// Declares an existing or new value as an extra graph output.
    pub fn graph_output(&mut self, value: NewValue) {
        self.patch.graph_outputs.push(value);
    }

    /// The element type of `value`: from the view, else from a new parameter or host input of
    /// that name, else the default type (see [`PatchBuilder::with_default_dtype`]). Errors when none is
    /// known.
    pub fn value_dtype(&self, value: &str) -> Result<DType> {
        self.graph
            .dtype_of(value)
            .or_else(|| {
                self.patch
                    .parameters
                    .iter()
                    .find(|p| p.name == value)
                    .map(|p| p.dtype)
            })
            .or_else(|| {
                self.patch
                    .training
                    .host_inputs
                    .iter()
                    .find(|i| i.name == value)
                    .map(|i| i.dtype)
            })
            .or_else(|| self.computed_dtypes.get(value).copied())
            .or(self.default_dtype)
            .ok_or_else(|| Error::Build(format!("the element type of \"{value}\" is unknown")))
    }

    fn has_name_under(&self, stem: &str) -> bool {
        let dotted = format!("{stem}.");
        self.used
            .range(dotted.clone()..)
            .next()
            .is_some_and(|n| n.starts_with(&dotted))
    }

    fn site_stem(&mut self, site: &Site) -> String {
        let hint = format!("{}.{}", self.prefix, site.display_name());
        self.stem(&hint)
    }

    /// `value` as an operand a `*_by` helper reads in place of a parameter it would create:
    /// it must be known to the view or created by this patch (a parameter, a node output or a
    /// graph input), and of element type `dtype` where its type is known. Returns it as left by
    /// earlier rewires ([`PatchBuilder::current`]).
    fn operand(&self, helper: &str, value: &str, dtype: DType) -> Result<String> {
        let parameter = self.patch.parameters.iter().find(|p| p.name == value);
        let input = self.patch.graph_inputs.iter().find(|v| v.name == value);
        let produced = self
            .patch
            .nodes
            .iter()
            .any(|n| n.outputs.iter().any(|o| o == value));
        if parameter.is_none()
            && input.is_none()
            && !produced
            && !self.graph.known_names().contains(value)
        {
            return Err(Error::Build(format!("{helper}: unknown value \"{value}\"")));
        }
        let known = self
            .graph
            .dtype_of(value)
            .or(parameter.map(|p| p.dtype))
            .or(input.map(|v| v.dtype));
        if let Some(found) = known.filter(|found| *found != dtype) {
            return Err(Error::Build(format!(
                "{helper}: \"{value}\" is {found}, not {dtype}"
            )));
        }
        Ok(self.current(value))
    }

    /// True when `value` is a parameter of this patch of shape `shape`: the only form of scale
    /// vector that `graft merge` can fold into a weight.
    fn is_parameter_of_shape(&self, value: &str, shape: &[usize]) -> bool {
        self.patch
            .parameters
            .iter()
            .any(|p| p.name == value && p.shape == shape)
    }

    fn weight_dtype(&self, site: &Site) -> Result<DType> {
        self.graph
            .tensor(&site.weight)
            .map(|t| t.dtype)
            .or_else(|| self.computed_dtypes.get(&site.weight).copied())
            .ok_or_else(|| {
                Error::Build(format!(
                    "site {}: no initializer \"{}\"",
                    site.display_name(),
                    site.weight
                ))
            })
    }
}

/// `base`, or `base_2`, `base_3`, ..., the first name that is not `taken`.
fn first_free(base: &str, taken: impl Fn(&str) -> bool) -> String {
    let mut candidate = base.to_string();
    let mut n = 1;
    while taken(&candidate) {
        n += 1;
        candidate = format!("{base}_{n}");
    }
    candidate
}
