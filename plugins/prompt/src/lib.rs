//! The `prompt` method plugin: soft prompts. `prompt_tuning` (`tuning.rs`) puts learned
//! virtual tokens before the input's token embeddings, `p_tuning` (also `tuning.rs`) computes
//! them with a trained MLP prompt encoder that `graft merge` bakes; `prefix_tuning` (`prefix.rs`) puts
//! learned keys and values before every layer's cache. Both read and write HF PEFT's files.

mod mlp;
mod prefix;
mod tuning;

use graft_plugin_sdk::{
    export_plugin, GraphView, Host, MethodConfig, MethodDescription, PatchReply, Plugin,
};

/// The soft-prompt methods.
pub struct Prompt;

impl Plugin for Prompt {
    const NAME: &'static str = "prompt";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn methods() -> Vec<MethodDescription> {
        vec![
            tuning::description(),
            tuning::p_tuning_description(),
            prefix::description(),
        ]
    }

    fn patch(
        _host: &Host<'_>,
        method: &str,
        config: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        match method {
            "prefix_tuning" => prefix::patch(config, graph),
            _ => tuning::patch(config, graph, method),
        }
    }
}

export_plugin!(Prompt);
