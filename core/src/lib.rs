//! graft: parameter-efficient fine-tuning for ONNX transformers.
//!
//! The library follows one data path: [`onnx::load`] parses a model into the [`ir`],
//! [`analysis`] finds its transformer structure, [`plugins`] ask method plugins for patches that
//! [`patch`] validates and applies, and the result is saved ([`onnx::save`]), merged
//! ([`merge`]) or exported. See ARCHITECTURE.md at the repository root.

pub mod adapter;
pub mod adapterhub;
pub mod analysis;
pub mod atomic_file;
pub mod autodiff;
pub mod error;
pub mod folder_lock;
pub mod import_hf;
pub mod input_file;
pub mod ir;
pub mod merge;
pub mod onnx;
pub mod onnx_adapter;
pub mod optimize;
pub mod patch;
pub mod pause;
pub mod peft;
pub mod plugins;
pub mod runtime;
pub mod staged_folder;
pub mod train;

pub use error::{Error, Result};
