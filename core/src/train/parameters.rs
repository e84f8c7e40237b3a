//! The parameter store: the tensors a run trains, with their shapes and current values, in
//! the order of the training graph's gradients. The optimizer updates the values in float32;
//! writing them back into a model keeps each tensor's element type.

use ndarray::{ArrayD, IxDyn};

use crate::ir::Model;
use crate::runtime::HostTensor;
use crate::{Error, Result};

/// The trained tensors of a run.
#[derive(Clone, Debug, Default)]
pub struct ParameterStore {
    /// Names, in the training graph's gradient order.
    pub names: Vec<String>,
    /// Shapes.
    pub dims: Vec<Vec<i64>>,
    /// Current values, float32, row-major.
    pub values: Vec<Vec<f32>>,
}

impl ParameterStore {
    /// The current values of `names` in `model`. Errors name a tensor the model lacks.
    pub fn from_model(model: &Model, names: Vec<String>) -> Result<Self> {
        let mut store = ParameterStore {
            names,
            ..ParameterStore::default()
        };
        for name in &store.names {
            let tensor = model.graph.initializer(name).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                reason: "trainable tensor missing from the model".into(),
            })?;
            store.values.push(tensor.to_f32()?);
            store.dims.push(tensor.dims.clone());
        }
        Ok(store)
    }

    /// The element count of each tensor.
    pub fn lengths(&self) -> Vec<usize> {
        self.values.iter().map(Vec::len).collect()
    }

    /// The position of `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The shape of tensor `index`, as sizes.
    pub fn shape(&self, index: usize) -> Vec<usize> {
        self.dims[index].iter().map(|&d| d as usize).collect()
    }

    /// The current values as graph inputs.
    pub fn feeds(&self) -> Result<Vec<(String, HostTensor)>> {
        (0..self.names.len())
            .map(|index| {
                let name = &self.names[index];
                let array =
                    ArrayD::from_shape_vec(IxDyn(&self.shape(index)), self.values[index].clone())
                        .map_err(|e| Error::Tensor {
                        name: name.clone(),
                        reason: e.to_string(),
                    })?;
                Ok((name.clone(), HostTensor::F32(array)))
            })
            .collect()
    }

    /// The first tensor holding a value that is not finite.
    pub fn first_not_finite(&self) -> Option<&str> {
        self.names
            .iter()
            .zip(&self.values)
            .find(|(_, values)| values.iter().any(|v| !v.is_finite()))
            .map(|(name, _)| name.as_str())
    }

    /// Writes the current values into `model`'s initializers of the same names, each kept in
    /// its element type.
    pub fn write_into(&self, model: &mut Model) -> Result<()> {
        for ((name, values), dims) in self.names.iter().zip(&self.values).zip(&self.dims) {
            if let Some(tensor) = model.graph.initializer_mut(name) {
                tensor.set_float_values(dims.clone(), values)?;
            }
        }
        Ok(())
    }
}
