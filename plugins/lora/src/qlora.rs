//! `qlora`: QLoRA (Dettmers et al., 2023) — every targeted base weight stored as 4-bit
//! NormalFloat codes in blocks of 64 with their block scales double-quantized to 8 bits in
//! groups of 256 (4.127 bits per weight), and a LoRA branch on top. The model keeps the codes
//! and dequantizes them in the graph (`PatchBuilder::dequantize_weight_double`), so the
//! patched model is itself the quantized export; training flows through the dequantization to
//! the LoRA factors (the codes are frozen and get no gradient).
//!
//! `graft merge` folds into float: the dequantized weight is baked into a tensor of the
//! weight's type and the LoRA update added to it.

use graft_plugin_sdk::quant::{double_quantize, quantize_blockwise, NF4_CODEBOOK};
use graft_plugin_sdk::{
    bytes_to_f32, ConfigKey, Fold, GraphView, Host, Init, MethodConfig, MethodDescription,
    PatchBuilder, PatchReply, Site,
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
        b.fold(Fold::Bake {
            value: names.output.clone(),
            nodes: names.nodes.clone(),
        });
        let quantized_site = Site {
            weight: names.output,
            ..site.clone()
        };
        let seed = b.next_seed();
        b.low_rank_branch(
            &quantized_site,
            target.r,
            target.scale as f32,
            Init::linear_default(site.in_features, seed),
            Init::Zeros,
            dropout,
        )?;
    }
    Ok(b.finish())
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
