//! `PatchBuilder`: helpers that emit the standard insertions (low-rank branches, scalings,
//! adapters, soft prompts, prefixes, gates, dequantization) as patch edits.
//!
//! Every helper emits ONNX default-domain ops with opset-17 semantics (`Constant` with
//! `value_int(s)`/`value_float(s)`, `Cast`, `MatMul`, `Add`, `Mul`, `Dropout`, `Erf`, `Relu`,
//! `Sigmoid`, `Tanh`, `Shape`, `Gather`, `Unsqueeze`, `Concat`, `Expand`, `Reshape`,
//! `BitShift`), reads nothing but the [`GraphView`], and returns the names it created.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::graph::{GraphView, Site};
use crate::patch::{AttributeValue, Fold, Init, NewNode, NewParameter, NewValue, Patch, Rewire};
use crate::protocol::{PatchReply, TensorPayload};
use crate::quant::check_blocks;
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

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
    seed: u64,
    seeds_drawn: u64,
}

/// Names created by [`PatchBuilder::low_rank_branch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowRankNames {
    /// Parameter `A`, `[in, r]`.
    pub a: String,
    /// Parameter `B`, `[r, out]`.
    pub b: String,
    /// The site's new output `y + scale · (x · A) · B`.
    pub output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

/// Names created by [`PatchBuilder::scale_output`] and [`PatchBuilder::scale_input`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleNames {
    /// The learned scale vector.
    pub vector: String,
    /// The scaled value.
    pub output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

/// Names created by [`PatchBuilder::residual_module`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidualNames {
    /// Down projection `[hidden, bottleneck]`.
    pub down: String,
    /// Down bias `[bottleneck]`, zero-initialised.
    pub down_bias: String,
    /// Up projection `[bottleneck, hidden]`, zero-initialised.
    pub up: String,
    /// Up bias `[hidden]`, zero-initialised.
    pub up_bias: String,
    /// The new value `h + up(act(down(src)))`.
    pub output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

/// Names created by [`PatchBuilder::prepend_to_sequence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptNames {
    /// The learned prompt `[n_virtual, hidden]`; `None` when `n_virtual` is 0.
    pub prompt: Option<String>,
    /// The extended sequence (the input value itself when `n_virtual` is 0).
    pub output: String,
    /// The extended attention mask, when a mask was given.
    pub mask_output: Option<String>,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

/// Names created by [`PatchBuilder::extend_mask`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskNames {
    /// The extended mask (the mask itself when nothing was prepended).
    pub output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

/// Names created by [`PatchBuilder::prefix_key_values`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixNames {
    /// Learned key prefix `[1, heads, n_prefix, head_dim]`; `None` when `n_prefix` is 0.
    pub key_prefix: Option<String>,
    /// Learned value prefix `[1, heads, n_prefix, head_dim]`; `None` when `n_prefix` is 0.
    pub value_prefix: Option<String>,
    /// The extended keys.
    pub key_output: String,
    /// The extended values.
    pub value_output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

/// Names created by [`PatchBuilder::gate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateNames {
    /// The learned gate, `[1]` or `[width]`.
    pub gate: String,
    /// The new value `base + gate ⊙ branch`.
    pub output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

/// Names created by [`PatchBuilder::dequantize_weight`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DequantNames {
    /// Packed codes, `uint8 [numel / 2]`, frozen, carried as [`Init::Data`].
    pub codes: String,
    /// Block scales, `float [numel / block_size, 1]`, frozen, carried as [`Init::Data`].
    pub absmax: String,
    /// The dequantized weight, of the original type and shape.
    pub output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

/// The nonlinearity of a [`PatchBuilder::residual_module`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// No nonlinearity.
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// Exact GELU, `0.5 · x · (1 + erf(x / √2))`.
    Gelu,
    /// `x · sigmoid(x)`.
    Silu,
    /// `tanh(x)`.
    Tanh,
}

impl FromStr for Activation {
    type Err = String;

    /// Parses `identity` (or `none`), `relu`, `gelu`, `silu` (or `swish`), `tanh`.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "identity" | "none" => Ok(Activation::Identity),
            "relu" => Ok(Activation::Relu),
            "gelu" => Ok(Activation::Gelu),
            "silu" | "swish" => Ok(Activation::Silu),
            "tanh" => Ok(Activation::Tanh),
            other => Err(format!(
                "unknown activation \"{other}\"; valid: identity, relu, gelu, silu, tanh"
            )),
        }
    }
}

/// Where a [`PatchBuilder::residual_module`] reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Houlsby-style: the module reads the value it adds onto.
    Sequential,
    /// Parallel adapter: the module reads `from` (typically the sublayer's input) and adds
    /// onto the value (the sublayer's output).
    Parallel {
        /// The value the module reads.
        from: String,
    },
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

    /// Declares an existing or new value as an extra graph output.
    pub fn graph_output(&mut self, value: NewValue) {
        self.patch.graph_outputs.push(value);
    }

    /// The element type of `value`: from the view, else from a new parameter of that name,
    /// else the default type (see [`PatchBuilder::with_default_dtype`]). Errors when none is
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
            .or(self.default_dtype)
            .ok_or_else(|| Error::Build(format!("the element type of \"{value}\" is unknown")))
    }

    /// Adds a low-rank branch on a linear site (LoRA):
    /// `y' = y + scale · ((dropout(x)) · A) · B`, `A` `[in, r]` and `B` `[r, out]` trainable
    /// in the weight's type, `x` the site's input (of any rank ≥ 2) as left by earlier
    /// unrestricted rewires (not by [`PatchBuilder::scale_input`], so both fold), `y` the
    /// site's output as left by earlier helpers. Rewires `y` to `y'` and records
    /// [`Fold::LowRank`].
    ///
    /// Nodes: with `dropout = Some(p)`, `p > 0`: `Constant(value_float = p)` and
    /// `Dropout(x, ratio)`, its `training_mode` input omitted so it is the identity at
    /// inference (the training-graph builder turns it on); then `MatMul(x, A)`,
    /// `MatMul(·, B)`, the scale as [`PatchBuilder::constant_scalar`], `Mul`, `Add(y, ·)`.
    /// Errors for a `norm` site, `r = 0`, `p` outside `[0, 1)`, or an unknown weight.
    pub fn low_rank_branch(
        &mut self,
        site: &Site,
        r: usize,
        scale: f32,
        init_a: Init,
        init_b: Init,
        dropout: Option<f32>,
    ) -> Result<LowRankNames> {
        require_linear(site, "low_rank_branch")?;
        if r == 0 {
            return Err(Error::Build(format!(
                "low_rank_branch on {}: rank must be at least 1",
                site.display_name()
            )));
        }
        if let Some(p) = dropout.filter(|p| !(0.0..1.0).contains(p)) {
            return Err(Error::Build(format!(
                "low_rank_branch on {}: dropout {p} is not in [0, 1)",
                site.display_name()
            )));
        }
        let dtype = self.weight_dtype(site)?;
        let stem = self.site_stem(site);
        let first = self.patch.nodes.len();
        let a = self.parameter(
            &format!("{stem}.A"),
            dtype,
            vec![site.in_features, r],
            init_a,
            true,
        );
        let b = self.parameter(
            &format!("{stem}.B"),
            dtype,
            vec![r, site.out_features],
            init_b,
            true,
        );
        let mut x = self.current(&site.input);
        if let Some(p) = dropout.filter(|p| *p > 0.0) {
            let ratio = self.op(
                &format!("{stem}.dropout_ratio"),
                "Constant",
                &[],
                &[("value_float", AttributeValue::Float(p))],
            );
            x = self.op(&format!("{stem}.dropout"), "Dropout", &[&x, &ratio], &[]);
        }
        let h = self.op(&format!("{stem}.matmul_a"), "MatMul", &[&x, &a], &[]);
        let u = self.op(&format!("{stem}.matmul_b"), "MatMul", &[&h, &b], &[]);
        let s = self.constant_scalar(&format!("{stem}.scale"), scale as f64, dtype);
        let d = self.op(&format!("{stem}.mul_scale"), "Mul", &[&u, &s], &[]);
        let base = self.current(&site.output);
        let output = self.op(&format!("{stem}.add"), "Add", &[&base, &d], &[]);
        self.rewire(&base, &output);
        let nodes = self.nodes_since(first);
        self.fold(Fold::LowRank {
            weight: site.weight.clone(),
            a: a.clone(),
            b: b.clone(),
            scale,
            layout: site.layout,
            branch_nodes: nodes.clone(),
            branch_output: output.clone(),
            base_output: base,
        });
        Ok(LowRankNames {
            a,
            b,
            output,
            nodes,
        })
    }

    /// Scales a linear site's output (IA³ on keys and values): `y' = y ⊙ s` with `s`
    /// `[out]` trainable in the weight's type, initialised by `init` (ones for a no-op).
    /// Nodes: `Mul(y, s)`. Rewires `y` to `y'` and records [`Fold::ScaleOutput`].
    pub fn scale_output(&mut self, site: &Site, init: Init) -> Result<ScaleNames> {
        require_linear(site, "scale_output")?;
        let dtype = self.weight_dtype(site)?;
        let stem = self.site_stem(site);
        let first = self.patch.nodes.len();
        let vector = self.parameter(
            &format!("{stem}.scale"),
            dtype,
            vec![site.out_features],
            init,
            true,
        );
        let base = self.current(&site.output);
        let output = self.op(&format!("{stem}.mul"), "Mul", &[&base, &vector], &[]);
        self.rewire(&base, &output);
        let nodes = self.nodes_since(first);
        self.fold(Fold::ScaleOutput {
            weight: site.weight.clone(),
            bias: site.bias.clone(),
            vector: vector.clone(),
            layout: site.layout,
            branch_nodes: nodes.clone(),
            branch_output: output.clone(),
            base_output: base,
        });
        Ok(ScaleNames {
            vector,
            output,
            nodes,
        })
    }

    /// Scales a linear site's input for that linear only (IA³ on the FFN down projection):
    /// the site's node reads `x' = x ⊙ s` with `s` `[in]` trainable in the weight's type,
    /// initialised by `init`; other consumers of `x` are untouched. Nodes: `Mul(x, s)`.
    /// Rewires `x` to `x'` with `only = [site.node]` and records [`Fold::ScaleInput`].
    pub fn scale_input(&mut self, site: &Site, init: Init) -> Result<ScaleNames> {
        require_linear(site, "scale_input")?;
        let dtype = self.weight_dtype(site)?;
        let stem = self.site_stem(site);
        let first = self.patch.nodes.len();
        let vector = self.parameter(
            &format!("{stem}.scale_in"),
            dtype,
            vec![site.in_features],
            init,
            true,
        );
        let base = self.current_for(&site.input, &site.node);
        let output = self.op(&format!("{stem}.mul_in"), "Mul", &[&base, &vector], &[]);
        self.rewire_only(&base, &output, &[&site.node]);
        let nodes = self.nodes_since(first);
        self.fold(Fold::ScaleInput {
            weight: site.weight.clone(),
            vector: vector.clone(),
            layout: site.layout,
            branch_nodes: nodes.clone(),
            branch_output: output.clone(),
            base_output: base,
        });
        Ok(ScaleNames {
            vector,
            output,
            nodes,
        })
    }

    /// Adds a bottleneck adapter onto `value` (width `hidden`):
    /// `h' = h + up(act(down(src)))` with `down(t) = t · Wd + bd`, `up(t) = t · Wu + bu`,
    /// `src = h` ([`Placement::Sequential`], Houlsby) or `from`
    /// ([`Placement::Parallel`]; its last axis must also be `hidden`). `Wd [hidden,
    /// bottleneck]` is initialised by `init_down`; `bd`, `Wu [bottleneck, hidden]` and `bu` are
    /// zeros, so the module starts as a no-op. All four are trainable, in `value`'s type.
    /// Nodes: `MatMul`, `Add`, the activation, `MatMul`, `Add`, `Add(h, ·)`. Rewires `h` to
    /// `h'`. Records no fold: an adapter is not mergeable.
    pub fn residual_module(
        &mut self,
        value: &str,
        hidden: usize,
        bottleneck: usize,
        activation: Activation,
        placement: Placement,
        init_down: Init,
    ) -> Result<ResidualNames> {
        if hidden == 0 || bottleneck == 0 {
            return Err(Error::Build(format!(
                "residual_module on {value}: widths must be positive"
            )));
        }
        let dtype = self.value_dtype(value)?;
        let stem = self.stem(&format!("{}.{value}", self.prefix));
        let first = self.patch.nodes.len();
        let down = self.parameter(
            &format!("{stem}.down"),
            dtype,
            vec![hidden, bottleneck],
            init_down,
            true,
        );
        let down_bias = self.parameter(
            &format!("{stem}.down_bias"),
            dtype,
            vec![bottleneck],
            Init::Zeros,
            true,
        );
        let up = self.parameter(
            &format!("{stem}.up"),
            dtype,
            vec![bottleneck, hidden],
            Init::Zeros,
            true,
        );
        let up_bias = self.parameter(
            &format!("{stem}.up_bias"),
            dtype,
            vec![hidden],
            Init::Zeros,
            true,
        );
        let h = self.current(value);
        let src = match &placement {
            Placement::Sequential => h.clone(),
            Placement::Parallel { from } => self.current(from),
        };
        let t = self.op(
            &format!("{stem}.matmul_down"),
            "MatMul",
            &[&src, &down],
            &[],
        );
        let t = self.op(
            &format!("{stem}.add_down_bias"),
            "Add",
            &[&t, &down_bias],
            &[],
        );
        let t = self.activation(&stem, activation, &t, dtype);
        let t = self.op(&format!("{stem}.matmul_up"), "MatMul", &[&t, &up], &[]);
        let t = self.op(&format!("{stem}.add_up_bias"), "Add", &[&t, &up_bias], &[]);
        let output = self.op(&format!("{stem}.add"), "Add", &[&h, &t], &[]);
        self.rewire(&h, &output);
        let nodes = self.nodes_since(first);
        Ok(ResidualNames {
            down,
            down_bias,
            up,
            up_bias,
            output,
            nodes,
        })
    }

    /// Prepends a learned soft prompt to a sequence (prompt tuning): `P [n_virtual, hidden]`
    /// (trainable, `embedding_output`'s type, initialised by `init`) is broadcast over the
    /// batch and concatenated before `embedding_output` `[batch, seq, hidden]` along axis 1.
    /// When `attention_mask` names the mask graph input, it is extended the same way
    /// ([`PatchBuilder::extend_mask`]). `n_virtual = 0` emits nothing.
    ///
    /// Nodes: `Constant`, `Unsqueeze(P, [0])`, `Shape(e)`, `Gather(·, [0])` (the batch size),
    /// `Constant([1, 1])`, `Concat` (the target `[batch, 1, 1]`), `Expand`,
    /// `Concat(P_batch, e, axis = 1)`. Rewires `e`. Every downstream value's sequence axis,
    /// graph outputs included, grows by `n_virtual`; the loss must skip those positions.
    pub fn prepend_to_sequence(
        &mut self,
        embedding_output: &str,
        attention_mask: Option<&str>,
        n_virtual: usize,
        hidden: usize,
        init: Init,
    ) -> Result<PromptNames> {
        let first = self.patch.nodes.len();
        if n_virtual == 0 {
            return Ok(PromptNames {
                prompt: None,
                output: self.current(embedding_output),
                mask_output: attention_mask.map(|m| self.current(m)),
                nodes: vec![],
            });
        }
        let dtype = self.value_dtype(embedding_output)?;
        let stem = self.stem(&format!("{}.prompt", self.prefix));
        let prompt = self.parameter(
            &format!("{stem}.embedding"),
            dtype,
            vec![n_virtual, hidden],
            init,
            true,
        );
        let e = self.current(embedding_output);
        let axes = self.constant_ints(&format!("{stem}.axes"), &[0]);
        let p3 = self.op(
            &format!("{stem}.unsqueeze"),
            "Unsqueeze",
            &[&prompt, &axes],
            &[],
        );
        let output = self.prepend_over_batch(&stem, &p3, &e, &[1, 1], 1);
        let mask_output = match attention_mask {
            Some(mask) => Some(self.extend_mask(mask, n_virtual)?.output),
            None => None,
        };
        let nodes = self.nodes_since(first);
        Ok(PromptNames {
            prompt: Some(prompt),
            output,
            mask_output,
            nodes,
        })
    }

    /// Repeats `block` (leading dimension 1) over the batch of `onto` and prepends it to `onto`
    /// along `axis`; later readers of `onto` read the result. Nodes, named under `stem`: the
    /// batch size of `onto`, `Constant(tail)` (the block's other dims), `Concat` (the target
    /// shape), `Expand`, `Concat(axis)`. Returns the concatenation.
    fn prepend_over_batch(
        &mut self,
        stem: &str,
        block: &str,
        onto: &str,
        tail: &[i64],
        axis: i64,
    ) -> String {
        let batch = self.batch_size(stem, onto);
        let tail = self.constant_ints(&format!("{stem}.tail"), tail);
        let target = self.op(
            &format!("{stem}.target"),
            "Concat",
            &[&batch, &tail],
            &[attr_int("axis", 0)],
        );
        let expanded = self.op(&format!("{stem}.expand"), "Expand", &[block, &target], &[]);
        let output = self.op(
            &format!("{stem}.concat"),
            "Concat",
            &[&expanded, onto],
            &[attr_int("axis", axis)],
        );
        self.rewire(onto, &output);
        output
    }

    /// Prepends `n` ones to an attention mask `[batch, seq]` along axis 1, so positions
    /// prepended by [`PatchBuilder::prepend_to_sequence`] or
    /// [`PatchBuilder::prefix_key_values`] are attended. Every consumer of the mask reads
    /// `Concat(ones[batch, n], mask, axis = 1)`. `n = 0` emits nothing.
    ///
    /// Nodes: `Shape(mask)`, `Gather(·, [0])`, `Constant([n])`, `Concat` (the shape
    /// `[batch, n]`), `Constant([1])`, `Expand` (int64 ones; `ConstantOfShape` would need a
    /// tensor attribute), `Cast(to = mask type)` unless the mask is `int64` or of unknown
    /// type, `Concat`.
    pub fn extend_mask(&mut self, mask: &str, n: usize) -> Result<MaskNames> {
        let m = self.current(mask);
        if n == 0 {
            return Ok(MaskNames {
                output: m,
                nodes: vec![],
            });
        }
        let first = self.patch.nodes.len();
        let stem = self.stem(&format!("{}.mask", self.prefix));
        let batch = self.batch_size(&stem, &m);
        let len = self.constant_ints(&format!("{stem}.len"), &[n as i64]);
        let shape = self.op(
            &format!("{stem}.shape"),
            "Concat",
            &[&batch, &len],
            &[attr_int("axis", 0)],
        );
        let one = self.constant_ints(&format!("{stem}.one"), &[1]);
        let mut ones = self.op(&format!("{stem}.ones"), "Expand", &[&one, &shape], &[]);
        let dtype = self.graph.dtype_of(mask).unwrap_or(DType::Int64);
        if dtype != DType::Int64 {
            ones = self.op(
                &format!("{stem}.cast"),
                "Cast",
                &[&ones],
                &[attr_int("to", dtype.onnx_code() as i64)],
            );
        }
        let output = self.op(
            &format!("{stem}.concat"),
            "Concat",
            &[&ones, &m],
            &[attr_int("axis", 1)],
        );
        self.rewire(&m, &output);
        Ok(MaskNames {
            output,
            nodes: self.nodes_since(first),
        })
    }

    /// Prepends learned keys and values to one attention (prefix tuning): `Pk` and `Pv`, each
    /// `[1, n_heads, n_prefix, head_dim]` (trainable, `key_states`' type; `Pk` initialised by
    /// `init`, `Pv` by `init` with a seed derived from its seed), are broadcast over the batch
    /// and concatenated before `key_states` and `value_states` `[batch, n_heads, seq,
    /// head_dim]` along axis 2. `n_heads` is the number of key/value heads (`n_kv_heads`
    /// under grouped-query attention). `n_prefix = 0` emits nothing.
    ///
    /// The attention mask must be extended the same way (call
    /// [`PatchBuilder::extend_mask`] once on the mask input for the whole model), and a
    /// causal mask built inside the graph must admit the prefix positions; this helper
    /// touches only the keys and values. Nodes per side: `Shape`, `Gather(·, [0])`,
    /// `Constant([1, 1, 1])`, `Concat`, `Expand`, `Concat(axis = 2)`.
    pub fn prefix_key_values(
        &mut self,
        key_states: &str,
        value_states: &str,
        n_heads: usize,
        head_dim: usize,
        n_prefix: usize,
        init: Init,
    ) -> Result<PrefixNames> {
        if n_prefix == 0 {
            return Ok(PrefixNames {
                key_prefix: None,
                value_prefix: None,
                key_output: self.current(key_states),
                value_output: self.current(value_states),
                nodes: vec![],
            });
        }
        let dtype = self.value_dtype(key_states)?;
        let first = self.patch.nodes.len();
        let value_init = match init.seed() {
            Some(seed) => init.clone().with_seed(splitmix64(seed)),
            None => init.clone(),
        };
        let mut made = Vec::new();
        for (states, side, init) in [
            (key_states, "key", init),
            (value_states, "value", value_init),
        ] {
            let stem = self.stem(&format!("{}.{states}", self.prefix));
            let prefix = self.parameter(
                &format!("{stem}.{side}_prefix"),
                dtype,
                vec![1, n_heads, n_prefix, head_dim],
                init,
                true,
            );
            let s = self.current(states);
            let output = self.prepend_over_batch(&stem, &prefix, &s, &[1, 1, 1], 2);
            made.push((prefix, output));
        }
        let (value_prefix, value_output) = made.pop().unwrap_or_default();
        let (key_prefix, key_output) = made.pop().unwrap_or_default();
        Ok(PrefixNames {
            key_prefix: Some(key_prefix),
            value_prefix: Some(value_prefix),
            key_output,
            value_output,
            nodes: self.nodes_since(first),
        })
    }

    /// Adds a learned gate on a branch: `base' = base + g ⊙ branch`, `g` of shape `[1]`
    /// (`width = None`) or `[width]` (broadcast over the last axis), trainable, in
    /// `base_output`'s type, initialised by `init` (zeros make it a no-op). `branch_output` is
    /// a value not yet added anywhere (for example a module built with
    /// [`PatchBuilder::op`]). Nodes: `Mul(branch, g)`, `Add(base, ·)`. Rewires `base`.
    /// Records no fold.
    pub fn gate(
        &mut self,
        branch_output: &str,
        base_output: &str,
        width: Option<usize>,
        init: Init,
    ) -> Result<GateNames> {
        let dtype = self.value_dtype(base_output)?;
        let stem = self.stem(&format!("{}.{base_output}.gate", self.prefix));
        let first = self.patch.nodes.len();
        let gate = self.parameter(
            &format!("{stem}.g"),
            dtype,
            vec![width.unwrap_or(1)],
            init,
            true,
        );
        let branch = self.current(branch_output);
        let gated = self.op(&format!("{stem}.mul"), "Mul", &[&branch, &gate], &[]);
        let base = self.current(base_output);
        let output = self.op(&format!("{stem}.add"), "Add", &[&base, &gated], &[]);
        self.rewire(&base, &output);
        Ok(GateNames {
            gate,
            output,
            nodes: self.nodes_since(first),
        })
    }

    /// Replaces initializer `weight`'s consumers by its dequantization from 4-bit codes
    /// (QLoRA's NF4 storage): element `i` (row-major) is `codebook[index_i] ·
    /// absmax[i / block_size]`, the indices packed two per byte in `codes`, high nibble first
    /// ([`crate::quant::pack_nibbles`]). `codes` (`uint8 [numel / 2]`) and `absmax`
    /// (`float [numel / block_size, 1]`) become frozen parameters carried as
    /// [`Init::Data`]. The original initializer is left without consumers (the core drops
    /// it). A weight whose values are all codebook entries is reproduced exactly with
    /// `absmax` all ones.
    ///
    /// Nodes: `Constant(4)` + `Cast(uint8)`; `BitShift(codes, 4, RIGHT)` (high nibbles);
    /// `BitShift(codes, 4, LEFT)`, `BitShift(·, 4, RIGHT)` (low nibbles); `Cast(int64)` of
    /// each; `Unsqueeze(·, [1])` of each; `Concat(axis = 1)` and `Reshape([n_blocks,
    /// block_size])` (indices in element order); `Constant(value_floats = codebook)`;
    /// `Gather`; `Mul(·, absmax)`; `Reshape(weight shape)`; `Cast(weight type)` unless
    /// `float`. Errors when `weight` is not a float initializer, its element count is odd or
    /// not a multiple of `block_size` (even, positive), or the data lengths disagree.
    pub fn dequantize_weight(
        &mut self,
        weight: &str,
        codes: Vec<u8>,
        absmax: Vec<f32>,
        block_size: usize,
        codebook: &[f32; 16],
    ) -> Result<DequantNames> {
        let info = self.graph.tensor(weight).ok_or_else(|| {
            Error::Build(format!("dequantize_weight: no initializer \"{weight}\""))
        })?;
        if !info.dtype.is_float() {
            return Err(Error::Build(format!(
                "dequantize_weight: \"{weight}\" is {}, not a float type",
                info.dtype
            )));
        }
        let numel = info.numel().ok_or_else(|| {
            Error::Build(format!(
                "dequantize_weight: \"{weight}\" has shape {:?}",
                info.shape
            ))
        })?;
        check_blocks(numel, block_size)
            .map_err(|e| Error::Build(format!("dequantize_weight on \"{weight}\": {e}")))?;
        let n_blocks = numel / block_size;
        if codes.len() * 2 != numel || absmax.len() != n_blocks {
            return Err(Error::Build(format!(
                "dequantize_weight on \"{weight}\": {} code bytes and {} scales do not fit {numel} elements in blocks of {block_size}",
                codes.len(),
                absmax.len()
            )));
        }
        let dtype = info.dtype;
        let shape = info.shape.clone();
        let stem = self.stem(&format!("{}.{weight}", self.prefix));
        let first = self.patch.nodes.len();
        let codes_init = self.data(
            &format!("{stem}.codes"),
            DType::Uint8,
            vec![numel / 2],
            codes,
        )?;
        let absmax_bytes = absmax.iter().flat_map(|v| v.to_le_bytes()).collect();
        let absmax_init = self.data(
            &format!("{stem}.absmax"),
            DType::Float,
            vec![n_blocks, 1],
            absmax_bytes,
        )?;
        let codes = self.parameter(
            &format!("{stem}.codes"),
            DType::Uint8,
            vec![numel / 2],
            codes_init,
            false,
        );
        let absmax = self.parameter(
            &format!("{stem}.absmax"),
            DType::Float,
            vec![n_blocks, 1],
            absmax_init,
            false,
        );
        let four = self.constant_scalar(&format!("{stem}.four"), 4.0, DType::Uint8);
        let right = ("direction", AttributeValue::String("RIGHT".into()));
        let left = ("direction", AttributeValue::String("LEFT".into()));
        let high = self.op(
            &format!("{stem}.high"),
            "BitShift",
            &[&codes, &four],
            std::slice::from_ref(&right),
        );
        let shifted = self.op(
            &format!("{stem}.shift_left"),
            "BitShift",
            &[&codes, &four],
            &[left],
        );
        let low = self.op(
            &format!("{stem}.low"),
            "BitShift",
            &[&shifted, &four],
            &[right],
        );
        let to_i64 = [attr_int("to", DType::Int64.onnx_code() as i64)];
        let high = self.op(&format!("{stem}.high_i64"), "Cast", &[&high], &to_i64);
        let low = self.op(&format!("{stem}.low_i64"), "Cast", &[&low], &to_i64);
        let axes = self.constant_ints(&format!("{stem}.axes"), &[1]);
        let high = self.op(
            &format!("{stem}.high_col"),
            "Unsqueeze",
            &[&high, &axes],
            &[],
        );
        let low = self.op(&format!("{stem}.low_col"), "Unsqueeze", &[&low, &axes], &[]);
        let pairs = self.op(
            &format!("{stem}.pairs"),
            "Concat",
            &[&high, &low],
            &[attr_int("axis", 1)],
        );
        let block_shape = self.constant_ints(
            &format!("{stem}.block_shape"),
            &[n_blocks as i64, block_size as i64],
        );
        let indices = self.op(
            &format!("{stem}.indices"),
            "Reshape",
            &[&pairs, &block_shape],
            &[],
        );
        let table = self.op(
            &format!("{stem}.codebook"),
            "Constant",
            &[],
            &[("value_floats", AttributeValue::Floats(codebook.to_vec()))],
        );
        let values = self.op(
            &format!("{stem}.lookup"),
            "Gather",
            &[&table, &indices],
            &[attr_int("axis", 0)],
        );
        let scaled = self.op(&format!("{stem}.scaled"), "Mul", &[&values, &absmax], &[]);
        let weight_shape = self.constant_ints(&format!("{stem}.weight_shape"), &shape);
        let mut output = self.op(
            &format!("{stem}.reshape"),
            "Reshape",
            &[&scaled, &weight_shape],
            &[],
        );
        if dtype != DType::Float {
            output = self.op(
                &format!("{stem}.cast"),
                "Cast",
                &[&output],
                &[attr_int("to", dtype.onnx_code() as i64)],
            );
        }
        self.rewire(weight, &output);
        Ok(DequantNames {
            codes,
            absmax,
            output,
            nodes: self.nodes_since(first),
        })
    }

    /// Trains the existing initializer `tensor` in place (BitFit): adds it to
    /// `mark_trainable` and records [`Fold::InPlace`], once however often called. Errors when
    /// the view has no such initializer.
    pub fn mark_trainable(&mut self, tensor: &str) -> Result<()> {
        if self.graph.tensor(tensor).is_none() {
            return Err(Error::Build(format!(
                "mark_trainable: no initializer \"{tensor}\""
            )));
        }
        if !self.patch.mark_trainable.iter().any(|t| t == tensor) {
            self.patch.mark_trainable.push(tensor.to_string());
            self.fold(Fold::InPlace {
                tensor: tensor.to_string(),
            });
        }
        Ok(())
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

    fn weight_dtype(&self, site: &Site) -> Result<DType> {
        self.graph
            .tensor(&site.weight)
            .map(|t| t.dtype)
            .ok_or_else(|| {
                Error::Build(format!(
                    "site {}: no initializer \"{}\"",
                    site.display_name(),
                    site.weight
                ))
            })
    }

    fn nodes_since(&self, first: usize) -> Vec<String> {
        self.patch.nodes[first..]
            .iter()
            .map(|n| n.name.clone())
            .collect()
    }

    fn batch_size(&mut self, stem: &str, value: &str) -> String {
        let shape = self.op(&format!("{stem}.input_shape"), "Shape", &[value], &[]);
        let index = self.constant_ints(&format!("{stem}.batch_index"), &[0]);
        self.op(
            &format!("{stem}.batch"),
            "Gather",
            &[&shape, &index],
            &[attr_int("axis", 0)],
        )
    }

    fn activation(&mut self, stem: &str, activation: Activation, x: &str, dtype: DType) -> String {
        match activation {
            Activation::Identity => x.to_string(),
            Activation::Relu => self.op(&format!("{stem}.relu"), "Relu", &[x], &[]),
            Activation::Tanh => self.op(&format!("{stem}.tanh"), "Tanh", &[x], &[]),
            Activation::Silu => {
                let s = self.op(&format!("{stem}.sigmoid"), "Sigmoid", &[x], &[]);
                self.op(&format!("{stem}.silu"), "Mul", &[x, &s], &[])
            }
            Activation::Gelu => {
                let root2 =
                    self.constant_scalar(&format!("{stem}.sqrt2"), std::f64::consts::SQRT_2, dtype);
                let one = self.constant_scalar(&format!("{stem}.one"), 1.0, dtype);
                let half = self.constant_scalar(&format!("{stem}.half"), 0.5, dtype);
                let t = self.op(&format!("{stem}.gelu_div"), "Div", &[x, &root2], &[]);
                let t = self.op(&format!("{stem}.gelu_erf"), "Erf", &[&t], &[]);
                let t = self.op(&format!("{stem}.gelu_add"), "Add", &[&t, &one], &[]);
                let t = self.op(&format!("{stem}.gelu_mul"), "Mul", &[x, &t], &[]);
                self.op(&format!("{stem}.gelu"), "Mul", &[&t, &half], &[])
            }
        }
    }
}

fn require_linear(site: &Site, helper: &str) -> Result<()> {
    if site.kind.is_linear() {
        Ok(())
    } else {
        Err(Error::Build(format!(
            "{helper} needs a linear site; {} is a norm",
            site.display_name()
        )))
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
