//! Tensors in host memory, as fed to and read from a runtime, and their `.npz` files.

use std::path::Path;

use ndarray::ArrayD;

use crate::{Error, Result};

/// A dense tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub enum HostTensor {
    /// 32-bit floats.
    F32(ArrayD<f32>),
    /// 64-bit floats.
    F64(ArrayD<f64>),
    /// 64-bit integers.
    I64(ArrayD<i64>),
    /// 32-bit integers.
    I32(ArrayD<i32>),
    /// Booleans.
    Bool(ArrayD<bool>),
}

impl HostTensor {
    /// A tensor of the same type and shape with every element `value` (cast to the type;
    /// non-zero is `true`).
    pub fn filled_with(&self, value: f64) -> HostTensor {
        match self {
            HostTensor::F32(a) => HostTensor::F32(a.mapv(|_| value as f32)),
            HostTensor::F64(a) => HostTensor::F64(a.mapv(|_| value)),
            HostTensor::I64(a) => HostTensor::I64(a.mapv(|_| value as i64)),
            HostTensor::I32(a) => HostTensor::I32(a.mapv(|_| value as i32)),
            HostTensor::Bool(a) => HostTensor::Bool(a.mapv(|_| value != 0.0)),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            HostTensor::F32(a) => a.shape(),
            HostTensor::F64(a) => a.shape(),
            HostTensor::I64(a) => a.shape(),
            HostTensor::I32(a) => a.shape(),
            HostTensor::Bool(a) => a.shape(),
        }
    }

    /// The values widened to f64 (for comparisons).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            HostTensor::F32(a) => a.iter().map(|&v| v as f64).collect(),
            HostTensor::F64(a) => a.iter().copied().collect(),
            HostTensor::I64(a) => a.iter().map(|&v| v as f64).collect(),
            HostTensor::I32(a) => a.iter().map(|&v| v as f64).collect(),
            HostTensor::Bool(a) => a.iter().map(|&v| v as u8 as f64).collect(),
        }
    }

    /// The f32 array, if this is one.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            HostTensor::F32(a) => Some(a),
            _ => None,
        }
    }

    /// The largest absolute element-wise difference to `other`; infinite when shapes differ.
    pub fn max_abs_diff(&self, other: &HostTensor) -> f64 {
        if self.shape() != other.shape() {
            return f64::INFINITY;
        }
        self.to_f64()
            .iter()
            .zip(other.to_f64())
            .map(|(a, b)| if a == &b { 0.0 } else { (a - b).abs() })
            .fold(0.0, |acc: f64, d| {
                if d.is_nan() {
                    f64::INFINITY
                } else {
                    acc.max(d)
                }
            })
    }
}

/// Reads every array of an `.npz` file (float32, float64, int64, int32, bool), keyed by name.
pub fn read_npz(path: &Path) -> Result<Vec<(String, HostTensor)>> {
    let fail = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
    let file = crate::input_file::open(path)?;
    let mut npz = ndarray_npy::NpzReader::new(file).map_err(|e| fail(e.to_string()))?;
    let names = npz.names().map_err(|e| fail(e.to_string()))?;
    let mut arrays = Vec::with_capacity(names.len());
    for name in names {
        let key = name.trim_end_matches(".npy").to_owned();
        let tensor = if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<f32>, ndarray::IxDyn>(&name) {
            HostTensor::F32(a)
        } else if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<i64>, ndarray::IxDyn>(&name) {
            HostTensor::I64(a)
        } else if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<f64>, ndarray::IxDyn>(&name) {
            HostTensor::F64(a)
        } else if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<i32>, ndarray::IxDyn>(&name) {
            HostTensor::I32(a)
        } else if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<bool>, ndarray::IxDyn>(&name) {
            HostTensor::Bool(a)
        } else {
            return Err(fail(format!(
                "array {key:?} has an element type graft does not read (use float32, float64, int64, int32 or bool)"
            )));
        };
        arrays.push((key, tensor));
    }
    Ok(arrays)
}

/// Writes arrays to an `.npz` file (atomically: built in memory, then written beside the
/// target and renamed over it).
pub fn write_npz(path: &Path, arrays: &[(String, HostTensor)]) -> Result<()> {
    let fail = |e: ndarray_npy::WriteNpzError| Error::Config(format!("{}: {e}", path.display()));
    let mut npz = ndarray_npy::NpzWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, tensor) in arrays {
        match tensor {
            HostTensor::F32(a) => npz.add_array(name.as_str(), a).map_err(fail)?,
            HostTensor::F64(a) => npz.add_array(name.as_str(), a).map_err(fail)?,
            HostTensor::I64(a) => npz.add_array(name.as_str(), a).map_err(fail)?,
            HostTensor::I32(a) => npz.add_array(name.as_str(), a).map_err(fail)?,
            HostTensor::Bool(a) => npz.add_array(name.as_str(), a).map_err(fail)?,
        }
    }
    let bytes = npz.finish().map_err(fail)?.into_inner();
    crate::atomic_file::write_atomically(path, &bytes)
}
