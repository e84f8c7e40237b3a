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
}

impl MethodDescription {
    /// A method with the given name, summary and keys.
    pub fn new(name: &str, summary: &str, config: Vec<ConfigKey>) -> MethodDescription {
        MethodDescription {
            name: name.into(),
            summary: summary.into(),
            config,
        }
    }
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
