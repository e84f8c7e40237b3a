//! What a plugin says about itself: its methods and each method's config keys.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The answer to `{"op":"describe"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginDescription {
    /// The plugin's name; equals the table's `name`.
    pub name: String,
    /// The plugin's version; equals the table's `version`.
    pub version: String,
    /// The methods it implements.
    pub methods: Vec<MethodDescription>,
}

impl PluginDescription {
    /// The method named `name`.
    pub fn method(&self, name: &str) -> Option<&MethodDescription> {
        self.methods.iter().find(|m| m.name == name)
    }
}

/// One method of a plugin (a plugin may implement several, e.g. `lora` and `dora`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodDescription {
    /// The name users select it by (`--method lora`).
    pub name: String,
    /// One line saying what it does.
    pub summary: String,
    /// Every config key it accepts; any other key is an error.
    pub config: Vec<ConfigKey>,
    /// How `graft apply --from-peft` reads HF PEFT adapters of this method, if it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft_import: Option<PeftImport>,
}

impl MethodDescription {
    /// A method with the given name, summary and keys.
    pub fn new(name: &str, summary: &str, config: Vec<ConfigKey>) -> MethodDescription {
        MethodDescription {
            name: name.into(),
            summary: summary.into(),
            config,
            peft_import: None,
        }
    }

    /// The same method, reading HF PEFT adapters as `import` says.
    pub fn with_peft_import(mut self, import: PeftImport) -> MethodDescription {
        self.peft_import = Some(import);
        self
    }
}

/// How the host turns an HF PEFT adapter folder of a method on linear modules (LoHa, LoKr, IA³,
/// DoRA, …) into this method's config, so `graft apply --from-peft` can graft it.
///
/// The host does what every PEFT tuner shares: it reads `target_modules`, `exclude_modules`,
/// `layers_to_transform` / `layers_pattern` and `modules_to_save` as PEFT does, and resolves
/// `rank_pattern` / `alpha_pattern` per module (PEFT's first key `k` in file order with
/// `(.*\.)?(k)$` matching the module path). The method then receives:
/// - `targets`: one regular expression matching exactly the targeted module paths (site
///   labels);
/// - with [`PeftImport::rank_field`]: `r` (the config's base rank) and `rank_pattern`, a map
///   from exact module-path patterns to the ranks of the modules that differ;
/// - with [`PeftImport::alpha_field`]: `alpha` and `alpha_pattern` likewise;
/// - every [`PeftImport::fields`] entry present and not `null`, copied as is;
/// - for every [`PeftImport::module_fields`] entry, one regular expression matching exactly the
///   targeted modules that PEFT's selector in that field selects (`^$` when none).
///
/// The method's patch must declare its tensors in [`PeftFiles`](crate::PeftFiles) with keys
/// `<module path>.<suffix>`, suffixes from [`PeftImport::tensor_suffixes`]; the host loads the
/// file's tensors into them (and `modules_to_save` tensors into the base model) and refuses any
/// other key. Config fields that are none of the above and not PEFT bookkeeping are ignored with
/// a warning.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeftImport {
    /// The config's `peft_type` (`"LOHA"`).
    pub peft_type: String,
    /// A boolean config field that must be `true` for this method to read the adapter (LoRA's
    /// `use_dora` for DoRA); a method without one reads the adapters where no other method's
    /// flag is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
    /// The config field holding the rank (`"r"`), for a method with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_field: Option<String>,
    /// The config field holding alpha (`"alpha"`, LoRA's `"lora_alpha"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha_field: Option<String>,
    /// `(PEFT field, method key)` pairs copied into the method's config.
    #[serde(default)]
    pub fields: Vec<(String, String)>,
    /// `(PEFT field, method key)` pairs of module selectors (IA³'s `feedforward_modules`),
    /// passed as an exact regular expression over the targeted modules they select.
    #[serde(default)]
    pub module_fields: Vec<(String, String)>,
    /// Fields that cannot change a loaded adapter's outputs (initialisation recipes), accepted
    /// without a warning.
    #[serde(default)]
    pub inert_fields: Vec<String>,
    /// The tensor names that follow the module path in the file's keys (`"hada_w1_a"`).
    pub tensor_suffixes: Vec<String>,
}

/// The kind of value a config key takes. Serialized lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigKind {
    /// An integer: a JSON integer, an integral JSON float, or a string such as `"8"`.
    Int,
    /// A number: a JSON number or a string such as `"1e-3"`.
    Float,
    /// A boolean: `true`/`false`, or one of the strings `true false 1 0 yes no on off`.
    Bool,
    /// A string; JSON numbers and booleans are taken as their text.
    String,
    /// A list of strings: a JSON array of scalars, or a comma-separated string `"q,v"`.
    List,
    /// A map from string to string: a JSON object, or a string `"pattern:8,other:4"`.
    Map,
}

impl ConfigKind {
    /// The serialized name (`"int"`, `"float"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ConfigKind::Int => "int",
            ConfigKind::Float => "float",
            ConfigKind::Bool => "bool",
            ConfigKind::String => "string",
            ConfigKind::List => "list",
            ConfigKind::Map => "map",
        }
    }
}

/// One config key of a method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigKey {
    /// The key (`"r"`, `"alpha"`, ...).
    pub key: String,
    /// The kind of value it takes.
    pub kind: ConfigKind,
    /// The value used when the key is not given; `null` makes the key required.
    pub default: Value,
    /// One line of help for users.
    pub help: String,
}

impl ConfigKey {
    /// A key of `kind` with `default` (`Value::Null` for a required key).
    pub fn new(key: &str, kind: ConfigKind, default: Value, help: &str) -> ConfigKey {
        ConfigKey {
            key: key.into(),
            kind,
            default,
            help: help.into(),
        }
    }

    /// An `int` key defaulting to `default`.
    pub fn int(key: &str, default: i64, help: &str) -> ConfigKey {
        ConfigKey::new(key, ConfigKind::Int, default.into(), help)
    }

    /// A `float` key defaulting to `default`.
    pub fn float(key: &str, default: f64, help: &str) -> ConfigKey {
        ConfigKey::new(key, ConfigKind::Float, default.into(), help)
    }

    /// A `bool` key defaulting to `default`.
    pub fn bool(key: &str, default: bool, help: &str) -> ConfigKey {
        ConfigKey::new(key, ConfigKind::Bool, default.into(), help)
    }

    /// A `string` key defaulting to `default`.
    pub fn string(key: &str, default: &str, help: &str) -> ConfigKey {
        ConfigKey::new(key, ConfigKind::String, default.into(), help)
    }

    /// A `list` key defaulting to `default`.
    pub fn list(key: &str, default: &[&str], help: &str) -> ConfigKey {
        ConfigKey::new(key, ConfigKind::List, default.into(), help)
    }

    /// A `map` key defaulting to `default` (pairs in order).
    pub fn map(key: &str, default: &[(&str, &str)], help: &str) -> ConfigKey {
        let map = default
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        ConfigKey::new(key, ConfigKind::Map, Value::Object(map), help)
    }

    /// The same key with no default: users must give it.
    pub fn required(mut self) -> ConfigKey {
        self.default = Value::Null;
        self
    }
}
