//! Reading and writing the [`GraftRecord`] (defined by the SDK, so that plugins see it too) in
//! a patched model's metadata.

pub use graft_plugin_sdk::{AppliedMethod, GraftRecord};

use crate::ir::Model;
use crate::{Error, Result};

/// The metadata key holding the [`GraftRecord`] as JSON.
pub const RECORD_KEY: &str = "graft.record";

/// The record stored in `model`'s metadata; empty for a model graft has not patched.
pub fn read_record(model: &Model) -> Result<GraftRecord> {
    match model.metadata_value(RECORD_KEY) {
        None => Ok(GraftRecord::default()),
        Some(json) => serde_json::from_str(json).map_err(|e| {
            Error::Config(format!(
                "model metadata {RECORD_KEY:?} is not a valid graft record: {e}"
            ))
        }),
    }
}

/// Stores `record` in `model`'s metadata (removing the entry when the record is empty).
pub fn write_record(record: &GraftRecord, model: &mut Model) {
    if record.is_empty() {
        model.metadata.retain(|(key, _)| key != RECORD_KEY);
    } else {
        let json = serde_json::to_string(record).unwrap_or_default();
        model.set_metadata(RECORD_KEY, json);
    }
}
