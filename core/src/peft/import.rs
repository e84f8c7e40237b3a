//! Reading HF PEFT adapters into a model: [`import`] onto an unpatched model (LoRA branches
//! built by the `lora` plugin, `modules_to_save` tensors replacing base initializers) and
//! [`load_values`] into branches that already exist.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use graft_plugin_sdk::{Fold, GraphView, WeightLayout};
use serde_json::json;

use super::config::{read_config, CONFIG_FILE};
use super::keys::{
    is_conv1d_module, read_peft_tensors, weights_file, PeftTensor, TensorRole, WEIGHTS_FILE,
};
use super::select::{compile_patterns, pattern_value, Selection};
use super::{mapped, transpose};
use crate::ir::Model;
use crate::plugins::{apply_method, graph_view, PluginRegistry};
use crate::{Error, Result};

/// One adapted module built by [`import`] (a LoRA branch, or another method's on that module).
#[derive(Clone, Debug, PartialEq)]
pub struct ImportedBranch {
    /// The module path (site label).
    pub module: String,
    /// Rank, after `rank_pattern`; 0 for a method without one (IA³).
    pub r: usize,
    /// Alpha, after `alpha_pattern`.
    pub alpha: f64,
    /// The branch scale: alpha / r, or alpha / √r with rsLoRA.
    pub scale: f64,
    /// False when the config targets the module but the tensor file holds no factors for it:
    /// the branch keeps its initial values (B = 0), as in PEFT.
    pub loaded: bool,
}

/// A base-model tensor that [`import`] replaced with a full tensor of the adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplacedTensor {
    /// The key in `adapter_model.safetensors`.
    pub key: String,
    /// The initializer replaced.
    pub initializer: String,
    /// Whether the values were transposed from PyTorch's layout to the initializer's.
    pub transposed: bool,
}

/// What [`import`] did, and what it chose to ignore.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportReport {
    /// The LoRA branches grafted, in graph order.
    pub branches: Vec<ImportedBranch>,
    /// Base tensors replaced (`modules_to_save`, trained biases).
    pub replaced: Vec<ReplacedTensor>,
    /// Config fields graft does not know, ignored.
    pub ignored_fields: Vec<String>,
    /// Keys skipped because they hold PEFT's frozen copies of replaced modules.
    pub skipped_keys: Vec<String>,
    /// True when the config had no `target_modules` and the modules of the tensor file were
    /// used instead.
    pub targets_from_file: bool,
    /// For a prompt-learning adapter: the method that grafted it and its number of virtual
    /// tokens.
    pub prompt: Option<(String, usize)>,
    /// The graft method that grafted the adapter (`lora`, `loha`, `ia3`, `prompt_tuning`, …).
    pub method: String,
}

impl ImportReport {
    /// The things a user should hear about: ignored fields, branches without tensors, skipped
    /// keys, guessed targets.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if !self.ignored_fields.is_empty() {
            warnings.push(format!(
                "{CONFIG_FILE}: ignored unknown fields: {}",
                self.ignored_fields.join(", ")
            ));
        }
        if self.targets_from_file {
            warnings.push(format!(
                "{CONFIG_FILE} has no target_modules; targeting the modules of {WEIGHTS_FILE}"
            ));
        }
        let unloaded: Vec<&str> = self
            .branches
            .iter()
            .filter(|b| !b.loaded)
            .map(|b| b.module.as_str())
            .collect();
        if !unloaded.is_empty() {
            warnings.push(format!(
                "{WEIGHTS_FILE} has no LoRA tensors for {} targeted module(s), which start with B = 0: {}",
                unloaded.len(),
                unloaded.join(", ")
            ));
        }
        if !self.skipped_keys.is_empty() {
            warnings.push(format!(
                "{WEIGHTS_FILE}: skipped frozen original-module copies: {}",
                self.skipped_keys.join(", ")
            ));
        }
        warnings
    }
}

/// Imports an HF PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`)
/// onto `model`, so that the model computes what PEFT's `PeftModel` computes.
///
/// The config is read as PEFT reads it: `target_modules` (a list matches a module path equal to
/// an entry or ending in `.entry`; a string must match the whole path as a regular expression),
/// `exclude_modules`, `layers_to_transform` with `layers_pattern`, `modules_to_save` (never
/// targeted), `r`, `lora_alpha`, `use_rslora`, and `rank_pattern` / `alpha_pattern` (the first
/// key `k`, in file order, with `(.*\.)?(k)$` matching the path). Module paths are the site labels
/// `graft inspect` shows. The branches are built by the `lora` plugin found in `registry`, with
/// an exact regular expression over the targeted paths and per-path rank and alpha, so that every
/// branch has PEFT's rank and scale; `lora_dropout` is kept as the branch dropout. `lora_A`
/// [r, in] and `lora_B` [out, r] are then loaded, transposed, into A [in, r] and B [r, out].
///
/// Full tensors in the file (`modules_to_save`, keyed `<path>.weight` or
/// `<path>.modules_to_save.<adapter>.weight`, and biases trained with `bias="all"`) replace the
/// base initializers of that module, found through head, site and embedding labels or by the
/// initializer name `<path>.<param>`.
///
/// Unknown config fields are ignored and listed in the report; fields asking for behaviour graft
/// lacks (DoRA, LoRA biases, ...), another `peft_type`, missing files, keys naming a module that is
/// no linear site of the model, and shape mismatches are errors naming the file and key. On any
/// error `model` is left as it was.
///
/// `PROMPT_TUNING` and `PREFIX_TUNING` adapters are grafted by the `prompt` plugin's methods
/// instead (see [`super::prompt`]).
pub fn import(registry: &PluginRegistry, model: &mut Model, dir: &Path) -> Result<ImportReport> {
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    if let Some((method, config)) = super::prompt::prompt_learning_method(&config_path)? {
        return super::prompt::import(registry, model, dir, method, &config);
    }
    if let Some((method, spec)) = super::declared::method_for(registry, &config_path)? {
        return super::declared::import(registry, model, dir, &method, &spec);
    }
    require_adapter_files(dir)?;
    let (config, ignored_fields) = read_config(&config_path)?;
    let config_error =
        |reason: String| Error::Config(format!("{}: {reason}", config_path.display()));
    let selection = Selection::new(&config).map_err(config_error)?;
    let rank_patterns =
        compile_patterns(&config.rank_pattern, "rank_pattern").map_err(config_error)?;
    let alpha_patterns =
        compile_patterns(&config.alpha_pattern, "alpha_pattern").map_err(config_error)?;
    let tensors = read_peft_tensors(&weights_path)?;
    let view = graph_view(model)?;
    let Targets {
        targeted,
        file_modules,
        targets_from_file,
    } = resolve_targets(
        &view,
        &selection,
        &tensors,
        |role| matches!(role, TensorRole::LoraA | TensorRole::LoraB),
        &config_path,
        &weights_path,
    )?;
    let targeted: Vec<&str> = targeted.iter().map(String::as_str).collect();

    let base_r = config.r.unwrap_or(8);
    let base_alpha = config.lora_alpha.unwrap_or(8.0);
    let rslora = config.use_rslora.unwrap_or(false);
    let mut branches = Vec::with_capacity(targeted.len());
    for module in &targeted {
        let r = pattern_value(&rank_patterns, module).unwrap_or(base_r);
        let alpha = pattern_value(&alpha_patterns, module).unwrap_or(base_alpha);
        if r == 0 {
            return Err(config_error(format!("rank 0 for module {module:?}")));
        }
        let scale = if rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        branches.push(ImportedBranch {
            module: (*module).to_owned(),
            r,
            alpha,
            scale,
            loaded: file_modules.contains(*module),
        });
    }

    if let Some(prompt) = tensors.iter().find(|t| t.role == TensorRole::Prompt) {
        return Err(Error::Config(format!(
            "{}: key {:?} belongs to a prompt-tuning adapter, but {CONFIG_FILE} says LORA",
            weights_path.display(),
            prompt.key
        )));
    }
    let (replacements, skipped_keys) =
        full_tensor_replacements(&view, model, &tensors, &weights_path)?;

    let rank_overrides = exact_overrides(&branches, |b| (b.r != base_r).then(|| json!(b.r)));
    let alpha_overrides = exact_overrides(&branches, |b| {
        (b.alpha != base_alpha).then(|| json!(b.alpha))
    });
    let target_regex = exact_regex(&targeted);
    let plugin_config = json!({
        "targets": [],
        "target_regex": target_regex,
        "r": base_r,
        "alpha": base_alpha,
        "rslora": rslora,
        "dropout": config.lora_dropout.unwrap_or(0.0),
        "rank_pattern": rank_overrides,
        "alpha_pattern": alpha_overrides,
    });

    let mut patched = model.clone();
    for replacement in &replacements {
        replace_initializer(&mut patched, replacement)?;
    }
    apply_method(registry, &mut patched, "lora", &plugin_config)?;
    load_lora_tensors(&mut patched, &weights_path, &tensors)?;
    *model = patched;
    Ok(ImportReport {
        branches,
        replaced: replacements.into_iter().map(|r| r.report).collect(),
        ignored_fields,
        skipped_keys,
        targets_from_file,
        prompt: None,
        method: "lora".into(),
    })
}

/// Fails naming what is missing unless `dir` holds both adapter files.
pub(super) fn require_adapter_files(dir: &Path) -> Result<()> {
    let missing: Vec<String> = [dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE)]
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{} is not a PEFT adapter folder: missing {}",
        dir.display(),
        missing.join(" and ")
    )))
}

/// The linear modules an adapter config targets on a model, as PEFT would wrap them.
pub(super) struct Targets {
    /// The targeted site labels, in graph order.
    pub(super) targeted: Vec<String>,
    /// The modules the tensor file has adapter tensors for.
    pub(super) file_modules: BTreeSet<String>,
    /// The config has no `target_modules`: the file's modules were targeted.
    pub(super) targets_from_file: bool,
}

/// PEFT's targeting of `selection` over the linear sites of `view`. Adapter tensors (those
/// `is_adapter` says) must name a linear site and a targeted one; with no `target_modules`
/// the file's modules are the targets. Errors name the file, the key and some site labels.
pub(super) fn resolve_targets(
    view: &GraphView,
    selection: &Selection,
    tensors: &[PeftTensor],
    is_adapter: impl Fn(&TensorRole) -> bool,
    config_path: &Path,
    weights_path: &Path,
) -> Result<Targets> {
    let labels: Vec<&str> = view
        .sites()
        .filter(|s| s.site.kind.is_linear())
        .filter_map(|s| s.site.label.as_deref())
        .collect();
    let some_labels = || {
        let shown: Vec<&str> = labels.iter().copied().take(4).collect();
        if shown.is_empty() {
            "none: this model's sites have no labels".to_owned()
        } else {
            format!("{}, … (see graft inspect)", shown.join(", "))
        }
    };
    let file_modules: BTreeSet<String> = tensors
        .iter()
        .filter(|t| is_adapter(&t.role))
        .map(|t| t.module.clone())
        .collect();
    if let Some(tensor) = tensors
        .iter()
        .find(|t| is_adapter(&t.role) && !labels.contains(&t.module.as_str()))
    {
        return Err(Error::Config(format!(
            "{}: key {:?} names module {:?}, which matches no linear site of this model; site labels: {}",
            weights_path.display(),
            tensor.key,
            tensor.module,
            some_labels()
        )));
    }
    let config_error =
        |reason: String| Error::Config(format!("{}: {reason}", config_path.display()));
    let targeted: Vec<String> = labels
        .iter()
        .filter(|label| {
            selection
                .selects(label)
                .unwrap_or_else(|| file_modules.contains(**label))
        })
        .map(|label| label.to_string())
        .collect();
    if let Some(unselected) = file_modules.iter().find(|m| !targeted.contains(m)) {
        return Err(config_error(format!(
            "{WEIGHTS_FILE} has adapter tensors for {unselected:?}, but target_modules, layers_to_transform, exclude_modules and modules_to_save do not select it"
        )));
    }
    if targeted.is_empty() {
        return Err(config_error(format!(
            "target_modules match no linear site of this model; site labels: {}",
            some_labels()
        )));
    }
    Ok(Targets {
        targeted,
        file_modules,
        targets_from_file: selection.has_no_targets(),
    })
}

/// A regular expression matching exactly the module paths `modules`.
pub(super) fn exact_regex<S: AsRef<str>>(modules: &[S]) -> String {
    format!(
        "^(?:{})$",
        modules
            .iter()
            .map(|m| regex::escape(m.as_ref()))
            .collect::<Vec<_>>()
            .join("|")
    )
}

/// A method-config pattern map `{exact module regex: value}` with the value `pick` gives each
/// branch that differs from the base setting.
pub(super) fn exact_overrides(
    branches: &[ImportedBranch],
    pick: impl Fn(&ImportedBranch) -> Option<serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    branches
        .iter()
        .filter_map(|b| Some((exact_regex(&[&b.module]), pick(b)?)))
        .collect()
}

/// A full tensor of the adapter resolved to the initializer it replaces.
pub(super) struct Replacement {
    pub(super) report: ReplacedTensor,
    dims: Vec<i64>,
    values: Vec<f32>,
}

/// The base tensors that the full tensors among `tensors` (read from `file`) replace, and the
/// keys of PEFT's frozen original-module copies, which are skipped.
pub(super) fn full_tensor_replacements(
    view: &GraphView,
    model: &Model,
    tensors: &[PeftTensor],
    file: &Path,
) -> Result<(Vec<Replacement>, Vec<String>)> {
    let mut replacements = Vec::new();
    let mut skipped_keys = Vec::new();
    for tensor in tensors {
        match &tensor.role {
            TensorRole::Full { param } => {
                replacements.push(resolve_full_tensor(view, model, tensor, param, file)?)
            }
            TensorRole::OriginalCopy => skipped_keys.push(tensor.key.clone()),
            TensorRole::LoraA
            | TensorRole::LoraB
            | TensorRole::Prompt
            | TensorRole::Method { .. } => {}
        }
    }
    Ok((replacements, skipped_keys))
}

/// Finds the initializer a full tensor replaces: the weight or bias of the head, site or
/// embedding labelled with the module path, else the initializer named `<module>.<param>`.
/// PyTorch stores linear weights [out, in] (GPT-2's Conv1D: [in, out]); the values are
/// transposed where the initializer is stored the other way.
fn resolve_full_tensor(
    view: &GraphView,
    model: &Model,
    tensor: &PeftTensor,
    param: &str,
    file: &Path,
) -> Result<Replacement> {
    let module = tensor.module.as_str();
    let labelled = |label: &Option<String>| label.as_deref() == Some(module);
    let linear = view
        .heads
        .iter()
        .find(|h| labelled(&h.label))
        .map(|h| (&h.weight, &h.bias, h.layout, true))
        .or_else(|| {
            view.sites().find(|s| labelled(&s.site.label)).map(|s| {
                (
                    &s.site.weight,
                    &s.site.bias,
                    s.site.layout,
                    s.site.kind.is_linear(),
                )
            })
        });
    let embedding = view.embeddings.iter().find(|e| labelled(&e.label));
    let fallback = format!("{module}.{param}");
    let (initializer, layout) = match (param, linear, embedding) {
        ("weight", Some((weight, _, layout, is_linear)), _) => {
            (weight.clone(), is_linear.then_some(layout))
        }
        ("bias", Some((_, Some(bias), _, _)), _) => (bias.clone(), None),
        ("weight", None, Some(embedding)) => (embedding.weight.clone(), None),
        _ => (fallback.clone(), None),
    };
    let fail = |reason: String| {
        Error::Config(format!(
            "{}: key {:?}: {reason}",
            file.display(),
            tensor.key
        ))
    };
    let Some(target) = model.graph.initializer(&initializer) else {
        return Err(fail(format!(
            "module {module:?} has no {param} in this model (no head, site or embedding labelled {module:?}, no initializer named {fallback:?})"
        )));
    };
    if let Some(tied) = view
        .embeddings
        .iter()
        .find(|e| e.weight == initializer && e.label.as_deref() != Some(module))
    {
        return Err(fail(format!(
            "the weight of {module:?} ({initializer:?}) is shared with embedding {:?}; replacing it would change both",
            tied.label.as_deref().unwrap_or(&tied.node)
        )));
    }
    let torch_layout = if is_conv1d_module(module) {
        WeightLayout::InOut
    } else {
        WeightLayout::OutIn
    };
    let transposed = tensor.shape.len() == 2 && layout.is_some_and(|l| l != torch_layout);
    let (shape, values) = if transposed {
        (
            vec![tensor.shape[1], tensor.shape[0]],
            transpose(&tensor.values, tensor.shape[0], tensor.shape[1]),
        )
    } else {
        (tensor.shape.clone(), tensor.values.clone())
    };
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    if shape != target.dims {
        return Err(fail(format!(
            "is {:?}{}, but {initializer:?} is {:?}",
            tensor.shape,
            if transposed {
                " (transposed to PyTorch's layout)"
            } else {
                ""
            },
            target.dims
        )));
    }
    Ok(Replacement {
        report: ReplacedTensor {
            key: tensor.key.clone(),
            initializer,
            transposed,
        },
        dims: shape,
        values,
    })
}

/// Replaces an initializer's values, keeping its element type.
pub(super) fn replace_initializer(model: &mut Model, replacement: &Replacement) -> Result<()> {
    let name = &replacement.report.initializer;
    let Some(tensor) = model.graph.initializer_mut(name) else {
        return Err(Error::Tensor {
            name: name.clone(),
            reason: "missing from the model".into(),
        });
    };
    tensor.set_float_values(replacement.dims.clone(), &replacement.values)
}

/// Loads the tensors of an HF PEFT adapter folder (or `adapter_model.safetensors` file): by
/// the layout a method declared when one did (see [`export`]), otherwise as LoRA tensors
/// into a patched model whose LoRA branches sit on the same modules: `lora_A.weight` [r, in] into
/// A [in, r] and `lora_B.weight` [out, r] into B [r, out]. Fails naming the key when a tensor
/// matches no branch, has another shape, or is not a LoRA factor (use [`import`] for adapters
/// with `modules_to_save`). Returns the number of tensors loaded.
///
/// [`export`]: super::export()
pub fn load_values(model: &mut Model, path: &Path) -> Result<usize> {
    let file = weights_file(path);
    if let Some(n) = mapped::load_values(model, &file)? {
        return Ok(n);
    }
    let tensors = read_peft_tensors(&file)?;
    if let Some(other) = tensors
        .iter()
        .find(|t| !matches!(t.role, TensorRole::LoraA | TensorRole::LoraB))
    {
        return Err(Error::Config(format!(
            "{}: key {:?} is not a LoRA tensor; only lora_A/lora_B weights are supported",
            file.display(),
            other.key
        )));
    }
    load_lora_tensors(model, &file, &tensors)
}

/// Writes the LoRA factors among `tensors` into the model's branches, transposed to graft's
/// layout; every check passes before the first tensor changes.
fn load_lora_tensors(model: &mut Model, file: &Path, tensors: &[PeftTensor]) -> Result<usize> {
    let fail = |reason: String| Error::Config(format!("{}: {reason}", file.display()));
    let record = crate::patch::read_record(model)?;
    let mut by_module: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    for fold in &record.folds {
        if let Fold::LowRank { weight, a, b, .. } = fold {
            if let Some(label) = record.labels.get(weight) {
                by_module.insert(label, (a, b));
            }
        }
    }
    let mut updates: Vec<(String, Vec<f32>)> = Vec::new();
    for tensor in tensors {
        let is_a = match tensor.role {
            TensorRole::LoraA => true,
            TensorRole::LoraB => false,
            _ => continue,
        };
        let key = &tensor.key;
        let Some(&(a, b)) = by_module.get(tensor.module.as_str()) else {
            let known: Vec<&str> = by_module.keys().copied().take(6).collect();
            return Err(fail(format!(
                "key {key:?} names module {:?}, which has no LoRA branch in this model (branches: {})",
                tensor.module,
                known.join(", ")
            )));
        };
        let target = if is_a { a } else { b };
        let dims = model
            .graph
            .initializer(target)
            .map(|t| t.dims.clone())
            .unwrap_or_default();
        let shape: Vec<i64> = tensor.shape.iter().map(|&d| d as i64).collect();
        if dims.len() != 2 || shape != [dims[1], dims[0]] {
            return Err(fail(format!(
                "{key:?} is {shape:?}, the branch needs the transpose of {dims:?}"
            )));
        }
        updates.push((
            target.to_owned(),
            transpose(&tensor.values, tensor.shape[0], tensor.shape[1]),
        ));
    }
    for (name, values) in &updates {
        if let Some(tensor) = model.graph.initializer_mut(name) {
            // In the branch's own element type (float16 on a float16 model).
            tensor.set_float_values(tensor.dims.clone(), values)?;
        }
    }
    Ok(updates.len())
}
