//! A small graph builder for the importer: nodes named like the legacy PyTorch exporter names
//! them (`/bert/encoder/layer.0/attention/self/query/MatMul`), so that graft's labels read the
//! Hugging Face module paths from them, and the few composite pieces both families share.

use std::collections::HashMap;

use crate::ir::attributes::{float_attribute, int_attribute, ints_attribute};
use crate::ir::{DataType, Graph, Node, Tensor};
use crate::Result;

use super::checkpoint::Checkpoint;

/// The largest finite float32, negated: what Hugging Face adds to the scores of masked keys.
pub const MASKED: f32 = f32::MIN;

/// Builds one graph in topological order, with weights drawn from a checkpoint.
pub struct Builder<'a> {
    pub graph: Graph,
    checkpoint: &'a Checkpoint,
    /// The base model's prefix in head classes (`bert`, `model`): a checkpoint of the bare base
    /// model stores `encoder.layer.0…` where the class with a head names `bert.encoder.layer.0…`,
    /// and the other way round; names are looked up both ways.
    base_alias: Option<String>,
    /// Draws the weights of heads the checkpoint lacks.
    fresh: Option<FreshHeads>,
    /// The module path new nodes belong to (`bert.encoder.layer.0.attention.self`).
    scope: String,
    /// Per scope and op type, how many nodes were named so far.
    counters: HashMap<(String, String), usize>,
    constants: usize,
}

impl<'a> Builder<'a> {
    /// An empty graph whose weights come from `checkpoint`.
    pub fn new(checkpoint: &'a Checkpoint) -> Self {
        Builder {
            graph: Graph {
                name: "main_graph".into(),
                ..Graph::default()
            },
            checkpoint,
            base_alias: None,
            fresh: None,
            scope: String::new(),
            counters: HashMap::new(),
            constants: 0,
        }
    }

    /// Runs `body` with nodes named under the module path `scope`.
    pub fn scoped<T>(
        &mut self,
        scope: &str,
        body: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let outer = std::mem::replace(&mut self.scope, scope.to_owned());
        let result = body(self);
        self.scope = outer;
        result
    }

    /// `module.child`, or `child` at the top.
    pub fn path(module: &str, child: &str) -> String {
        match module {
            "" => child.to_owned(),
            _ => format!("{module}.{child}"),
        }
    }

    /// Appends an `op` node reading `inputs` with `attributes`; returns its output.
    pub fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<onnx_protobuf::AttributeProto>,
    ) -> String {
        let count = self
            .counters
            .entry((self.scope.clone(), op.to_owned()))
            .or_insert(0);
        let suffix = match *count {
            0 => String::new(),
            n => format!("_{n}"),
        };
        *count += 1;
        let name = format!("{}/{op}{suffix}", module_scope(&self.scope));
        let output = format!("{name}_output_0");
        let mut node = Node::new(
            name,
            op,
            inputs.iter().map(|s| (*s).to_owned()).collect(),
            vec![output.clone()],
        );
        node.attributes = attributes;
        self.graph.nodes.push(node);
        output
    }

    fn constant(&mut self, tensor: impl FnOnce(String) -> Tensor) -> String {
        self.constants += 1;
        let name = format!("graft_import.const_{}", self.constants);
        let tensor = tensor(name.clone());
        self.graph.initializers.push(tensor);
        name
    }

    /// An int64 constant of shape `dims`.
    pub fn ints(&mut self, dims: &[i64], values: &[i64]) -> String {
        self.constant(|name| Tensor::from_i64(name, dims.to_vec(), values))
    }

    /// A 1-D int64 constant.
    pub fn ints1(&mut self, values: &[i64]) -> String {
        self.ints(&[values.len() as i64], values)
    }

    /// A float32 constant of shape `dims`.
    pub fn floats(&mut self, dims: &[i64], values: &[f32]) -> String {
        self.constant(|name| Tensor::from_f32(name, dims.to_vec(), values))
    }

    /// A float32 scalar.
    pub fn scalar(&mut self, value: f32) -> String {
        self.floats(&[], &[value])
    }

    /// Looks names up with and without the base model's prefix `base` (see `base_alias`).
    pub fn alias_base(&mut self, base: &str) {
        self.base_alias = Some(base.to_owned());
    }

    /// Lets [`Builder::head_linear`] start heads the checkpoint lacks.
    pub fn start_missing_heads(&mut self, fresh: FreshHeads) {
        self.fresh = Some(fresh);
    }

    /// The checkpoint's key for the graph's tensor `name`.
    fn key(&self, name: &str) -> Option<String> {
        if self.checkpoint.contains(name) {
            return Some(name.to_owned());
        }
        let base = self.base_alias.as_deref()?;
        let other = match name.strip_prefix(base).and_then(|n| n.strip_prefix('.')) {
            Some(bare) => bare.to_owned(),
            None => format!("{base}.{name}"),
        };
        self.checkpoint.contains(&other).then_some(other)
    }

    /// The checkpoint's tensor `name`, added as an initializer of that name (once), as float32.
    pub fn weight(&mut self, name: &str) -> Result<String> {
        if self.graph.initializer(name).is_none() {
            let key = self.key(name).unwrap_or_else(|| name.to_owned());
            let mut tensor = self.checkpoint.tensor(&key)?;
            tensor.name = name.to_owned();
            self.graph.initializers.push(tensor);
        }
        Ok(name.to_owned())
    }

    /// The checkpoint's shape of tensor `name`, if it holds one.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.checkpoint.shape(&self.key(name)?)
    }

    /// Whether the checkpoint holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.key(name).is_some()
    }

    /// A head's linear `[out, in]` at `module`: the checkpoint's when it holds the module,
    /// else (with [`Builder::start_missing_heads`]) new weights drawn as transformers draws
    /// them (normal with the config's `initializer_range`, zero bias); `started` lists them.
    pub fn head_linear(
        &mut self,
        x: &str,
        module: &str,
        out: usize,
        input: usize,
    ) -> Result<String> {
        let weight = format!("{module}.weight");
        if self.has(&weight) {
            return self.linear(x, module, out, input);
        }
        let Some(fresh) = self.fresh.as_mut() else {
            return Err(crate::Error::Config(format!(
                "the checkpoint has no {weight}, which the head needs; pass --num-labels N to \
                 start a new head"
            )));
        };
        // Each module's draws depend on the seed and the module's name only.
        let seed = module
            .bytes()
            .fold(fresh.seed ^ 0xcbf2_9ce4_8422_2325, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
        let values: Vec<f32> = crate::patch::normal_values(seed, 0.0, fresh.std, out * input)
            .map(|v| v as f32)
            .collect();
        fresh.started.push(module.to_owned());
        let bias = format!("{module}.bias");
        let tensor = Tensor::from_f32(&weight, vec![out as i64, input as i64], &values);
        self.graph.initializers.push(tensor);
        (self.graph.initializers).push(Tensor::from_f32(&bias, vec![out as i64], &vec![0.0; out]));
        self.linear_with(x, module, &weight, Some(&bias))
    }

    /// The modules [`Builder::head_linear`] started.
    pub fn started_heads(&self) -> Vec<String> {
        self.fresh
            .as_ref()
            .map_or_else(Vec::new, |f| f.started.clone())
    }

    /// `x · Wᵀ (+ b)` for the `torch.nn.Linear` at `module` (`module.weight` is `[out, in]`,
    /// read through a `Transpose` so that the checkpoint's bytes are used as they are).
    ///
    /// The weight must be `[out, input]` and a bias `[out]`, the sizes the config implies;
    /// another shape is refused naming the tensor.
    pub fn linear(&mut self, x: &str, module: &str, out: usize, input: usize) -> Result<String> {
        let weight = format!("{module}.weight");
        self.expect_shape(&weight, &[out, input])?;
        let weight = self.weight(&weight)?;
        let bias = format!("{module}.bias");
        let bias = self.has(&bias).then_some(bias);
        if let Some(bias) = &bias {
            self.expect_shape(bias, &[out])?;
        }
        self.linear_with(x, module, &weight, bias.as_deref())
    }

    /// The first dimension of the checkpoint's tensor `name` (0 when missing or a scalar).
    pub fn rows(&self, name: &str) -> usize {
        self.shape(name)
            .and_then(|s| s.first().copied())
            .unwrap_or(0)
    }

    /// Fails naming tensor `name` unless the checkpoint stores it with shape `dims` (a missing
    /// tensor is left to [`Builder::weight`] to report).
    pub fn expect_shape(&self, name: &str, dims: &[usize]) -> Result<()> {
        match self.shape(name) {
            Some(shape) if shape != dims => Err(crate::Error::Config(format!(
                "the checkpoint's {name} has shape {shape:?}; config.json implies {dims:?}"
            ))),
            _ => Ok(()),
        }
    }

    /// `x · weightᵀ (+ bias)` named as the module `module` (a tied head reads another module's
    /// weight).
    pub fn linear_with(
        &mut self,
        x: &str,
        module: &str,
        weight: &str,
        bias: Option<&str>,
    ) -> Result<String> {
        self.scoped(module, |b| {
            let transposed = b.op(
                "Transpose",
                &[weight],
                vec![ints_attribute("perm", &[1, 0])],
            );
            let product = b.op("MatMul", &[x, &transposed], vec![]);
            match bias {
                Some(bias) => {
                    let bias = b.weight(bias)?;
                    Ok(b.op("Add", &[&bias, &product], vec![]))
                }
                None => Ok(product),
            }
        })
    }

    /// `LayerNormalization` over the last axis with the module's weight and bias.
    pub fn layer_norm(
        &mut self,
        x: &str,
        module: &str,
        width: usize,
        epsilon: f32,
    ) -> Result<String> {
        let (weight, bias) = (format!("{module}.weight"), format!("{module}.bias"));
        self.expect_shape(&weight, &[width])?;
        self.expect_shape(&bias, &[width])?;
        let weight = self.weight(&weight)?;
        let bias = self.weight(&bias)?;
        self.scoped(module, |b| {
            Ok(b.op(
                "LayerNormalization",
                &[x, &weight, &bias],
                vec![
                    int_attribute("axis", -1),
                    float_attribute("epsilon", epsilon),
                ],
            ))
        })
    }

    /// RMSNorm as LLaMA computes it: `weight · x / sqrt(mean(x²) + ε)`.
    pub fn rms_norm(
        &mut self,
        x: &str,
        module: &str,
        width: usize,
        epsilon: f32,
    ) -> Result<String> {
        let weight = format!("{module}.weight");
        self.expect_shape(&weight, &[width])?;
        let weight = self.weight(&weight)?;
        self.scoped(module, |b| {
            let two = b.scalar(2.0);
            let squares = b.op("Pow", &[x, &two], vec![]);
            let mean = b.op(
                "ReduceMean",
                &[&squares],
                vec![ints_attribute("axes", &[-1]), int_attribute("keepdims", 1)],
            );
            let eps = b.scalar(epsilon);
            let shifted = b.op("Add", &[&mean, &eps], vec![]);
            let root = b.op("Sqrt", &[&shifted], vec![]);
            let inverse = b.op("Reciprocal", &[&root], vec![]);
            let normalized = b.op("Mul", &[x, &inverse], vec![]);
            Ok(b.op("Mul", &[&weight, &normalized], vec![]))
        })
    }

    /// The activation function a config names, applied to `x`.
    pub fn activation(&mut self, x: &str, activation: Activation) -> String {
        match activation {
            Activation::Relu => self.op("Relu", &[x], vec![]),
            Activation::Silu => {
                let gate = self.op("Sigmoid", &[x], vec![]);
                self.op("Mul", &[x, &gate], vec![])
            }
            Activation::Gelu => {
                let root2 = self.scalar(std::f32::consts::SQRT_2);
                let scaled = self.op("Div", &[x, &root2], vec![]);
                let erf = self.op("Erf", &[&scaled], vec![]);
                let one = self.scalar(1.0);
                let shifted = self.op("Add", &[&erf, &one], vec![]);
                let product = self.op("Mul", &[x, &shifted], vec![]);
                let half = self.scalar(0.5);
                self.op("Mul", &[&product, &half], vec![])
            }
            Activation::GeluTanh => {
                // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
                let three = self.scalar(3.0);
                let cube = self.op("Pow", &[x, &three], vec![]);
                let c = self.scalar(0.044715);
                let cubic = self.op("Mul", &[&cube, &c], vec![]);
                let inner = self.op("Add", &[x, &cubic], vec![]);
                let k = self.scalar((2.0 / std::f64::consts::PI).sqrt() as f32);
                let scaled = self.op("Mul", &[&inner, &k], vec![]);
                let tanh = self.op("Tanh", &[&scaled], vec![]);
                let one = self.scalar(1.0);
                let shifted = self.op("Add", &[&tanh, &one], vec![]);
                let product = self.op("Mul", &[x, &shifted], vec![]);
                let half = self.scalar(0.5);
                self.op("Mul", &[&product, &half], vec![])
            }
        }
    }

    /// `[B, S, heads·head_dim]` → `[B, heads, S, head_dim]`.
    pub fn split_heads(&mut self, x: &str, heads: usize, head_dim: usize) -> String {
        let shape = self.ints1(&[0, 0, heads as i64, head_dim as i64]);
        let split = self.op("Reshape", &[x, &shape], vec![]);
        self.op(
            "Transpose",
            &[&split],
            vec![ints_attribute("perm", &[0, 2, 1, 3])],
        )
    }

    /// `[B, heads, S, head_dim]` → `[B, S, heads·head_dim]`.
    pub fn merge_heads(&mut self, x: &str, width: usize) -> String {
        let transposed = self.op(
            "Transpose",
            &[x],
            vec![ints_attribute("perm", &[0, 2, 1, 3])],
        );
        let shape = self.ints1(&[0, 0, width as i64]);
        self.op("Reshape", &[&transposed, &shape], vec![])
    }

    /// Scaled dot-product attention with an additive mask broadcastable to `[B, H, S, T]`:
    /// `softmax(q·kᵀ·scale + mask)·v`.
    pub fn attention(&mut self, q: &str, k: &str, v: &str, mask: &str, scale: f32) -> String {
        let kt = self.op(
            "Transpose",
            &[k],
            vec![ints_attribute("perm", &[0, 1, 3, 2])],
        );
        let scores = self.op("MatMul", &[q, &kt], vec![]);
        let scale = self.scalar(scale);
        let scaled = self.op("Mul", &[&scores, &scale], vec![]);
        let masked = self.op("Add", &[&scaled, mask], vec![]);
        let probabilities = self.op("Softmax", &[&masked], vec![int_attribute("axis", -1)]);
        self.op("MatMul", &[&probabilities, v], vec![])
    }

    /// Dimension `axis` of `x`'s shape as a 1-element int64 tensor.
    pub fn dim(&mut self, x: &str, axis: i64) -> String {
        let shape = self.op("Shape", &[x], vec![]);
        let index = self.ints1(&[axis]);
        self.op("Gather", &[&shape, &index], vec![int_attribute("axis", 0)])
    }

    /// Row `index` along axis 1 of `[B, S, H]`: `[B, H]` (the first token's state).
    pub fn token(&mut self, x: &str, index: i64) -> String {
        let index = self.ints(&[], &[index]);
        self.op("Gather", &[x, &index], vec![int_attribute("axis", 1)])
    }

    /// A graph input.
    pub fn input(&mut self, name: &str, dtype: DataType, dims: &[crate::ir::Dim]) -> String {
        (self.graph.inputs).push(crate::ir::ValueInfo::tensor(name, dtype, dims));
        name.to_owned()
    }

    /// Renames the value `value` to `name` and makes it a graph output.
    pub fn output(&mut self, value: &str, name: &str, dims: &[crate::ir::Dim]) {
        let identity = Node::new(
            format!("graft_import.output.{name}"),
            "Identity",
            vec![value.to_owned()],
            vec![name.to_owned()],
        );
        self.graph.nodes.push(identity);
        (self.graph.outputs).push(crate::ir::ValueInfo::tensor(name, DataType::Float, dims));
    }
}

/// How to start heads a checkpoint lacks (a classifier on a bare encoder).
#[derive(Clone, Debug)]
pub struct FreshHeads {
    /// The standard deviation of the weights (the config's `initializer_range`).
    pub std: f64,
    /// The seed of the draws.
    pub seed: u64,
    started: Vec<String>,
}

impl FreshHeads {
    /// Heads drawn with `std` from `seed`.
    pub fn new(std: f64, seed: u64) -> Self {
        FreshHeads {
            std,
            seed,
            started: Vec::new(),
        }
    }
}

/// The scope prefix as the legacy exporter writes it for a module path:
/// `bert.encoder.layer.0.attention` gives `/bert/encoder/layer.0/attention` (a numeric
/// component joins the one before it).
fn module_scope(path: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    for component in path.split('.').filter(|s| !s.is_empty()) {
        match out.last_mut() {
            Some(last) if component.chars().all(|c| c.is_ascii_digit()) => {
                last.push('.');
                last.push_str(component);
            }
            _ => out.push(component.to_owned()),
        }
    }
    out.iter().map(|c| format!("/{c}")).collect()
}

/// The activation functions the importer builds, by the names configs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `relu`.
    Relu,
    /// `silu` / `swish`.
    Silu,
    /// The exact, erf-based GELU (`gelu`).
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
}

impl Activation {
    /// The activation a config's `hidden_act` names, or `None`.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "relu" => Some(Activation::Relu),
            "silu" | "swish" => Some(Activation::Silu),
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            _ => None,
        }
    }

    /// The names [`Activation::named`] accepts.
    pub const NAMES: &'static str =
        "relu, silu, swish, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_join_layer_numbers_as_the_legacy_exporter_does() {
        assert_eq!(
            module_scope("bert.encoder.layer.0.attention"),
            "/bert/encoder/layer.0/attention"
        );
        assert_eq!(module_scope(""), "");
    }
}
