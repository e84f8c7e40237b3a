//! ONNX files ⇄ IR: [`load`] parses a model and maps its external data lazily; [`save`] writes it
//! back atomically, inline or with external data, recording each tensor's [`checksum`];
//! [`verify`] checks a saved model against them.

pub mod checksum;
mod load;
mod save;
mod verify;

pub use load::{load, load_from_bytes};
pub use save::{save, to_bytes, DataPlacement, SaveOptions};
pub use verify::{verify, ExternalFileUse, Verification};
