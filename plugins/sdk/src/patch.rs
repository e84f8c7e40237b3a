//! The patch: the declarative list of graph edits a plugin returns and the core applies.

use crate::dtype::DType;
use crate::graph::{Dim, GraphView, WeightLayout};
use crate::training::TrainingSpec;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Graph edits, applied by the core atomically (all or nothing) after validation, with this
/// meaning: add `parameters`, `graph_inputs` and `nodes`; then apply `rewires` in list order,
/// then `output_rewires`; then expose `graph_outputs` and make `mark_trainable` trainable. `folds` are not applied:
/// they tell `graft merge` how to fold the added branches back into the base weights.
///
/// Every missing list deserializes as empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Patch {
    /// New initializers.
    #[serde(default)]
    pub parameters: Vec<NewParameter>,
    /// New nodes; they may read base values, new parameters and each other's outputs.
    #[serde(default)]
    pub nodes: Vec<NewNode>,
    /// Consumer redirections, applied in list order.
    #[serde(default)]
    pub rewires: Vec<Rewire>,
    /// Graph outputs that return another value under their own name, while every node keeps
    /// reading the original (a `present` cache output that must not return a prefix).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_rewires: Vec<OutputRewire>,
    /// New graph inputs (for example an extra mask the caller must feed).
    #[serde(default)]
    pub graph_inputs: Vec<NewValue>,
    /// New graph outputs; each names a value the patched graph produces.
    #[serde(default)]
    pub graph_outputs: Vec<NewValue>,
    /// Existing initializers to train in place (the base tensor itself becomes trainable).
    #[serde(default)]
    pub mark_trainable: Vec<String>,
    /// How `graft merge` folds each branch back into base weights, in the order to apply.
    #[serde(default)]
    pub folds: Vec<Fold>,
    /// What the method contributes to training and to PEFT files (ABI 2); serialized as
    /// fields of the patch itself.
    #[serde(flatten)]
    pub training: TrainingSpec,
}

/// A new initializer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewParameter {
    /// Its name; must not clash with any name in the graph or the patch.
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its shape; `[]` for a scalar.
    pub shape: Vec<usize>,
    /// How the core fills it.
    pub init: Init,
    /// Whether training updates it (false for constants such as packed quantized codes).
    pub trainable: bool,
}

/// How the core fills a new parameter. Serialized with a `"kind"` tag in snake_case, e.g.
/// `{"kind":"normal","mean":0.0,"std":0.02,"seed":7}`.
///
/// Random inits draw from the core's seeded generator: the same seed gives the same tensor,
/// and distinct parameters should carry distinct seeds ([`crate::PatchBuilder::next_seed`]).
/// Values are computed in `f64` and rounded to the parameter's type; integer types take
/// `zeros`, `ones`, `constant` (truncated toward zero) and `data` only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Init {
    /// All elements 0.
    Zeros,
    /// All elements 1.
    Ones,
    /// All elements `value`.
    Constant {
        /// The fill value.
        value: f64,
    },
    /// Independent draws from N(`mean`, `std`²).
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
        /// Generator seed.
        seed: u64,
    },
    /// Independent draws from U[`low`, `high`).
    Uniform {
        /// Lower bound, inclusive.
        low: f64,
        /// Upper bound, exclusive.
        high: f64,
        /// Generator seed.
        seed: u64,
    },
    /// `torch.nn.init.kaiming_uniform_(w, a)` with the given fan-in: U[-bound, bound) with
    /// `bound = gain · sqrt(3 / fan_in)` and `gain = sqrt(2 / (1 + a²))`
    /// (see [`Init::kaiming_uniform_bound`]).
    KaimingUniform {
        /// The fan-in (for a LoRA `A` of shape `[in, r]`, PyTorch's fan-in is `in`).
        fan_in: usize,
        /// The negative slope `a` (`sqrt(5)` for `nn.Linear`'s default init).
        a: f64,
        /// Generator seed.
        seed: u64,
    },
    /// Bytes carried in the response frame's safetensors blob under `key`; its element type
    /// and shape must equal the parameter's.
    Data {
        /// The tensor name in the blob.
        key: String,
    },
    /// Rows of a 2-D initializer of the model, in the given order: a parameter
    /// `[rows.len(), width]` copied from `table` `[n, width]` (a soft prompt started from
    /// vocabulary embeddings, as PEFT's `SAMPLE_VOCAB` and `TEXT` inits do). The table's
    /// element type must equal the parameter's, and every row index must be below `n`.
    Rows {
        /// The initializer read.
        table: String,
        /// The row indices taken.
        rows: Vec<u64>,
    },
}

impl Init {
    /// The half-width of the [`Init::KaimingUniform`] interval:
    /// `sqrt(2 / (1 + a²)) · sqrt(3 / fan_in)`; infinite for `fan_in = 0`.
    pub fn kaiming_uniform_bound(fan_in: usize, a: f64) -> f64 {
        let gain = (2.0 / (1.0 + a * a)).sqrt();
        gain * (3.0 / fan_in as f64).sqrt()
    }

    /// PyTorch's `nn.Linear` weight init (and LoRA's `A` init): Kaiming-uniform with `a = √5`,
    /// giving `bound = 1 / sqrt(fan_in)`.
    pub fn linear_default(fan_in: usize, seed: u64) -> Init {
        Init::KaimingUniform {
            fan_in,
            a: 5f64.sqrt(),
            seed,
        }
    }

    /// The seed of a random init; `None` for the others.
    pub fn seed(&self) -> Option<u64> {
        match self {
            Init::Normal { seed, .. }
            | Init::Uniform { seed, .. }
            | Init::KaimingUniform { seed, .. } => Some(*seed),
            _ => None,
        }
    }

    /// The same init with its seed replaced; other inits are returned unchanged.
    pub fn with_seed(mut self, new_seed: u64) -> Init {
        if let Init::Normal { seed, .. }
        | Init::Uniform { seed, .. }
        | Init::KaimingUniform { seed, .. } = &mut self
        {
            *seed = new_seed;
        }
        self
    }
}

/// A new node. Ops are ONNX default-domain ops unless `domain` says otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewNode {
    /// Its name; must not clash with any name in the graph or the patch.
    pub name: String,
    /// The operator (`"MatMul"`, `"Add"`, ...).
    pub op_type: String,
    /// The operator domain; `""` (the default) is the ONNX default domain.
    #[serde(default)]
    pub domain: String,
    /// Input value names in operator order; `""` omits an optional input.
    pub inputs: Vec<String>,
    /// Output value names in operator order; `""` omits an optional output. Each non-empty
    /// name is new.
    pub outputs: Vec<String>,
    /// Attributes by name.
    #[serde(default)]
    pub attributes: BTreeMap<String, AttributeValue>,
}

/// An ONNX attribute value. Serialized externally tagged by its ONNX attribute type in
/// snake_case: `{"int":3}`, `{"float":0.5}`, `{"string":"RIGHT"}`, `{"ints":[1,2]}`,
/// `{"floats":[0.5]}`, `{"strings":["a"]}`. Tensor and graph attributes are not supported;
/// build constants with `Constant`'s `value_int(s)`/`value_float(s)` attributes instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttributeValue {
    /// `INT`.
    Int(i64),
    /// `FLOAT`.
    Float(f32),
    /// `STRING` (UTF-8).
    String(String),
    /// `INTS`.
    Ints(Vec<i64>),
    /// `FLOATS`.
    Floats(Vec<f32>),
    /// `STRINGS` (UTF-8).
    Strings(Vec<String>),
}

/// Redirects the consumers of `value` to `replacement`.
///
/// Rewires apply in list order, each to the graph as left by the previous ones. A rewire
/// affects every node that reads `value` at that point, and every graph output named `value`
/// (the core keeps the public output name; the output then carries `replacement`'s data),
/// except the patch's own new nodes and the nodes named in `keep`. When `only` is non-empty,
/// only the nodes it names are rewired (and no graph output). `value` may name an
/// initializer, a graph input or any node output, including one the patch added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rewire {
    /// The value whose consumers move.
    pub value: String,
    /// The value they read instead.
    pub replacement: String,
    /// Consumer nodes that keep reading `value`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<String>,
    /// If non-empty, the only consumer nodes rewired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only: Vec<String>,
}

/// A graph output made to return `replacement` (see [`Patch::output_rewires`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputRewire {
    /// The graph output's name (also the value it returns before the patch).
    pub output: String,
    /// The value it returns instead, under the same name.
    pub replacement: String,
}

/// A new graph input or output with its declared type and shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewValue {
    /// The value's name.
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its shape; symbolic dimensions by name.
    pub shape: Vec<Dim>,
}

/// How `graft merge` removes a branch and folds its effect into base weights.
///
/// Serialized with a `"kind"` tag in snake_case. Folds apply in list order. Each (except
/// `in_place`) updates base tensors, deletes `branch_nodes`, and makes every consumer of
/// `branch_output` (graph outputs included) read `base_output` instead; a name a later fold
/// mentions that an earlier fold removed resolves through that earlier redirect. Parameters
/// left without consumers are dropped. Arithmetic is done in `f32` and rounded back to each
/// tensor's type. A branch without a fold is not mergeable and stays in the merged graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fold {
    /// `branch_output = base_output + scale · (x · A) · B`, with `A` of shape `[in, r]` and `B`
    /// of shape `[r, out]` as stored parameters and `x` the linear's input. Merge adds
    /// `scale · A · B` (an `[in, out]` matrix) to `weight` for `in_out`, or its transpose for
    /// `out_in`.
    LowRank {
        /// The base weight receiving the update.
        weight: String,
        /// Parameter `A`, `[in, r]`.
        a: String,
        /// Parameter `B`, `[r, out]`.
        b: String,
        /// The branch scale (LoRA's `alpha / r`).
        scale: f32,
        /// `weight`'s layout.
        layout: WeightLayout,
        /// Nodes of the branch, the final `Add` included.
        branch_nodes: Vec<String>,
        /// The value the branch produces (the `Add`'s output).
        branch_output: String,
        /// The value the branch added onto.
        base_output: String,
    },
    /// `branch_output = base_output ⊙ vector` over the last axis, where `base_output` is
    /// `x · W + bias` (IA³ on keys and values). Merge multiplies output column `j` of `weight`
    /// (row `j` for `out_in`) and `bias[j]` by `vector[j]`.
    ScaleOutput {
        /// The base weight.
        weight: String,
        /// The base bias, scaled too, when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bias: Option<String>,
        /// Parameter holding the `[out]` scale.
        vector: String,
        /// `weight`'s layout.
        layout: WeightLayout,
        /// Nodes of the branch (the `Mul`).
        branch_nodes: Vec<String>,
        /// The scaled value.
        branch_output: String,
        /// The value that was scaled.
        base_output: String,
    },
    /// The linear reads `branch_output = base_output ⊙ vector` (its input scaled over the last
    /// axis; IA³ on the FFN down projection): `(x ⊙ s) · W = x · (diag(s) · W)`. Merge
    /// multiplies input row `i` of `weight` (column `i` for `out_in`) by `vector[i]`. Only the
    /// site's node may read `branch_output`.
    ScaleInput {
        /// The base weight.
        weight: String,
        /// Parameter holding the `[in]` scale.
        vector: String,
        /// `weight`'s layout.
        layout: WeightLayout,
        /// Nodes of the branch (the `Mul`).
        branch_nodes: Vec<String>,
        /// The scaled input.
        branch_output: String,
        /// The input that was scaled.
        base_output: String,
    },
    /// `branch_output = base_output + x · D`, where `D` (`[in, out]`) is the value `delta`
    /// that the side subgraph `delta_nodes` computes from parameters and constants only (an
    /// AdaLoRA `(A ⊙ E) · B · s`, a LoHa Hadamard or LoKr Kronecker product). The side
    /// subgraph is not part of the model: merge evaluates it once and adds `D` to `weight`
    /// (its transpose for `out_in`).
    Delta {
        /// The base weight receiving the update.
        weight: String,
        /// `weight`'s layout.
        layout: WeightLayout,
        /// Nodes computing `delta`; they may read any initializer of the patched model and
        /// each other's outputs, and their names need only be unique among themselves.
        delta_nodes: Vec<NewNode>,
        /// The `[in, out]` value `delta_nodes` produce.
        delta: String,
        /// Nodes of the branch, the final `Add` included.
        branch_nodes: Vec<String>,
        /// The value the branch produces (the `Add`'s output).
        branch_output: String,
        /// The value the branch added onto.
        base_output: String,
    },
    /// The value `value`, computed in the graph by `nodes` from parameters and constants only
    /// (a prefix-tuning MLP, a P-Tuning prompt encoder, a dequantized weight), is evaluated
    /// once at merge time and stored as an initializer of the same name; `nodes` are removed.
    /// Later folds may update the baked value (a LoRA branch on a dequantized weight).
    Bake {
        /// The value to bake.
        value: String,
        /// The nodes computing it (every node between the parameters and `value`).
        nodes: Vec<String>,
        /// Set when `nodes` dequantize a weight from 4-bit storage: merging with
        /// requantization (`graft merge --requantize`) then writes the updated value back
        /// into that storage, in the same block layout, and keeps `nodes` instead of baking.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        storage: Option<QuantizedStorage>,
    },
    /// The trained tensor replaces the base tensor of the same name (BitFit and other
    /// `mark_trainable` tensors); no nodes change.
    InPlace {
        /// The trained initializer.
        tensor: String,
    },
}

/// Where a dequantized weight's 4-bit storage lives (the `storage` of a [`Fold::Bake`]): element `i`
/// (row-major) is `codebook[code_i] · scale[i / block_size]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizedStorage {
    /// The 16 values the codes index ([`crate::quant::NF4_CODEBOOK`] for QLoRA).
    pub codebook: Vec<f32>,
    /// Elements per block scale.
    pub block_size: usize,
    /// The packed codes, `uint8 [numel / 2]`, high nibble first.
    pub codes: String,
    /// The block scales.
    pub scales: StoredScales,
}

/// How the block scales of a [`QuantizedStorage`] are stored. Serialized with a `"kind"` tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoredScales {
    /// `float [n_blocks, 1]`.
    Float {
        /// The initializer.
        absmax: String,
    },
    /// Double-quantized ([`crate::quant::DoubleQuantized`]): `int8 [n_blocks]` codes,
    /// `float [n_groups, 1]` group scales and a `float [1]` offset.
    Double {
        /// The int8 codes.
        codes: String,
        /// The group scales.
        scales: String,
        /// The offset.
        offset: String,
        /// Scales per group.
        block_size: usize,
    },
}

/// A fold's branch: the nodes merge removes, the value they produced and the value its
/// consumers read instead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Branch<'f> {
    /// Nodes removed by the merge.
    pub nodes: &'f [String],
    /// The value the branch produced.
    pub output: &'f str,
    /// The value that replaces it.
    pub base_output: &'f str,
}

impl Fold {
    /// The branch this fold removes; `None` for `in_place` and `bake` (which keep the value's
    /// name).
    pub fn branch(&self) -> Option<Branch<'_>> {
        match self {
            Fold::LowRank {
                branch_nodes,
                branch_output,
                base_output,
                ..
            }
            | Fold::ScaleOutput {
                branch_nodes,
                branch_output,
                base_output,
                ..
            }
            | Fold::ScaleInput {
                branch_nodes,
                branch_output,
                base_output,
                ..
            }
            | Fold::Delta {
                branch_nodes,
                branch_output,
                base_output,
                ..
            } => Some(Branch {
                nodes: branch_nodes,
                output: branch_output,
                base_output,
            }),
            Fold::Bake { .. } | Fold::InPlace { .. } => None,
        }
    }

    /// Every graph node the merge removes: the branch's, or the baked value's.
    pub fn removed_nodes(&self) -> &[String] {
        match self {
            Fold::Bake { nodes, .. } => nodes,
            _ => self.branch().map_or(&[], |b| b.nodes),
        }
    }

    /// The graph values the fold names (branch output and base output, or the baked value).
    pub fn values(&self) -> Vec<&str> {
        match self {
            Fold::Bake { value, .. } => vec![value],
            _ => self
                .branch()
                .map_or_else(Vec::new, |b| vec![b.output, b.base_output]),
        }
    }

    /// The base weight the fold updates, if any.
    pub fn weight(&self) -> Option<&str> {
        match self {
            Fold::LowRank { weight, .. }
            | Fold::ScaleOutput { weight, .. }
            | Fold::ScaleInput { weight, .. }
            | Fold::Delta { weight, .. } => Some(weight),
            Fold::Bake { .. } | Fold::InPlace { .. } => None,
        }
    }

    /// The new parameters the fold reads by name (`a`, `b`, `vector`); the side subgraph of a
    /// delta fold is not included.
    pub fn new_parameters(&self) -> Vec<&str> {
        match self {
            Fold::LowRank { a, b, .. } => vec![a, b],
            Fold::ScaleOutput { vector, .. } | Fold::ScaleInput { vector, .. } => vec![vector],
            _ => Vec::new(),
        }
    }

    /// Renames the base output through `rename` (the core uses it when a rewire gave a graph
    /// output's producer a new name).
    pub fn rename_base_output(&mut self, rename: impl Fn(&str) -> Option<String>) {
        if let Fold::LowRank { base_output, .. }
        | Fold::ScaleOutput { base_output, .. }
        | Fold::ScaleInput { base_output, .. }
        | Fold::Delta { base_output, .. } = self
        {
            if let Some(fresh) = rename(base_output) {
                *base_output = fresh;
            }
        }
    }
}

impl Patch {
    /// True when the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.parameters.is_empty()
            && self.nodes.is_empty()
            && self.rewires.is_empty()
            && self.output_rewires.is_empty()
            && self.graph_inputs.is_empty()
            && self.graph_outputs.is_empty()
            && self.mark_trainable.is_empty()
            && self.folds.is_empty()
            && self.training.is_empty()
    }

    /// Checks the patch's names against `graph` and itself, returning every problem found:
    /// new names (parameters, nodes, node outputs, graph inputs, host inputs) are unique and
    /// unknown to the view; every node input, rewire end, graph output and fold reference names
    /// something the view knows ([`GraphView::known_names`]) or the patch creates;
    /// `mark_trainable` names initializers, fold weights initializers or new parameters (a fold
    /// may update a parameter of the same patch, as `examples/plugin-rust` does); fold `a`, `b`, `vector` name new
    /// parameters and `branch_nodes` name new nodes; tensors made trainable are floating point,
    /// named once, and not already trainable by an earlier method (`graph.record`). It does
    /// not check shapes, op semantics or cycles: the core checks those on the patched graph.
    pub fn check(&self, graph: &GraphView) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let known = graph.known_names();
        let mut created: BTreeSet<&str> = BTreeSet::new();
        fn claim<'p>(
            name: &'p str,
            what: &str,
            known: &BTreeSet<&str>,
            created: &mut BTreeSet<&'p str>,
            problems: &mut Vec<String>,
        ) {
            if name.is_empty() {
                problems.push(format!("{what} has an empty name"));
            } else if known.contains(name) {
                problems.push(format!("{what} \"{name}\" already exists in the graph"));
            } else if !created.insert(name) {
                problems.push(format!("{what} \"{name}\" is created twice by the patch"));
            }
        }
        for p in &self.parameters {
            claim(&p.name, "parameter", &known, &mut created, &mut problems);
        }
        for n in &self.nodes {
            claim(&n.name, "node", &known, &mut created, &mut problems);
            for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                claim(o, "node output", &known, &mut created, &mut problems);
            }
        }
        for v in &self.graph_inputs {
            claim(&v.name, "graph input", &known, &mut created, &mut problems);
        }
        for v in &self.training.host_inputs {
            claim(&v.name, "host input", &known, &mut created, &mut problems);
        }
        let params: BTreeSet<&str> = self.parameters.iter().map(|p| p.name.as_str()).collect();
        let node_names: BTreeSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        let base_values: BTreeSet<&str> = (graph.tensors.iter().map(|t| t.name.as_str()))
            .chain(graph.values.iter().map(|v| v.name.as_str()))
            .chain(
                graph
                    .inputs
                    .iter()
                    .chain(&graph.outputs)
                    .map(String::as_str),
            )
            .collect();
        let base_nodes: BTreeSet<&str> = graph.node_names.iter().map(String::as_str).collect();
        // Node names and value names are separate namespaces in ONNX: a name only a node has
        // is not a value to read.
        let exists = |name: &str| {
            (known.contains(name) && (base_values.contains(name) || !base_nodes.contains(name)))
                || (created.contains(name) && !node_names.contains(name))
        };
        for n in &self.nodes {
            if n.op_type.is_empty() {
                problems.push(format!("node \"{}\" has no op_type", n.name));
            }
            for i in n.inputs.iter().filter(|i| !i.is_empty()) {
                if !exists(i) {
                    problems.push(format!("node \"{}\" reads unknown value \"{i}\"", n.name));
                }
            }
        }
        for r in &self.rewires {
            for v in [&r.value, &r.replacement] {
                if !exists(v) {
                    problems.push(format!("rewire names unknown value \"{v}\""));
                }
            }
            if r.value == r.replacement {
                problems.push(format!("rewire of \"{}\" onto itself", r.value));
            }
        }
        for r in &self.output_rewires {
            if !graph.outputs.contains(&r.output) {
                problems.push(format!(
                    "output rewire names \"{}\", which is no graph output",
                    r.output
                ));
            }
            if !exists(&r.replacement) {
                problems.push(format!(
                    "output rewire reads unknown value \"{}\"",
                    r.replacement
                ));
            }
        }
        for v in &self.graph_outputs {
            if !exists(&v.name) {
                problems.push(format!("graph output \"{}\" is not produced", v.name));
            }
        }
        let earlier: BTreeSet<&str> = graph.record.trainable().collect();
        let mut marked: BTreeSet<&str> = BTreeSet::new();
        for t in &self.mark_trainable {
            match graph.tensor(t) {
                None => problems.push(format!("mark_trainable names unknown initializer \"{t}\"")),
                Some(tensor) if !tensor.dtype.is_float() => problems.push(format!(
                    "mark_trainable names \"{t}\", which is {}, not floating point",
                    tensor.dtype
                )),
                Some(_) => {}
            }
            if !marked.insert(t) {
                problems.push(format!("mark_trainable names \"{t}\" twice"));
            }
        }
        for p in self.parameters.iter().filter(|p| p.trainable) {
            if !p.dtype.is_float() {
                problems.push(format!(
                    "trainable parameter \"{}\" is {}, not floating point",
                    p.name, p.dtype
                ));
            }
        }
        let trainable = (self.parameters.iter())
            .filter(|p| p.trainable)
            .map(|p| p.name.as_str())
            .chain(self.mark_trainable.iter().map(String::as_str));
        let mut reported = BTreeSet::new();
        for t in trainable.filter(|t| earlier.contains(t) && reported.insert(*t)) {
            problems.push(format!("\"{t}\" is already trainable by an earlier method"));
        }
        // A bake fold's value is an initializer once merged: later folds may update it (a
        // LoRA branch on a dequantized weight).
        let mut baked = BTreeSet::new();
        for f in &self.folds {
            if let Fold::Bake { value, .. } = f {
                baked.insert(value.as_str());
            }
            if let Fold::InPlace { tensor } = f {
                if graph.tensor(tensor).is_none() {
                    problems.push(format!(
                        "in_place fold names unknown initializer \"{tensor}\""
                    ));
                }
                continue;
            }
            if let Some(weight) = f.weight() {
                if graph.tensor(weight).is_none()
                    && !params.contains(weight)
                    && !baked.contains(weight)
                {
                    problems.push(format!("fold names unknown weight \"{weight}\""));
                }
            }
            if let Fold::ScaleOutput {
                bias: Some(bias), ..
            } = f
            {
                if graph.tensor(bias).is_none() {
                    problems.push(format!("fold names unknown bias \"{bias}\""));
                }
            }
            for p in f.new_parameters() {
                if !params.contains(p) {
                    problems.push(format!("fold names \"{p}\", which is not a new parameter"));
                }
            }
            if let Fold::Delta {
                delta_nodes, delta, ..
            } = f
            {
                let side: BTreeSet<&str> = delta_nodes
                    .iter()
                    .flat_map(|n| n.outputs.iter().map(String::as_str))
                    .collect();
                if !side.contains(delta.as_str()) {
                    problems.push(format!("delta fold: no delta node produces \"{delta}\""));
                }
                for i in delta_nodes.iter().flat_map(|n| &n.inputs) {
                    if !i.is_empty() && !side.contains(i.as_str()) && !exists(i) {
                        problems.push(format!("delta fold reads unknown value \"{i}\""));
                    }
                }
            }
            for n in f.removed_nodes() {
                if !node_names.contains(n.as_str()) {
                    problems.push(format!("fold names \"{n}\", which is not a new node"));
                }
            }
            for v in f.values() {
                if !exists(v) {
                    problems.push(format!("fold names unknown value \"{v}\""));
                }
            }
        }
        for term in &self.training.loss_terms {
            if !exists(&term.value) {
                problems.push(format!(
                    "loss term \"{}\" reads unknown value \"{}\"",
                    term.name, term.value
                ));
            }
            if !term.weight.is_finite() {
                problems.push(format!(
                    "loss term \"{}\" has weight {}",
                    term.name, term.weight
                ));
            }
        }
        for tensor in self.training.step_hook.iter().flat_map(|h| &h.tensors) {
            if graph.tensor(tensor).is_none() && !params.contains(tensor.as_str()) {
                problems.push(format!("step hook names unknown tensor \"{tensor}\""));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
