//! ONNX files ⇄ IR: [`load`] parses a model and maps its external data lazily; [`save`] writes it
//! back atomically, inline or with external data.

mod load;
mod save;

pub use load::{load, load_from_bytes};
pub use save::{save, to_bytes, DataPlacement, SaveOptions};
