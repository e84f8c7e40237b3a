//! Insertions that add a new branch onto a value and record no fold: bottleneck adapters
//! (`residual_module`) and learned gates.

use super::PatchBuilder;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::patch::Init;
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

impl PatchBuilder<'_> {
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
        let (output, nodes) = self.block(|builder| {
            let h = builder.current(value);
            let src = match &placement {
                Placement::Sequential => h.clone(),
                Placement::Parallel { from } => builder.current(from),
            };
            let t = builder.op(
                &format!("{stem}.matmul_down"),
                "MatMul",
                &[&src, &down],
                &[],
            );
            let t = builder.op(
                &format!("{stem}.add_down_bias"),
                "Add",
                &[&t, &down_bias],
                &[],
            );
            let t = builder.activation(&stem, activation, &t, dtype);
            let t = builder.op(&format!("{stem}.matmul_up"), "MatMul", &[&t, &up], &[]);
            let t = builder.op(&format!("{stem}.add_up_bias"), "Add", &[&t, &up_bias], &[]);
            let output = builder.op(&format!("{stem}.add"), "Add", &[&h, &t], &[]);
            builder.rewire(&h, &output);
            Ok(output)
        })?;
        Ok(ResidualNames {
            down,
            down_bias,
            up,
            up_bias,
            output,
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
