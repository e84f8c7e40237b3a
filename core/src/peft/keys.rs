//! The keys of a PEFT tensor file and what they name: LoRA factors, full base-model tensors and
//! PEFT's frozen copies, read from `adapter_model.safetensors` into [`PeftTensor`]s.

use std::path::Path;

use crate::{Error, Result};

/// The adapter folder's tensor file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix of every key in a PEFT tensor file of a tuner (LoRA, AdaLoRA, …).
pub(super) const KEY_PREFIX: &str = "base_model.model.";
/// The prefix of the full tensors in a prompt-learning file (`base_model.classifier.weight`).
const PROMPT_LEARNING_PREFIX: &str = "base_model.";
/// The key of a prompt-tuning file's prompt, `[num_virtual_tokens, token_dim]`.
pub(super) const PROMPT_KEY: &str = "prompt_embeddings";

/// What a tensor of a PEFT file is.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum TensorRole {
    /// `lora_A.weight`, [r, in].
    LoraA,
    /// `lora_B.weight`, [out, r].
    LoraB,
    /// A full base-model tensor (`modules_to_save`, or a bias trained with `bias="all"`):
    /// the module's parameter `param` (`weight`, `bias`).
    Full { param: String },
    /// A frozen copy PEFT keeps beside a `modules_to_save` module (`original_module`).
    OriginalCopy,
    /// The learned prompt of a prompt-tuning adapter ([`PROMPT_KEY`]).
    Prompt,
    /// A tensor of a plugin method that declared its PEFT keys (`<module>.hada_w1_a`), named by
    /// the suffix after the module path.
    Method { suffix: String },
}

/// One tensor of a PEFT file, keyed by the module it belongs to.
pub(super) struct PeftTensor {
    pub(super) key: String,
    pub(super) module: String,
    pub(super) role: TensorRole,
    pub(super) shape: Vec<usize>,
    pub(super) values: Vec<f32>,
}

/// Reads every tensor of a PEFT `adapter_model.safetensors`, sorting its keys into LoRA
/// factors, full tensors and a prompt; tuner keys start with `base_model.model.`, those of
/// prompt-learning files with `base_model.` (and the prompt has none). Fails naming the key for
/// anything else.
pub(super) fn read_peft_tensors(file: &Path) -> Result<Vec<PeftTensor>> {
    read_tensors_of(file, &[])
}

/// [`read_peft_tensors`] for a plugin method whose keys are `<module>.<suffix>` (optionally
/// followed by `.weight` or an adapter name and `.weight`, as PEFT's state dicts have them):
/// those become [`TensorRole::Method`] before any other reading of the key.
pub(super) fn read_tensors_of(file: &Path, method_suffixes: &[String]) -> Result<Vec<PeftTensor>> {
    let bytes = crate::input_file::read(file)?;
    let fail = |reason: String| Error::Config(format!("{}: {reason}", file.display()));
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| fail(format!("not a safetensors file: {e}")))?;
    let mut entries = tensors.tensors();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut parsed = Vec::with_capacity(entries.len());
    for (key, view) in entries {
        let rest = key
            .strip_prefix(KEY_PREFIX)
            .or_else(|| key.strip_prefix(PROMPT_LEARNING_PREFIX));
        let (module, role) = if key == PROMPT_KEY {
            ("", TensorRole::Prompt)
        } else if let Some((module, suffix)) =
            rest.and_then(|rest| method_tensor(rest, method_suffixes))
        {
            (
                module,
                TensorRole::Method {
                    suffix: suffix.to_owned(),
                },
            )
        } else if let Some((module, role)) = rest.and_then(lora_factor) {
            (module, role)
        } else if let Some(part) = rest
            .iter()
            .flat_map(|rest| rest.split('.'))
            .find(|part| part.starts_with("lora_"))
        {
            return Err(fail(format!(
                "key {key:?} is a LoRA tensor of kind {part:?}; only lora_A/lora_B weights of linear modules are supported (no embedding LoRA, DoRA magnitudes or LoRA biases)"
            )));
        } else {
            let Some(rest) = rest else {
                return Err(fail(format!(
                    "key {key:?} is not a PEFT key ({KEY_PREFIX}… or {PROMPT_KEY})"
                )));
            };
            let Some((module, param)) = rest.rsplit_once('.') else {
                return Err(fail(format!(
                    "key {key:?} names no module parameter (<module>.<weight|bias>)"
                )));
            };
            if let Some(index) = module.find(".original_module") {
                (&module[..index], TensorRole::OriginalCopy)
            } else {
                let module = module
                    .find(".modules_to_save")
                    .map_or(module, |index| &module[..index]);
                let param = param.to_owned();
                (module, TensorRole::Full { param })
            }
        };
        let dtype = graft_plugin_sdk::DType::from_safetensors(view.dtype())
            .ok_or_else(|| fail(format!("{key:?} has unsupported type {:?}", view.dtype())))?;
        let values = graft_plugin_sdk::bytes_to_f32(dtype, view.data())
            .ok_or_else(|| fail(format!("{key:?} is not a float tensor")))?;
        parsed.push(PeftTensor {
            module: module.to_owned(),
            role,
            shape: view.shape().to_vec(),
            values,
            key,
        });
    }
    Ok(parsed)
}

/// Splits `<module>.lora_A.weight` (or `<module>.lora_A.<adapter>.weight`, as in a PEFT model's
/// raw state dict) into the module and the factor; likewise for `lora_B`.
fn lora_factor(key: &str) -> Option<(&str, TensorRole)> {
    let head = key.strip_suffix(".weight")?;
    [
        (".lora_A", TensorRole::LoraA),
        (".lora_B", TensorRole::LoraB),
    ]
    .into_iter()
    .find_map(|(marker, role)| {
        let index = head.rfind(marker)?;
        let adapter = &head[index + marker.len()..];
        let plain = adapter.is_empty()
            || adapter
                .strip_prefix('.')
                .is_some_and(|name| !name.is_empty() && !name.contains('.'));
        plain.then(|| (&head[..index], role))
    })
}

/// Splits `<module>.<suffix>` (or `<module>.<suffix>.weight`, or
/// `<module>.<suffix>.<adapter>.weight`) for one of `suffixes`.
fn method_tensor<'k>(key: &'k str, suffixes: &'k [String]) -> Option<(&'k str, &'k str)> {
    suffixes.iter().find_map(|suffix| {
        let marker = format!(".{suffix}");
        let index = key.rfind(&marker)?;
        let tail = &key[index + marker.len()..];
        let plain = tail.is_empty()
            || tail == ".weight"
            || tail
                .strip_prefix('.')
                .and_then(|t| t.strip_suffix(".weight"))
                .is_some_and(|name| !name.is_empty() && !name.contains('.'));
        plain.then(|| (&key[..index], suffix.as_str()))
    })
}

/// The PEFT tensor file of an adapter folder, or the file itself.
pub(super) fn weights_file(path: &Path) -> std::path::PathBuf {
    if path.is_dir() {
        path.join(WEIGHTS_FILE)
    } else {
        path.to_path_buf()
    }
}

/// GPT-2-style `Conv1D` modules store weights as [in, out]; PEFT needs `fan_in_fan_out` for them.
pub(super) fn is_conv1d_module(module: &str) -> bool {
    [".attn.c_attn", ".attn.c_proj", ".mlp.c_fc", ".mlp.c_proj"]
        .iter()
        .any(|suffix| module.ends_with(suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_keys_may_carry_an_adapter_name() {
        let module = "model.layers.0.self_attn.q_proj";
        for (key, role) in [
            (
                "model.layers.0.self_attn.q_proj.lora_A.weight",
                TensorRole::LoraA,
            ),
            (
                "model.layers.0.self_attn.q_proj.lora_B.default.weight",
                TensorRole::LoraB,
            ),
        ] {
            assert_eq!(lora_factor(key), Some((module, role)));
        }
        assert_eq!(lora_factor("model.layers.0.mlp.lora_B.bias"), None);
        assert_eq!(
            lora_factor("model.embed_tokens.lora_embedding_A.weight"),
            None
        );
    }

    #[test]
    fn method_keys_are_split_at_a_declared_suffix() {
        let suffixes = ["hada_w1_a".to_owned(), "lora_magnitude_vector".to_owned()];
        let module = "model.layers.0.self_attn.q_proj";
        for key in [
            "model.layers.0.self_attn.q_proj.hada_w1_a",
            "model.layers.0.self_attn.q_proj.hada_w1_a.weight",
            "model.layers.0.self_attn.q_proj.hada_w1_a.default.weight",
        ] {
            assert_eq!(method_tensor(key, &suffixes), Some((module, "hada_w1_a")));
        }
        assert_eq!(
            method_tensor("m.q.lora_magnitude_vector.weight", &suffixes),
            Some(("m.q", "lora_magnitude_vector"))
        );
        assert_eq!(method_tensor("m.q.hada_w1_ab", &suffixes), None);
        assert_eq!(method_tensor("m.q.hada_w1_a.x.y", &suffixes), None);
    }
}
