//! Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, keyed
//! `base_model.model.<module path>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]):
//! export, and import onto an unpatched model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use graft_plugin_sdk::{Fold, GraphView, WeightLayout};
use regex::Regex;
use serde::Deserialize;
use serde_json::json;

use crate::atomic_file::write_atomically;
use crate::ir::Model;
use crate::plugins::{apply_method, graph_view, PluginRegistry};
use crate::{Error, Result};

mod mapped;

/// The adapter folder's config file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter folder's tensor file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix of every key in a PEFT tensor file.
const KEY_PREFIX: &str = "base_model.model.";

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

/// Writes the model's adapter as HF PEFT files in `dir` (created if needed): the layout a
/// method declared ([`graft_plugin_sdk::PeftFiles`], e.g. AdaLoRA) when one did, otherwise the
/// LoRA branches.
///
/// The config's `target_modules` is the sorted list of the targeted module paths: PEFT selects a
/// module when its path equals an entry, so the list is exact, needs no regular-expression
/// dialect, and [`import`] reads it back to the same branches. `r` and `lora_alpha` are the values
/// most branches share; the others go to `rank_pattern` and `alpha_pattern`, keyed by module
/// path. Alphas are recovered from the stored scales and rounded to 7 significant digits (the
/// precision of an f32 scale), so that α = 16 with rsLoRA at r = 2 reads back as 16, not
/// 16.000002. Base-model tensors replaced by an import (`modules_to_save`) are not written.
pub fn export(model: &Model, dir: &Path) -> Result<()> {
    if mapped::export(model, dir)? {
        return Ok(());
    }
    let branches = lora_branches(model)?;
    let rslora = crate::patch::read_record(model)?.methods.iter().any(|m| {
        m.method == "lora"
            && matches!(m.config.get("rslora"), Some(v) if v == &json!(true) || v == &json!("true"))
    });
    let alphas: Vec<f64> = branches
        .iter()
        .map(|branch| {
            let denominator = if rslora {
                (branch.r as f64).sqrt()
            } else {
                branch.r as f64
            };
            round_to_f32_precision(branch.scale as f64 * denominator)
        })
        .collect();
    let r = most_common(branches.iter().map(|b| b.r)).unwrap_or(8);
    let alpha = most_common(alphas.iter().map(|a| a.to_bits()))
        .map(f64::from_bits)
        .unwrap_or(8.0);
    let rank_pattern: BTreeMap<&str, usize> = branches
        .iter()
        .filter(|b| b.r != r)
        .map(|b| (b.module.as_str(), b.r))
        .collect();
    let alpha_pattern: BTreeMap<&str, serde_json::Value> = branches
        .iter()
        .zip(&alphas)
        .filter(|(_, a)| **a != alpha)
        .map(|(b, a)| (b.module.as_str(), json_number(*a)))
        .collect();
    let mut target_modules: Vec<&str> = branches.iter().map(|b| b.module.as_str()).collect();
    target_modules.sort_unstable();
    target_modules.dedup();
    let fan_in_fan_out = branches.iter().any(|b| is_conv1d_module(&b.module));
    let config = json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": null,
        "inference_mode": true,
        "r": r,
        "lora_alpha": json_number(alpha),
        "lora_dropout": 0.0,
        "use_rslora": rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "target_modules": target_modules,
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
            format!("{KEY_PREFIX}{}.lora_A.weight", branch.module),
            vec![branch.r, branch.in_features],
            bytes(&branch.a),
        ));
        tensors.push((
            format!("{KEY_PREFIX}{}.lora_B.weight", branch.module),
            vec![branch.out_features, branch.r],
            bytes(&branch.b),
        ));
    }
    write_files(dir, &config, &tensors)
}

/// Writes `adapter_model.safetensors` (float32 `tensors`: key, shape, little-endian bytes) and
/// `adapter_config.json` into `dir`, each atomically.
fn write_files(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<()> {
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
    write_atomically(&dir.join(WEIGHTS_FILE), &safetensors_bytes)?;
    let config_text = serde_json::to_string_pretty(config).unwrap_or_default();
    write_atomically(&dir.join(CONFIG_FILE), config_text.as_bytes())?;
    Ok(())
}

/// The value most items share; ties go to the one seen first.
fn most_common<T: PartialEq + Copy>(items: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for item in items {
        match counts.iter_mut().find(|(value, _)| *value == item) {
            Some((_, n)) => *n += 1,
            None => counts.push((item, 1)),
        }
    }
    let best = counts.iter().map(|(_, n)| *n).max()?;
    counts.into_iter().find(|(_, n)| *n == best).map(|(v, _)| v)
}

/// `value` rounded to 7 significant digits.
fn round_to_f32_precision(value: f64) -> f64 {
    format!("{value:.6e}").parse().unwrap_or(value)
}

/// A JSON integer for whole numbers (as PEFT writes `lora_alpha`), else a JSON float.
fn json_number(value: f64) -> serde_json::Value {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        json!(value as i64)
    } else {
        json!(value)
    }
}

/// GPT-2-style `Conv1D` modules store weights as [in, out]; PEFT needs `fan_in_fan_out` for them.
fn is_conv1d_module(module: &str) -> bool {
    [".attn.c_attn", ".attn.c_proj", ".mlp.c_fc", ".mlp.c_proj"]
        .iter()
        .any(|suffix| module.ends_with(suffix))
}

/// What a tensor of a PEFT file is.
#[derive(Clone, Debug, PartialEq)]
enum TensorRole {
    /// `lora_A.weight`, [r, in].
    LoraA,
    /// `lora_B.weight`, [out, r].
    LoraB,
    /// A full base-model tensor (`modules_to_save`, or a bias trained with `bias="all"`):
    /// the module's parameter `param` (`weight`, `bias`).
    Full { param: String },
    /// A frozen copy PEFT keeps beside a `modules_to_save` module (`original_module`).
    OriginalCopy,
}

/// One tensor of a PEFT file, keyed by the module it belongs to.
struct PeftTensor {
    key: String,
    module: String,
    role: TensorRole,
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// Reads every tensor of a PEFT `adapter_model.safetensors`, sorting its keys into LoRA
/// factors and full tensors. Fails naming the key for anything else.
fn read_peft_tensors(file: &Path) -> Result<Vec<PeftTensor>> {
    let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
    let fail = |reason: String| Error::Config(format!("{}: {reason}", file.display()));
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| fail(format!("not a safetensors file: {e}")))?;
    let mut entries = tensors.tensors();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut parsed = Vec::with_capacity(entries.len());
    for (key, view) in entries {
        let Some(rest) = key.strip_prefix(KEY_PREFIX) else {
            return Err(fail(format!(
                "key {key:?} is not a PEFT key ({KEY_PREFIX}…)"
            )));
        };
        let (module, role) = if let Some((module, role)) = lora_factor(rest) {
            (module, role)
        } else if let Some(part) = rest.split('.').find(|part| part.starts_with("lora_")) {
            return Err(fail(format!(
                "key {key:?} is a LoRA tensor of kind {part:?}; only lora_A/lora_B weights of linear modules are supported (no embedding LoRA, DoRA magnitudes or LoRA biases)"
            )));
        } else {
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

/// The PEFT tensor file of an adapter folder, or the file itself.
fn weights_file(path: &Path) -> std::path::PathBuf {
    if path.is_dir() {
        path.join(WEIGHTS_FILE)
    } else {
        path.to_path_buf()
    }
}

/// Loads the tensors of an HF PEFT adapter folder (or `adapter_model.safetensors` file): by
/// the layout a method declared when one did (see [`export`]), otherwise as LoRA tensors
/// into a patched model whose LoRA branches sit on the same modules: `lora_A.weight` [r, in] into
/// A [in, r] and `lora_B.weight` [out, r] into B [r, out]. Fails naming the key when a tensor
/// matches no branch, has another shape, or is not a LoRA factor (use [`import`] for adapters
/// with `modules_to_save`). Returns the number of tensors loaded.
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

/// One LoRA branch built by [`import`].
#[derive(Clone, Debug, PartialEq)]
pub struct ImportedBranch {
    /// The module path (site label).
    pub module: String,
    /// Rank, after `rank_pattern`.
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

/// The `adapter_config.json` fields that [`import`] reads. Every other field lands in `other`.
#[derive(Debug, Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    #[serde(default)]
    r: Option<usize>,
    #[serde(default)]
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: Option<bool>,
    #[serde(default)]
    target_modules: Option<ModuleSelector>,
    #[serde(default)]
    exclude_modules: Option<ModuleSelector>,
    #[serde(default)]
    layers_to_transform: Option<LayerIndexes>,
    #[serde(default)]
    layers_pattern: Option<OneOrMany>,
    #[serde(default)]
    rank_pattern: Option<OrderedMap<usize>>,
    #[serde(default)]
    alpha_pattern: Option<OrderedMap<f64>>,
    #[serde(default)]
    lora_dropout: Option<f64>,
    #[serde(default)]
    modules_to_save: Option<OneOrMany>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

/// PEFT's `target_modules` / `exclude_modules`: a regular expression that must match a whole
/// module path, or a list of names matching a path equal to them or ending in `.name`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ModuleSelector {
    Regex(String),
    Names(Vec<String>),
}

/// `layers_to_transform`: one index or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LayerIndexes {
    One(usize),
    Many(Vec<usize>),
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The entries, dropping empty strings.
    fn entries(&self) -> Vec<String> {
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
struct OrderedMap<T>(Vec<(String, T)>);

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

/// Reads and checks `adapter_config.json`; returns the config and the unknown fields it ignores.
fn read_config(path: &Path) -> Result<(AdapterConfig, Vec<String>)> {
    let fail = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let config: AdapterConfig =
        serde_json::from_str(&text).map_err(|e| fail(format!("not a PEFT adapter config: {e}")))?;
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
    let mut ignored = Vec::new();
    for (field, value) in &config.other {
        if let Some((_, what)) = UNSUPPORTED_FIELDS.iter().find(|(name, _)| name == field) {
            if !is_empty_value(value) {
                return Err(fail(format!(
                    "{field} = {value} asks for {what}, which graft does not support"
                )));
            }
        } else if !INERT_FIELDS.contains(&field.as_str()) {
            ignored.push(field.clone());
        }
    }
    Ok((config, ignored))
}

/// PEFT's module selection (`check_target_module_exists`), compiled once.
struct Selection {
    targets: Option<Matcher>,
    excluded: Option<Matcher>,
    saved: Vec<Regex>,
    layers: Option<Vec<usize>>,
    layer_patterns: Vec<Regex>,
}

/// A compiled [`ModuleSelector`].
enum Matcher {
    FullMatch(Regex),
    Names(Vec<String>),
}

impl Matcher {
    fn new(selector: &ModuleSelector, field: &str) -> std::result::Result<Matcher, String> {
        Ok(match selector {
            ModuleSelector::Regex(pattern) => {
                Matcher::FullMatch(compile(&format!("^(?:{pattern})$"), field, pattern)?)
            }
            ModuleSelector::Names(names) => Matcher::Names(names.clone()),
        })
    }

    fn is_listed(&self, module: &str) -> bool {
        matches!(self, Matcher::Names(names) if names.iter().any(|n| n == module))
    }

    fn matches(&self, module: &str) -> bool {
        match self {
            Matcher::FullMatch(regex) => regex.is_match(module),
            Matcher::Names(names) => names
                .iter()
                .any(|n| module == n || ends_with_component(module, n)),
        }
    }
}

/// True when `module` ends with `.name`.
fn ends_with_component(module: &str, name: &str) -> bool {
    module
        .strip_suffix(name)
        .is_some_and(|head| head.ends_with('.'))
}

/// Compiles a regular expression written in a config field, naming the field on failure.
fn compile(regex: &str, field: &str, written: &str) -> std::result::Result<Regex, String> {
    Regex::new(regex).map_err(|e| {
        format!("{field} entry {written:?} is not a regular expression graft can use: {e}")
    })
}

impl Selection {
    fn new(config: &AdapterConfig) -> std::result::Result<Selection, String> {
        let targets = config
            .target_modules
            .as_ref()
            .map(|t| Matcher::new(t, "target_modules"))
            .transpose()?;
        let excluded = config
            .exclude_modules
            .as_ref()
            .map(|t| Matcher::new(t, "exclude_modules"))
            .transpose()?;
        let saved = config
            .modules_to_save
            .as_ref()
            .map(OneOrMany::entries)
            .unwrap_or_default()
            .iter()
            .map(|m| compile(&format!(r"^(?:^|.*\.){m}(?:$|\..*)"), "modules_to_save", m))
            .collect::<std::result::Result<_, _>>()?;
        let layers = match &config.layers_to_transform {
            None => None,
            Some(LayerIndexes::One(index)) => Some(vec![*index]),
            Some(LayerIndexes::Many(indexes)) if indexes.is_empty() => None,
            Some(LayerIndexes::Many(indexes)) => Some(indexes.clone()),
        };
        let patterns = config
            .layers_pattern
            .as_ref()
            .map(OneOrMany::entries)
            .unwrap_or_default();
        let layer_patterns = if patterns.is_empty() {
            vec![compile(r"^.*\.[^.]*\.(\d+)\.", "layers_pattern", "")?]
        } else {
            patterns
                .iter()
                .map(|p| compile(&format!(r"^.*\.{p}\.(\d+)\."), "layers_pattern", p))
                .collect::<std::result::Result<_, _>>()?
        };
        Ok(Selection {
            targets,
            excluded,
            saved,
            layers,
            layer_patterns,
        })
    }

    /// Whether PEFT would wrap `module` (given targets; `None` when the config has none).
    fn selects(&self, module: &str) -> Option<bool> {
        let targets = self.targets.as_ref()?;
        if self.excluded.as_ref().is_some_and(|e| e.matches(module))
            || self.saved.iter().any(|s| s.is_match(module))
        {
            return Some(false);
        }
        if matches!(targets, Matcher::FullMatch(_)) || targets.is_listed(module) {
            return Some(targets.matches(module));
        }
        let found = targets.matches(module);
        Some(match &self.layers {
            Some(layers) if found => self
                .layer_patterns
                .iter()
                .find_map(|p| p.captures(module))
                .and_then(|c| c.get(1)?.as_str().parse::<usize>().ok())
                .is_some_and(|index| layers.contains(&index)),
            _ => found,
        })
    }
}

/// PEFT's `get_pattern_key`: the value of the first key `k` with `re.match(rf"(.*\.)?({k})$",
/// module)`.
fn pattern_value<T: Copy>(patterns: &[(Regex, T)], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(regex, _)| regex.is_match(module))
        .map(|(_, value)| *value)
}

/// Compiles `rank_pattern` / `alpha_pattern` keys the way PEFT matches them.
fn compile_patterns<T: Copy>(
    map: &Option<OrderedMap<T>>,
    field: &str,
) -> std::result::Result<Vec<(Regex, T)>, String> {
    map.iter()
        .flat_map(|m| m.0.iter())
        .map(|(key, value)| {
            compile(&format!(r"^(?:.*\.)?(?:{key})$"), field, key).map(|re| (re, *value))
        })
        .collect()
}

/// A full tensor of the adapter resolved to the initializer it replaces.
struct Replacement {
    report: ReplacedTensor,
    dims: Vec<i64>,
    values: Vec<f32>,
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
fn replace_initializer(model: &mut Model, replacement: &Replacement) -> Result<()> {
    let name = &replacement.report.initializer;
    let Some(tensor) = model.graph.initializer_mut(name) else {
        return Err(Error::Tensor {
            name: name.clone(),
            reason: "missing from the model".into(),
        });
    };
    tensor.set_float_values(replacement.dims.clone(), &replacement.values)
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
pub fn import(registry: &PluginRegistry, model: &mut Model, dir: &Path) -> Result<ImportReport> {
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    let missing: Vec<String> = [&config_path, &weights_path]
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::Config(format!(
            "{} is not a PEFT adapter folder: missing {}",
            dir.display(),
            missing.join(" and ")
        )));
    }
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
    let file_modules: BTreeSet<&str> = tensors
        .iter()
        .filter(|t| matches!(t.role, TensorRole::LoraA | TensorRole::LoraB))
        .map(|t| t.module.as_str())
        .collect();
    for tensor in &tensors {
        if matches!(tensor.role, TensorRole::LoraA | TensorRole::LoraB)
            && !labels.contains(&tensor.module.as_str())
        {
            return Err(Error::Config(format!(
                "{}: key {:?} names module {:?}, which matches no linear site of this model; site labels: {}",
                weights_path.display(),
                tensor.key,
                tensor.module,
                some_labels()
            )));
        }
    }
    let targets_from_file = config.target_modules.is_none();
    let targeted: Vec<&str> = labels
        .iter()
        .copied()
        .filter(|label| {
            selection
                .selects(label)
                .unwrap_or_else(|| file_modules.contains(label))
        })
        .collect();
    if let Some(unselected) = file_modules.iter().find(|m| !targeted.contains(m)) {
        return Err(config_error(format!(
            "{WEIGHTS_FILE} has LoRA tensors for {unselected:?}, but target_modules, layers_to_transform, exclude_modules and modules_to_save do not select it"
        )));
    }
    if targeted.is_empty() {
        return Err(config_error(format!(
            "target_modules match no linear site of this model; site labels: {}",
            some_labels()
        )));
    }

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
            loaded: file_modules.contains(module),
        });
    }

    let mut replacements = Vec::new();
    let mut skipped_keys = Vec::new();
    for tensor in &tensors {
        match &tensor.role {
            TensorRole::Full { param } => replacements.push(resolve_full_tensor(
                &view,
                model,
                tensor,
                param,
                &weights_path,
            )?),
            TensorRole::OriginalCopy => skipped_keys.push(tensor.key.clone()),
            TensorRole::LoraA | TensorRole::LoraB => {}
        }
    }

    let exact = |module: &str| format!("^{}$", regex::escape(module));
    let rank_overrides: serde_json::Map<String, serde_json::Value> = branches
        .iter()
        .filter(|b| b.r != base_r)
        .map(|b| (exact(&b.module), json!(b.r)))
        .collect();
    let alpha_overrides: serde_json::Map<String, serde_json::Value> = branches
        .iter()
        .filter(|b| b.alpha != base_alpha)
        .map(|b| (exact(&b.module), json!(b.alpha)))
        .collect();
    let target_regex = format!(
        "^(?:{})$",
        targeted
            .iter()
            .map(|m| regex::escape(m))
            .collect::<Vec<_>>()
            .join("|")
    );
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selection(config: serde_json::Value) -> Selection {
        let config: AdapterConfig = serde_json::from_value(config).unwrap();
        Selection::new(&config).unwrap()
    }

    #[test]
    fn list_entries_match_whole_path_components_from_the_end() {
        let s = selection(json!({"peft_type": "LORA", "target_modules": ["query", "self.value"]}));
        assert_eq!(
            s.selects("bert.encoder.layer.0.attention.self.query"),
            Some(true)
        );
        assert_eq!(
            s.selects("bert.encoder.layer.0.attention.self.value"),
            Some(true)
        );
        assert_eq!(
            s.selects("bert.encoder.layer.0.attention.self.subquery"),
            Some(false)
        );
        assert_eq!(
            s.selects("bert.encoder.layer.0.attention.self.query_x"),
            Some(false)
        );
        assert_eq!(s.selects("query"), Some(true));
    }

    #[test]
    fn a_string_must_match_the_whole_path() {
        let s = selection(json!({"peft_type": "LORA", "target_modules": r".*\.q_proj"}));
        assert_eq!(s.selects("model.layers.0.self_attn.q_proj"), Some(true));
        let s = selection(json!({"peft_type": "LORA", "target_modules": "q_proj"}));
        assert_eq!(s.selects("model.layers.0.self_attn.q_proj"), Some(false));
        assert_eq!(s.selects("q_proj"), Some(true));
    }

    #[test]
    fn layers_to_transform_reads_the_last_indexed_component() {
        let s = selection(json!({
            "peft_type": "LORA", "target_modules": ["c_attn"], "layers_to_transform": [1]
        }));
        assert_eq!(s.selects("transformer.h.1.attn.c_attn"), Some(true));
        assert_eq!(s.selects("transformer.h.0.attn.c_attn"), Some(false));
        let s = selection(json!({
            "peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": 0,
            "layers_pattern": "layers"
        }));
        assert_eq!(s.selects("model.layers.0.self_attn.q_proj"), Some(true));
        assert_eq!(s.selects("model.layers.1.self_attn.q_proj"), Some(false));
        let s = selection(json!({
            "peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": [0],
            "layers_pattern": ["blocks"]
        }));
        assert_eq!(s.selects("model.layers.0.self_attn.q_proj"), Some(false));
    }

    #[test]
    fn exclusions_and_saved_modules_are_never_targeted() {
        let s = selection(json!({
            "peft_type": "LORA", "target_modules": ["dense"],
            "exclude_modules": ["intermediate.dense"], "modules_to_save": ["output"]
        }));
        assert_eq!(
            s.selects("bert.encoder.layer.0.intermediate.dense"),
            Some(false)
        );
        assert_eq!(
            s.selects("bert.encoder.layer.0.attention.output.dense"),
            Some(false)
        );
        assert_eq!(s.selects("bert.pooler.dense"), Some(true));
        let s = selection(json!({"peft_type": "LORA"}));
        assert_eq!(s.selects("bert.pooler.dense"), None);
    }

    #[test]
    fn the_first_pattern_in_file_order_wins() {
        let config: AdapterConfig = serde_json::from_str(
            r#"{"peft_type": "LORA", "rank_pattern": {"q_proj": 16, "layers.0.self_attn.q_proj": 2, "proj": 1}}"#,
        )
        .unwrap();
        let patterns = compile_patterns(&config.rank_pattern, "rank_pattern").unwrap();
        assert_eq!(
            pattern_value(&patterns, "model.layers.0.self_attn.q_proj"),
            Some(16)
        );
        assert_eq!(
            pattern_value(&patterns, "model.layers.0.mlp.down_proj"),
            None
        );
        assert_eq!(pattern_value(&patterns, "proj"), Some(1));
        assert_eq!(
            pattern_value(&patterns, "model.layers.0.self_attn.xq_proj"),
            None
        );
    }

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
    fn export_recovers_round_alphas() {
        let scale = (16.0f64 / 2f64.sqrt()) as f32;
        assert_eq!(round_to_f32_precision(scale as f64 * 2f64.sqrt()), 16.0);
        assert_eq!(most_common([4, 2, 2, 4].into_iter()), Some(4));
        assert_eq!(json_number(16.0), json!(16));
        assert_eq!(json_number(0.5), json!(0.5));
    }
}
