//! Existing initializers trained in place (BitFit), recorded as in-place folds.

use super::PatchBuilder;
use crate::error::{Error, Result};
use crate::patch::Fold;

impl PatchBuilder<'_> {
    /// Trains the existing initializer `tensor` in place (BitFit): adds it to
    /// `mark_trainable` and records [`Fold::InPlace`], once however often called. Errors when
    /// the view has no such initializer.
    pub fn mark_trainable(&mut self, tensor: &str) -> Result<()> {
        if self.graph.tensor(tensor).is_none() {
            return Err(Error::Build(format!(
                "mark_trainable: no initializer \"{tensor}\""
            )));
        }
        if !self.patch.mark_trainable.iter().any(|t| t == tensor) {
            self.patch.mark_trainable.push(tensor.to_string());
            self.fold(Fold::InPlace {
                tensor: tensor.to_string(),
            });
        }
        Ok(())
    }
}
