//! lorakit-models: differentiable transformer architectures written against
//! `lorakit_adapter::LayerBuilder`, so every linear layer can carry a LoRA adapter. Callers see
//! a model through [`model`]'s traits and open one through [`BaseModel`]; [`registry`] says
//! which architectures exist. Never mentions rank, alpha or merging.
pub mod base_model;
pub mod bert;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod hub;
pub mod layer_count;
pub mod llama;
pub mod model;
pub mod registry;

pub use base_model::{build, build_causal_lm, is_gguf, BaseModel, Quantization, QUANTIZE_TYPES};
pub use error::{ModelError, Result};
pub use model::{CausalLm, Dimensions, KvCache, Model, ModelConfig, SequenceClassifier, Task};
