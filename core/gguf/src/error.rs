//! The one error type of this crate.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while reading a GGUF file or converting it.
///
/// Every variant names the file it is about, so a message stands on its own.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// An operating-system error while reading or writing a file.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// The file is not a well-formed GGUF file (bad magic, truncated, inconsistent sizes...).
    #[error("{}: not a valid GGUF file: {msg}", path.display())]
    Format { path: PathBuf, msg: String },

    /// A tensor is stored in a ggml type this crate cannot dequantize.
    #[error(
        "{}: tensor '{tensor}' is stored as {ggml_type}, which cannot be dequantized \
         (supported: F32, F16, BF16, F64, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)",
        path.display()
    )]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        ggml_type: String,
    },

    /// A tensor that was asked for is not in the file.
    #[error("{}: no tensor named '{name}'", path.display())]
    MissingTensor { path: PathBuf, name: String },

    /// A metadata key is missing or holds a value of the wrong kind.
    #[error("{}: metadata '{key}': {msg}", path.display())]
    Metadata {
        path: PathBuf,
        key: String,
        msg: String,
    },

    /// The model in the file cannot be converted (architecture, shapes, tensor names...).
    #[error("{}: cannot convert: {msg}", path.display())]
    Convert { path: PathBuf, msg: String },

    /// Building, saving or checking the tokenizer failed.
    #[error("{}: tokenizer: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },
}

impl GgufError {
    pub(crate) fn io(path: &Path, what: impl Into<String>, source: std::io::Error) -> Self {
        GgufError::Io {
            path: path.to_path_buf(),
            what: what.into(),
            source,
        }
    }

    pub(crate) fn format(path: &Path, msg: impl Into<String>) -> Self {
        GgufError::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn metadata(path: &Path, key: &str, msg: impl Into<String>) -> Self {
        GgufError::Metadata {
            path: path.to_path_buf(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }

    pub(crate) fn convert(path: &Path, msg: impl Into<String>) -> Self {
        GgufError::Convert {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn tokenizer(path: &Path, msg: impl Into<String>) -> Self {
        GgufError::Tokenizer {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// Short for `Result<T, GgufError>`.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;
