//! Errors of the model crate.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{file}: `{key}`: {message}")]
    Config {
        file: PathBuf,
        key: String,
        message: String,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },

    #[error("input: {0}")]
    Input(String),

    /// Boxed: adapter errors carry file and tensor names and would bloat every `Result`.
    #[error(transparent)]
    Adapter(Box<lorakit_adapter::AdapterError>),

    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl From<lorakit_adapter::AdapterError> for ModelError {
    fn from(e: lorakit_adapter::AdapterError) -> Self {
        ModelError::Adapter(Box::new(e))
    }
}
