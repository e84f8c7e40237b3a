//! graft: parameter-efficient fine-tuning for ONNX transformers.
//!
//! The library follows one data path: [`onnx::load`] parses a model into the [`ir`], analyses
//! find its transformer structure, plugins describe patches that the core applies, and the result
//! is saved, trained, merged or exported. See ARCHITECTURE.md at the repository root.

pub mod atomic_file;
pub mod error;
pub mod ir;
pub mod onnx;
pub mod runtime;

pub use error::{Error, Result};
