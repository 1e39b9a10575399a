//! Errors of the training crate: each names the file and the field or line at fault.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{file}: {field}: {message}")]
    InvalidRecipe {
        file: String,
        field: String,
        message: String,
    },

    #[error("{file}:{line}: {message}")]
    Data {
        file: PathBuf,
        line: usize,
        message: String,
    },

    #[error("{file}: {message}")]
    DataFile { file: PathBuf, message: String },

    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },

    #[error("{file}: chat template: {message}")]
    Template { file: PathBuf, message: String },

    #[error("training diverged at step {step}: the loss is {loss} (lower the learning rate or check the data); the last good checkpoint is kept")]
    NonFinite { step: usize, loss: f32 },

    /// A forward pass gave NaN or infinity: a result, not a number, so never reported as one.
    #[error("the model computes {what} of {value} (NaN or infinite values in the model or adapter: check lora_alpha in adapter_config.json, rms_norm_eps and rope_theta in config.json)")]
    NonFiniteOutput { what: &'static str, value: f64 },

    #[error("{0}")]
    Resume(String),

    /// Boxed: model and adapter errors are large.
    #[error(transparent)]
    Model(Box<lorakit_models::ModelError>),

    #[error(transparent)]
    Adapter(Box<lorakit_adapter::AdapterError>),

    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

impl From<lorakit_models::ModelError> for TrainError {
    fn from(e: lorakit_models::ModelError) -> Self {
        TrainError::Model(Box::new(e))
    }
}

impl From<lorakit_adapter::AdapterError> for TrainError {
    fn from(e: lorakit_adapter::AdapterError) -> Self {
        TrainError::Adapter(Box::new(e))
    }
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        TrainError::Io {
            path: path.into(),
            message: e.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
