//! What graft records in a patched model (its `graft.record` metadata): the methods applied,
//! with their configs, tensors, nodes and training contributions, and the merge folds. The
//! core writes it; plugins read it through [`crate::GraphView::record`] to see and reuse what
//! earlier methods grafted.

use crate::patch::Fold;
use crate::training::TrainingSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One method applied to the model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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
    /// The nodes this method added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// What the method's patch contributes to training and to PEFT files, as it declared it.
    #[serde(flatten)]
    pub training: TrainingSpec,
}

/// Everything graft knows about the PEFT methods grafted onto a model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GraftRecord {
    /// Methods in the order they were applied.
    #[serde(default)]
    pub methods: Vec<AppliedMethod>,
    /// How `graft merge` folds the branches back, in order.
    #[serde(default)]
    pub folds: Vec<Fold>,
    /// The label (HF module path) of each base weight a fold touches, where the site had one;
    /// adapter files in HF PEFT's format are keyed by these.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl GraftRecord {
    /// True when nothing was grafted.
    pub fn is_empty(&self) -> bool {
        self.methods.is_empty() && self.folds.is_empty() && self.labels.is_empty()
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

    /// The method that added or made trainable `tensor`.
    pub fn method_of(&self, tensor: &str) -> Option<&AppliedMethod> {
        self.methods.iter().find(|m| {
            m.parameters.iter().any(|p| p == tensor) || m.trainable.iter().any(|t| t == tensor)
        })
    }
}
