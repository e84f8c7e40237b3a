//! HF PEFT prompt-tuning adapters (`peft_type` `PROMPT_TUNING`): grafted by the `prompt`
//! plugin's `prompt_tuning` method, whose declared [`PeftFiles`](graft_plugin_sdk::PeftFiles)
//! also write them back (see [`super::mapped`]).
//!
//! PEFT saves the prompt as `prompt_embeddings` `[num_virtual_tokens, token_dim]` and, for
//! classification, the task head it trains as `base_model.<module>.<param>`
//! (`modules_to_save`); those replace the model's head.

use std::path::Path;

use serde_json::{json, Value};

use super::config::CONFIG_FILE;
use super::import::{full_tensor_replacements, replace_initializer, ImportReport};
use super::keys::{read_peft_tensors, TensorRole, PROMPT_KEY, WEIGHTS_FILE};
use crate::ir::Model;
use crate::plugins::{apply_method, graph_view, PluginRegistry};
use crate::{Error, Result};

/// The `peft_type` this module reads.
const PEFT_TYPE: &str = "PROMPT_TUNING";

/// Whether the `adapter_config.json` at `config_path` is a prompt-tuning adapter's (false when
/// it is missing or unreadable: the LoRA import reports that).
pub(super) fn is_prompt_tuning(config_path: &Path) -> Result<bool> {
    if !config_path.is_file() {
        return Ok(false);
    }
    let config = read_json(config_path)?;
    Ok(config.get("peft_type").and_then(Value::as_str) == Some(PEFT_TYPE))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = crate::input_file::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Config(format!(
            "{}: not a PEFT adapter config: {e}",
            path.display()
        ))
    })
}

/// Grafts the prompt-tuning adapter saved in `dir` onto `model`, so that the model computes
/// what PEFT's `PeftModel` computes (outputs gain the virtual positions in front, as PEFT's
/// do): the `prompt_tuning` method with the config's `num_virtual_tokens` and `task_type`, the
/// saved prompt, and the saved task head in place of the model's. Refused, naming the file and
/// field: a prompt for more than one transformer (encoder–decoder prompts), a `token_dim` or
/// prompt shape other than the model's token embedding width, and a file without the prompt.
/// On any error `model` is unchanged.
pub(super) fn import(
    registry: &PluginRegistry,
    model: &mut Model,
    dir: &Path,
) -> Result<ImportReport> {
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    let config = read_json(&config_path)?;
    let fail = |reason: String| Error::Config(format!("{}: {reason}", config_path.display()));
    let field = |name: &str| config.get(name).filter(|v| !v.is_null());
    let n = field("num_virtual_tokens")
        .and_then(Value::as_u64)
        .ok_or_else(|| fail("num_virtual_tokens must be a positive integer".into()))?
        as usize;
    if let Some(submodules) = field("num_transformer_submodules").and_then(Value::as_u64) {
        if submodules != 1 {
            return Err(fail(format!(
                "num_transformer_submodules is {submodules}: graft imports prompts for one \
                 transformer (encoder or decoder), not encoder–decoder prompts"
            )));
        }
    }
    let task_type = field("task_type")
        .and_then(Value::as_str)
        .unwrap_or("auto")
        .to_owned();
    if !weights_path.is_file() {
        return Err(Error::Config(format!(
            "{} is not a PEFT adapter folder: missing {}",
            dir.display(),
            weights_path.display()
        )));
    }
    let tensors = read_peft_tensors(&weights_path)?;
    let weights_error =
        |reason: String| Error::Config(format!("{}: {reason}", weights_path.display()));
    let prompt = tensors
        .iter()
        .find(|t| t.role == TensorRole::Prompt)
        .ok_or_else(|| weights_error(format!("has no {PROMPT_KEY:?}")))?;
    if let Some(lora) = tensors
        .iter()
        .find(|t| matches!(t.role, TensorRole::LoraA | TensorRole::LoraB))
    {
        return Err(weights_error(format!(
            "key {:?} is a LoRA tensor in a {PEFT_TYPE} adapter",
            lora.key
        )));
    }

    let mut patched = model.clone();
    apply_method(
        registry,
        &mut patched,
        "prompt_tuning",
        &json!({ "num_virtual_tokens": n, "task_type": task_type }),
    )?;
    let record = crate::patch::read_record(&patched)?;
    let declared = record
        .methods
        .last()
        .and_then(|m| m.training.peft.as_ref())
        .and_then(|files| files.tensors.first())
        .ok_or_else(|| fail("the prompt_tuning method declared no prompt tensor".into()))?;
    if prompt.shape != declared.shape {
        return Err(weights_error(format!(
            "{PROMPT_KEY:?} is {:?}, but this model's prompt is {:?} (num_virtual_tokens × the \
             token embedding width){}",
            prompt.shape,
            declared.shape,
            match field("token_dim").and_then(Value::as_u64) {
                Some(dim) => format!("; the config's token_dim is {dim}"),
                None => String::new(),
            }
        )));
    }
    let tensor = patched
        .graph
        .initializer_mut(&declared.tensor)
        .ok_or_else(|| {
            fail(format!(
                "the prompt tensor {:?} is missing",
                declared.tensor
            ))
        })?;
    let dims = tensor.dims.clone();
    tensor.set_float_values(dims, &prompt.values)?;

    let view = graph_view(model)?;
    let (replacements, skipped_keys) =
        full_tensor_replacements(&view, model, &tensors, &weights_path)?;
    for replacement in &replacements {
        replace_initializer(&mut patched, replacement)?;
    }
    *model = patched;
    Ok(ImportReport {
        replaced: replacements.into_iter().map(|r| r.report).collect(),
        skipped_keys,
        prompt_tokens: Some(n),
        ..ImportReport::default()
    })
}
