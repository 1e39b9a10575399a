//! Which architectures lorakit builds, keyed on the Hugging Face `model_type` and the GGUF
//! `general.architecture`. Adding an architecture is one file implementing [`Architecture`] and
//! [`crate::ModelConfig`], plus one line in [`ARCHITECTURES`].
use crate::error::{ModelError, Result};
use crate::gguf::GgufHeader;
use crate::model::ModelConfig;
use candle_core::Tensor;
use serde_json::Value;
use std::path::Path;

/// One family of models: how to read its config and, where llama.cpp has it, its GGUF files.
pub trait Architecture: Sync {
    /// The Hugging Face `model_type` values it reads.
    fn model_types(&self) -> &'static [&'static str];

    /// Parses config.json (already known to carry one of [`Architecture::model_types`]).
    fn parse_config(&self, json: Value, file: &Path) -> Result<Box<dyn ModelConfig>>;

    /// The GGUF `general.architecture` values it reads (none: no GGUF support).
    fn gguf_architectures(&self) -> &'static [&'static str] {
        &[]
    }

    /// config.json, as transformers writes it, for a GGUF file of this architecture.
    fn gguf_config_json(&self, _header: &GgufHeader, file: &Path) -> Result<Value> {
        Err(ModelError::Config {
            file: file.to_path_buf(),
            key: "general.architecture".into(),
            message: "lorakit reads no GGUF files of this architecture".into(),
        })
    }

    /// The Hugging Face name of a llama.cpp tensor (`blk.3.attn_q.weight` →
    /// `model.layers.3.self_attn.q_proj.weight`); `None` for a name it does not know.
    fn hf_tensor_name(&self, _gguf_name: &str) -> Option<String> {
        None
    }

    /// A dequantised GGUF tensor (already under its Hugging Face name) in the Hugging Face
    /// layout; `config` is [`Architecture::gguf_config_json`]'s result. Must treat a 2-D
    /// weight row by row (rows reordered, or the tensor changed as a whole): a base kept
    /// quantized applies the row order this gives a column of row numbers to the stored
    /// blocks, and dequantizes a tensor whose conversion is anything else.
    fn gguf_tensor_to_hf(&self, _hf_name: &str, t: Tensor, _config: &Value) -> Result<Tensor> {
        Ok(t)
    }
}

/// Every architecture lorakit builds. One line per architecture.
pub static ARCHITECTURES: &[&dyn Architecture] = &[
    &crate::llama::LlamaFamily,
    &crate::llama::gemma3::Gemma3,
    &crate::gpt2::Gpt2Family,
    &crate::bert::Bert,
];

/// The `model_type`s lorakit reads, for messages.
pub fn model_types() -> Vec<&'static str> {
    ARCHITECTURES
        .iter()
        .flat_map(|a| a.model_types().iter().copied())
        .collect()
}

/// The GGUF `general.architecture`s lorakit reads, for messages.
pub fn gguf_architectures() -> Vec<&'static str> {
    ARCHITECTURES
        .iter()
        .flat_map(|a| a.gguf_architectures().iter().copied())
        .collect()
}

/// The architecture of a Hugging Face `model_type`.
pub fn by_model_type(model_type: &str) -> Option<&'static dyn Architecture> {
    ARCHITECTURES
        .iter()
        .copied()
        .find(|a| a.model_types().contains(&model_type))
}

/// The architecture of a GGUF `general.architecture`.
pub fn by_gguf_architecture(name: &str) -> Option<&'static dyn Architecture> {
    ARCHITECTURES
        .iter()
        .copied()
        .find(|a| a.gguf_architectures().contains(&name))
}

/// Parses a config.json through the architecture its `model_type` names (`llama` when absent,
/// as in early Llama releases).
pub fn parse_config(json: Value, file: &Path) -> Result<Box<dyn ModelConfig>> {
    let model_type = json
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("llama")
        .to_string();
    let arch = by_model_type(&model_type).ok_or_else(|| ModelError::Config {
        file: file.to_path_buf(),
        key: "model_type".into(),
        message: format!(
            "{model_type:?} is not supported (supported: {})",
            model_types().join(", ")
        ),
    })?;
    arch.parse_config(json, file)
}

/// Reads and parses `path` (a config.json).
pub fn read_config(path: &Path) -> Result<Box<dyn ModelConfig>> {
    parse_config(read_json(path)?, path)
}

/// A JSON file (config.json), errors naming it.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_belongs_to_one_architecture() {
        let types = model_types();
        let mut unique = types.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), types.len(), "{types:?}");
        for t in &types {
            assert!(by_model_type(t).is_some());
        }
        for g in gguf_architectures() {
            assert!(by_gguf_architecture(g).is_some());
        }
        assert!(by_model_type("gpt_neox").is_none());
    }

    #[test]
    fn an_unknown_model_type_is_named_with_the_supported_ones() {
        let e = parse_config(
            serde_json::json!({"model_type": "gpt_neox"}),
            Path::new("c.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("c.json")
                && e.contains("gpt_neox")
                && e.contains("phi3, gemma3_text, gemma3, gpt2, bert"),
            "{e}"
        );
    }
}
