//! `qlora`: QLoRA (Dettmers et al., 2023) — every targeted base weight stored as 4-bit
//! NormalFloat codes in blocks of 64 with their block scales double-quantized to 8 bits in
//! groups of 256 (4.127 bits per weight), and a LoRA branch on top. The model keeps the codes
//! and dequantizes them in the graph (`PatchBuilder::dequantize_weight_double`), so the
//! patched model is itself the quantized export; training flows through the dequantization to
//! the LoRA factors (the codes are frozen and get no gradient).
//!
//! `graft merge` folds into float: the dequantized weight is baked into a tensor of the
//! weight's type and the LoRA update added to it. `graft export --format peft` writes the LoRA
//! factors as a `LORA` adapter, which PEFT loads onto a 4-bit base model as onto any other.

use graft_plugin_sdk::quant::{double_quantize, quantize_blockwise, NF4_CODEBOOK};
use graft_plugin_sdk::{
    bytes_to_f32, serde_json, ConfigKey, GraphView, Host, Init, MethodConfig, MethodDescription,
    PatchBuilder, PatchReply, PeftFiles, PeftTensor, Site,
};

use crate::{lora_keys, selected_sites};

/// The `qlora` method's description: LoRA's keys, every linear layer by default (QLoRA's
/// recipe), and the quantization's.
pub fn description() -> MethodDescription {
    let mut keys: Vec<ConfigKey> = lora_keys()
        .into_iter()
        .map(|key| {
            if key.key == "targets" {
                ConfigKey::list(
                    "targets",
                    &["all-linear"],
                    "site kinds (q k v o qkv ffn_up ffn_gate ffn_down ffn_gate_up), all-linear (QLoRA's recipe), or label patterns",
                )
            } else {
                key
            }
        })
        .collect();
    keys.push(ConfigKey::int(
        "block_size",
        64,
        "weights per NF4 block (one scale each)",
    ));
    keys.push(ConfigKey::bool(
        "double_quant",
        true,
        "store the block scales in 8 bits (QLoRA's double quantization)",
    ));
    keys.push(ConfigKey::int(
        "double_quant_block",
        256,
        "block scales per 8-bit group",
    ));
    MethodDescription::new(
        "qlora",
        "LoRA on NF4-quantized base weights (4-bit codes, double-quantized block scales)",
        keys,
    )
}

/// Quantizes every selected site's weight and grafts a LoRA branch on it.
pub fn patch(
    host: &Host<'_>,
    config: &MethodConfig,
    graph: &GraphView,
) -> Result<PatchReply, String> {
    let block_size = config.get_usize("block_size")?;
    let double = config.get_bool("double_quant")?;
    let group = config.get_usize("double_quant_block")?;
    if double && group == 0 {
        return Err("double_quant_block must be positive".into());
    }
    let dropout = Some(config.get_f32("dropout")?);
    let targets = selected_sites(config, graph)?;
    let mut b = PatchBuilder::new(graph, "qlora").with_seed(config.get_usize("seed")? as u64);
    let (mut tensors, mut modules) = (Vec::new(), Vec::new());
    for target in &targets {
        let site = target.site;
        let values = weight_values(host, graph, site)?;
        let quantized = quantize_blockwise(&values, block_size, &NF4_CODEBOOK)
            .map_err(|e| format!("site {}: {e}", site.display_name()))?;
        let names = if double {
            let scales = double_quantize(&quantized.absmax, group)?;
            b.dequantize_weight_double(
                &site.weight,
                quantized.codes,
                scales,
                block_size,
                &NF4_CODEBOOK,
            )?
        } else {
            b.dequantize_weight(
                &site.weight,
                quantized.codes,
                quantized.absmax,
                block_size,
                &NF4_CODEBOOK,
            )?
        };
        b.fold(names.bake_fold());
        let quantized_site = Site {
            weight: names.output,
            ..site.clone()
        };
        let seed = b.next_seed();
        let branch = b.low_rank_branch(
            &quantized_site,
            target.r,
            target.scale as f32,
            Init::linear_default(site.in_features, seed),
            Init::Zeros,
            dropout,
        )?;
        if let Some(label) = &site.label {
            modules.push((label.clone(), target.r, target.scale));
            let (n_in, n_out, r) = (site.in_features, site.out_features, target.r);
            tensors.push(PeftTensor {
                key: format!("{label}.lora_A.weight"),
                tensor: branch.a,
                transpose: true,
                shape: vec![r, n_in],
                rank_axis: None,
            });
            tensors.push(PeftTensor {
                key: format!("{label}.lora_B.weight"),
                tensor: branch.b,
                transpose: true,
                shape: vec![n_out, r],
                rank_axis: None,
            });
        }
    }
    let mut reply = b.finish();
    if modules.len() == targets.len() {
        reply.patch.training.peft = Some(PeftFiles {
            config: lora_config(config, &modules)?,
            tensors,
            ..PeftFiles::default()
        });
    }
    Ok(reply)
}

/// PEFT's `adapter_config.json` for the LoRA factors of a QLoRA model (a `LORA` adapter, which
/// PEFT loads onto a 4-bit base as onto any other): per-module ranks and alphas where they
/// differ from the config's.
fn lora_config(
    config: &MethodConfig,
    modules: &[(String, usize, f64)],
) -> Result<serde_json::Value, String> {
    let (r, alpha, rslora) = (
        config.get_usize("r")?,
        config.get_f64("alpha")?,
        config.get_bool("rslora")?,
    );
    let (mut ranks, mut alphas) = (serde_json::Map::new(), serde_json::Map::new());
    for (label, rank, scale) in modules {
        if *rank != r {
            ranks.insert(label.clone(), (*rank).into());
        }
        let module_alpha = scale
            * if rslora {
                (*rank as f64).sqrt()
            } else {
                *rank as f64
            };
        if (module_alpha - alpha).abs() > 1e-9 * alpha.abs().max(1.0) {
            alphas.insert(label.clone(), module_alpha.into());
        }
    }
    let mut targets: Vec<&str> = modules.iter().map(|m| m.0.as_str()).collect();
    targets.sort_unstable();
    Ok(serde_json::json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": null,
        "inference_mode": true,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.get_f64("dropout")?,
        "use_rslora": rslora,
        "fan_in_fan_out": false,
        "bias": "none",
        "target_modules": targets,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "init_lora_weights": true,
        "modules_to_save": null,
    }))
}

/// The site weight's values as f32, in storage order.
fn weight_values(host: &Host<'_>, graph: &GraphView, site: &Site) -> Result<Vec<f32>, String> {
    let dtype = graph
        .tensor(&site.weight)
        .map(|t| t.dtype)
        .ok_or_else(|| format!("site {}: unknown weight", site.display_name()))?;
    let bytes = host.tensor_view(&site.weight).ok_or_else(|| {
        format!(
            "site {}: the host lent no weight values",
            site.display_name()
        )
    })?;
    bytes_to_f32(dtype, bytes)
        .ok_or_else(|| format!("site {}: weight is not a float tensor", site.display_name()))
}
