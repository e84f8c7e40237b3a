//! The `bitfit` method plugin: train the model's bias terms only (Ben Zaken et al., 2022).

use graft_plugin_sdk::{
    export_plugin, ConfigKey, GraphView, Host, MethodConfig, MethodDescription, PatchBuilder,
    PatchReply, Plugin, SiteKind,
};

/// BitFit: marks existing bias tensors trainable; merging keeps the trained biases in place.
pub struct BitFit;

impl Plugin for BitFit {
    const NAME: &'static str = "bitfit";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn methods() -> Vec<MethodDescription> {
        vec![MethodDescription::new(
            "bitfit",
            "train bias terms only",
            vec![
                ConfigKey::string("subset", "all", "all: every linear bias in the layers; paper: query and FFN-intermediate biases only"),
                ConfigKey::bool("norm_bias", false, "also train the norms' biases"),
            ],
        )]
    }

    fn patch(
        _host: &Host<'_>,
        _method: &str,
        config: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        let subset = config.get_string("subset")?;
        let norm_bias = config.get_bool("norm_bias")?;
        let wanted = |kind: SiteKind| match subset.as_str() {
            "paper" => matches!(kind, SiteKind::Q | SiteKind::FfnUp),
            _ => kind.is_linear() || (norm_bias && kind == SiteKind::Norm),
        };
        if subset != "all" && subset != "paper" {
            return Err(format!("subset \"{subset}\" is not one of: all, paper"));
        }
        let mut builder = PatchBuilder::new(graph, "bitfit");
        for site_ref in graph.sites().filter(|s| wanted(s.site.kind)) {
            if let Some(bias) = &site_ref.site.bias {
                // Marking is idempotent: a bias shared by two sites is marked once.
                builder.mark_trainable(bias)?;
            }
        }
        if builder.patch().mark_trainable.is_empty() {
            return Err(format!(
                "the model has no bias terms in the {subset} subset (LLaMA-style models have none)"
            ));
        }
        Ok(builder.finish())
    }
}

export_plugin!(BitFit);
