//! Adapter tensor files (safetensors): the trainable tensors of a patched model, saved after
//! training and loaded back for merge or export.

use std::path::Path;

use safetensors::SafeTensors;

use crate::ir::{Model, Tensor, TensorData};
use crate::{Error, Result};

/// Replaces the values of `model`'s method tensors with those in the safetensors file at
/// `path`, matched by tensor name. Every tensor in the file must name a trainable tensor of the
/// model, or a frozen parameter of one of its methods (the adapters an AdapterFusion fuses),
/// with the same element type and shape. Returns how many tensors were loaded.
pub fn load_into(model: &mut Model, path: &Path) -> Result<usize> {
    let bytes = crate::input_file::read(path)?;
    let fail = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| fail(format!("not a safetensors file: {e}")))?;
    let record = crate::patch::read_record(model)?;
    let loadable: Vec<&str> = record.trainable().chain(record.parameters()).collect();
    let mut loaded = 0;
    for (name, view) in file.tensors() {
        if !loadable.contains(&name.as_str()) {
            let mut valid = loadable.clone();
            valid.dedup();
            valid.truncate(8);
            return Err(fail(format!(
                "tensor {name:?} is not a tensor of this model's methods (they are named like {})",
                valid.join(", ")
            )));
        }
        let Some(target) = model.graph.initializer_mut(&name) else {
            return Err(fail(format!("the model has no tensor {name:?}")));
        };
        let dims: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let dtype_matches = safetensors_dtype(target).is_some_and(|d| d == view.dtype());
        if dims != target.dims || !dtype_matches {
            return Err(fail(format!(
                "tensor {name:?} is {:?} {:?}, the model's is {} {:?}",
                view.dtype(),
                dims,
                target.dtype,
                target.dims
            )));
        }
        target.data = TensorData::Raw(view.data().to_vec().into());
        loaded += 1;
    }
    Ok(loaded)
}

/// The safetensors element type of a tensor, when there is one.
pub fn safetensors_dtype(tensor: &Tensor) -> Option<safetensors::Dtype> {
    tensor.dtype.sdk()?.to_safetensors()
}

/// Writes every trainable tensor of a patched model to a safetensors file (atomically), keyed by
/// graft's tensor names.
pub fn save(model: &Model, path: &Path) -> Result<()> {
    let record = crate::patch::read_record(model)?;
    let mut views = Vec::new();
    for name in record.trainable() {
        let tensor = model.graph.initializer(name).ok_or_else(|| Error::Tensor {
            name: name.to_owned(),
            reason: "trainable tensor missing from the model".into(),
        })?;
        let dtype = safetensors_dtype(tensor).ok_or_else(|| Error::Tensor {
            name: name.to_owned(),
            reason: format!("{} cannot be stored in safetensors", tensor.dtype),
        })?;
        let shape: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
        let view = safetensors::tensor::TensorView::new(dtype, shape, tensor.raw_bytes()?)
            .map_err(|e| Error::Tensor {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        views.push((name.to_owned(), view));
    }
    let bytes = safetensors::serialize(views, &None).map_err(|e| {
        Error::Config(format!(
            "{}: cannot encode safetensors: {e}",
            path.display()
        ))
    })?;
    crate::atomic_file::write_atomically(path, &bytes)
}
