//! lorakit-merge: folds a PEFT LoRA adapter into a safetensors checkpoint and writes an ordinary
//! Hugging Face model directory. Streaming (one tensor in memory at a time), f32 arithmetic with
//! a single rounding, architecture-agnostic (tensor names only), all-or-nothing output.
pub mod error;
pub mod merge;

pub use error::{MergeError, Result};
pub use merge::{merge, merge_pending, MergeOptions, MergeSummary, OutDType, PendingMerge};
