//! Key/value cache inputs in training and evaluation: a model exported with a cache (for
//! generation, or for prefix tuning, whose prefix is the cache) is trained on whole sequences,
//! so each cache input is fed empty — `[batch, heads, 0, head_dim]`, no past.

use crate::ir::{Dim, Model};
use crate::runtime::HostTensor;
use crate::{Error, Result};
use graft_plugin_sdk::InputRole;

/// The cache inputs of a model and their fixed dims besides the batch and the length.
#[derive(Clone, Debug, Default)]
pub(super) struct EmptyCaches(Vec<(String, [usize; 2])>);

impl EmptyCaches {
    /// The cache inputs of `model` (none for a model exported without a cache); fails naming
    /// an input whose heads or head width are not fixed numbers.
    pub(super) fn of(model: &Model) -> Result<Self> {
        let view = crate::plugins::graph_view(model)?;
        let mut caches = Vec::new();
        for input in view
            .input_roles
            .iter()
            .filter(|i| matches!(i.role, InputRole::PastKey | InputRole::PastValue))
        {
            let declared = model
                .graph
                .inputs
                .iter()
                .find(|i| i.name == input.name)
                .and_then(|i| i.value_type())
                .and_then(|t| t.shape);
            match declared.as_deref() {
                Some([_, Dim::Fixed(heads), _, Dim::Fixed(width)]) => {
                    caches.push((input.name.clone(), [*heads as usize, *width as usize]))
                }
                _ => {
                    return Err(Error::Config(format!(
                        "cache input {:?} is not declared [batch, heads, past, head_dim] with \
                         fixed heads and head_dim, so graft cannot feed it empty in training",
                        input.name
                    )))
                }
            }
        }
        Ok(EmptyCaches(caches))
    }

    /// Empty float32 caches for a batch of `batch` sequences.
    pub(super) fn feeds(&self, batch: usize) -> Vec<(String, HostTensor)> {
        self.0
            .iter()
            .map(|(name, [heads, width])| {
                let shape = ndarray::IxDyn(&[batch, *heads, 0, *width]);
                (name.clone(), HostTensor::F32(ndarray::ArrayD::zeros(shape)))
            })
            .collect()
    }
}
