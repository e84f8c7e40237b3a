//! Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, keyed
//! `base_model.model.<module path>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]).

use std::collections::BTreeMap;
use std::path::Path;

use graft_plugin_sdk::Fold;
use serde_json::json;

use crate::atomic_file::write_atomically;
use crate::ir::Model;
use crate::merge::tensor_f32;
use crate::patch::GraftRecord;
use crate::{Error, Result};

/// One LoRA branch in PEFT's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftLora {
    /// The module path (site label), e.g. `bert.encoder.layer.0.attention.self.query`.
    pub module: String,
    /// Rank.
    pub r: usize,
    /// `lora_A.weight`, [r, in], row-major.
    pub a: Vec<f32>,
    /// `lora_B.weight`, [out, r], row-major.
    pub b: Vec<f32>,
    /// in_features.
    pub in_features: usize,
    /// out_features.
    pub out_features: usize,
    /// The branch scale (alpha / r, or alpha / √r with rsLoRA).
    pub scale: f32,
}

/// The LoRA branches of a patched model (with its current, possibly trained, values), labelled by
/// module path. Fails naming the weight when a branch's site has no label, since PEFT files are
/// keyed by module paths.
pub fn lora_branches(model: &Model) -> Result<Vec<PeftLora>> {
    let record = GraftRecord::read(model)?;
    let mut branches = Vec::new();
    for fold in &record.folds {
        let Fold::LowRank {
            weight,
            a,
            b,
            scale,
            ..
        } = fold
        else {
            continue;
        };
        let module = record.labels.get(weight).ok_or_else(|| Error::Tensor {
            name: weight.clone(),
            reason:
                "its site has no module-path label, so it cannot be written in HF PEFT's format"
                    .into(),
        })?;
        let tensor = |name: &str| {
            model.graph.initializer(name).ok_or_else(|| Error::Tensor {
                name: name.to_owned(),
                reason: "missing from the patched model".into(),
            })
        };
        let (a_tensor, b_tensor) = (tensor(a)?, tensor(b)?);
        let (in_features, r) = (a_tensor.dims[0] as usize, a_tensor.dims[1] as usize);
        let out_features = b_tensor.dims[1] as usize;
        branches.push(PeftLora {
            module: module.clone(),
            r,
            a: transpose(&tensor_f32(a_tensor)?, in_features, r),
            b: transpose(&tensor_f32(b_tensor)?, r, out_features),
            in_features,
            out_features,
            scale: *scale,
        });
    }
    if branches.is_empty() {
        return Err(Error::Config(
            "the model has no LoRA branches to export".into(),
        ));
    }
    Ok(branches)
}

/// Transposes a row-major [rows, cols] matrix.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = values[i * cols + j];
        }
    }
    out
}

/// Writes the model's LoRA branches as an HF PEFT adapter in `dir` (created if needed). The
/// config's `target_modules` is an exact regular expression over the targeted module paths;
/// per-module ranks and alphas that differ from the most common ones go to `rank_pattern` and
/// `alpha_pattern`.
pub fn export(model: &Model, dir: &Path) -> Result<()> {
    let branches = lora_branches(model)?;
    let rslora = GraftRecord::read(model)?.methods.iter().any(|m| {
        m.method == "lora"
            && matches!(m.config.get("rslora"), Some(v) if v == &json!(true) || v == &json!("true"))
    });
    let alpha_of = |branch: &PeftLora| {
        let denominator = if rslora {
            (branch.r as f32).sqrt()
        } else {
            branch.r as f32
        };
        branch.scale * denominator
    };
    let most_common = |values: Vec<String>| -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for v in values {
            *counts.entry(v).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(v, _)| v)
            .unwrap_or_default()
    };
    let r: usize = most_common(branches.iter().map(|b| b.r.to_string()).collect())
        .parse()
        .unwrap_or(8);
    let alpha: f32 = most_common(branches.iter().map(|b| alpha_of(b).to_string()).collect())
        .parse()
        .unwrap_or(8.0);
    let rank_pattern: BTreeMap<&str, usize> = branches
        .iter()
        .filter(|b| b.r != r)
        .map(|b| (b.module.as_str(), b.r))
        .collect();
    let alpha_pattern: BTreeMap<&str, f32> = branches
        .iter()
        .filter(|b| (alpha_of(b) - alpha).abs() > 1e-6 * alpha.abs().max(1.0))
        .map(|b| (b.module.as_str(), alpha_of(b)))
        .collect();
    let target_regex = branches
        .iter()
        .map(|b| regex::escape(&b.module))
        .collect::<Vec<_>>()
        .join("|");
    let fan_in_fan_out = branches.iter().any(|b| is_conv1d_module(&b.module));
    let config = json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": null,
        "inference_mode": true,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "target_modules": format!("({target_regex})"),
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
            format!("base_model.model.{}.lora_A.weight", branch.module),
            vec![branch.r, branch.in_features],
            bytes(&branch.a),
        ));
        tensors.push((
            format!("base_model.model.{}.lora_B.weight", branch.module),
            vec![branch.out_features, branch.r],
            bytes(&branch.b),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::Config(format!("tensor {name}: {e}")))
        })
        .collect::<Result<_>>()?;
    let safetensors_bytes = safetensors::serialize(views, &None)
        .map_err(|e| Error::Config(format!("cannot encode safetensors: {e}")))?;
    write_atomically(&dir.join("adapter_model.safetensors"), &safetensors_bytes)?;
    let config_text = serde_json::to_string_pretty(&config).unwrap_or_default();
    write_atomically(&dir.join("adapter_config.json"), config_text.as_bytes())?;
    Ok(())
}

/// GPT-2-style `Conv1D` modules store weights as [in, out]; PEFT needs `fan_in_fan_out` for them.
fn is_conv1d_module(module: &str) -> bool {
    [".attn.c_attn", ".attn.c_proj", ".mlp.c_fc", ".mlp.c_proj"]
        .iter()
        .any(|suffix| module.ends_with(suffix))
}

/// Loads the LoRA tensors of an HF PEFT adapter folder (or `adapter_model.safetensors` file)
/// into a patched model whose LoRA branches sit on the same modules: `lora_A.weight` [r, in] into
/// A [in, r] and `lora_B.weight` [out, r] into B [r, out]. Fails naming the key when a tensor
/// matches no branch or has another shape. Returns the number of tensors loaded.
pub fn load_values(model: &mut Model, path: &Path) -> Result<usize> {
    let file = if path.is_dir() {
        path.join("adapter_model.safetensors")
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    let fail = |reason: String| Error::Config(format!("{}: {reason}", file.display()));
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| fail(format!("not a safetensors file: {e}")))?;
    let record = GraftRecord::read(model)?;
    let mut by_module: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    for fold in &record.folds {
        if let Fold::LowRank { weight, a, b, .. } = fold {
            if let Some(label) = record.labels.get(weight) {
                by_module.insert(label, (a, b));
            }
        }
    }
    let mut updates: Vec<(String, Vec<f32>)> = Vec::new();
    for (key, view) in tensors.tensors() {
        let Some(rest) = key.strip_prefix("base_model.model.") else {
            return Err(fail(format!(
                "key {key:?} is not a PEFT key (base_model.model.…)"
            )));
        };
        let (module, is_a) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, true)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, false)
        } else {
            return Err(fail(format!(
                "key {key:?} is not a LoRA tensor; only lora_A/lora_B weights are supported"
            )));
        };
        let Some(&(a, b)) = by_module.get(module) else {
            let known: Vec<&str> = by_module.keys().copied().take(6).collect();
            return Err(fail(format!(
                "key {key:?} names module {module:?}, which has no LoRA branch in this model (branches: {})",
                known.join(", ")
            )));
        };
        let target = if is_a { a } else { b };
        let dims = model
            .graph
            .initializer(target)
            .map(|t| t.dims.clone())
            .unwrap_or_default();
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if dims.len() != 2 || shape != [dims[1], dims[0]] {
            return Err(fail(format!(
                "{key:?} is {shape:?}, the branch needs the transpose of {dims:?}"
            )));
        }
        let dtype = graft_plugin_sdk::DType::from_safetensors(view.dtype())
            .ok_or_else(|| fail(format!("{key:?} has unsupported type {:?}", view.dtype())))?;
        let values = graft_plugin_sdk::bytes_to_f32(dtype, view.data())
            .ok_or_else(|| fail(format!("{key:?} is not a float tensor")))?;
        updates.push((
            target.to_owned(),
            transpose(&values, shape[0] as usize, shape[1] as usize),
        ));
    }
    for (name, values) in &updates {
        if let Some(tensor) = model
            .graph
            .initializers
            .iter_mut()
            .find(|t| &t.name == name)
        {
            *tensor = crate::ir::Tensor::from_f32(name, tensor.dims.clone(), values);
        }
    }
    Ok(updates.len())
}
