//! The library's error type: every variant names the file, node, tensor or plugin at fault.

use std::path::PathBuf;

/// An error from any graft library operation. Messages name the thing at fault so that the CLI
/// can print them as they are and exit with status 2.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying I/O error (kept out of the error chain: the message already says it).
        error: std::io::Error,
    },
    /// A path graft was asked to read names a FIFO, a device or another special file.
    #[error("{path}: is a {kind}, not a regular file; graft reads only regular files")]
    NotRegularFile {
        /// The path at fault.
        path: PathBuf,
        /// What it is instead.
        kind: String,
    },
    /// A file is not a valid ONNX model.
    #[error("{path}: not a valid ONNX model: {reason}")]
    InvalidModel {
        /// The model file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor's external data cannot be used.
    #[error("{model}: tensor {tensor:?}: external data {location:?}: {reason}")]
    ExternalData {
        /// The model file that refers to the data.
        model: PathBuf,
        /// The tensor whose data is external.
        tensor: String,
        /// The location string recorded in the model.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A graph is inconsistent (dangling value, duplicate name, cycle, type clash).
    #[error("invalid graph: {0}")]
    InvalidGraph(String),
    /// A tensor is missing or has the wrong type or shape for the operation asked of it.
    #[error("tensor {name:?}: {reason}")]
    Tensor {
        /// The tensor at fault.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A plugin could not be loaded or failed.
    #[error("plugin {plugin}: {reason}")]
    Plugin {
        /// The plugin's name or path.
        plugin: String,
        /// What went wrong.
        reason: String,
    },
    /// A user-supplied setting is invalid.
    #[error("{0}")]
    Config(String),
    /// ONNX Runtime failed or could not be provisioned.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    /// tract could not load or run a model.
    #[error("tract: {0}")]
    Tract(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
