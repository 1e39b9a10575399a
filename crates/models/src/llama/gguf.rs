//! llama.cpp's side of a Llama model: its tensor names, its `llama.*` metadata as a
//! config.json, and its q/k row order.
use crate::error::{ModelError, Result};
use crate::gguf::{GgufHeader, Value};
use std::path::Path;

/// The Hugging Face module path of a llama.cpp tensor name (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`).
pub fn hf_name(gguf: &str) -> Option<String> {
    let block = |part: &str| {
        Some(match part {
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            "attn_norm" => "input_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            _ => return None,
        })
    };
    map_name(gguf, &[("output", "lm_head")], block)
}

/// A llama.cpp tensor name under its Hugging Face name: `token_embd` and `output_norm` as every
/// llama.cpp decoder names them, `top` for other whole-model tensors, and `blk.N.<part>` through
/// `block` (the architecture's names for a layer's parts); `None` for names it does not know.
pub(crate) fn map_name(
    gguf: &str,
    top: &[(&str, &str)],
    block: impl Fn(&str) -> Option<&'static str>,
) -> Option<String> {
    let (stem, suffix) = gguf.rsplit_once('.')?;
    let mapped = match stem {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        _ => match top.iter().find(|(g, _)| *g == stem) {
            Some((_, hf)) => hf.to_string(),
            None => {
                let (n, part) = stem.strip_prefix("blk.")?.split_once('.')?;
                let n: usize = n.parse().ok()?;
                format!("model.layers.{n}.{}", block(part)?)
            }
        },
    };
    Some(format!("{mapped}.{suffix}"))
}

/// `config.json` of a llama GGUF as transformers writes it for `LlamaForCausalLM`.
pub fn config_json(header: &GgufHeader, path: &Path) -> Result<serde_json::Value> {
    let num = |k: &str| header.arch_u64(k, path);
    let vocab = header
        .tensor_dims("token_embd.weight")
        .ok_or_else(|| ModelError::Config {
            file: path.to_path_buf(),
            key: "token_embd.weight".into(),
            message: "missing".into(),
        })?
        .get(1)
        .copied()
        .unwrap_or(0);
    let heads = num("attention.head_count")?;
    crate::layer_count::check(
        num("block_count")?,
        header.tensors.iter().map(|t| t.name.as_str()),
        path,
        "llama.block_count",
        "the file",
    )?;
    let json = serde_json::json!({
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": num("embedding_length")?,
        "intermediate_size": num("feed_forward_length")?,
        "num_hidden_layers": num("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": num("attention.head_count_kv").unwrap_or(heads),
        "rms_norm_eps": header.arch_f64("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        "rope_theta": header.arch_f64("rope.freq_base").unwrap_or(10_000.0),
        "max_position_embeddings": num("context_length").unwrap_or(2048),
        "tie_word_embeddings": header.tensor_dims("output.weight").is_none(),
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "bos_token_id": header.metadata.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64),
        "eos_token_id": header.metadata.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64),
    });
    Ok(json)
}

/// q/k rows back from llama.cpp's interleaved-RoPE order into the Hugging Face order (head
/// counts from `config`, [`config_json`]'s result); other tensors as they are.
pub fn to_hf_layout(
    hf_name: &str,
    t: candle_core::Tensor,
    config: &serde_json::Value,
) -> Result<candle_core::Tensor> {
    let count = |k: &str| config.get(k).and_then(serde_json::Value::as_u64);
    let heads = if hf_name.ends_with("self_attn.q_proj.weight") {
        count("num_attention_heads")
    } else if hf_name.ends_with("self_attn.k_proj.weight") {
        count("num_key_value_heads").or(count("num_attention_heads"))
    } else {
        return Ok(t);
    };
    Ok(unpermute_rope_rows(&t, heads.unwrap_or(1) as usize)?)
}

/// Inverse of llama.cpp's `permute` of q/k weights: within each head, rows stored as interleaved
/// pairs (0, d/2, 1, d/2+1, ...) go back to halves (0..d/2, d/2..d).
pub fn unpermute_rope_rows(
    w: &candle_core::Tensor,
    heads: usize,
) -> candle_core::Result<candle_core::Tensor> {
    let (out, inp) = w.dims2()?;
    let d = out / heads.max(1);
    w.reshape((heads, d / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}
