//! Existing initializers trained in place (BitFit), recorded as in-place folds, and new
//! parameters kept frozen.

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

    /// Keeps the new parameter `parameter` (added by this builder, for example by
    /// [`PatchBuilder::bottleneck`]) out of training: it stays an initializer the method
    /// owns, which `graft train` never updates and adapter files still carry (the adapters an
    /// AdapterFusion layer fuses, trained beforehand). Errors when the patch has no such
    /// parameter.
    pub fn freeze(&mut self, parameter: &str) -> Result<()> {
        let found = self
            .patch
            .parameters
            .iter_mut()
            .find(|p| p.name == parameter)
            .ok_or_else(|| Error::Build(format!("freeze: no new parameter \"{parameter}\"")))?;
        found.trainable = false;
        Ok(())
    }
}
