//! Errors of the adapter crate: each names the file, key or tensor at fault.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },

    #[error("{file}: `{key}`: {message}")]
    InvalidConfig {
        file: String,
        key: String,
        message: String,
    },

    #[error("{file}: `{key}` = {value} switches on {feature}, which lorakit does not support yet")]
    Unsupported {
        file: String,
        key: String,
        value: String,
        feature: String,
    },

    #[error("{file}: a {variant} adapter cannot be exported for {target}, which reads plain LoRA only (it rejects `{tensor}`); merge first (`lorakit merge`), then share the merged model")]
    NotPlainLora {
        file: String,
        variant: String,
        tensor: String,
        target: String,
    },

    #[error("LoRA target entr{} {} matched no module of the model (linear modules are e.g. {})",
        if entries.len() == 1 { "y" } else { "ies" }, entries.join(", "), examples.join(", "))]
    NoTargetMatched {
        entries: Vec<String>,
        examples: Vec<String>,
    },

    #[error("{file}: tensor `{name}` has shape {got:?}, expected {expected:?} ({why})")]
    ShapeMismatch {
        file: String,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
        why: String,
    },

    #[error("{file}: tensor `{name}` is missing ({why})")]
    MissingTensor {
        file: String,
        name: String,
        why: String,
    },

    #[error("{file}: {} tensor(s) belong to no targeted module of this base model, e.g. {} \
        (is the adapter made for another base model?)", names.len(), names.iter().take(3).cloned().collect::<Vec<_>>().join(", "))]
    UnusedTensors { file: String, names: Vec<String> },

    #[error("{file}: {} tensor(s) are for modules that {config} does not target (target_modules, exclude_modules, layers_to_transform), e.g. {}", names.len(), names.iter().take(3).cloned().collect::<Vec<_>>().join(", "))]
    UntargetedTensors {
        file: String,
        config: String,
        names: Vec<String>,
    },

    #[error("{file}: tensor `{name}`: {message}")]
    BadTensor {
        file: String,
        name: String,
        message: String,
    },

    #[error("{file}: not a valid safetensors file: {message}")]
    Safetensors { file: String, message: String },

    #[error("adapter tensor(s) received no gradient: {} (a non-differentiable op sits between them and the loss)", names.join(", "))]
    DeadAdapters { names: Vec<String> },

    /// `--force` asked to replace a directory lorakit must not touch (see `output_guard`).
    #[error("{0}")]
    RefusedOutput(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, AdapterError>;

impl AdapterError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AdapterError::Io {
            path: path.into(),
            source,
        }
    }
}
