//! AdapterHub adapter folders (the `adapters` library's `save_adapter` / `load_adapter`):
//! `adapter_config.json` (`{"config": {…BnConfig…}, "hidden_size", "model_type", "name",
//! "version"}`) and the weights in `adapter.safetensors`, keyed by module path
//! (`bert.encoder.layer.0.output.adapters.<name>.adapter_down.0.weight`, …).
//!
//! The layout is the one the method's plugin declared ([`graft_plugin_sdk::TrainingSpec`]'s
//! `adapterhub`): this module only writes and reads what it declared, like
//! [`crate::peft`] does for methods with their own PEFT layout. Reading a folder grafts the
//! `adapter` method with the folder's settings, then loads its weights.

use std::path::Path;

use graft_plugin_sdk::{AppliedMethod, PeftFiles};
use serde_json::{Map, Value};

use crate::atomic_file::write_atomically;
use crate::ir::Model;
use crate::peft::mapped::{declared_tensors, load_declared};
use crate::plugins::{apply_method, PluginRegistry};
use crate::{Error, Result};

/// The config file of an AdapterHub adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file (`save_adapter(…, use_safetensors=True)`).
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
/// The weights file AdapterHub writes by default (a PyTorch pickle, which graft does not read).
pub const PICKLE_WEIGHTS_FILE: &str = "pytorch_adapter.bin";

/// The method graft grafts for an AdapterHub bottleneck adapter.
pub const METHOD: &str = "adapter";

/// `BnConfig` fields graft does not model but accepts at these values (their defaults, which
/// leave the adapter unchanged); any other value is refused by name.
const NEUTRAL_FIELDS: &[(&str, &[&str])] = &[
    ("architecture", &["\"bottleneck\""]),
    ("ln_before", &["false"]),
    ("ln_after", &["false"]),
    ("use_gating", &["false"]),
    ("adapter_residual_before_ln", &["false"]),
    ("inv_adapter", &["null"]),
    ("inv_adapter_reduction_factor", &["null"]),
    ("phm_layer", &["false"]),
    ("stochastic_depth", &["0.0", "0"]),
    ("init_weights_seed", &["null"]),
];

/// `BnConfig` fields that only matter when `phm_layer` is true.
const PHM_FIELDS: &[&str] = &[
    "phm_dim",
    "factorized_phm_W",
    "shared_W_phm",
    "shared_phm_rule",
    "factorized_phm_rule",
    "phm_c_init",
    "phm_init_range",
    "learn_phm",
    "hypercomplex_nonlinearity",
    "phm_rank",
    "phm_bias",
];

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// The adapters written, each with its folder.
    pub adapters: Vec<(String, std::path::PathBuf)>,
    /// Trained tensors the files cannot carry (norms trained in place), per adapter.
    pub not_carried: Vec<String>,
}

/// The methods of `model` that declared an AdapterHub layout, with their adapter names.
fn declared(model: &Model) -> Result<Vec<(String, AppliedMethod, PeftFiles)>> {
    let record = crate::patch::read_record(model)?;
    Ok(record
        .methods
        .into_iter()
        .filter_map(|m| {
            let files = m.training.adapterhub.clone()?;
            let name = files.config.get("name")?.as_str()?.to_owned();
            Some((name, m, files))
        })
        .collect())
}

/// Writes the model's AdapterHub adapters: into `dir` itself when there is one (or `name`
/// picks one), else one subfolder per adapter name. Errors when no method declared an
/// AdapterHub layout (naming what the model has) or `name` matches none.
pub fn export(model: &Model, dir: &Path, name: Option<&str>) -> Result<ExportReport> {
    let mut adapters = declared(model)?;
    if adapters.is_empty() {
        let record = crate::patch::read_record(model)?;
        let methods: Vec<&str> = record.methods.iter().map(|m| m.method.as_str()).collect();
        return Err(Error::Config(format!(
            "no method of this model has AdapterHub files (it has: {}); AdapterHub files hold \
             bottleneck adapters grafted by `graft apply -m adapter` on a model whose sites have \
             labels",
            if methods.is_empty() {
                "none".to_owned()
            } else {
                methods.join(", ")
            }
        )));
    }
    if let Some(wanted) = name {
        let names: Vec<String> = adapters.iter().map(|(n, ..)| n.clone()).collect();
        adapters.retain(|(n, ..)| n == wanted);
        if adapters.is_empty() {
            return Err(Error::Config(format!(
                "no adapter named {wanted:?}; the model has: {}",
                names.join(", ")
            )));
        }
    }
    let single = adapters.len() == 1;
    let mut report = ExportReport {
        adapters: Vec::new(),
        not_carried: Vec::new(),
    };
    for (adapter_name, method, files) in &adapters {
        let folder = if single {
            dir.to_path_buf()
        } else {
            dir.join(adapter_name)
        };
        let tensors = declared_tensors(model, files, "")?;
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        crate::peft::write_safetensors(&folder.join(WEIGHTS_FILE), &tensors)?;
        let config_text = serde_json::to_string_pretty(&files.config).unwrap_or_default();
        write_atomically(&folder.join(CONFIG_FILE), config_text.as_bytes())?;
        let in_place: Vec<&String> = method
            .trainable
            .iter()
            .filter(|t| !method.parameters.contains(t))
            .collect();
        if !in_place.is_empty() {
            report.not_carried.push(format!(
                "adapter {adapter_name}: {} norm tensors trained in place ({}…) are not part of \
                 AdapterHub's files; `graft merge` cannot fold the adapter either, so keep them \
                 with `graft export --format onnx`",
                in_place.len(),
                in_place[0]
            ));
        }
        report.adapters.push((adapter_name.clone(), folder));
    }
    Ok(report)
}

/// Grafts the AdapterHub adapter saved in `dir` onto `model` (which must not have it yet):
/// reads `adapter_config.json`, applies the `adapter` method with its settings and name, and
/// loads `adapter.safetensors` into the new tensors. Settings graft does not model are refused
/// by name unless they hold their neutral defaults. On error `model` is unchanged. Returns the
/// adapter's name and the number of tensors loaded.
pub fn import(registry: &PluginRegistry, model: &mut Model, dir: &Path) -> Result<(String, usize)> {
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    if !config_path.is_file() {
        return Err(Error::Config(format!(
            "{} is not an AdapterHub adapter folder: missing {CONFIG_FILE}",
            dir.display()
        )));
    }
    if !weights_path.is_file() {
        let hint = if dir.join(PICKLE_WEIGHTS_FILE).is_file() {
            format!(
                "; it has {PICKLE_WEIGHTS_FILE}, a PyTorch pickle graft does not read (pickles can \
                 run code). Save the adapter with `model.save_adapter(dir, name, \
                 use_safetensors=True)`"
            )
        } else {
            String::new()
        };
        return Err(Error::Config(format!(
            "{}: missing {WEIGHTS_FILE}{hint}",
            dir.display()
        )));
    }
    let text = crate::input_file::read_to_string(&config_path)?;
    let file_config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not JSON: {e}", config_path.display())))?;
    let settings = method_settings(&file_config)
        .map_err(|reason| Error::Config(format!("{}: {reason}", config_path.display())))?;
    let name = settings
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut patched = model.clone();
    apply_method(registry, &mut patched, METHOD, &Value::Object(settings))?;
    let (_, method, files) = declared(&patched)?
        .into_iter()
        .find(|(n, ..)| *n == name)
        .ok_or_else(|| {
            Error::Config(format!(
                "{}: the adapter plugin declared no AdapterHub layout for this model (its sites \
                 have no labels to key the weights by)",
                dir.display()
            ))
        })?;
    let n = load_declared(&mut patched, &method, &files, &weights_path, "", &[])?;
    if n != files.tensors.len() {
        return Err(Error::Config(format!(
            "{}: holds {n} of the adapter's {} tensors (e.g. {:?} is missing); the adapter does \
             not fit this model",
            weights_path.display(),
            files.tensors.len(),
            files.tensors.first().map(|t| &t.key)
        )));
    }
    *model = patched;
    Ok((name, n))
}

/// The `adapter` method's settings for an `adapter_config.json`.
fn method_settings(file_config: &Value) -> std::result::Result<Map<String, Value>, String> {
    let config = file_config
        .get("config")
        .and_then(Value::as_object)
        .ok_or("no \"config\" object")?;
    let name = file_config
        .get("name")
        .and_then(Value::as_str)
        .ok_or("no \"name\"")?;
    let phm = config
        .get("phm_layer")
        .is_some_and(|v| v == &Value::Bool(true));
    let mut settings = Map::new();
    settings.insert("name".into(), Value::from(name));
    settings.insert("config".into(), Value::from("seq_bn"));
    for (key, value) in config {
        if let Some((_, neutral)) = NEUTRAL_FIELDS.iter().find(|(k, _)| k == key) {
            if !neutral.contains(&value.to_string().as_str()) {
                return Err(format!(
                    "config.{key} = {value} is not supported by graft's adapter (only {})",
                    neutral.join(" or ")
                ));
            }
            continue;
        }
        if PHM_FIELDS.contains(&key.as_str()) && !phm {
            continue;
        }
        let value = match (key.as_str(), value) {
            ("reduction_factor", Value::Object(_)) => {
                return Err(
                    "config.reduction_factor per layer (a mapping) is not supported yet".into(),
                )
            }
            ("scaling", Value::String(s)) => {
                return Err(format!(
                    "config.scaling = \"{s}\" (a learned scaling) is not supported yet"
                ))
            }
            (_, v) => v.clone(),
        };
        settings.insert(key.clone(), value);
    }
    settings.insert("train_layer_norms".into(), Value::Bool(false));
    Ok(settings)
}
