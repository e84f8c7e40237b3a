//! Tensors of the IR: metadata plus a reference to where the bytes live (inline, a mapped external
//! file, or data a plugin or the trainer produced). Bytes are never copied until someone asks.

use std::path::PathBuf;
use std::sync::Arc;

use onnx_protobuf::TensorProto;

use super::DataType;
use crate::{Error, Result};

/// A read-only memory map of an external-data file, shared by every tensor stored in it.
#[derive(Debug)]
pub struct MappedFile {
    /// The file's path as resolved on load (inside the model's folder).
    pub path: PathBuf,
    map: memmap2::Mmap,
    device: u64,
    inode: u64,
}

impl MappedFile {
    /// Maps `path` read-only; fails unless it is a regular file. The pages are read from disk
    /// only when a tensor's bytes are touched.
    pub fn open(path: PathBuf) -> Result<Self> {
        let file = crate::input_file::open(&path)?;
        Self::map(file, path)
    }

    /// Maps the open regular file `file`, whose path is `path`.
    pub fn map(file: std::fs::File, path: PathBuf) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = file.metadata().map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; graft never writes to a file it has mapped (outputs are
        // written to a temporary file and renamed over the destination, leaving the mapped inode
        // intact, and a save refuses an output path that is a mapped file).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Ok(MappedFile {
            path,
            map,
            device: metadata.dev(),
            inode: metadata.ino(),
        })
    }

    /// The file's (device, inode): equal for two paths naming the same file.
    pub fn identity(&self) -> (u64, u64) {
        (self.device, self.inode)
    }

    /// The file's bytes (paged in as they are read).
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The file's length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Where a tensor's bytes live.
#[derive(Clone, Debug)]
pub enum TensorData {
    /// Raw little-endian bytes held in memory (ONNX `raw_data`, or typed fields converted on load).
    Raw(Arc<[u8]>),
    /// A byte range of a mapped external-data file.
    External {
        /// The mapped file.
        file: Arc<MappedFile>,
        /// The location string as written in the model (kept for diagnostics).
        location: String,
        /// Byte offset of the tensor in the file.
        offset: usize,
        /// Byte length of the tensor.
        length: usize,
    },
    /// A form the IR does not interpret (string tensors, typed fields of packed types); the
    /// original message is kept and written back unchanged.
    Opaque(Box<TensorProto>),
}

/// A named constant tensor (an initializer, or a new parameter from a plugin).
#[derive(Clone, Debug)]
pub struct Tensor {
    /// The tensor's name; unique among the graph's values.
    pub name: String,
    /// The element type.
    pub dtype: DataType,
    /// The dimensions.
    pub dims: Vec<i64>,
    /// The bytes.
    pub data: TensorData,
    /// `doc_string` from the model, kept for the round trip.
    pub doc_string: String,
}

impl Tensor {
    /// A tensor holding `bytes` in raw little-endian form.
    pub fn from_raw(
        name: impl Into<String>,
        dtype: DataType,
        dims: Vec<i64>,
        bytes: Vec<u8>,
    ) -> Self {
        Tensor {
            name: name.into(),
            dtype,
            dims,
            data: TensorData::Raw(bytes.into()),
            doc_string: String::new(),
        }
    }

    /// An f32 tensor.
    pub fn from_f32(name: impl Into<String>, dims: Vec<i64>, values: &[f32]) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw(name, DataType::Float, dims, bytes)
    }

    /// An i64 tensor.
    pub fn from_i64(name: impl Into<String>, dims: Vec<i64>, values: &[i64]) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw(name, DataType::Int64, dims, bytes)
    }

    /// The number of elements (product of the dimensions; 1 for a scalar).
    pub fn n_elements(&self) -> usize {
        self.dims.iter().map(|&d| d.max(0) as usize).product()
    }

    /// Bytes of storage, known without reading the data.
    pub fn byte_len(&self) -> usize {
        match &self.data {
            TensorData::Raw(bytes) => bytes.len(),
            TensorData::External { length, .. } => *length,
            TensorData::Opaque(_) => self.dtype.storage_bytes(self.n_elements()).unwrap_or(0),
        }
    }

    /// The raw little-endian bytes, borrowed from memory or from the mapped file.
    /// Fails for [`TensorData::Opaque`] tensors, whose bytes the IR does not interpret.
    pub fn raw_bytes(&self) -> Result<&[u8]> {
        match &self.data {
            TensorData::Raw(bytes) => Ok(bytes),
            TensorData::External {
                file,
                offset,
                length,
                ..
            } => Ok(&file.map[*offset..*offset + *length]),
            TensorData::Opaque(_) => Err(Error::Tensor {
                name: self.name.clone(),
                reason: format!("{} data is not stored as raw bytes", self.dtype),
            }),
        }
    }

    /// The values of an f32 tensor (copied out, since mapped bytes need not be aligned).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.expect_dtype(DataType::Float)?;
        Ok(self
            .raw_bytes()?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The values of a floating-point tensor (float, float16, bfloat16, double) as f32.
    pub fn float_values(&self) -> Result<Vec<f32>> {
        let values = (self.dtype.sdk())
            .and_then(|dtype| graft_plugin_sdk::bytes_to_f32(dtype, self.raw_bytes().ok()?));
        values.ok_or_else(|| self.not_float())
    }

    /// Replaces the values, and the dims with `dims`, keeping the element type (a floating-point
    /// one): `values` are rounded to it as [`graft_plugin_sdk::f32_to_bytes`] does.
    pub fn set_float_values(&mut self, dims: Vec<i64>, values: &[f32]) -> Result<()> {
        let bytes = (self.dtype.sdk())
            .and_then(|dtype| graft_plugin_sdk::f32_to_bytes(dtype, values))
            .ok_or_else(|| self.not_float())?;
        self.dims = dims;
        self.data = TensorData::Raw(bytes.into());
        Ok(())
    }

    fn not_float(&self) -> Error {
        Error::Tensor {
            name: self.name.clone(),
            reason: format!(
                "is {}, not a floating-point type graft can read and write as f32",
                self.dtype
            ),
        }
    }

    /// Fails with a message naming the tensor unless its element type is `dtype`.
    pub fn expect_dtype(&self, dtype: DataType) -> Result<()> {
        if self.dtype == dtype {
            Ok(())
        } else {
            Err(Error::Tensor {
                name: self.name.clone(),
                reason: format!("expected {dtype}, found {}", self.dtype),
            })
        }
    }

    /// Whether the bytes live in an external file.
    pub fn is_external(&self) -> bool {
        matches!(self.data, TensorData::External { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writing f32 values into a float16 tensor keeps it float16 (rounded to nearest even), and
    /// reading them back gives the rounded values.
    #[test]
    fn float_values_keep_the_element_type() {
        let mut tensor = Tensor::from_raw("t", DataType::Float16, vec![2], vec![0; 4]);
        tensor
            .set_float_values(vec![1, 2], &[1.0, 1.0 + 1e-4])
            .unwrap();
        assert_eq!(tensor.dtype, DataType::Float16);
        assert_eq!(tensor.dims, [1, 2]);
        // 1 + 1e-4 is below half a float16 ulp at 1 (2^-11 ≈ 4.9e-4), so it rounds to 1.
        assert_eq!(tensor.raw_bytes().unwrap(), [0x00, 0x3c, 0x00, 0x3c]);
        assert_eq!(tensor.float_values().unwrap(), [1.0, 1.0]);

        let mut integers = Tensor::from_i64("i", vec![1], &[7]);
        assert!(integers.set_float_values(vec![1], &[1.0]).is_err());
        assert!(integers.float_values().is_err());
    }
}
