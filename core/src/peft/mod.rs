//! Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, keyed
//! `base_model.model.<module path>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]):
//! export, and import onto an unpatched model.
//!
//! `config` reads `adapter_config.json`, `select` is PEFT's module matching, `keys` reads the
//! tensor file's keys, `import` and `export` are the two directions, `mapped` handles the
//! layouts a method declares for itself ([`graft_plugin_sdk::PeftFiles`], e.g. AdaLoRA and
//! prompt tuning), `declared` imports the adapters of plugin methods that declare how
//! ([`graft_plugin_sdk::PeftImport`]: LoHa, LoKr, IA³, DoRA), and `prompt` imports
//! prompt-tuning adapters. This file holds what both directions share: a model's LoRA branches in PEFT's terms.

use graft_plugin_sdk::Fold;

use crate::ir::Model;
use crate::{Error, Result};

mod combine;
mod config;
mod declared;
mod export;
mod import;
mod keys;
pub(crate) mod mapped;
mod prompt;
mod select;

pub use combine::{combine, Combination, CombineOptions, CombineReport, MajoritySign};
pub use config::CONFIG_FILE;
pub use export::export;
pub(crate) use export::write_safetensors;
pub use import::{import, load_values, ImportReport, ImportedBranch, ReplacedTensor};
pub use keys::WEIGHTS_FILE;

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
/// keyed by module paths, and naming the module when it carries more than one branch (LoRA
/// applied twice), since a PEFT adapter holds one branch per module.
pub fn lora_branches(model: &Model) -> Result<Vec<PeftLora>> {
    let record = crate::patch::read_record(model)?;
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
        let rescaled = record.folds.iter().any(|other| {
            !matches!(other, Fold::LowRank { .. })
                && crate::plugins::fold_weight(other).is_some_and(|w| w == a || w == b)
        });
        if rescaled {
            return Err(Error::Tensor {
                name: weight.clone(),
                reason: "its low-rank branch has extra factors (a per-rank scale), which HF \
                         PEFT's LoRA format cannot hold"
                    .into(),
            });
        }
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
        if branches.iter().any(|b: &PeftLora| &b.module == module) {
            return Err(Error::Tensor {
                name: weight.clone(),
                reason: format!(
                    "module {module} has more than one LoRA branch (a LoRA method applied \
                     twice); an HF PEFT adapter holds one branch per module: export each \
                     method's model separately, or use `graft merge` or `--format onnx-adapter`"
                ),
            });
        }
        branches.push(PeftLora {
            module: module.clone(),
            r,
            a: transpose(&a_tensor.float_values()?, in_features, r),
            b: transpose(&b_tensor.float_values()?, r, out_features),
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

/// True when [`export`] can write the model's adapter as one HF PEFT adapter: one method
/// declared PEFT files and nothing else adapts the model the files would miss, or the model's
/// LoRA branches all have module-path labels.
pub fn can_export(model: &Model) -> Result<bool> {
    let declaring = crate::patch::read_record(model)?
        .methods
        .iter()
        .filter(|m| m.training.peft.is_some())
        .count();
    Ok(match declaring {
        0 => lora_branches(model).is_ok(),
        1 => mapped::declared(model).is_ok(),
        _ => false,
    })
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
