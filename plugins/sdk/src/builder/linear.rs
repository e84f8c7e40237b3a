//! Insertions on linear sites that merge back into the weight: low-rank branches (LoRA),
//! output and input scalings (IA³) and weight-delta branches (LoHa, LoKr, DoRA), each recording
//! its [`Fold`].

use super::PatchBuilder;
use crate::error::{Error, Result};
use crate::graph::Site;
use crate::patch::{AttributeValue, Fold, Init};

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

/// Names created by [`PatchBuilder::scale_output`], [`PatchBuilder::scale_input`] and their
/// `_by` variants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleNames {
    /// The scale: the learned vector, or the value a `_by` variant read.
    pub vector: String,
    /// The scaled value.
    pub output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

/// Names created by [`PatchBuilder::delta_branch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaNames {
    /// The `[in, out]` weight update the caller's nodes computed.
    pub delta: String,
    /// The site's new output `y + x · delta`.
    pub output: String,
    /// Every node emitted, the caller's included, in order.
    pub nodes: Vec<String>,
}

impl<'g> PatchBuilder<'g> {
    /// Adds a branch that computes a whole weight update from parameters (a LoHa Hadamard or
    /// LoKr Kronecker product, a DoRA rescaling): `build_delta` emits nodes that read only
    /// parameters, constants and initializers (never a graph input or activation) and returns
    /// their `[in, out]` output `D`; then `y' = y + x · D`, with `x` the site's input and `y` its
    /// output as left by earlier helpers. Rewires `y` to `y'` and records [`Fold::Delta`] with
    /// copies of `build_delta`'s nodes as the side subgraph, so merge adds `D` to the weight.
    ///
    /// Nodes: `build_delta`'s, then `MatMul(x, D)` and `Add(y, ·)`, named from `stem` (the
    /// caller's [`PatchBuilder::stem`] for the site). Errors for a `norm` site or whatever
    /// `build_delta` returns.
    pub fn delta_branch(
        &mut self,
        site: &Site,
        stem: &str,
        build_delta: impl FnOnce(&mut PatchBuilder<'g>) -> Result<String>,
    ) -> Result<DeltaNames> {
        require_linear(site, "delta_branch")?;
        let first = self.patch.nodes.len();
        let ((delta, output, base), nodes) = self.block(|builder| {
            let delta = build_delta(builder)?;
            let x = builder.current(&site.input);
            let update = builder.op(
                &format!("{stem}.matmul_delta"),
                "MatMul",
                &[&x, &delta],
                &[],
            );
            let base = builder.current(&site.output);
            let output = builder.op(&format!("{stem}.add"), "Add", &[&base, &update], &[]);
            builder.rewire(&base, &output);
            Ok((delta, output, base))
        })?;
        // The caller's nodes are every node before the MatMul and the Add.
        let delta_nodes = self.patch.nodes[first..self.patch.nodes.len() - 2].to_vec();
        self.fold(Fold::Delta {
            weight: site.weight.clone(),
            layout: site.layout,
            delta_nodes,
            delta: delta.clone(),
            branch_nodes: nodes.clone(),
            branch_output: output.clone(),
            base_output: base,
        });
        Ok(DeltaNames {
            delta,
            output,
            nodes,
        })
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
    /// Errors for a `norm` site, a rank `r` that [`Site::check_rank`] refuses, `p` outside
    /// `[0, 1)`, or an unknown weight.
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
        site.check_rank(r).map_err(Error::Build)?;
        if let Some(p) = dropout.filter(|p| !(0.0..1.0).contains(p)) {
            return Err(Error::Build(format!(
                "low_rank_branch on {}: dropout {p} is not in [0, 1)",
                site.display_name()
            )));
        }
        let dtype = self.weight_dtype(site)?;
        let stem = self.site_stem(site);
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
        let ((output, base), nodes) = self.block(|builder| {
            let mut x = builder.current(&site.input);
            if let Some(p) = dropout.filter(|p| *p > 0.0) {
                let ratio = builder.op(
                    &format!("{stem}.dropout_ratio"),
                    "Constant",
                    &[],
                    &[("value_float", AttributeValue::Float(p))],
                );
                x = builder.op(&format!("{stem}.dropout"), "Dropout", &[&x, &ratio], &[]);
            }
            let h = builder.op(&format!("{stem}.matmul_a"), "MatMul", &[&x, &a], &[]);
            let u = builder.op(&format!("{stem}.matmul_b"), "MatMul", &[&h, &b], &[]);
            let s = builder.constant_scalar(&format!("{stem}.scale"), scale as f64, dtype);
            let d = builder.op(&format!("{stem}.mul_scale"), "Mul", &[&u, &s], &[]);
            let base = builder.current(&site.output);
            let output = builder.op(&format!("{stem}.add"), "Add", &[&base, &d], &[]);
            builder.rewire(&base, &output);
            Ok((output, base))
        })?;
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
    /// [`PatchBuilder::scale_output_by`] scales by a value the caller made instead.
    pub fn scale_output(&mut self, site: &Site, init: Init) -> Result<ScaleNames> {
        require_linear(site, "scale_output")?;
        let dtype = self.weight_dtype(site)?;
        let stem = self.site_stem(site);
        let vector = self.parameter(
            &format!("{stem}.scale"),
            dtype,
            vec![site.out_features],
            init,
            true,
        );
        self.scale_output_at(site, &stem, vector)
    }

    /// Scales a linear site's output by an existing value: `y' = y ⊙ v`, `v` (as left by
    /// earlier rewires) a value the view knows or the patch creates — a parameter the caller
    /// added with [`PatchBuilder::parameter`], or a node output such as a computed or shared
    /// scale — of the weight's type and broadcastable over `y`'s last axis. Creates no
    /// parameter. Nodes: `Mul(y, v)`. Rewires `y` to `y'`.
    ///
    /// Records [`Fold::ScaleOutput`] when `v` is a parameter of this patch of shape `[out]`,
    /// the one form `graft merge` folds; otherwise records no fold and the `Mul` stays in
    /// merged graphs. Folds on the same site are then merged around it, which is exact only
    /// for low-rank branches and scales added before it. Errors for a `norm` site, an unknown
    /// weight, an unknown `v`, or a `v` whose known type is not the weight's.
    pub fn scale_output_by(&mut self, site: &Site, vector: &str) -> Result<ScaleNames> {
        require_linear(site, "scale_output_by")?;
        let dtype = self.weight_dtype(site)?;
        let helper = format!("scale_output_by on {}", site.display_name());
        let vector = self.operand(&helper, vector, dtype)?;
        let stem = self.site_stem(site);
        self.scale_output_at(site, &stem, vector)
    }

    /// Scales a linear site's input for that linear only (IA³ on the FFN down projection):
    /// the site's node reads `x' = x ⊙ s` with `s` `[in]` trainable in the weight's type,
    /// initialised by `init`; other consumers of `x` are untouched. Nodes: `Mul(x, s)`.
    /// Rewires `x` to `x'` with `only = [site.node]` and records [`Fold::ScaleInput`].
    /// [`PatchBuilder::scale_input_by`] scales by a value the caller made instead.
    pub fn scale_input(&mut self, site: &Site, init: Init) -> Result<ScaleNames> {
        require_linear(site, "scale_input")?;
        let dtype = self.weight_dtype(site)?;
        let stem = self.site_stem(site);
        let vector = self.parameter(
            &format!("{stem}.scale_in"),
            dtype,
            vec![site.in_features],
            init,
            true,
        );
        self.scale_input_at(site, &stem, vector)
    }

    /// Scales a linear site's input for that linear only by an existing value: the site's
    /// node reads `x' = x ⊙ v`, `v` (as left by earlier rewires) a value the view knows or the
    /// patch creates, of the weight's type and broadcastable over `x`'s last axis; other
    /// consumers of `x` are untouched. Creates no parameter. Nodes: `Mul(x, v)`. Rewires `x`
    /// to `x'` with `only = [site.node]`.
    ///
    /// Records [`Fold::ScaleInput`] when `v` is a parameter of this patch of shape `[in]`;
    /// otherwise records no fold and the `Mul` stays in merged graphs, where a low-rank
    /// branch on the same site would no longer be merged exactly. Errors as
    /// [`PatchBuilder::scale_output_by`] does.
    pub fn scale_input_by(&mut self, site: &Site, vector: &str) -> Result<ScaleNames> {
        require_linear(site, "scale_input_by")?;
        let dtype = self.weight_dtype(site)?;
        let helper = format!("scale_input_by on {}", site.display_name());
        let vector = self.operand(&helper, vector, dtype)?;
        let stem = self.site_stem(site);
        self.scale_input_at(site, &stem, vector)
    }

    /// The nodes, rewire and fold of an output scale by `vector`, named under `stem`.
    fn scale_output_at(&mut self, site: &Site, stem: &str, vector: String) -> Result<ScaleNames> {
        let ((output, base), nodes) = self.block(|builder| {
            let base = builder.current(&site.output);
            let output = builder.op(&format!("{stem}.mul"), "Mul", &[&base, &vector], &[]);
            builder.rewire(&base, &output);
            Ok((output, base))
        })?;
        if self.is_parameter_of_shape(&vector, &[site.out_features]) {
            self.fold(Fold::ScaleOutput {
                weight: site.weight.clone(),
                bias: site.bias.clone(),
                vector: vector.clone(),
                layout: site.layout,
                branch_nodes: nodes.clone(),
                branch_output: output.clone(),
                base_output: base,
            });
        }
        Ok(ScaleNames {
            vector,
            output,
            nodes,
        })
    }

    /// The nodes, rewire and fold of an input scale by `vector`, named under `stem`.
    fn scale_input_at(&mut self, site: &Site, stem: &str, vector: String) -> Result<ScaleNames> {
        let ((output, base), nodes) = self.block(|builder| {
            let base = builder.current_for(&site.input, &site.node);
            let output = builder.op(&format!("{stem}.mul_in"), "Mul", &[&base, &vector], &[]);
            builder.rewire_only(&base, &output, &[&site.node]);
            Ok((output, base))
        })?;
        if self.is_parameter_of_shape(&vector, &[site.in_features]) {
            self.fold(Fold::ScaleInput {
                weight: site.weight.clone(),
                vector: vector.clone(),
                layout: site.layout,
                branch_nodes: nodes.clone(),
                branch_output: output.clone(),
                base_output: base,
            });
        }
        Ok(ScaleNames {
            vector,
            output,
            nodes,
        })
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
