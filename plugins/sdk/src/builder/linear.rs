//! Insertions on linear sites that merge back into the weight: low-rank branches (LoRA) and
//! output and input scalings (IA³), each recording its [`Fold`].

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

impl PatchBuilder<'_> {
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
