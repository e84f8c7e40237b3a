//! Writing HF PEFT adapter folders: [`export`] (a method's declared layout, or the LoRA branches
//! with `r` / `lora_alpha` and their per-module patterns) and the file writer both paths use.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use super::config::CONFIG_FILE;
use super::keys::{is_conv1d_module, KEY_PREFIX, WEIGHTS_FILE};
use super::{lora_branches, mapped};
use crate::atomic_file::write_atomically;
use crate::ir::Model;
use crate::{Error, Result};

/// Writes the model's adapter as HF PEFT files in `dir` (created if needed): the layout a
/// method declared ([`graft_plugin_sdk::PeftFiles`], e.g. AdaLoRA) when one did, otherwise the
/// LoRA branches.
///
/// The config's `target_modules` is the sorted list of the targeted module paths: PEFT selects a
/// module when its path equals an entry, so the list is exact, needs no regular-expression
/// dialect, and [`import`] reads it back to the same branches. `r` and `lora_alpha` are the values
/// most branches share; the others go to `rank_pattern` and `alpha_pattern`, keyed by module
/// path. Alphas are recovered from the stored scales and rounded to 7 significant digits (the
/// precision of an f32 scale), so that α = 16 with rsLoRA at r = 2 reads back as 16, not
/// 16.000002. Base-model tensors replaced by an import (`modules_to_save`) are not written.
///
/// [`import`]: super::import()
pub fn export(model: &Model, dir: &Path) -> Result<()> {
    if mapped::export(model, dir)? {
        return Ok(());
    }
    let branches = lora_branches(model)?;
    let rslora = crate::patch::read_record(model)?.methods.iter().any(|m| {
        m.method == "lora"
            && matches!(m.config.get("rslora"), Some(v) if v == &json!(true) || v == &json!("true"))
    });
    let alphas: Vec<f64> = branches
        .iter()
        .map(|branch| {
            let denominator = if rslora {
                (branch.r as f64).sqrt()
            } else {
                branch.r as f64
            };
            round_to_f32_precision(branch.scale as f64 * denominator)
        })
        .collect();
    let r = most_common(branches.iter().map(|b| b.r)).unwrap_or(8);
    let alpha = most_common(alphas.iter().map(|a| a.to_bits()))
        .map(f64::from_bits)
        .unwrap_or(8.0);
    let rank_pattern: BTreeMap<&str, usize> = branches
        .iter()
        .filter(|b| b.r != r)
        .map(|b| (b.module.as_str(), b.r))
        .collect();
    let alpha_pattern: BTreeMap<&str, serde_json::Value> = branches
        .iter()
        .zip(&alphas)
        .filter(|(_, a)| **a != alpha)
        .map(|(b, a)| (b.module.as_str(), json_number(*a)))
        .collect();
    let mut target_modules: Vec<&str> = branches.iter().map(|b| b.module.as_str()).collect();
    target_modules.sort_unstable();
    target_modules.dedup();
    let fan_in_fan_out = branches.iter().any(|b| is_conv1d_module(&b.module));
    let config = json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": null,
        "inference_mode": true,
        "r": r,
        "lora_alpha": json_number(alpha),
        "lora_dropout": 0.0,
        "use_rslora": rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": null,
        "init_lora_weights": true,
        "layers_to_transform": null,
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for branch in &branches {
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        tensors.push((
            format!("{KEY_PREFIX}{}.lora_A.weight", branch.module),
            vec![branch.r, branch.in_features],
            bytes(&branch.a),
        ));
        tensors.push((
            format!("{KEY_PREFIX}{}.lora_B.weight", branch.module),
            vec![branch.out_features, branch.r],
            bytes(&branch.b),
        ));
    }
    write_files(dir, &config, &tensors)
}

/// Writes `adapter_model.safetensors` (float32 `tensors`: key, shape, little-endian bytes) and
/// `adapter_config.json` into `dir`, each atomically.
pub(super) fn write_files(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<()> {
    write_safetensors(&dir.join(WEIGHTS_FILE), tensors)?;
    crate::pause::point(&format!("file-written:{WEIGHTS_FILE}"));
    let config_text = serde_json::to_string_pretty(config).unwrap_or_default();
    write_atomically(&dir.join(CONFIG_FILE), config_text.as_bytes())?;
    Ok(())
}

/// Writes float32 `(key, shape, little-endian bytes)` tensors as the safetensors file `path`,
/// atomically. Fails naming the key when two tensors share one.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<()> {
    let mut keys = std::collections::HashSet::new();
    if let Some((key, _, _)) = tensors.iter().find(|(key, _, _)| !keys.insert(key)) {
        return Err(Error::Config(format!(
            "{}: two tensors would both be stored as {key}",
            path.display()
        )));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::Config(format!("tensor {name}: {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, &None)
        .map_err(|e| Error::Config(format!("cannot encode safetensors: {e}")))?;
    write_atomically(path, &bytes)
}

/// The value most items share; ties go to the one seen first.
fn most_common<T: PartialEq + Copy>(items: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for item in items {
        match counts.iter_mut().find(|(value, _)| *value == item) {
            Some((_, n)) => *n += 1,
            None => counts.push((item, 1)),
        }
    }
    let best = counts.iter().map(|(_, n)| *n).max()?;
    counts.into_iter().find(|(_, n)| *n == best).map(|(v, _)| v)
}

/// `value` rounded to 7 significant digits.
fn round_to_f32_precision(value: f64) -> f64 {
    format!("{value:.6e}").parse().unwrap_or(value)
}

/// A JSON integer for whole numbers (as PEFT writes `lora_alpha`), else a JSON float.
fn json_number(value: f64) -> serde_json::Value {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        json!(value as i64)
    } else {
        json!(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_recovers_round_alphas() {
        let scale = (16.0f64 / 2f64.sqrt()) as f32;
        assert_eq!(round_to_f32_precision(scale as f64 * 2f64.sqrt()), 16.0);
        assert_eq!(most_common([4, 2, 2, 4].into_iter()), Some(4));
        assert_eq!(json_number(16.0), json!(16));
        assert_eq!(json_number(0.5), json!(0.5));
    }
}
