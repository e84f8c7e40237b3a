//! Module-path labels (`bert.encoder.layer.0.attention.self.query`, the names HF PEFT uses in
//! adapter keys) recovered from what exporters leave behind: legacy node names, dynamo's
//! `pkg.torch.onnx.name_scopes` metadata, or initializer names. Labels are for people and for
//! matching user patterns; detection never depends on them.

use crate::ir::Node;

/// The node metadata key under which the dynamo exporter records the module scopes of a node.
pub const NAME_SCOPES_KEY: &str = "pkg.torch.onnx.name_scopes";

/// The module path of the module that emitted `node`: from dynamo's name scopes when present,
/// else from a legacy exporter node name. `None` when neither carries a module path.
pub fn node_label(node: &Node) -> Option<String> {
    node.metadata_value(NAME_SCOPES_KEY)
        .and_then(scope_label)
        .or_else(|| legacy_name_label(&node.name))
}

/// The module path in a legacy (TorchScript) exporter node name: the scope components without
/// the trailing op name, joined by dots. `/bert/encoder/layer.0/attention/self/query/MatMul`
/// gives `bert.encoder.layer.0.attention.self.query`; names without a leading `/` or without a
/// scope give `None`.
pub fn legacy_name_label(name: &str) -> Option<String> {
    let scoped = name.strip_prefix('/')?;
    let mut components: Vec<&str> = scoped.split('/').collect();
    components.pop()?;
    let label = components.join(".");
    is_module_path(&label).then_some(label)
}

/// The module path in a dynamo name-scope list such as
/// `['', 'bert', 'bert.encoder', 'bert.encoder.layer.0.attention.self.query', 'linear']`: the
/// innermost module, i.e. the entry before the trailing op name.
pub fn scope_label(scopes: &str) -> Option<String> {
    let inner = scopes.trim().strip_prefix('[')?.strip_suffix(']')?;
    let entries: Vec<&str> = inner
        .split(',')
        .map(|entry| entry.trim().trim_matches(|c| c == '\'' || c == '"'))
        .collect();
    let module = entries.len().checked_sub(2).map(|i| entries[i])?;
    is_module_path(module).then(|| module.to_owned())
}

/// The module path in a parameter name: `bert.encoder.layer.0.attention.self.query.weight`
/// gives `bert.encoder.layer.0.attention.self.query`. Names that do not end in `.weight` or
/// `.bias` (such as `val_84` or `onnx::MatMul_376`) give `None`.
pub fn initializer_label(name: &str) -> Option<String> {
    let module = name
        .strip_suffix(".weight")
        .or_else(|| name.strip_suffix(".bias"))?;
    is_module_path(module).then(|| module.to_owned())
}

/// Whether `text` looks like a dotted module path: non-empty segments of letters, digits and
/// underscores.
pub fn is_module_path(text: &str) -> bool {
    !text.is_empty()
        && text.split('.').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names_drop_the_op() {
        assert_eq!(
            legacy_name_label("/bert/encoder/layer.0/attention/self/query/MatMul").as_deref(),
            Some("bert.encoder.layer.0.attention.self.query")
        );
        assert_eq!(legacy_name_label("/Mul"), None);
        assert_eq!(legacy_name_label("node_linear"), None);
    }

    #[test]
    fn dynamo_scopes_give_the_innermost_module() {
        let scopes = "['', 'model', 'model.layers.0', 'model.layers.0.self_attn.q_proj', 'linear']";
        assert_eq!(
            scope_label(scopes).as_deref(),
            Some("model.layers.0.self_attn.q_proj")
        );
        assert_eq!(scope_label("['', 'matmul_8']"), None);
    }

    #[test]
    fn parameter_names_lose_their_suffix() {
        assert_eq!(
            initializer_label("lm_head.weight").as_deref(),
            Some("lm_head")
        );
        assert_eq!(initializer_label("val_84"), None);
        assert_eq!(initializer_label("onnx::MatMul_376"), None);
    }
}
