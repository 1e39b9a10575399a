//! The other direction of [`crate::gguf_tokenizer`]: a Hugging Face directory's byte-level BPE
//! tokenizer (`tokenizer.json`, `tokenizer_config.json`) as the `tokenizer.ggml.*` metadata
//! llama.cpp's converter writes — tokens by id with their types (added special tokens control,
//! other added tokens user-defined, ids past the tokenizer's end unused), merges, the
//! pre-tokenizer by llama.cpp's name, special token ids, `add_bos_token`, the chat template.
//! Only pre-tokenizers lorakit reads back identically are written; others are refused by name.
use crate::gguf_tokenizer::{pre_tokenizer, SUPPORTED_PRE};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::path::Path;

/// `(file, message)` of what cannot be written.
pub type VocabError = (String, String);

/// `v` without the keys that do not change how text is split (`trim_offsets` only moves offsets).
fn canonical(v: &Json) -> Json {
    match v {
        Json::Object(m) => Json::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "trim_offsets")
                .map(|(k, v)| (k.clone(), canonical(v)))
                .collect(),
        ),
        Json::Array(a) => Json::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// llama.cpp's name for a `tokenizer.json` pre-tokenizer, if lorakit knows it.
pub fn pre_name(pre: &Json) -> Option<&'static str> {
    let want = canonical(pre);
    SUPPORTED_PRE
        .iter()
        .filter(|n| **n != "default")
        .find(|n| pre_tokenizer(n).is_some_and(|p| canonical(&p) == want))
        .copied()
}

/// The `tokenizer.ggml.*` and `tokenizer.chat_template` metadata of the tokenizer in `dir`, for
/// a model of `vocab_size` embedding rows.
pub fn gguf_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>, VocabError> {
    let file = dir.join("tokenizer.json");
    let name = file.display().to_string();
    let err = |m: String| (name.clone(), m);
    let text = std::fs::read_to_string(&file).map_err(|e| err(e.to_string()))?;
    let t: Json = serde_json::from_str(&text).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let model = &t["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == Json::Bool(true) {
        return Err(err(format!(
            "model type {} (byte_fallback {}): lorakit writes GGUF tokenizers for byte-level BPE (GPT-2 style) only; convert SentencePiece models with llama.cpp's convert_hf_to_gguf.py",
            model["type"], model["byte_fallback"]
        )));
    }
    let pre = pre_name(&t["pre_tokenizer"]).ok_or_else(|| {
        err(format!(
            "pre_tokenizer {} is none llama.cpp knows by a name lorakit can write ({})",
            t["pre_tokenizer"],
            SUPPORTED_PRE.join(", ")
        ))
    })?;
    if !t["normalizer"].is_null() {
        return Err(err(format!(
            "normalizer {}: llama.cpp's byte-level BPE applies none",
            t["normalizer"]
        )));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| err("model.vocab is not an object".into()))?;
    let mut put = |id: u64, tok: &str, ty: i32| -> Result<(), VocabError> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            err(format!(
                "token {tok:?} has id {id}, beyond the model's {vocab_size} embedding rows"
            ))
        })?;
        *slot = Some(tok.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    for (tok, id) in vocab {
        put(
            id.as_u64()
                .ok_or_else(|| err(format!("vocab id of {tok:?}")))?,
            tok,
            1,
        )?;
    }
    let mut content_to_id = std::collections::HashMap::new();
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(err(format!("added token {a} lacks an id or content")));
        };
        put(
            id,
            c,
            if a["special"] == Json::Bool(true) {
                3
            } else {
                4
            },
        )?;
        content_to_id.insert(c.to_string(), id);
    }
    // ids past the tokenizer's end (embedding rows padded to a round size) are unused (type 5)
    let types: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .map(|(t, ty)| Value::I32(if t.is_some() { *ty } else { 5 }))
        .collect();
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| Value::String(t.unwrap_or_else(|| format!("[PAD{i}]"))))
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .ok_or_else(|| err("model.merges is not a list".into()))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(p) if p.len() == 2 => Ok(Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            ))),
            other => Err(err(format!("merge {other} is neither \"a b\" nor [a, b]"))),
        })
        .collect::<Result<_, _>>()?;
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    // special tokens and flags from tokenizer_config.json
    let cfg_file = dir.join("tokenizer_config.json");
    if let Ok(text) = std::fs::read_to_string(&cfg_file) {
        let cfg: Json = serde_json::from_str(&text)
            .map_err(|e| (cfg_file.display().to_string(), format!("invalid JSON: {e}")))?;
        let token_id = |k: &str| -> Option<u64> {
            let v = &cfg[k];
            let s = v.as_str().or_else(|| v["content"].as_str())?;
            content_to_id
                .get(s)
                .copied()
                .or_else(|| vocab.get(s).and_then(Json::as_u64))
        };
        for (k, key) in [
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        ] {
            if let Some(id) = token_id(k) {
                out.push((format!("tokenizer.ggml.{key}"), Value::U32(id as u32)));
            }
        }
        if let Some(b) = cfg["add_bos_token"].as_bool() {
            out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
        }
        let template = match &cfg["chat_template"] {
            Json::String(s) => Some(s.clone()),
            Json::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(String::from),
            _ => None,
        };
        if let Some(t) = template {
            out.push(("tokenizer.chat_template".into(), Value::String(t)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pre_tokenizer_lorakit_reads_is_recognised_and_others_are_not() {
        for name in ["gpt2", "smollm", "llama-bpe", "qwen2"] {
            assert_eq!(pre_name(&pre_tokenizer(name).unwrap()), Some(name));
        }
        let other = serde_json::json!({"type": "Whitespace"});
        assert_eq!(pre_name(&other), None);
    }
}
