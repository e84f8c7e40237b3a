//! Where the adapter's tensors sit in an AdapterHub adapter folder: `adapter_config.json`
//! (`{"config": BnConfig, "hidden_size", "model_type", "name", "version"}`) and the weights
//! keyed by module path.
//!
//! AdapterHub keeps the adapters of BERT-family models inside the sublayers' output modules
//! (`bert.encoder.layer.0.attention.output.adapters.<name>`, `….output.adapters.<name>`) and
//! those of the other models on the layer (`transformer.h.0.attention_adapters.adapters.<name>`,
//! `….output_adapters.adapters.<name>`, `….cross_attention_adapters.adapters.<name>`). Each
//! adapter has `adapter_down.0.{weight,bias}` (`nn.Linear(hidden, bottleneck)`, weight `[out,
//! in]`) and `adapter_up.{weight,bias}`. The module paths come from the site labels; a model
//! without labels gets no AdapterHub layout.

use graft_plugin_sdk::serde_json::{json, Value};
use graft_plugin_sdk::{
    AttentionKind, BlockKind, BottleneckNames, GraphView, Layer, PeftFiles, PeftTensor, SiteKind,
    Stack,
};

use crate::settings::Settings;

/// The AdapterHub version whose layout this follows.
pub const ADAPTERS_VERSION: &str = "adapters.1.3.0";

/// Collects the tensor mapping while the adapters are built.
pub struct Files<'s> {
    settings: &'s Settings,
    tensors: Vec<PeftTensor>,
    hidden_size: usize,
    /// Set when a block had no label to key its tensors by.
    unlabelled: bool,
}

impl<'s> Files<'s> {
    /// An empty mapping for the adapter `settings` describe.
    pub fn new(settings: &'s Settings) -> Files<'s> {
        Files {
            settings,
            tensors: Vec::new(),
            hidden_size: 0,
            unlabelled: false,
        }
    }

    /// Maps the tensors of the adapter built at `layer`'s block of `kind`.
    pub fn add(&mut self, stack: &Stack, layer: &Layer, kind: BlockKind, names: &BottleneckNames) {
        self.hidden_size = stack.hidden_size;
        let Some(module) = module_path(layer, kind, &self.settings.name) else {
            self.unlabelled = true;
            return;
        };
        let bottleneck = self.settings.bottleneck(stack.hidden_size);
        let hidden = stack.hidden_size;
        let tensor = |key: &str, tensor: &str, transpose: bool, shape: Vec<usize>| PeftTensor {
            key: format!("{module}.{key}"),
            tensor: tensor.to_owned(),
            transpose,
            shape,
            rank_axis: None,
        };
        self.tensors.extend([
            tensor(
                "adapter_down.0.weight",
                &names.down,
                true,
                vec![bottleneck, hidden],
            ),
            tensor(
                "adapter_down.0.bias",
                &names.down_bias,
                false,
                vec![bottleneck],
            ),
            tensor(
                "adapter_up.weight",
                &names.up,
                true,
                vec![hidden, bottleneck],
            ),
            tensor("adapter_up.bias", &names.up_bias, false, vec![hidden]),
        ]);
    }

    /// The folder's layout, or `None` when some adapter had no module path.
    pub fn finish(self, graph: &GraphView) -> Option<PeftFiles> {
        if self.unlabelled || self.tensors.is_empty() {
            return None;
        }
        let model_type = model_type(graph);
        Some(PeftFiles {
            config: json!({
                "config": self.settings.adapterhub_config(),
                "hidden_size": self.hidden_size,
                "model_type": model_type,
                "name": self.settings.name,
                "version": ADAPTERS_VERSION,
            }),
            tensors: self.tensors,
            ..PeftFiles::default()
        })
    }
}

/// The module path of the adapter named `name` at `layer`'s block of `kind`.
fn module_path(layer: &Layer, kind: BlockKind, name: &str) -> Option<String> {
    Some(format!("{}.adapters.{name}", holder_path(layer, kind)?))
}

/// The module path of the AdapterFusion layer named `fusion` (`a,b`) at `layer`'s block of
/// `kind`.
pub fn fusion_module_path(layer: &Layer, kind: BlockKind, fusion: &str) -> Option<String> {
    Some(format!(
        "{}.adapter_fusion_layer.{fusion}",
        holder_path(layer, kind)?
    ))
}

/// The module that holds a block's adapters and fusion layers, from its output projection's
/// label.
fn holder_path(layer: &Layer, kind: BlockKind) -> Option<String> {
    let (site_kind, attention) = match kind {
        BlockKind::SelfAttention => (SiteKind::O, Some(AttentionKind::SelfAttention)),
        BlockKind::CrossAttention => (SiteKind::O, Some(AttentionKind::Cross)),
        BlockKind::Ffn => (SiteKind::FfnDown, None),
    };
    let label = layer
        .sites
        .iter()
        .find(|s| {
            s.kind == site_kind
                && (attention.is_none() || s.attention.is_none() || s.attention == attention)
        })?
        .label
        .as_deref()?;
    // BERT family: `<layer>.attention.output.dense`, `<layer>.crossattention.output.dense`,
    // `<layer>.output.dense` — the adapters live in the `output` module.
    if let Some(parent) = label.strip_suffix(".output.dense") {
        return Some(format!("{parent}.output"));
    }
    let mut parts: Vec<&str> = label.split('.').collect();
    let index = parts.iter().rposition(|p| p.parse::<usize>().is_ok())?;
    parts.truncate(index + 1);
    let holder = match kind {
        BlockKind::SelfAttention => "attention_adapters",
        BlockKind::CrossAttention => "cross_attention_adapters",
        BlockKind::Ffn => "output_adapters",
    };
    Some(format!("{}.{holder}", parts.join(".")))
}

/// AdapterHub's `model_type`, guessed from the labels' root module (`bert`, `roberta`, ...;
/// `transformer` is GPT-2, `model` LLaMA-like); `null` when there is no label.
pub fn model_type(graph: &GraphView) -> Value {
    let root = graph
        .sites()
        .find_map(|s| s.site.label.as_deref())
        .and_then(|l| l.split('.').next());
    match root {
        Some("transformer") => json!("gpt2"),
        Some("model") => json!("llama"),
        Some(root) => json!(root),
        None => Value::Null,
    }
}
