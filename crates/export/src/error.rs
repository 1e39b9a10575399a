//! Errors of the export crate: each names the file (and key or tensor) and what was expected.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },

    /// Something in a file (a key, a tensor) is not what it must be.
    #[error("{file}: `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },

    /// What llama.cpp (or lorakit's GGUF support) cannot express.
    #[error("{0}")]
    Unsupported(String),

    /// Boxed: adapter and model errors carry file and tensor names.
    #[error(transparent)]
    Adapter(Box<lorakit_adapter::AdapterError>),

    #[error(transparent)]
    Model(Box<lorakit_models::ModelError>),

    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

impl ExportError {
    pub(crate) fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        ExportError::Io {
            path: path.into(),
            message: e.to_string(),
        }
    }

    pub(crate) fn invalid(file: impl Into<PathBuf>, key: &str, message: impl Into<String>) -> Self {
        ExportError::Invalid {
            file: file.into(),
            key: key.into(),
            message: message.into(),
        }
    }
}

impl From<lorakit_adapter::AdapterError> for ExportError {
    fn from(e: lorakit_adapter::AdapterError) -> Self {
        ExportError::Adapter(Box::new(e))
    }
}

impl From<lorakit_models::ModelError> for ExportError {
    fn from(e: lorakit_models::ModelError) -> Self {
        ExportError::Model(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, ExportError>;
