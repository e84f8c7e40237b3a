//! Per-tensor checksums that [`save`](super::save) records in the model and
//! [`verify`](super::verify) checks.
//!
//! Each initializer's bytes get a CRC-32 (the zip/PNG polynomial), stored as one JSON object
//! `{"tensor name": "8 hex digits", …}` under the model metadata key [`METADATA_KEY`]. A CRC
//! finds accidental damage — a truncated or overwritten data file, flipped bits, a data file
//! swapped for another of the same size — not deliberate tampering: whoever can rewrite the
//! weights can rewrite the checksums beside them (see SECURITY.md).

use std::collections::{BTreeMap, HashMap};

use onnx_protobuf::Message;

use crate::ir::{Model, Tensor, TensorData};
use crate::{Error, Result};

/// The model metadata key holding the checksums.
pub const METADATA_KEY: &str = "graft.tensor_crc32";

/// The CRC-32 of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(bytes);
    hasher.finalize()
}

/// The checksum of `tensor`'s stored form: its raw bytes, or the serialized message of a tensor
/// the IR keeps opaque.
pub fn tensor_crc32(tensor: &Tensor) -> Result<u32> {
    match &tensor.data {
        TensorData::Opaque(proto) => {
            let bytes = proto.write_to_bytes().map_err(|e| Error::Tensor {
                name: tensor.name.clone(),
                reason: format!("cannot encode: {e}"),
            })?;
            Ok(crc32(&bytes))
        }
        _ => Ok(crc32(tensor.raw_bytes()?)),
    }
}

/// The checksums recorded in `model`'s metadata, by tensor name (empty when none were).
/// Fails when the entry exists but is not the object [`save`](super::save) writes.
pub fn recorded(model: &Model) -> Result<HashMap<String, u32>> {
    let Some(text) = model.metadata_value(METADATA_KEY) else {
        return Ok(HashMap::new());
    };
    let malformed = |reason: &str| {
        Error::Config(format!(
            "the model's metadata entry {METADATA_KEY:?} is malformed ({reason}); it should \
             map tensor names to 8-digit hexadecimal CRC-32 values"
        ))
    };
    let entries: BTreeMap<String, String> =
        serde_json::from_str(text).map_err(|_| malformed("not a JSON object of strings"))?;
    entries
        .into_iter()
        .map(|(name, value)| match u32::from_str_radix(&value, 16) {
            Ok(crc) if value.len() == 8 => Ok((name, crc)),
            _ => Err(malformed(&format!("{name:?} has {value:?}"))),
        })
        .collect()
}

/// The metadata value recording `checksums`.
pub fn to_metadata(checksums: &BTreeMap<String, u32>) -> String {
    let entries: BTreeMap<&str, String> = checksums
        .iter()
        .map(|(name, crc)| (name.as_str(), format!("{crc:08x}")))
        .collect();
    serde_json::to_string(&entries).expect("a map of strings serializes")
}
