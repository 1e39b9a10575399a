//! lorakit-models: differentiable transformer architectures written against
//! `lorakit_adapter::LayerBuilder`, so every linear layer can carry a LoRA adapter. Full-sequence
//! logits, causal + padding masks, GQA, tied embeddings. Never mentions rank, alpha or merging.
pub mod attention;
pub mod attention_probs;
pub mod attention_recompute;
pub mod bert;
pub mod chunked_loss;
pub mod config;
pub mod error;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod layer_count;
pub mod llama;
pub mod load;
pub mod ops;
pub mod row_exp;

pub use config::{Arch, LlamaConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use llama::{CausalLm, KvCache};
pub use load::{build, is_gguf, ModelDir};
