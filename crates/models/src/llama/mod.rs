//! Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3 decoders: one family, differing in biases,
//! attention windows (per layer for Gemma 3), Qwen3's and Gemma's per-head q/k norms, Phi-3's
//! fused projections and Gemma's norms, activation and scales. `config` reads config.json, `model` is the network, `gguf` is llama.cpp's naming.
mod config;
pub mod gemma3;
pub mod gguf;
mod model;

pub use config::{Activation, Arch, LayerKind, LayerKinds, LlamaConfig, RopeScaling};
pub use model::Llama;

use crate::error::{ModelError, Result};
use crate::model::{Dimensions, Model, ModelConfig, Task};
use crate::registry::Architecture;
use candle_core::DType;
use lorakit_adapter::LayerBuilder;
use serde_json::Value;
use std::path::Path;

/// The registry entry of the Llama family.
pub struct LlamaFamily;

impl Architecture for LlamaFamily {
    fn model_types(&self) -> &'static [&'static str] {
        &["llama", "mistral", "qwen2", "qwen3", "phi3"]
    }

    fn parse_config(&self, json: Value, file: &Path) -> Result<Box<dyn ModelConfig>> {
        Ok(Box::new(LlamaConfig::from_json(json, file)?))
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["llama"]
    }

    fn gguf_config_json(&self, header: &crate::gguf::GgufHeader, file: &Path) -> Result<Value> {
        gguf::config_json(header, file)
    }

    fn hf_tensor_name(&self, gguf_name: &str) -> Option<String> {
        gguf::hf_name(gguf_name)
    }

    fn gguf_tensor_to_hf(
        &self,
        hf_name: &str,
        t: candle_core::Tensor,
        config: &Value,
    ) -> Result<candle_core::Tensor> {
        gguf::to_hf_layout(hf_name, t, config)
    }
}

impl ModelConfig for LlamaConfig {
    fn model_type(&self) -> &'static str {
        self.arch.name()
    }

    fn dimensions(&self) -> Dimensions {
        Dimensions {
            layers: self.num_hidden_layers,
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            vocab: self.vocab_size,
            tied_embeddings: self.tie_word_embeddings,
        }
    }

    fn declared_dtype(&self) -> Option<DType> {
        self.dtype
    }

    fn default_task(&self) -> Task {
        Task::CausalLm
    }

    fn build(&self, lb: &LayerBuilder, task: Task) -> Result<Model> {
        match task {
            Task::CausalLm => Ok(Model::CausalLm(Box::new(Llama::new(self, lb)?))),
            other => Err(ModelError::Input(format!(
                "a {} model is built for causal_lm, not {}",
                self.arch.name(),
                other.name()
            ))),
        }
    }

    fn may_leave_unused(&self, name: &str) -> bool {
        name.ends_with("rotary_emb.inv_freq")
            || (self.tie_word_embeddings && name == "lm_head.weight")
            // a multimodal checkpoint's vision tower and projector
            || (self.multimodal && !name.contains("language_model"))
    }
}
