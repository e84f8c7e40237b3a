//! Applying plugin patches to the IR: validation, atomic application, and the metadata that
//! records what was grafted (trainable tensors, methods and their configs, merge folds) inside
//! the model itself, so that later stages need no side files.

mod apply;
mod init;
mod record;

pub(crate) use apply::apply_patch_with_view;
pub use apply::{apply_patch, node_from_patch, node_on_cycle, topological_sort};
pub use init::{data_type, materialize, normal_values};
pub use record::{read_record, write_record, AppliedMethod, GraftRecord, RECORD_KEY};
