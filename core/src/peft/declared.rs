//! Importing HF PEFT adapters of the plugin methods that say how ([`PeftImport`] in their
//! description): LoHa, LoKr, IA³, DoRA. The host does what every PEFT tuner shares — module
//! targeting, `rank_pattern` / `alpha_pattern`, `modules_to_save` — and hands the method its
//! config; the method's patch declares where each tensor of the file goes
//! ([`graft_plugin_sdk::PeftFiles`]), and [`super::mapped`] loads them.

use std::path::Path;

use graft_plugin_sdk::PeftImport;
use serde_json::{json, Value};

use super::config::{
    is_inert_field, read_adapter_config, refuse_unsupported_lora_fields, ModuleSelector,
    CONFIG_FILE,
};
use super::import::{
    exact_overrides, exact_regex, full_tensor_replacements, replace_initializer,
    require_adapter_files, resolve_targets, ImportReport, ImportedBranch, Targets,
};
use super::keys::{read_tensors_of, TensorRole, KEY_PREFIX, WEIGHTS_FILE};
use super::select::{compile_patterns, pattern_value, Selection};
use crate::ir::Model;
use crate::plugins::{apply_method, graph_view, PluginRegistry};
use crate::{Error, Result};

/// The `peft_type`s the core itself imports (LoRA, and prompt learning through the `prompt`
/// plugin's methods).
const CORE_TYPES: &[&str] = &["LORA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"];

/// The config fields every PEFT tuner shares, which the host reads itself.
const SHARED_FIELDS: &[&str] = &[
    "peft_type",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
];

/// The plugin method that reads the adapter whose config is `config_path`: one declaring its
/// `peft_type` whose flag field is `true` there, else one declaring it without a flag. `None`
/// when the core reads the type itself (plain LoRA, prompt learning) or the file is missing (the
/// caller reports it). Errors for a `peft_type` nothing reads, naming the ones that can be, and
/// when two methods could read it.
pub(super) fn method_for(
    registry: &PluginRegistry,
    config_path: &Path,
) -> Result<Option<(String, PeftImport)>> {
    if !config_path.is_file() {
        return Ok(None);
    }
    let (_, config) = read_adapter_config(config_path)?;
    let Some(peft_type) = config.get("peft_type").and_then(Value::as_str) else {
        return Ok(None);
    };
    let declared: Vec<(&str, &PeftImport)> = registry
        .plugins
        .iter()
        .flat_map(|p| &p.description.methods)
        .filter_map(|m| Some((m.name.as_str(), m.peft_import.as_ref()?)))
        .collect();
    let flag_set = |spec: &PeftImport| {
        spec.flag
            .as_ref()
            .is_some_and(|f| config.get(f).and_then(Value::as_bool) == Some(true))
    };
    let of_type = || declared.iter().filter(|(_, s)| s.peft_type == peft_type);
    let mut chosen: Vec<&(&str, &PeftImport)> = of_type().filter(|(_, s)| flag_set(s)).collect();
    if chosen.is_empty() {
        chosen = of_type().filter(|(_, s)| s.flag.is_none()).collect();
    }
    match chosen.as_slice() {
        [(method, spec)] => Ok(Some((method.to_string(), (*spec).clone()))),
        [] if CORE_TYPES.contains(&peft_type) => Ok(None),
        [] => {
            let mut known: Vec<&str> = CORE_TYPES.to_vec();
            known.extend(declared.iter().map(|(_, s)| s.peft_type.as_str()));
            known.sort_unstable();
            known.dedup();
            Err(Error::Config(format!(
                "{}: peft_type is {peft_type:?}; graft and the plugins found import {}",
                config_path.display(),
                known.join(", ")
            )))
        }
        several => {
            let names: Vec<&str> = several.iter().map(|(m, _)| *m).collect();
            Err(Error::Config(format!(
                "{}: peft_type {peft_type:?} is read by several methods ({}); keep one of their plugins on the plugin path",
                config_path.display(),
                names.join(", ")
            )))
        }
    }
}

/// Grafts the adapter saved in `dir` with `method`, as `spec` says (see [`PeftImport`]), so that
/// the model computes what PEFT's `PeftModel` computes: the targeted modules, per-module rank and
/// alpha, the method's tensors loaded where its patch declared them, and `modules_to_save`
/// tensors in place of the base model's. On any error `model` is unchanged.
pub(super) fn import(
    registry: &PluginRegistry,
    model: &mut Model,
    dir: &Path,
    method: &str,
    spec: &PeftImport,
) -> Result<ImportReport> {
    require_adapter_files(dir)?;
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    let (config, raw) = read_adapter_config(&config_path)?;
    if spec.peft_type == "LORA" {
        let fields = raw.as_object().into_iter().flatten();
        refuse_unsupported_lora_fields(&config_path, fields, spec.flag.as_deref())?;
    }
    let config_error =
        |reason: String| Error::Config(format!("{}: {reason}", config_path.display()));
    let selection = Selection::new(&config).map_err(config_error)?;
    let tensors = read_tensors_of(&weights_path, &spec.tensor_suffixes)?;
    if let Some(other) = tensors.iter().find(|t| {
        matches!(
            t.role,
            TensorRole::LoraA | TensorRole::LoraB | TensorRole::Prompt
        )
    }) {
        return Err(Error::Config(format!(
            "{}: key {:?} is not a tensor of a {} adapter (its tensors end in {})",
            weights_path.display(),
            other.key,
            spec.peft_type,
            spec.tensor_suffixes.join(", ")
        )));
    }
    let view = graph_view(model)?;
    let Targets {
        targeted,
        file_modules,
        targets_from_file,
    } = resolve_targets(
        &view,
        &selection,
        &tensors,
        |role| matches!(role, TensorRole::Method { .. }),
        &config_path,
        &weights_path,
    )?;

    let number = |field: &Option<String>| -> Result<Option<f64>> {
        let Some(field) = field else { return Ok(None) };
        match raw.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_f64()
                .map(Some)
                .ok_or_else(|| config_error(format!("{field} = {value} is not a number"))),
        }
    };
    let base_r = number(&spec.rank_field)?;
    let base_alpha = number(&spec.alpha_field)?;
    let rank_patterns =
        compile_patterns(&config.rank_pattern, "rank_pattern").map_err(config_error)?;
    let alpha_patterns =
        compile_patterns(&config.alpha_pattern, "alpha_pattern").map_err(config_error)?;
    let mut branches = Vec::with_capacity(targeted.len());
    for module in &targeted {
        let r = pattern_value(&rank_patterns, module)
            .or(base_r.map(|r| r as usize))
            .unwrap_or(0);
        if spec.rank_field.is_some() && r == 0 {
            return Err(config_error(format!(
                "no rank (or rank 0) for module {module:?}"
            )));
        }
        let alpha = pattern_value(&alpha_patterns, module)
            .or(base_alpha)
            .unwrap_or(0.0);
        branches.push(ImportedBranch {
            module: module.clone(),
            r,
            alpha,
            scale: if r > 0 { alpha / r as f64 } else { 1.0 },
            loaded: file_modules.contains(module),
        });
    }

    let mut method_config = serde_json::Map::new();
    method_config.insert("targets".into(), json!([exact_regex(&targeted)]));
    if let Some(r) = base_r {
        method_config.insert("r".into(), json!(r as usize));
        let ranks = exact_overrides(&branches, |b| (b.r != r as usize).then(|| json!(b.r)));
        method_config.insert("rank_pattern".into(), ranks.into());
    }
    if let Some(alpha) = base_alpha {
        method_config.insert("alpha".into(), json!(alpha));
        let alphas = exact_overrides(&branches, |b| (b.alpha != alpha).then(|| json!(b.alpha)));
        method_config.insert("alpha_pattern".into(), alphas.into());
    }
    for (field, key) in &spec.fields {
        if let Some(value) = raw.get(field).filter(|v| !v.is_null()) {
            method_config.insert(key.clone(), value.clone());
        }
    }
    for (field, key) in &spec.module_fields {
        let selector: Option<ModuleSelector> = match raw.get(field) {
            None | Some(Value::Null) => None,
            Some(value) => Some(serde_json::from_value(value.clone()).map_err(|_| {
                config_error(format!(
                    "{field} = {value} is neither a regular expression nor a list of module names"
                ))
            })?),
        };
        let selected: Vec<&String> = match &selector {
            None => Vec::new(),
            Some(selector) => {
                let matcher = SuffixMatcher::new(selector, field).map_err(config_error)?;
                targeted.iter().filter(|m| matcher.matches(m)).collect()
            }
        };
        let regex = if selected.is_empty() {
            "^$".to_owned()
        } else {
            exact_regex(&selected)
        };
        method_config.insert(key.clone(), json!([regex]));
    }
    let ignored_fields: Vec<String> = raw
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .filter(|field| {
            let field = field.as_str();
            !SHARED_FIELDS.contains(&field)
                && !is_inert_field(field)
                && spec.flag.as_deref() != Some(field)
                && spec.rank_field.as_deref() != Some(field)
                && spec.alpha_field.as_deref() != Some(field)
                && !spec.fields.iter().any(|(f, _)| f == field)
                && !spec.module_fields.iter().any(|(f, _)| f == field)
                && !spec.inert_fields.iter().any(|f| f == field)
        })
        .cloned()
        .collect();

    let (replacements, skipped_keys) =
        full_tensor_replacements(&view, model, &tensors, &weights_path)?;
    let mut patched = model.clone();
    for replacement in &replacements {
        replace_initializer(&mut patched, replacement)?;
    }
    apply_method(
        registry,
        &mut patched,
        method,
        &Value::Object(method_config),
    )?;
    let record = crate::patch::read_record(&patched)?;
    let applied = record
        .methods
        .iter()
        .rev()
        .find(|m| m.method == method)
        .cloned()
        .ok_or_else(|| Error::Config(format!("method {method} left no record")))?;
    let Some(files) = applied.training.peft.clone() else {
        return Err(Error::Plugin {
            plugin: applied.plugin.clone(),
            reason: format!(
                "method {method} declares a {} import but its patch names no PEFT tensors (do all sites have module-path labels?)",
                spec.peft_type
            ),
        });
    };
    let in_file: std::collections::BTreeSet<String> = tensors
        .iter()
        .filter_map(|t| match &t.role {
            TensorRole::Method { suffix } => Some(format!("{}.{suffix}", t.module)),
            _ => None,
        })
        .collect();
    // Declared keys may carry PEFT's `.weight` (`lora_A.weight`); the file's are compared
    // without it.
    let declared_key = |key: &str| key.strip_suffix(".weight").unwrap_or(key).to_owned();
    if let Some(missing) = files.tensors.iter().find(|m| {
        let key = declared_key(&m.key);
        let module = key
            .rsplit_once('.')
            .map_or("", |(module, _)| module)
            .to_owned();
        file_modules.contains(&module) && !in_file.contains(&key)
    }) {
        return Err(Error::Config(format!(
            "{}: has tensors for module {:?} but not {:?}, which a {} adapter{} needs",
            weights_path.display(),
            missing
                .key
                .rsplit_once('.')
                .map_or("", |(module, _)| module),
            missing.key,
            spec.peft_type,
            spec.flag
                .as_ref()
                .map(|f| format!(" with {f}"))
                .unwrap_or_default()
        )));
    }
    let items = tensors
        .into_iter()
        .filter(|t| matches!(t.role, TensorRole::Method { .. }))
        .map(|t| (t.key, t.shape, t.values))
        .collect();
    super::mapped::load_declared_values(
        &mut patched,
        &applied,
        &files,
        items,
        &weights_path,
        KEY_PREFIX,
        &[],
    )?;
    *model = patched;
    Ok(ImportReport {
        branches,
        replaced: replacements.into_iter().map(|r| r.report).collect(),
        ignored_fields,
        skipped_keys,
        targets_from_file,
        prompt: None,
        method: method.to_owned(),
    })
}

/// PEFT's matching of a module selector outside `target_modules` (IA³'s
/// `feedforward_modules`): a string must match the whole path as a regular expression; a list
/// entry matches a path that ends with it (no `.` boundary, as PEFT's `str.endswith`).
enum SuffixMatcher {
    FullMatch(regex::Regex),
    Suffixes(Vec<String>),
}

impl SuffixMatcher {
    fn new(selector: &ModuleSelector, field: &str) -> std::result::Result<Self, String> {
        Ok(match selector {
            ModuleSelector::Regex(pattern) => SuffixMatcher::FullMatch(
                regex::Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| format!("{field} {pattern:?} is not a regular expression: {e}"))?,
            ),
            ModuleSelector::Names(names) => SuffixMatcher::Suffixes(names.clone()),
        })
    }

    fn matches(&self, module: &str) -> bool {
        match self {
            SuffixMatcher::FullMatch(regex) => regex.is_match(module),
            SuffixMatcher::Suffixes(names) => names.iter().any(|n| module.ends_with(n.as_str())),
        }
    }
}
