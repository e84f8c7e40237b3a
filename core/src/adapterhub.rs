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

use graft_plugin_sdk::{AdapterHubKind, AppliedMethod, PeftFiles};
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

/// The config file of an AdapterHub fusion folder (`save_adapter_fusion`).
pub const FUSION_CONFIG_FILE: &str = "adapter_fusion_config.json";
/// The weights file of a fusion folder (`save_adapter_fusion(…, use_safetensors=True)`).
pub const FUSION_WEIGHTS_FILE: &str = "model_adapter_fusion.safetensors";
/// The fusion weights file AdapterHub writes by default (a PyTorch pickle).
pub const FUSION_PICKLE_WEIGHTS_FILE: &str = "pytorch_model_adapter_fusion.bin";

/// The method graft grafts for an AdapterHub bottleneck adapter.
pub const METHOD: &str = "adapter";
/// The method graft grafts for an AdapterHub fusion and the adapters it fuses.
pub const FUSION_METHOD: &str = "adapter_fusion";

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
    /// The adapters (and fusions) written, each with its folder.
    pub adapters: Vec<(String, std::path::PathBuf)>,
    /// The files written, config and weights of each folder, in the order of `adapters`.
    pub files: Vec<std::path::PathBuf>,
    /// Trained tensors the files cannot carry (norms trained in place), per adapter.
    pub not_carried: Vec<String>,
}

/// One AdapterHub folder a method of the model declared.
struct DeclaredFolder {
    /// The adapter's (or the fusion's) name.
    name: String,
    kind: AdapterHubKind,
    method: AppliedMethod,
    files: PeftFiles,
}

/// The AdapterHub folders the methods of `model` declared: each `adapter` method's, and an
/// `adapter_fusion` method's fused adapters and fusion layer.
fn declared(model: &Model) -> Result<Vec<DeclaredFolder>> {
    let record = crate::patch::read_record(model)?;
    let mut folders = Vec::new();
    for method in record.methods {
        if let Some(files) = method.training.adapterhub.clone() {
            if let Some(name) = files.config.get("name").and_then(Value::as_str) {
                folders.push(DeclaredFolder {
                    name: name.to_owned(),
                    kind: AdapterHubKind::Adapter,
                    method: method.clone(),
                    files,
                });
            }
        }
        for folder in &method.training.adapterhub_folders {
            folders.push(DeclaredFolder {
                name: folder.name.clone(),
                kind: folder.kind,
                method: method.clone(),
                files: folder.files.clone(),
            });
        }
    }
    Ok(folders)
}

/// The config and weights file names of a folder of `kind`.
fn file_names(kind: AdapterHubKind) -> (&'static str, &'static str) {
    match kind {
        AdapterHubKind::Adapter => (CONFIG_FILE, WEIGHTS_FILE),
        AdapterHubKind::Fusion => (FUSION_CONFIG_FILE, FUSION_WEIGHTS_FILE),
    }
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
        let names: Vec<String> = adapters.iter().map(|f| f.name.clone()).collect();
        adapters.retain(|f| f.name == wanted);
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
        files: Vec::new(),
        not_carried: Vec::new(),
    };
    for declared in &adapters {
        let (adapter_name, method, files) = (&declared.name, &declared.method, &declared.files);
        let folder = if single {
            dir.to_path_buf()
        } else {
            dir.join(adapter_name)
        };
        let (config_file, weights_file) = file_names(declared.kind);
        let tensors = declared_tensors(model, files, "")?;
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        crate::peft::write_safetensors(&folder.join(weights_file), &tensors)?;
        let config_text = serde_json::to_string_pretty(&files.config).unwrap_or_default();
        write_atomically(&folder.join(config_file), config_text.as_bytes())?;
        let in_place: Vec<&String> = method
            .trainable
            .iter()
            .filter(|t| !method.parameters.contains(t))
            .collect();
        if !in_place.is_empty() && declared.kind == AdapterHubKind::Adapter {
            report.not_carried.push(format!(
                "adapter {adapter_name}: {} norm tensors trained in place ({}…) are not part of \
                 AdapterHub's files; `graft merge` cannot fold the adapter either, so keep them \
                 with `graft export --format onnx`",
                in_place.len(),
                in_place[0]
            ));
        }
        report.files.push(folder.join(config_file));
        report.files.push(folder.join(weights_file));
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
    let (file_config, weights_path) = read_folder(dir, AdapterHubKind::Adapter)?;
    let config_path = dir.join(CONFIG_FILE);
    let settings = method_settings(&file_config)
        .map_err(|reason| Error::Config(format!("{}: {reason}", config_path.display())))?;
    let name = settings
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut patched = model.clone();
    apply_method(registry, &mut patched, METHOD, &Value::Object(settings))?;
    let DeclaredFolder { method, files, .. } = declared(&patched)?
        .into_iter()
        .find(|f| f.name == name && f.kind == AdapterHubKind::Adapter)
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

/// Whether `dir` holds an AdapterHub fusion (`adapter_fusion_config.json`).
pub fn is_fusion_folder(dir: &Path) -> bool {
    dir.join(FUSION_CONFIG_FILE).is_file()
}

/// The parsed config file of the AdapterHub folder `dir` holding a `kind`, and the path of its
/// weights file; errors name the folder and what is missing (a pickle is named as such).
fn read_folder(dir: &Path, kind: AdapterHubKind) -> Result<(Value, std::path::PathBuf)> {
    let (config_file, weights_file) = file_names(kind);
    let pickle = match kind {
        AdapterHubKind::Adapter => PICKLE_WEIGHTS_FILE,
        AdapterHubKind::Fusion => FUSION_PICKLE_WEIGHTS_FILE,
    };
    let config_path = dir.join(config_file);
    let weights_path = dir.join(weights_file);
    if !config_path.is_file() {
        return Err(Error::Config(format!(
            "{} is not an AdapterHub {} folder: missing {config_file}",
            dir.display(),
            match kind {
                AdapterHubKind::Adapter => "adapter",
                AdapterHubKind::Fusion => "fusion",
            }
        )));
    }
    if !weights_path.is_file() {
        let hint = if dir.join(pickle).is_file() {
            format!(
                "; it has {pickle}, a PyTorch pickle graft does not read (pickles can run code). \
                 Save with `use_safetensors=True`"
            )
        } else {
            String::new()
        };
        return Err(Error::Config(format!(
            "{}: missing {weights_file}{hint}",
            dir.display()
        )));
    }
    let text = crate::input_file::read_to_string(&config_path)?;
    let config = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not JSON: {e}", config_path.display())))?;
    Ok((config, weights_path))
}

/// Grafts the AdapterHub fusion saved in `fusion_dir` onto `model` with the adapters it fuses:
/// each is looked up by name among `adapter_dirs`, else in the folder of that name beside
/// `fusion_dir` (where `save_all_adapters` and `save_all_adapter_fusions` put them). The
/// adapters must share their settings apart from the name. Applies the `adapter_fusion`
/// method and loads every folder's weights; on error `model` is unchanged. Returns the
/// fusion's name, the adapter folders used and the number of tensors loaded.
pub fn import_fusion(
    registry: &PluginRegistry,
    model: &mut Model,
    fusion_dir: &Path,
    adapter_dirs: &[std::path::PathBuf],
) -> Result<(String, Vec<std::path::PathBuf>, usize)> {
    let (fusion_config, fusion_weights) = read_folder(fusion_dir, AdapterHubKind::Fusion)?;
    let config_path = fusion_dir.join(FUSION_CONFIG_FILE);
    let fail = |reason: String| Error::Config(format!("{}: {reason}", config_path.display()));
    let names: Vec<String> = fusion_config
        .get("adapter_names")
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .ok_or_else(|| fail("no \"adapter_names\" list".into()))?;
    let mut used = Vec::new();
    let mut adapter_settings: Option<Map<String, Value>> = None;
    for name in &names {
        let dir = adapter_dirs
            .iter()
            .find(|d| {
                read_folder(d, AdapterHubKind::Adapter)
                    .ok()
                    .and_then(|(c, _)| c.get("name").and_then(Value::as_str).map(|n| n == name))
                    .unwrap_or(false)
            })
            .cloned()
            .or_else(|| {
                let beside = fusion_dir.parent()?.join(name);
                beside.join(CONFIG_FILE).is_file().then_some(beside)
            })
            .ok_or_else(|| {
                fail(format!(
                    "it fuses adapter {name}, which no --from-adapterhub folder holds and no folder \
                     {name}/ beside it"
                ))
            })?;
        let (file_config, _) = read_folder(&dir, AdapterHubKind::Adapter)?;
        let mut settings = method_settings(&file_config).map_err(|reason| {
            Error::Config(format!("{}: {reason}", dir.join(CONFIG_FILE).display()))
        })?;
        settings.remove("name");
        match &adapter_settings {
            None => adapter_settings = Some(settings),
            Some(first) if *first != settings => {
                return Err(fail(format!(
                    "adapter {name} has other settings than {}; graft fuses adapters that share \
                     their settings",
                    names[0]
                )))
            }
            Some(_) => {}
        }
        used.push(dir);
    }
    let mut settings = adapter_settings.ok_or_else(|| fail("it fuses no adapter".into()))?;
    settings.insert("adapters".into(), Value::from(names.clone()));
    let fusion = fusion_config
        .get("config")
        .and_then(Value::as_object)
        .ok_or_else(|| fail("no \"config\" object".into()))?;
    for (key, value) in fusion {
        let value = match (key.as_str(), value) {
            (_, Value::Null) => continue,
            // Typed as a string in AdapterHub, written as a boolean.
            ("value_initialized", Value::String(s)) => Value::Bool(s.eq_ignore_ascii_case("true")),
            (_, v) => v.clone(),
        };
        settings.insert(key.clone(), value);
    }
    let mut patched = model.clone();
    apply_method(
        registry,
        &mut patched,
        FUSION_METHOD,
        &Value::Object(settings),
    )?;
    let folders: Vec<DeclaredFolder> = declared(&patched)?
        .into_iter()
        .filter(|f| f.method.method == FUSION_METHOD)
        .collect();
    let fusion_name = names.join(",");
    let mut loaded = 0;
    for folder in &folders {
        let weights = match folder.kind {
            AdapterHubKind::Fusion if folder.name == fusion_name => fusion_weights.clone(),
            AdapterHubKind::Adapter => match names.iter().position(|n| *n == folder.name) {
                Some(i) => used[i].join(WEIGHTS_FILE),
                None => continue,
            },
            AdapterHubKind::Fusion => continue,
        };
        let n = load_declared(
            &mut patched,
            &folder.method,
            &folder.files,
            &weights,
            "",
            &[],
        )?;
        if n != folder.files.tensors.len() {
            return Err(Error::Config(format!(
                "{}: holds {n} of the {} tensors of {} (e.g. {:?} is missing); it does not fit \
                 this model",
                weights.display(),
                folder.files.tensors.len(),
                folder.name,
                folder.files.tensors.first().map(|t| &t.key)
            )));
        }
        loaded += n;
    }
    if folders.is_empty() {
        return Err(fail(
            "the adapter plugin declared no AdapterHub layout for this model (its sites have no \
             labels to key the weights by)"
                .into(),
        ));
    }
    *model = patched;
    Ok((fusion_name, used, loaded))
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
