//! Typed, validated access to a method's JSON config.

use crate::describe::{ConfigKey, ConfigKind, MethodDescription};
use crate::error::{Error, Result};
use crate::select::{PatternMap, SiteSelector};
use serde_json::{Map, Value};
use std::str::FromStr;

/// A method's config checked against the method's declared keys.
///
/// Values may arrive typed (from a TOML recipe: `r = 8`) or as strings (from the command
/// line: `--set r=8`); every getter accepts both, as [`ConfigKind`] describes. A key that is
/// absent or `null` takes its declared default. Errors are [`Error::Config`] with texts meant
/// for users, for example
/// `unknown config key "rr" for method lora; valid keys: r, alpha, dropout`.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodConfig {
    method: String,
    keys: Vec<ConfigKey>,
    values: Map<String, Value>,
}

impl MethodConfig {
    /// Checks `config` (a JSON object, or `null` for "all defaults") against `method`'s keys:
    /// every key must be declared and every non-null value must be of its key's kind.
    pub fn new(method: &MethodDescription, config: &Value) -> Result<MethodConfig> {
        let values = match config {
            Value::Null => Map::new(),
            Value::Object(map) => map.clone(),
            other => {
                return Err(Error::Config(format!(
                    "config for method {} must be a JSON object, got {other}",
                    method.name
                )))
            }
        };
        let cfg = MethodConfig {
            method: method.name.clone(),
            keys: method.config.clone(),
            values,
        };
        for (key, value) in &cfg.values {
            let declared = cfg.declared(key)?;
            if !value.is_null() && !kind_accepts(declared.kind, value) {
                return Err(cfg.kind_error(declared, value));
            }
        }
        Ok(cfg)
    }

    /// The method's name.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The method's declared keys.
    pub fn keys(&self) -> &[ConfigKey] {
        &self.keys
    }

    /// The given value of `key`, else its default; `None` when both are absent or `null`.
    /// Errors if `key` is not declared.
    pub fn raw(&self, key: &str) -> Result<Option<&Value>> {
        let declared = self.declared(key)?;
        Ok(self
            .values
            .get(key)
            .filter(|v| !v.is_null())
            .or(Some(&declared.default).filter(|v| !v.is_null())))
    }

    /// True when `key` is declared and has a value (given or default).
    pub fn is_set(&self, key: &str) -> bool {
        matches!(self.raw(key), Ok(Some(_)))
    }

    /// True when the user gave `key` explicitly (not `null`).
    pub fn is_given(&self, key: &str) -> bool {
        self.values.get(key).is_some_and(|v| !v.is_null())
    }

    /// `key` as a non-negative integer.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let value = self.required(key)?;
        parse_int(value)
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| self.error(key, &format!("expects a non-negative int, got {value}")))
    }

    /// `key` as an integer.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        let value = self.required(key)?;
        parse_int(value).ok_or_else(|| self.error(key, &format!("expects an int, got {value}")))
    }

    /// `key` as a number, rounded to `f64`.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let value = self.required(key)?;
        parse_float(value).ok_or_else(|| self.error(key, &format!("expects a float, got {value}")))
    }

    /// `key` as a number, rounded to `f32`.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.get_f64(key).map(|v| v as f32)
    }

    /// `key` as a boolean.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let value = self.required(key)?;
        parse_bool(value).ok_or_else(|| self.error(key, &format!("expects a bool, got {value}")))
    }

    /// `key` as a string.
    pub fn get_string(&self, key: &str) -> Result<String> {
        let value = self.required(key)?;
        parse_string(value)
            .ok_or_else(|| self.error(key, &format!("expects a string, got {value}")))
    }

    /// `key` as a list of strings: a JSON array of scalars, or a comma-separated string whose
    /// items are trimmed and whose empty items are dropped (`"q, v"` gives `["q", "v"]`).
    pub fn get_list(&self, key: &str) -> Result<Vec<String>> {
        let value = self.required(key)?;
        parse_list(value).ok_or_else(|| self.error(key, &format!("expects a list, got {value}")))
    }

    /// `key` as `(key, value)` string pairs: a JSON object (values that are numbers or
    /// booleans taken as text; pairs in the order the JSON map yields them, which is sorted
    /// by key), or a string `"pattern:8,other:4"` (pairs in written order; each item split at
    /// its last `:`, both sides trimmed; keys cannot contain `,` in this form).
    pub fn get_map(&self, key: &str) -> Result<Vec<(String, String)>> {
        let value = self.required(key)?;
        parse_map(value).ok_or_else(|| self.error(key, &format!("expects a map, got {value}")))
    }

    /// [`MethodConfig::get_map`] with every value parsed as `T`.
    pub fn get_map_parsed<T: FromStr>(&self, key: &str) -> Result<Vec<(String, T)>> {
        self.get_map(key)?
            .into_iter()
            .map(|(k, v)| match v.parse::<T>() {
                Ok(parsed) => Ok((k, parsed)),
                Err(_) => {
                    Err(self.error(key, &format!("has an invalid value \"{v}\" for \"{k}\"")))
                }
            })
            .collect()
    }

    /// [`MethodConfig::get_map_parsed`] with every key compiled as a regular expression, for
    /// per-site overrides such as `rank_pattern = { "layers\\.[0-3]\\." = 16 }`.
    pub fn get_patterns<T: FromStr>(&self, key: &str) -> Result<PatternMap<T>> {
        PatternMap::new(self.get_map_parsed(key)?).map_err(|e| self.error(key, &e))
    }

    /// [`MethodConfig::get_list`] read as a [`SiteSelector`] (site kinds, groups, label
    /// patterns).
    pub fn get_sites(&self, key: &str) -> Result<SiteSelector> {
        SiteSelector::parse(&self.get_list(key)?).map_err(|e| self.error(key, &e))
    }

    fn declared(&self, key: &str) -> Result<&ConfigKey> {
        self.keys.iter().find(|k| k.key == key).ok_or_else(|| {
            let valid: Vec<&str> = self.keys.iter().map(|k| k.key.as_str()).collect();
            Error::Config(format!(
                "unknown config key \"{key}\" for method {}; valid keys: {}",
                self.method,
                if valid.is_empty() {
                    "(none)".to_string()
                } else {
                    valid.join(", ")
                }
            ))
        })
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.raw(key)?
            .ok_or_else(|| self.error(key, "is required and has no default"))
    }

    fn error(&self, key: &str, what: &str) -> Error {
        Error::Config(format!(
            "config key \"{key}\" for method {} {what}",
            self.method
        ))
    }

    fn kind_error(&self, key: &ConfigKey, value: &Value) -> Error {
        let article = if key.kind == ConfigKind::Int {
            "an"
        } else {
            "a"
        };
        self.error(
            &key.key,
            &format!("expects {article} {}, got {value}", key.kind.name()),
        )
    }
}

fn kind_accepts(kind: ConfigKind, value: &Value) -> bool {
    match kind {
        ConfigKind::Int => parse_int(value).is_some(),
        ConfigKind::Float => parse_float(value).is_some(),
        ConfigKind::Bool => parse_bool(value).is_some(),
        ConfigKind::String => parse_string(value).is_some(),
        ConfigKind::List => parse_list(value).is_some(),
        ConfigKind::Map => parse_map(value).is_some(),
    }
}

fn parse_int(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn parse_float(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn parse_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn parse_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn parse_list(value: &Value) -> Option<Vec<String>> {
    match value {
        Value::Array(items) => items.iter().map(parse_string).collect(),
        Value::String(s) => Some(
            s.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(String::from)
                .collect(),
        ),
        _ => None,
    }
}

fn parse_map(value: &Value) -> Option<Vec<(String, String)>> {
    match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| Some((k.clone(), parse_string(v)?)))
            .collect(),
        Value::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                let (k, v) = item.rsplit_once(':')?;
                Some((k.trim().to_string(), v.trim().to_string()))
            })
            .collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lora() -> MethodDescription {
        MethodDescription::new(
            "lora",
            "low-rank adapters",
            vec![
                ConfigKey::int("r", 8, "rank"),
                ConfigKey::float("alpha", 16.0, "scale numerator"),
                ConfigKey::float("dropout", 0.0, "dropout on the branch input"),
                ConfigKey::bool("fan_in_fan_out", false, "weights stored [in, out]"),
                ConfigKey::string("init", "kaiming", "A init"),
                ConfigKey::list("targets", &["q", "v"], "sites to adapt"),
                ConfigKey::map("rank_pattern", &[], "per-label rank overrides"),
                ConfigKey::int("seed", 0, "seed").required(),
            ],
        )
    }

    #[test]
    fn typed_and_string_values_agree() {
        let typed = MethodConfig::new(
            &lora(),
            &json!({"r": 4, "alpha": 8, "fan_in_fan_out": true, "targets": ["q", "k"],
                    "rank_pattern": {"layers\\.0\\.": 2}, "seed": 1}),
        )
        .unwrap();
        let strings = MethodConfig::new(
            &lora(),
            &json!({"r": "4", "alpha": "8.0", "fan_in_fan_out": "yes", "targets": "q, k",
                    "rank_pattern": "layers\\.0\\.:2", "seed": "1"}),
        )
        .unwrap();
        for cfg in [&typed, &strings] {
            assert_eq!(cfg.get_usize("r").unwrap(), 4);
            assert_eq!(cfg.get_f32("alpha").unwrap(), 8.0);
            assert!(cfg.get_bool("fan_in_fan_out").unwrap());
            assert_eq!(cfg.get_list("targets").unwrap(), ["q", "k"]);
            assert_eq!(
                cfg.get_map("rank_pattern").unwrap(),
                [("layers\\.0\\.".to_string(), "2".to_string())]
            );
            assert_eq!(cfg.get_map_parsed::<usize>("rank_pattern").unwrap()[0].1, 2);
            assert_eq!(cfg.get_f32("dropout").unwrap(), 0.0);
            assert_eq!(cfg.get_string("init").unwrap(), "kaiming");
            assert_eq!(cfg.get_i64("seed").unwrap(), 1);
        }
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let cfg = MethodConfig::new(&lora(), &Value::Null).unwrap();
        assert_eq!(cfg.get_usize("r").unwrap(), 8);
        assert_eq!(cfg.get_list("targets").unwrap(), ["q", "v"]);
        assert!(cfg.get_map("rank_pattern").unwrap().is_empty());
        assert!(!cfg.is_set("seed"));
        assert!(!cfg.is_given("r"));
        assert!(cfg.is_set("r"));
        let with_null = MethodConfig::new(&lora(), &json!({"r": null})).unwrap();
        assert_eq!(with_null.get_usize("r").unwrap(), 8);
    }

    #[test]
    fn error_texts() {
        let unknown = MethodConfig::new(&lora(), &json!({"rr": 4})).unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "unknown config key \"rr\" for method lora; valid keys: r, alpha, dropout, \
             fan_in_fan_out, init, targets, rank_pattern, seed"
        );
        assert!(matches!(unknown, Error::Config(_)));
        let bad = MethodConfig::new(&lora(), &json!({"r": "abc"})).unwrap_err();
        assert_eq!(
            bad.to_string(),
            "config key \"r\" for method lora expects an int, got \"abc\""
        );
        let bad = MethodConfig::new(&lora(), &json!({"fan_in_fan_out": "maybe"})).unwrap_err();
        assert_eq!(
            bad.to_string(),
            "config key \"fan_in_fan_out\" for method lora expects a bool, got \"maybe\""
        );
        let bad = MethodConfig::new(&lora(), &json!({"rank_pattern": "x"})).unwrap_err();
        assert_eq!(
            bad.to_string(),
            "config key \"rank_pattern\" for method lora expects a map, got \"x\""
        );
        let cfg = MethodConfig::new(&lora(), &json!({"r": -2})).unwrap();
        assert_eq!(
            cfg.get_usize("r").unwrap_err().to_string(),
            "config key \"r\" for method lora expects a non-negative int, got -2"
        );
        assert_eq!(
            cfg.get_i64("seed").unwrap_err().to_string(),
            "config key \"seed\" for method lora is required and has no default"
        );
        assert!(cfg
            .get_usize("nope")
            .unwrap_err()
            .to_string()
            .starts_with("unknown config key \"nope\""));
        let not_object = MethodConfig::new(&lora(), &json!([1])).unwrap_err();
        assert_eq!(
            not_object.to_string(),
            "config for method lora must be a JSON object, got [1]"
        );
        let cfg = MethodConfig::new(&lora(), &json!({"rank_pattern": "a:x"})).unwrap();
        assert_eq!(
            cfg.get_map_parsed::<usize>("rank_pattern")
                .unwrap_err()
                .to_string(),
            "config key \"rank_pattern\" for method lora has an invalid value \"x\" for \"a\""
        );
    }

    #[test]
    fn list_and_map_string_forms() {
        assert_eq!(parse_list(&json!("a,,b ,")).unwrap(), ["a", "b"]);
        assert_eq!(parse_list(&json!("")).unwrap(), Vec::<String>::new());
        assert_eq!(
            parse_list(&json!([1, "x", true])).unwrap(),
            ["1", "x", "true"]
        );
        assert!(parse_list(&json!([[1]])).is_none());
        assert_eq!(
            parse_map(&json!("a.*:8, (?:b):4")).unwrap(),
            [
                ("a.*".to_string(), "8".to_string()),
                ("(?:b)".to_string(), "4".to_string())
            ]
        );
        assert_eq!(parse_int(&json!(8.0)), Some(8));
        assert_eq!(parse_int(&json!(8.5)), None);
        assert_eq!(parse_float(&json!("1e-3")), Some(1e-3));
        assert_eq!(parse_float(&json!("nan")), None);
    }
}
