//! PEFT's module matching (`check_target_module_exists` and `get_pattern_key`): which module
//! paths a config targets, and which `rank_pattern` / `alpha_pattern` key applies to a path.

use regex::Regex;

use super::config::{AdapterConfig, LayerIndexes, ModuleSelector, OneOrMany, OrderedMap};

/// PEFT's module selection (`check_target_module_exists`), compiled once.
pub(super) struct Selection {
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
    pub(super) fn new(config: &AdapterConfig) -> std::result::Result<Selection, String> {
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

    /// True when the config names no `target_modules` (PEFT then targets the saved modules).
    pub(super) fn has_no_targets(&self) -> bool {
        self.targets.is_none()
    }

    /// Whether PEFT would wrap `module` (given targets; `None` when the config has none).
    pub(super) fn selects(&self, module: &str) -> Option<bool> {
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
pub(super) fn pattern_value<T: Copy>(patterns: &[(Regex, T)], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(regex, _)| regex.is_match(module))
        .map(|(_, value)| *value)
}

/// Compiles `rank_pattern` / `alpha_pattern` keys the way PEFT matches them.
pub(super) fn compile_patterns<T: Copy>(
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

#[cfg(test)]
mod tests {
    use serde_json::json;

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
}
