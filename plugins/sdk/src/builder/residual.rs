//! Insertions that add a new branch onto a value and record no fold: bottleneck adapters
//! (`residual_module`) and learned gates.

use super::PatchBuilder;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::patch::{AttributeValue, Init};
use std::str::FromStr;

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

/// Names created by [`PatchBuilder::gate`] and [`PatchBuilder::gate_by`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateNames {
    /// The gate: the learned `[1]` or `[width]` parameter, or the value
    /// [`PatchBuilder::gate_by`] read.
    pub gate: String,
    /// The new value `base + gate ⊙ branch`.
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

/// The module of a bottleneck adapter, `scaling · up(act(down(x)))` (AdapterHub's
/// `Adapter`): `down(t) = t · Wd + bd` with `Wd [hidden, bottleneck]`, `up(t) = t · Wu + bu`
/// with `Wu [bottleneck, hidden]`, then dropout on the result when `dropout` is set.
#[derive(Debug, Clone, PartialEq)]
pub struct Bottleneck {
    /// The width the module reads and writes.
    pub hidden: usize,
    /// The bottleneck width.
    pub bottleneck: usize,
    /// The nonlinearity between the projections.
    pub activation: Activation,
    /// The factor on the module's output (no node when 1).
    pub scaling: f64,
    /// Dropout on the scaled output, active in training graphs only.
    pub dropout: Option<f32>,
    /// `Wd`'s init.
    pub init_down: Init,
    /// `Wu`'s init (zeros make the module output zero, so an adapter starts as a no-op).
    pub init_up: Init,
}

/// Names created by [`PatchBuilder::bottleneck`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BottleneckNames {
    /// Down projection `[hidden, bottleneck]`.
    pub down: String,
    /// Down bias `[bottleneck]`, zero-initialised.
    pub down_bias: String,
    /// Up projection `[bottleneck, hidden]`.
    pub up: String,
    /// Up bias `[hidden]`, zero-initialised.
    pub up_bias: String,
    /// The module's output, added nowhere yet.
    pub output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

impl PatchBuilder<'_> {
    /// Builds the module `module` on `x` under the names `<stem>.<part>` (`stem` as returned
    /// by [`PatchBuilder::stem`]) and returns its output without adding it anywhere; the
    /// caller wires it (residual, gate, fusion). Its four parameters are trainable, in `x`'s
    /// type. Nodes: `MatMul`, `Add`, the activation, `MatMul`, `Add`, then `Mul` by the
    /// scaling unless it is 1, then `Dropout` when set. Errors for a zero width or a dropout
    /// outside `[0, 1)`.
    pub fn bottleneck(
        &mut self,
        stem: &str,
        x: &str,
        module: &Bottleneck,
    ) -> Result<BottleneckNames> {
        let Bottleneck {
            hidden, bottleneck, ..
        } = *module;
        if hidden == 0 || bottleneck == 0 {
            return Err(Error::Build(format!(
                "bottleneck on {x}: widths must be positive (hidden {hidden}, bottleneck {bottleneck})"
            )));
        }
        if let Some(p) = module.dropout {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::Build(format!(
                    "bottleneck on {x}: dropout {p} is outside [0, 1)"
                )));
            }
        }
        let dtype = self.value_dtype(x)?;
        let parameter = |builder: &mut Self, part: &str, shape: Vec<usize>, init: Init| {
            builder.parameter(&format!("{stem}.{part}"), dtype, shape, init, true)
        };
        let down = parameter(
            self,
            "down",
            vec![hidden, bottleneck],
            module.init_down.clone(),
        );
        let down_bias = parameter(self, "down_bias", vec![bottleneck], Init::Zeros);
        let up = parameter(self, "up", vec![bottleneck, hidden], module.init_up.clone());
        let up_bias = parameter(self, "up_bias", vec![hidden], Init::Zeros);
        let (output, nodes) = self.block(|builder| {
            let x = builder.current(x);
            let t = builder.op(&format!("{stem}.matmul_down"), "MatMul", &[&x, &down], &[]);
            let t = builder.op(
                &format!("{stem}.add_down_bias"),
                "Add",
                &[&t, &down_bias],
                &[],
            );
            let t = builder.activation(stem, module.activation, &t, dtype);
            let t = builder.op(&format!("{stem}.matmul_up"), "MatMul", &[&t, &up], &[]);
            let mut t = builder.op(&format!("{stem}.add_up_bias"), "Add", &[&t, &up_bias], &[]);
            if module.scaling != 1.0 {
                let s = builder.constant_scalar(&format!("{stem}.scaling"), module.scaling, dtype);
                t = builder.op(&format!("{stem}.mul_scaling"), "Mul", &[&t, &s], &[]);
            }
            if let Some(p) = module.dropout.filter(|&p| p > 0.0) {
                let ratio = builder.op(
                    &format!("{stem}.dropout_ratio"),
                    "Constant",
                    &[],
                    &[("value_float", AttributeValue::Float(p))],
                );
                t = builder.op(&format!("{stem}.dropout"), "Dropout", &[&t, &ratio], &[]);
            }
            Ok(t)
        })?;
        Ok(BottleneckNames {
            down,
            down_bias,
            up,
            up_bias,
            output,
            nodes,
        })
    }

    /// Adds a bottleneck adapter onto `value` (width `hidden`):
    /// `h' = h + up(act(down(src)))` ([`PatchBuilder::bottleneck`] with scaling 1 and no
    /// dropout), `src = h` ([`Placement::Sequential`], Houlsby) or `from`
    /// ([`Placement::Parallel`]; its last axis must also be `hidden`). `Wd` is initialised by
    /// `init_down`; `bd`, `Wu` and `bu` are zeros, so the module starts as a no-op. Nodes: the
    /// module's, then `Add(h, ·)`. Rewires `h` to `h'`. Records no fold: an adapter is not
    /// mergeable.
    pub fn residual_module(
        &mut self,
        value: &str,
        hidden: usize,
        bottleneck: usize,
        activation: Activation,
        placement: Placement,
        init_down: Init,
    ) -> Result<ResidualNames> {
        let stem = self.stem(&format!("{}.{value}", self.prefix));
        let module = Bottleneck {
            hidden,
            bottleneck,
            activation,
            scaling: 1.0,
            dropout: None,
            init_down,
            init_up: Init::Zeros,
        };
        let (names, nodes) = self.block(|builder| {
            let h = builder.current(value);
            let src = match &placement {
                Placement::Sequential => h.clone(),
                Placement::Parallel { from } => builder.current(from),
            };
            let names = builder.bottleneck(&stem, &src, &module)?;
            let output = builder.op(&format!("{stem}.add"), "Add", &[&h, &names.output], &[]);
            builder.rewire(&h, &output);
            Ok(BottleneckNames { output, ..names })
        })?;
        Ok(ResidualNames {
            down: names.down,
            down_bias: names.down_bias,
            up: names.up,
            up_bias: names.up_bias,
            output: names.output,
            nodes,
        })
    }

    /// Adds a learned gate on a branch: `base' = base + g ⊙ branch`, `g` of shape `[1]`
    /// (`width = None`) or `[width]` (broadcast over the last axis), trainable, in
    /// `base_output`'s type, initialised by `init` (zeros make it a no-op). `branch_output` is
    /// a value not yet added anywhere (for example a module built with
    /// [`PatchBuilder::op`]). Nodes: `Mul(branch, g)`, `Add(base, ·)`. Rewires `base`.
    /// Records no fold. [`PatchBuilder::gate_by`] gates by a value the caller made instead.
    pub fn gate(
        &mut self,
        branch_output: &str,
        base_output: &str,
        width: Option<usize>,
        init: Init,
    ) -> Result<GateNames> {
        let dtype = self.value_dtype(base_output)?;
        let stem = self.stem(&format!("{}.{base_output}.gate", self.prefix));
        let gate = self.parameter(
            &format!("{stem}.g"),
            dtype,
            vec![width.unwrap_or(1)],
            init,
            true,
        );
        self.gate_at(&stem, branch_output, base_output, gate)
    }

    /// Adds a branch gated by an existing value: `base' = base + g ⊙ branch`, `g` (as left by
    /// earlier rewires) a value the view knows or the patch creates — for example
    /// `tanh` of a parameter, or one gate shared by several branches — in `base_output`'s
    /// type and broadcastable over the branch. Creates no parameter. Nodes and rewire as
    /// [`PatchBuilder::gate`]; records no fold. Errors when `g` is unknown, when its known type
    /// is not `base_output`'s, or when `base_output`'s type is unknown.
    pub fn gate_by(
        &mut self,
        branch_output: &str,
        base_output: &str,
        gate: &str,
    ) -> Result<GateNames> {
        let dtype = self.value_dtype(base_output)?;
        let gate = self.operand(&format!("gate_by on {base_output}"), gate, dtype)?;
        let stem = self.stem(&format!("{}.{base_output}.gate", self.prefix));
        self.gate_at(&stem, branch_output, base_output, gate)
    }

    /// The nodes and rewire of a gate by `gate`, named under `stem`.
    fn gate_at(
        &mut self,
        stem: &str,
        branch_output: &str,
        base_output: &str,
        gate: String,
    ) -> Result<GateNames> {
        let (output, nodes) = self.block(|builder| {
            let branch = builder.current(branch_output);
            let gated = builder.op(&format!("{stem}.mul"), "Mul", &[&branch, &gate], &[]);
            let base = builder.current(base_output);
            let output = builder.op(&format!("{stem}.add"), "Add", &[&base, &gated], &[]);
            builder.rewire(&base, &output);
            Ok(output)
        })?;
        Ok(GateNames {
            gate,
            output,
            nodes,
        })
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
