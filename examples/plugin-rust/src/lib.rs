//! An out-of-tree graft plugin: `lora_scaled`, LoRA with a learned scale per rank, built
//! against `graft-plugin-sdk` alone — the walk-through for writing a method plugin.
//!
//! # The method
//!
//! On each targeted linear `y = x · W`, the branch adds `scale · ((x · A) ⊙ e) · B`, with
//! `A [in, r]`, `e [r]` and `B [r, out]` trained. It is AdaLoRA's parametrisation
//! `ΔW = P · diag(λ) · Q` at a fixed rank (no rank budget, no orthogonality penalty), with
//! AdaLoRA's initialisation: `A` and `B` Gaussian (std 0.02), `e` zero, so the model is
//! unchanged at init while every factor receives gradient.
//!
//! # Folding it with the SDK's folds
//!
//! `graft merge` knows no method; it replays the [`Fold`]s a plugin records, in order. The
//! rank scale is an input scale of the small linear `h · B` (with `h = x · A`), so it is
//! recorded as a [`Fold::ScaleInput`] whose weight is the parameter `B`: merging it multiplies
//! row `k` of `B` by `e[k]` and removes the `Mul`. The [`Fold::LowRank`] recorded next then
//! sees the plain branch `scale · (x · A) · B'` and adds `scale · A · B'` into `W`. Two folds
//! that the core already has express a method it has never heard of.
//!
//! # Taking part in training: a step hook
//!
//! With `clip_e = c > 0` the patch also declares a [`StepHook`] on the rank scales: after
//! every optimizer step `graft train` sends the plugin their values and gradients
//! ([`StepRequest`]), and the plugin answers with the scales clipped to `[-c, c]`
//! ([`StepReply::set`]) — a projected-gradient constraint — a `clipped` figure for
//! `metrics.jsonl`, and its state (how many entries it has clipped so far), which the host
//! checkpoints and hands back at the next step, after a `--resume` too. A plugin keeps no state
//! of its own between calls; everything travels through the host as bytes.
//!
//! # Building and loading
//!
//! ```text
//! cargo build --release --manifest-path examples/plugin-rust/Cargo.toml
//! graft apply model.onnx --plugin examples/plugin-rust/target/release/libgraft_plugin_lora_scaled.so \
//!     -m lora_scaled --set r=8 --set targets=q,v -o patched.onnx
//! ```

use graft_plugin_sdk::{
    export_plugin, ConfigKey, Fold, GraphView, Host, Init, MethodConfig, MethodDescription,
    PatchBuilder, PatchReply, Plugin, Site, StepHook, StepReply, StepRequest, WeightLayout,
};

/// The plugin: one method, `lora_scaled`.
pub struct LoraScaled;

impl Plugin for LoraScaled {
    const NAME: &'static str = "lora-scaled";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn methods() -> Vec<MethodDescription> {
        vec![MethodDescription::new(
            "lora_scaled",
            "LoRA with a learned per-rank scale: y + (alpha/r)·((x·A) ⊙ e)·B, e starting at zero",
            vec![
                ConfigKey::int("r", 8, "rank"),
                ConfigKey::float("alpha", 8.0, "the branch is scaled by alpha / r"),
                ConfigKey::list(
                    "targets",
                    &["q", "v"],
                    "site kinds, groups or label patterns",
                ),
                ConfigKey::float("init_std", 0.02, "standard deviation of A and B at init"),
                ConfigKey::int("seed", 0, "seed of A and B"),
                ConfigKey::float(
                    "clip_e",
                    0.0,
                    "after every training step, clip the rank scales to [-clip_e, clip_e] (0: never)",
                ),
            ],
        )]
    }

    fn patch(
        _host: &Host<'_>,
        method: &str,
        config: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        let r = config.get_usize("r")?;
        if r == 0 {
            return Err(format!("{method}: r must be at least 1"));
        }
        let scale = config.get_f32("alpha")? / r as f32;
        let std = config.get_f64("init_std")?;
        let mut builder =
            PatchBuilder::new(graph, "lora_scaled").with_seed(config.get_usize("seed")? as u64);
        let sites: Vec<&Site> = config
            .get_sites("targets")?
            .select(graph)
            .into_iter()
            .map(|s| s.site)
            .filter(|site| site.kind.is_linear())
            .collect();
        if sites.is_empty() {
            return Err(format!("{method}: the targets select no linear site"));
        }
        let mut rank_scales = Vec::new();
        for site in sites {
            rank_scales.push(scaled_branch(&mut builder, site, r, scale, std)?);
        }
        let mut reply = builder.finish();
        if config.get_f64("clip_e")? > 0.0 {
            reply.patch.training.step_hook = Some(StepHook {
                tensors: rank_scales,
                state: graft_plugin_sdk::serde_json::json!({ "clipped_so_far": 0 }),
            });
        }
        Ok(reply)
    }

    /// Clips every rank scale to `[-clip_e, clip_e]` and counts what it clipped.
    fn step(
        _host: &Host<'_>,
        config: &MethodConfig,
        request: &StepRequest,
    ) -> Result<StepReply, String> {
        let limit = config.get_f32("clip_e")?;
        let mut reply = StepReply::default();
        let mut clipped = 0u64;
        for (name, value) in &request.values {
            let mut value = value.clone();
            for v in value.data.iter_mut() {
                if v.abs() > limit {
                    *v = v.clamp(-limit, limit);
                    clipped += 1;
                }
            }
            reply.set.insert(name.clone(), value);
        }
        let so_far = request.state["clipped_so_far"].as_u64().unwrap_or(0) + clipped;
        reply.state = graft_plugin_sdk::serde_json::json!({ "clipped_so_far": so_far });
        reply.metrics.insert("clipped".into(), clipped as f64);
        reply.metrics.insert("clipped_so_far".into(), so_far as f64);
        Ok(reply)
    }
}

/// Adds `y' = y + scale · ((x · A) ⊙ e) · B` on `site`, and the two folds that merge it;
/// returns the name of `e`.
fn scaled_branch(
    builder: &mut PatchBuilder<'_>,
    site: &Site,
    r: usize,
    scale: f32,
    std: f64,
) -> graft_plugin_sdk::Result<String> {
    let dtype = builder.value_dtype(&site.weight)?;
    let stem = builder.stem(&format!("lora_scaled.{}", site.display_name()));
    let gaussian = |seed| Init::Normal {
        mean: 0.0,
        std,
        seed,
    };
    let seed_a = builder.next_seed();
    let a = builder.parameter(
        &format!("{stem}.A"),
        dtype,
        vec![site.in_features, r],
        gaussian(seed_a),
        true,
    );
    let rank_scale = builder.parameter(&format!("{stem}.E"), dtype, vec![r], Init::Zeros, true);
    let seed_b = builder.next_seed();
    let b = builder.parameter(
        &format!("{stem}.B"),
        dtype,
        vec![r, site.out_features],
        gaussian(seed_b),
        true,
    );

    // `block` hands back the names of the nodes built inside it, for the folds.
    let ((h, scaled, rank_scale_nodes, base, output), nodes) = builder.block(|builder| {
        let x = builder.current(&site.input);
        let h = builder.op(&format!("{stem}.matmul_a"), "MatMul", &[&x, &a], &[]);
        let (scaled, rank_scale_nodes) = builder.block(|builder| {
            Ok(builder.op(&format!("{stem}.mul_e"), "Mul", &[&h, &rank_scale], &[]))
        })?;
        let u = builder.op(&format!("{stem}.matmul_b"), "MatMul", &[&scaled, &b], &[]);
        let s = builder.constant_scalar(&format!("{stem}.scale"), scale as f64, dtype);
        let d = builder.op(&format!("{stem}.mul_scale"), "Mul", &[&u, &s], &[]);
        let base = builder.current(&site.output);
        let output = builder.op(&format!("{stem}.add"), "Add", &[&base, &d], &[]);
        builder.rewire(&base, &output);
        Ok((h, scaled, rank_scale_nodes, base, output))
    })?;

    builder.fold(Fold::ScaleInput {
        weight: b.clone(),
        vector: rank_scale.clone(),
        layout: WeightLayout::InOut,
        branch_nodes: rank_scale_nodes,
        branch_output: scaled,
        base_output: h,
    });
    builder.fold(Fold::LowRank {
        weight: site.weight.clone(),
        a,
        b,
        scale,
        layout: site.layout,
        branch_nodes: nodes,
        branch_output: output,
        base_output: base,
    });
    Ok(rank_scale)
}

export_plugin!(LoraScaled);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_its_method() {
        // SAFETY: the entry point of this very crate, which honours the ABI.
        let client = unsafe { graft_plugin_sdk::PluginClient::from_raw(graft_plugin_entry()) }
            .expect("a valid plugin table");
        let description = client.describe().expect("describe");
        assert_eq!(description.name, "lora-scaled");
        assert_eq!(description.methods[0].name, "lora_scaled");
    }
}
