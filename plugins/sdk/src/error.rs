//! The one error type of the SDK, with a variant per failure domain.

use std::fmt;

/// An SDK failure. `Display` prints the message alone, so texts shown to users (for example
/// config errors) read exactly as written; the variant says where the failure arose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A method config is malformed: unknown key, wrong kind of value, missing required key.
    Config(String),
    /// A patch-building helper was given arguments it cannot honour.
    Build(String),
    /// A response frame, its JSON or its safetensors blob is malformed or inconsistent.
    Frame(String),
    /// A plugin table or host callback breaks the ABI contract (version, size, null pointers).
    Abi(String),
    /// The plugin answered a call with an error reply; the message is the plugin's.
    Plugin(String),
}

impl Error {
    /// The message without the variant.
    pub fn message(&self) -> &str {
        match self {
            Error::Config(m)
            | Error::Build(m)
            | Error::Frame(m)
            | Error::Abi(m)
            | Error::Plugin(m) => m,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Error {}

impl From<Error> for String {
    fn from(error: Error) -> String {
        match error {
            Error::Config(m)
            | Error::Build(m)
            | Error::Frame(m)
            | Error::Abi(m)
            | Error::Plugin(m) => m,
        }
    }
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
