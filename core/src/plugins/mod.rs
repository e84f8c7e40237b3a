//! The plugin host: finds method plugins (cdylibs speaking the SDK's C ABI), checks their ABI
//! version, asks them for patches, and hands the patches to [`crate::patch`] for validation and
//! application. Libraries are never unloaded.

mod discovery;
mod view;
pub mod worker;

pub use discovery::{LoadedPlugin, PluginIsolation, PluginRegistry};
pub use view::graph_view;

use graft_plugin_sdk::{MethodConfig, PatchReply, TensorSource};

use crate::ir::Model;
use crate::patch::{apply_patch_with_view, AppliedMethod};
use crate::{Error, Result};

/// Lends the model's initializer bytes to a plugin (mapped external data included; no copies).
struct ModelTensors<'m>(std::collections::HashMap<&'m str, &'m crate::ir::Tensor>);

impl TensorSource for ModelTensors<'_> {
    fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).and_then(|t| t.raw_bytes().ok())
    }
}

/// Asks the plugin providing `method` for a patch with `config` (a JSON object of user settings;
/// unknown keys are refused with the list of valid ones), and applies it to `model`. On any
/// failure the model is left as it was and the error names the plugin.
pub fn apply_method(
    registry: &PluginRegistry,
    model: &mut Model,
    method: &str,
    config: &serde_json::Value,
) -> Result<()> {
    let (plugin, description) = registry.find_method(method)?;
    MethodConfig::new(description, config).map_err(|e| Error::Config(e.to_string()))?;
    // The model's own faults are reported as its own, not as a patch the plugin got wrong.
    if let Some(node) = crate::patch::node_on_cycle(&model.graph) {
        return Err(Error::InvalidGraph(format!(
            "the model has a cycle through node {:?} ({}) before method {method} is applied",
            node.name, node.op_type
        )));
    }
    let view = graph_view(model)?;
    let tensors = ModelTensors(
        model
            .graph
            .initializers
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect(),
    );
    let reply: PatchReply = plugin
        .patch(&tensors, method, config, &view)
        .map_err(|reason| Error::Plugin {
            plugin: plugin.display_name(),
            reason,
        })?;
    let applied = AppliedMethod {
        method: method.to_owned(),
        plugin: plugin.description.name.clone(),
        plugin_version: plugin.description.version.clone(),
        config: effective_config(description, config),
        ..AppliedMethod::default()
    };
    apply_patch_with_view(model, &view, &reply, applied).map_err(|e| Error::Plugin {
        plugin: plugin.display_name(),
        reason: format!("method {method} returned a patch graft cannot apply: {e}"),
    })?;
    record_labels(model, &view)
}

/// Stores the label of every base weight the recorded folds touch.
fn record_labels(model: &mut Model, view: &graft_plugin_sdk::GraphView) -> Result<()> {
    let mut record = crate::patch::read_record(model)?;
    for site in view.sites().map(|s| s.site) {
        let Some(label) = &site.label else { continue };
        let touched = record
            .folds
            .iter()
            .any(|fold| fold_weight(fold) == Some(site.weight.as_str()));
        if touched {
            record.labels.insert(site.weight.clone(), label.clone());
        }
    }
    crate::patch::write_record(&record, model);
    Ok(())
}

/// The base weight a fold updates.
pub fn fold_weight(fold: &graft_plugin_sdk::Fold) -> Option<&str> {
    match fold {
        graft_plugin_sdk::Fold::InPlace { tensor } => Some(tensor),
        _ => fold.weight(),
    }
}

/// The configuration as applied: every key of the method, given values over defaults.
fn effective_config(
    description: &graft_plugin_sdk::MethodDescription,
    given: &serde_json::Value,
) -> serde_json::Value {
    let mut effective = serde_json::Map::new();
    for key in &description.config {
        let value = given
            .get(&key.key)
            .cloned()
            .unwrap_or_else(|| key.default.clone());
        effective.insert(key.key.clone(), value);
    }
    serde_json::Value::Object(effective)
}

/// Step hooks served by the plugins of a registry: each method's hook goes to the plugin that
/// provides a method of that name.
pub struct RegistryStepHooks<'r>(pub &'r PluginRegistry);

impl crate::train::participation::StepHooks for RegistryStepHooks<'_> {
    fn step(
        &self,
        method: &graft_plugin_sdk::AppliedMethod,
        request: &graft_plugin_sdk::StepRequest,
    ) -> Result<graft_plugin_sdk::StepReply> {
        let (plugin, _) = self.0.find_method(&method.method).map_err(|e| {
            Error::Config(format!(
                "method {} has a step hook, but its plugin {} is not loaded ({e}); pass it with \
                 --plugin or GRAFT_PLUGIN_PATH",
                method.method, method.plugin
            ))
        })?;
        plugin.step(request).map_err(|e| Error::Plugin {
            plugin: plugin.display_name(),
            reason: format!(
                "step hook of method {} at step {}: {e}",
                method.method, request.step
            ),
        })
    }
}
