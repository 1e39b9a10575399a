//! lorakit-train: YAML recipes, JSONL data sets and templates, the causal-LM loss, AdamW with LR
//! schedules, the training loop with eval, checkpoints and exact resume, and metrics.
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod recipe;
pub mod run_lock;
pub mod runtime;
pub mod schedule;
pub mod tokenizer;
pub mod trainer;

pub use error::{Result, TrainError};
pub use recipe::{DataFormat, Recipe};
pub use tokenizer::TextTokenizer;
pub use trainer::{train, Reporter, StepReport, TrainOptions, TrainSummary};
