//! Reading `adapter_config.json` the way PEFT reads it: the fields [`import`](super::import())
//! uses, the fields that cannot change a LoRA forward pass, and the fields graft refuses.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The adapter folder's config file.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The `adapter_config.json` fields that [`import`] reads. Every other field lands in `other`.
///
/// [`import`]: super::import()
#[derive(Debug, Deserialize)]
pub(super) struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    #[serde(default)]
    pub(super) r: Option<usize>,
    #[serde(default)]
    pub(super) lora_alpha: Option<f64>,
    #[serde(default)]
    pub(super) use_rslora: Option<bool>,
    #[serde(default)]
    pub(super) target_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub(super) exclude_modules: Option<ModuleSelector>,
    #[serde(default)]
    pub(super) layers_to_transform: Option<LayerIndexes>,
    #[serde(default)]
    pub(super) layers_pattern: Option<OneOrMany>,
    #[serde(default)]
    pub(super) rank_pattern: Option<OrderedMap<usize>>,
    #[serde(default)]
    pub(super) alpha_pattern: Option<OrderedMap<f64>>,
    #[serde(default)]
    pub(super) lora_dropout: Option<f64>,
    #[serde(default)]
    pub(super) modules_to_save: Option<OneOrMany>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

/// PEFT's `target_modules` / `exclude_modules`: a regular expression that must match a whole
/// module path, or a list of names matching a path equal to them or ending in `.name`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum ModuleSelector {
    Regex(String),
    Names(Vec<String>),
}

/// `layers_to_transform`: one index or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum LayerIndexes {
    One(usize),
    Many(Vec<usize>),
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The entries, dropping empty strings.
    pub(super) fn entries(&self) -> Vec<String> {
        let all = match self {
            OneOrMany::One(one) => std::slice::from_ref(one),
            OneOrMany::Many(many) => many.as_slice(),
        };
        all.iter().filter(|e| !e.is_empty()).cloned().collect()
    }
}

/// A JSON object read with its keys in file order, since PEFT applies the first matching
/// `rank_pattern` / `alpha_pattern` key.
#[derive(Debug, Default)]
pub(super) struct OrderedMap<T>(pub(super) Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OrderedMap<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for MapVisitor<T> {
            type Value = OrderedMap<T>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(OrderedMap(entries))
            }
        }
        deserializer.deserialize_map(MapVisitor(std::marker::PhantomData))
    }
}

/// PEFT config fields that do not change a loaded LoRA adapter's forward pass (initialisation
/// recipes, provenance, bookkeeping, and `fan_in_fan_out`, which only describes how PyTorch
/// stores a Conv1D base weight: A and B are [r, in] / [out, r] either way).
const INERT_FIELDS: &[&str] = &[
    "auto_mapping",
    "base_model_name_or_path",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "loftq_config",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "peft_version",
    "qalora_group_size",
    "revision",
    "runtime_config",
    "task_type",
];

/// PEFT config fields that change the forward pass in ways graft's LoRA does not reproduce;
/// refused unless empty (`null`, `false`, `[]`, `{}`).
const UNSUPPORTED_FIELDS: &[(&str, &str)] = &[
    ("use_dora", "DoRA"),
    ("lora_bias", "a bias on lora_B"),
    ("layer_replication", "layer replication"),
    ("target_parameters", "LoRA on raw parameters"),
    ("trainable_token_indices", "trainable token embeddings"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("arrow_config", "Arrow routing"),
    ("use_qalora", "QALoRA"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("kasa_config", "KaSA"),
    ("monteclora_config", "MonteCLoRA"),
    ("velora_config", "VeLoRA"),
];

/// True for `null`, `false`, `""`, `[]` and `{}`.
fn is_empty_value(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null | serde_json::Value::Bool(false) => true,
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Array(items) => items.is_empty(),
        serde_json::Value::Object(map) => map.is_empty(),
        _ => false,
    }
}

/// Reads `adapter_config.json` as JSON and as the fields every PEFT tuner shares (targeting,
/// patterns, `modules_to_save`), whatever its `peft_type`.
pub(super) fn read_adapter_config(path: &Path) -> Result<(AdapterConfig, serde_json::Value)> {
    let fail = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
    let text = crate::input_file::read_to_string(path)?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| fail(format!("not JSON: {e}")))?;
    let config: AdapterConfig = serde_json::from_value(value.clone())
        .map_err(|e| fail(format!("not a PEFT adapter config: {e}")))?;
    Ok((config, value))
}

/// True for the PEFT fields no tuner's outputs depend on (provenance, bookkeeping).
pub(super) fn is_inert_field(field: &str) -> bool {
    INERT_FIELDS.contains(&field)
}

/// Reads and checks a LoRA `adapter_config.json`; returns the config and the unknown fields it
/// ignores.
pub(super) fn read_config(path: &Path) -> Result<(AdapterConfig, Vec<String>)> {
    let fail = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
    let (config, _) = read_adapter_config(path)?;
    match config.peft_type.as_deref() {
        Some("LORA") => {}
        Some(other) => {
            return Err(fail(format!(
                "peft_type is {other:?}; graft imports LORA adapters only"
            )))
        }
        None => return Err(fail("has no peft_type; expected \"LORA\"".into())),
    }
    if let Some(bias) = config.bias.as_deref() {
        if !["none", "all", "lora_only"].contains(&bias) {
            return Err(fail(format!(
                "bias {bias:?} is not one of none, all, lora_only"
            )));
        }
    }
    refuse_unsupported_lora_fields(path, &config.other, None)?;
    let ignored = config
        .other
        .keys()
        .filter(|field| {
            !INERT_FIELDS.contains(&field.as_str())
                && !UNSUPPORTED_FIELDS.iter().any(|(name, _)| name == *field)
        })
        .cloned()
        .collect();
    Ok((config, ignored))
}

/// Refuses the LoRA config fields that ask for behaviour graft does not reproduce (DoRA,
/// LoRA biases, …) unless empty, except `allowed` (the flag of the method reading the file,
/// such as `use_dora` for `dora`).
pub(super) fn refuse_unsupported_lora_fields<'a>(
    path: &Path,
    fields: impl IntoIterator<Item = (&'a String, &'a serde_json::Value)>,
    allowed: Option<&str>,
) -> Result<()> {
    for (field, value) in fields {
        let Some((_, what)) = UNSUPPORTED_FIELDS.iter().find(|(name, _)| name == field) else {
            continue;
        };
        if Some(field.as_str()) != allowed && !is_empty_value(value) {
            return Err(Error::Config(format!(
                "{}: {field} = {value} asks for {what}, which graft does not support",
                path.display()
            )));
        }
    }
    Ok(())
}
