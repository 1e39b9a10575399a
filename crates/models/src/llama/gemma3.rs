//! Gemma 3 (text): a Llama-family decoder (see [`super::LlamaConfig`]'s Gemma fields) with its
//! own registry entry, because its GGUF files differ from llama's: other tensor names (four
//! norms per layer), norm weights stored as `1 + w`, no q/k row permutation (llama.cpp rotates
//! Gemma's halves as transformers does), and metadata that leaves out what llama.cpp derives
//! (the layer pattern, the sliding layers' RoPE base, the query scale).
use super::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::{GgufHeader, Value};
use crate::model::ModelConfig;
use crate::registry::Architecture;
use candle_core::Tensor;
use std::path::Path;

/// Every `SLIDING_PATTERN`-th layer attends to the whole prefix, the others to a window
/// (llama.cpp's fixed pattern for `gemma3`; transformers' default `sliding_window_pattern`).
const SLIDING_PATTERN: usize = 6;
/// The sliding layers' RoPE base, which GGUF files do not carry.
const LOCAL_ROPE_BASE: f64 = 10_000.0;

/// The registry entry of Gemma 3.
pub struct Gemma3;

impl Architecture for Gemma3 {
    fn model_types(&self) -> &'static [&'static str] {
        &["gemma3_text", "gemma3"]
    }

    fn parse_config(&self, json: serde_json::Value, file: &Path) -> Result<Box<dyn ModelConfig>> {
        Ok(Box::new(LlamaConfig::from_json(json, file)?))
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["gemma3"]
    }

    fn gguf_config_json(&self, header: &GgufHeader, file: &Path) -> Result<serde_json::Value> {
        config_json(header, file)
    }

    fn hf_tensor_name(&self, gguf_name: &str) -> Option<String> {
        hf_name(gguf_name)
    }

    /// Norm weights back from llama.cpp's `1 + w` to transformers' `w`.
    fn gguf_tensor_to_hf(
        &self,
        hf_name: &str,
        t: Tensor,
        _config: &serde_json::Value,
    ) -> Result<Tensor> {
        if hf_name.ends_with("norm.weight") {
            Ok((t - 1.0)?)
        } else {
            Ok(t)
        }
    }
}

/// The Hugging Face name of a llama.cpp `gemma3` tensor.
pub fn hf_name(gguf: &str) -> Option<String> {
    let block = |part: &str| {
        Some(match part {
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            "attn_norm" => "input_layernorm",
            "post_attention_norm" => "post_attention_layernorm",
            "ffn_norm" => "pre_feedforward_layernorm",
            "post_ffw_norm" => "post_feedforward_layernorm",
            _ => return None,
        })
    };
    // no `output`: the head is tied to the embeddings
    super::gguf::map_name(gguf, &[], block)
}

/// `config.json` of a gemma3 GGUF as transformers writes it for `Gemma3ForCausalLM`, with what
/// the file leaves out filled in as llama.cpp does.
pub fn config_json(header: &GgufHeader, path: &Path) -> Result<serde_json::Value> {
    let num = |k: &str| header.arch_u64(k, path);
    let vocab = header
        .tensor_dims("token_embd.weight")
        .and_then(|d| d.get(1).copied())
        .ok_or_else(|| ModelError::Config {
            file: path.to_path_buf(),
            key: "token_embd.weight".into(),
            message: "missing or not 2-D".into(),
        })?;
    let layers = num("block_count")?;
    crate::layer_count::check(
        layers,
        header.tensors.iter().map(|t| t.name.as_str()),
        path,
        "gemma3.block_count",
        "the file",
    )?;
    let (hidden, heads) = (num("embedding_length")?, num("attention.head_count")?);
    let head_dim = num("attention.key_length")?;
    // llama.cpp scales scores by 1/√head_dim, except for the 62-layer (27B) model: 1/√(hidden/heads)
    let query_pre_attn_scalar = if layers == 62 {
        hidden / heads.max(1)
    } else {
        head_dim
    };
    let layer_types: Vec<&str> = (0..layers as usize)
        .map(|i| {
            if (i + 1) % SLIDING_PATTERN == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    let mut full = serde_json::json!({
        "rope_type": "default",
        "rope_theta": header.arch_f64("rope.freq_base").unwrap_or(1_000_000.0),
    });
    if header.arch_str("rope.scaling.type") == Some("linear") {
        full["rope_type"] = "linear".into();
        full["factor"] = header.arch_f64("rope.scaling.factor").unwrap_or(1.0).into();
    }
    Ok(serde_json::json!({
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": num("feed_forward_length")?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": num("attention.head_count_kv").unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": header.arch_f64("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        "rope_parameters": {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_ROPE_BASE},
        },
        "sliding_window": num("attention.sliding_window").unwrap_or(4096),
        "layer_types": layer_types,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "max_position_embeddings": num("context_length").unwrap_or(32768),
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": null,
        "attn_logit_softcapping": null,
        "tie_word_embeddings": header.tensor_dims("output.weight").is_none(),
        "bos_token_id": header.metadata.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64),
        "eos_token_id": header.metadata.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64),
        "pad_token_id": header.metadata.get("tokenizer.ggml.padding_token_id").and_then(Value::as_u64),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_the_four_norms_of_a_layer() {
        assert_eq!(
            hf_name("blk.2.ffn_norm.weight").as_deref(),
            Some("model.layers.2.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.2.post_attention_norm.weight").as_deref(),
            Some("model.layers.2.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_k_norm.weight").as_deref(),
            Some("model.layers.0.self_attn.k_norm.weight")
        );
        assert_eq!(hf_name("output.weight"), None);
    }
}
