//! HF PEFT prompt-learning adapters (`peft_type` `PROMPT_TUNING`, `PREFIX_TUNING`): grafted
//! by the `prompt` plugin's `prompt_tuning` and `prefix_tuning` methods, whose declared
//! [`PeftFiles`](graft_plugin_sdk::PeftFiles) also write them back (see [`super::mapped`]).
//!
//! PEFT saves the prompt as `prompt_embeddings` (`[num_virtual_tokens, token_dim]` for prompt
//! tuning; `[num_virtual_tokens, layers · 2 · kv_width]` for prefix tuning, the prefix every
//! layer's cache starts with) and, for classification, the task head it trains as
//! `base_model.<module>.<param>` (`modules_to_save`); those replace the model's head.

use std::path::Path;

use serde_json::{json, Value};

use super::config::CONFIG_FILE;
use super::import::{full_tensor_replacements, replace_initializer, ImportReport};
use super::keys::{read_peft_tensors, TensorRole, PROMPT_KEY, WEIGHTS_FILE};
use crate::ir::Model;
use crate::plugins::{apply_method, graph_view, PluginRegistry};
use crate::{Error, Result};

/// The prompt-learning `peft_type`s this module reads, and the method that grafts each.
const METHODS: &[(&str, &str)] = &[
    ("PROMPT_TUNING", "prompt_tuning"),
    ("PREFIX_TUNING", "prefix_tuning"),
    // PEFT saves a P-Tuning prompt as its encoder's output: a prompt-tuning table.
    ("P_TUNING", "prompt_tuning"),
];

/// The method that grafts the adapter whose `adapter_config.json` is at `config_path`, with
/// the parsed config, when it is a prompt-learning adapter graft reads (`None` when the file
/// is missing or names another type: the LoRA import reports those).
pub(super) fn prompt_learning_method(config_path: &Path) -> Result<Option<(&'static str, Value)>> {
    if !config_path.is_file() {
        return Ok(None);
    }
    let config = read_json(config_path)?;
    let peft_type = config.get("peft_type").and_then(Value::as_str);
    let method = METHODS
        .iter()
        .find(|(name, _)| Some(*name) == peft_type)
        .map(|(_, method)| *method);
    Ok(method.map(|method| (method, config)))
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

/// Grafts the prompt-learning adapter saved in `dir`, whose `adapter_config.json` is `config`,
/// onto `model` with `method` (both from [`prompt_learning_method`]), so that the model computes what PEFT's `PeftModel` computes
/// (prompt tuning: the outputs gain the virtual positions in front, as PEFT's do): the method
/// with the config's `num_virtual_tokens` (and, for prompt tuning, `task_type`), the saved
/// prompt, and the saved task head in place of the model's. Refused, naming the file and
/// field: a prompt for more than one transformer (encoder–decoder prompts), PEFT's prefix MLP
/// in training form, a prompt shape other than the model's, and a file without the prompt. On
/// any error `model` is unchanged.
pub(super) fn import(
    registry: &PluginRegistry,
    model: &mut Model,
    dir: &Path,
    method: &str,
    config: &Value,
) -> Result<ImportReport> {
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
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
    if field("prefix_projection").and_then(Value::as_bool) == Some(true) {
        return Err(fail(
            "prefix_projection is true: PEFT keeps the prefix MLP (embedding → Linear → Tanh → \
             Linear) in such files, which graft does not import; save the adapter with \
             prefix_projection=false"
                .into(),
        ));
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
            "key {:?} is a LoRA tensor in a prompt-learning adapter",
            lora.key
        )));
    }

    let settings = match method {
        "prompt_tuning" => json!({ "num_virtual_tokens": n, "task_type": task_type }),
        _ => json!({ "num_virtual_tokens": n }),
    };
    let mut patched = model.clone();
    apply_method(registry, &mut patched, method, &settings)?;
    let record = crate::patch::read_record(&patched)?;
    let declared = record
        .methods
        .last()
        .and_then(|m| m.training.peft.as_ref())
        .and_then(|files| files.tensors.first())
        .ok_or_else(|| fail(format!("the {method} method declared no prompt tensor")))?;
    if prompt.shape != declared.shape {
        return Err(weights_error(format!(
            "{PROMPT_KEY:?} is {:?}, but this model's {method} prompt is {:?}{}",
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
        prompt: Some((method.to_owned(), n)),
        method: method.to_owned(),
        ..ImportReport::default()
    })
}
