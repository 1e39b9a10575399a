//! A `tokenizers::Tokenizer` rebuilt from a GGUF's `tokenizer.ggml.*` metadata, as llama.cpp
//! tokenises: GPT-2 byte-level BPE (vocabulary, merges, control tokens) behind the pre-tokenizer
//! that `tokenizer.ggml.pre` names.
use lorakit_models::gguf::{GgufHeader, Value};
use serde_json::json;

/// What the tokenizer needs besides the `tokenizers::Tokenizer`.
pub struct GgufTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub chat_template: Option<String>,
}

/// llama.cpp's GPT-2-style split regexes by `tokenizer.ggml.pre` (all followed by byte-level
/// BPE); `None` means the GPT-2 regex of the ByteLevel pre-tokenizer itself.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub const SUPPORTED_PRE: &[&str] = &["default", "gpt2", "smollm", "llama-bpe", "qwen2"];

fn pre_tokenizer(pre: &str) -> Option<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "default" | "gpt2" => byte_level(true),
        // SmolLM: every digit alone, then GPT-2's regex
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        "qwen2" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]})
        }
        _ => return None,
    })
}

/// Builds the tokenizer; errors are `(metadata key, message)`.
pub fn from_header(h: &GgufHeader) -> Result<GgufTokenizer, (String, String)> {
    let err = |k: &str, m: String| (k.to_string(), m);
    let get = |k: &str| h.metadata.get(k);
    let model = get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            err(
                "tokenizer.ggml.model",
                "missing: this GGUF carries no tokenizer; use the model's Hugging Face directory"
                    .into(),
            )
        })?;
    if model != "gpt2" {
        return Err(err("tokenizer.ggml.model", format!("{model:?} is not supported: lorakit builds GGUF tokenizers of type \"gpt2\" (byte-level BPE); for SentencePiece models use the Hugging Face directory with its tokenizer.json")));
    }
    let pre_name = get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let pre = pre_tokenizer(pre_name).ok_or_else(|| {
        err(
            "tokenizer.ggml.pre",
            format!(
                "pre-tokenizer {pre_name:?} is not supported (supported: {})",
                SUPPORTED_PRE.join(", ")
            ),
        )
    })?;
    let strings = |k: &str| -> Result<Vec<&str>, (String, String)> {
        match get(k) {
            Some(Value::Array(a)) => a
                .strings()
                .map(|v| v.iter().map(String::as_str).collect())
                .ok_or_else(|| err(k, "expected an array of strings".into())),
            _ => Err(err(k, "missing or not an array".into())),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = match get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) if a.len() == tokens.len() => {
            a.iter().map(|v| v.as_u64().unwrap_or(1)).collect()
        }
        Some(_) => {
            return Err(err(
                "tokenizer.ggml.token_type",
                format!("expected {} integers, one per token", tokens.len()),
            ))
        }
        None => vec![1; tokens.len()],
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert(tok.to_string(), json!(id));
        // 3 = control, 4 = user-defined: matched whole, before BPE
        if *ty == 3 || *ty == 4 {
            added.push(
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *ty == 3}),
            );
        }
    }
    for m in &merges {
        if m.split(' ').count() != 2 {
            return Err(err(
                "tokenizer.ggml.merges",
                format!("merge {m:?} is not two tokens separated by one space"),
            ));
        }
    }
    let id = |k: &str| -> Result<Option<u32>, (String, String)> {
        match get(k) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(i) if (i as usize) < tokens.len() => Ok(Some(i as u32)),
                _ => Err(err(
                    k,
                    format!("expected a token id below {}", tokens.len()),
                )),
            },
        }
    };
    let bos_id = id("tokenizer.ggml.bos_token_id")?;
    let eos_id = id("tokenizer.ggml.eos_token_id")?;
    let pad_id = id("tokenizer.ggml.padding_token_id")?;
    let add_bos = matches!(get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
    let post = match (add_bos, bos_id) {
        (true, Some(b)) => {
            let bos = tokens[b as usize];
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [b], "tokens": [bos]}}})
        }
        _ => serde_json::Value::Null,
    };
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    });
    let tokenizer: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| {
        err(
            "tokenizer.ggml.*",
            format!("cannot build the tokenizer: {e}"),
        )
    })?;
    let chat_template = get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .map(String::from);
    Ok(GgufTokenizer {
        tokenizer,
        bos_id,
        eos_id,
        pad_id,
        chat_template,
    })
}
