//! Errors of the merge crate.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },

    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },

    #[error("{adapter}: module `{module}` has no weight `{module}.weight` in the base model {base} (is the adapter made for another base model?)")]
    NoBaseWeight {
        adapter: String,
        module: String,
        base: String,
    },

    #[error("merged tensor `{name}` would hold NaN or infinite values; refusing to write it (check the adapter for overflow, or merge in f32)")]
    NonFinite { name: String },

    /// Boxed: adapter errors carry file and tensor names and would bloat every `Result`.
    #[error(transparent)]
    Adapter(Box<lorakit_adapter::AdapterError>),

    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

impl MergeError {
    pub(crate) fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        MergeError::Io {
            path: path.into(),
            message: e.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, MergeError>;

impl From<lorakit_adapter::AdapterError> for MergeError {
    fn from(e: lorakit_adapter::AdapterError) -> Self {
        MergeError::Adapter(Box::new(e))
    }
}
