//! lorakit-train: YAML recipes, JSONL data sets and templates, the causal-LM loss, AdamW with LR
//! schedules, the training loop with eval, checkpoints and exact resume, and metrics.
pub mod card;
pub mod checkpoint;
pub mod choices;
pub mod data;
pub mod error;
pub mod eval;
pub mod gguf_tokenizer;
pub mod gguf_vocab;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod packing;
pub mod preference;
pub mod recipe;
pub mod run_lock;
pub mod runtime;
pub mod schedule;
pub mod task_model;
pub mod tokenizer;
pub mod trainer;

pub use error::{Result, TrainError};

/// Adapter safetensors metadata key holding a classifier's label names (JSON list, index order).
pub const LABELS_METADATA: &str = "lorakit.labels";
pub use recipe::{DataFormat, Recipe, Task};
pub use tokenizer::TextTokenizer;
pub use trainer::{train, Reporter, StepReport, TrainOptions, TrainSummary};

/// The label names a classifier adapter was trained with (its safetensors metadata), if any.
pub fn adapter_labels(adapter_dir: &std::path::Path) -> Option<Vec<String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(adapter_dir.join("adapter_model.safetensors")).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    let labels = v.get("__metadata__")?.get(LABELS_METADATA)?.as_str()?;
    serde_json::from_str(labels).ok()
}
