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

/// Reads every array of an `.npz` file (float32, float64, int64, int32, bool), keyed by name
/// (a trailing `.npy` dropped).
///
/// Memory stays proportional to the file: each member is decompressed into memory (as much
/// as it really holds, whatever its zip header claims), and an `.npy` header that declares a
/// longer header or more elements than the member's bytes hold is refused by name, before
/// anything of the declared size is allocated. Any other malformed archive or array is an
/// [`Error::Config`] naming the file too.
pub fn read_npz(path: &Path) -> Result<Vec<(String, HostTensor)>> {
    use ndarray_npy::ReadNpyExt;
    use std::io::Read;
    let fail = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
    let file = crate::input_file::open(path)?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| fail(e.to_string()))?;
    let mut arrays = Vec::with_capacity(archive.len());
    for index in 0..archive.len() {
        let mut member = archive.by_index(index).map_err(|e| fail(e.to_string()))?;
        let key = member.name().trim_end_matches(".npy").to_owned();
        let mut bytes = Vec::new();
        member
            .read_to_end(&mut bytes)
            .map_err(|e| fail(format!("array {key:?}: {e}")))?;
        check_npy_sizes(&bytes).map_err(|reason| fail(format!("array {key:?}: {reason}")))?;
        let npy = bytes.as_slice();
        let tensor = if let Ok(a) = ArrayD::<f32>::read_npy(npy) {
            HostTensor::F32(a)
        } else if let Ok(a) = ArrayD::<i64>::read_npy(npy) {
            HostTensor::I64(a)
        } else if let Ok(a) = ArrayD::<f64>::read_npy(npy) {
            HostTensor::F64(a)
        } else if let Ok(a) = ArrayD::<i32>::read_npy(npy) {
            HostTensor::I32(a)
        } else if let Ok(a) = ArrayD::<bool>::read_npy(npy) {
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

/// `Ok` when the `.npy` image `npy` declares no more than it holds: a header no longer than the
/// bytes after its length field, and at most one element per byte after the header (every
/// element type graft reads takes at least a byte). The `.npy` reader allocates what the header
/// declares before it reads, so a few bytes could otherwise ask for gigabytes. Whatever else
/// is wrong is left to the reader.
fn check_npy_sizes(npy: &[u8]) -> std::result::Result<(), String> {
    // Magic (6 bytes), version (2), then the header length: u16 in version 1, u32 after.
    if !npy.starts_with(b"\x93NUMPY") {
        return Ok(());
    }
    let (length_end, header_len) = match npy.get(6).copied() {
        Some(1) if npy.len() >= 10 => (10, u16::from_le_bytes([npy[8], npy[9]]) as usize),
        Some(2 | 3) if npy.len() >= 12 => (
            12,
            u32::from_le_bytes([npy[8], npy[9], npy[10], npy[11]]) as usize,
        ),
        _ => return Ok(()),
    };
    let after_length = npy.len() - length_end;
    if header_len > after_length {
        return Err(format!(
            "its .npy header declares {header_len} bytes of header, but only {after_length} \
             bytes follow"
        ));
    }
    let mut rest = npy;
    let Ok(header) = ndarray_npy::npy::header::Header::from_reader(&mut rest) else {
        return Ok(());
    };
    let elements = header
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d));
    match elements {
        Some(n) if n <= rest.len() => Ok(()),
        _ => Err(format!(
            "its .npy header declares shape {:?}, more elements than the {} bytes of data hold",
            header.shape,
            rest.len()
        )),
    }
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
