//! What graft records in a patched model's metadata: which tensors are trainable, which methods
//! made them (with their configs), and how to fold each branch at merge time.

use graft_plugin_sdk::Fold;
use serde::{Deserialize, Serialize};

use crate::ir::Model;
use crate::{Error, Result};

/// The metadata key holding the [`GraftRecord`] as JSON.
pub const RECORD_KEY: &str = "graft.record";

/// One method applied to the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppliedMethod {
    /// The method's name (`lora`, `ia3`, ...).
    pub method: String,
    /// The plugin that provided it.
    pub plugin: String,
    /// That plugin's version.
    pub plugin_version: String,
    /// The configuration it was applied with (after defaults), as JSON.
    pub config: serde_json::Value,
    /// The tensors this method made trainable.
    pub trainable: Vec<String>,
    /// Every parameter this method added (trainable or not).
    pub parameters: Vec<String>,
}

/// Everything graft knows about the PEFT methods grafted onto a model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GraftRecord {
    /// Methods in the order they were applied.
    pub methods: Vec<AppliedMethod>,
    /// How `graft merge` folds the branches back, in order.
    pub folds: Vec<Fold>,
    /// The label (HF module path) of each base weight a fold touches, where the site had one;
    /// adapter files in HF PEFT's format are keyed by these.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl GraftRecord {
    /// The record stored in `model`'s metadata; empty for a model graft has not patched.
    pub fn read(model: &Model) -> Result<Self> {
        match model.metadata_value(RECORD_KEY) {
            None => Ok(GraftRecord::default()),
            Some(json) => serde_json::from_str(json).map_err(|e| {
                Error::Config(format!(
                    "model metadata {RECORD_KEY:?} is not a valid graft record: {e}"
                ))
            }),
        }
    }

    /// Stores the record in `model`'s metadata (removing the entry when the record is empty).
    pub fn write(&self, model: &mut Model) {
        if self.methods.is_empty() && self.folds.is_empty() && self.labels.is_empty() {
            model.metadata.retain(|(key, _)| key != RECORD_KEY);
        } else {
            let json = serde_json::to_string(self).unwrap_or_default();
            model.set_metadata(RECORD_KEY, json);
        }
    }

    /// Every parameter the methods added, in order of application.
    pub fn parameters(&self) -> impl Iterator<Item = &str> {
        self.methods
            .iter()
            .flat_map(|m| m.parameters.iter().map(String::as_str))
    }

    /// Every trainable tensor, in order of application.
    pub fn trainable(&self) -> impl Iterator<Item = &str> {
        self.methods
            .iter()
            .flat_map(|m| m.trainable.iter().map(String::as_str))
    }
}
