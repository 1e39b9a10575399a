//! A `tokenizers::Tokenizer` rebuilt from a GGUF's `tokenizer.ggml.*` metadata, as llama.cpp
//! tokenises: `gpt2` — byte-level BPE (vocabulary, merges, control tokens) behind the
//! pre-tokenizer that `tokenizer.ggml.pre` names; `llama` — SentencePiece (Gemma, Llama 2,
//! Mistral 7B v0.1, TinyLlama): see [`sentencepiece_model`].
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

/// The `tokenizer.json` pre-tokenizer llama.cpp's `tokenizer.ggml.pre` name stands for.
pub(crate) fn pre_tokenizer(pre: &str) -> Option<serde_json::Value> {
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

/// The pieces of a tokenizer.json that differ between GGUF tokenizer types.
struct Parts {
    normalizer: serde_json::Value,
    pre_tokenizer: serde_json::Value,
    decoder: serde_json::Value,
    model: serde_json::Value,
}

/// GPT-2-style byte-level BPE with the file's merges.
fn byte_level_model(
    pre: Option<&str>,
    vocab: serde_json::Map<String, serde_json::Value>,
    merges: &[&str],
) -> Result<Parts, (String, String)> {
    let pre_name = pre.unwrap_or("default");
    let pre = pre_tokenizer(pre_name).ok_or_else(|| {
        (
            "tokenizer.ggml.pre".to_string(),
            format!(
                "pre-tokenizer {pre_name:?} is not supported (supported: {})",
                SUPPORTED_PRE.join(", ")
            ),
        )
    })?;
    for m in merges {
        if m.split(' ').count() != 2 {
            return Err((
                "tokenizer.ggml.merges".to_string(),
                format!("merge {m:?} is not two tokens separated by one space"),
            ));
        }
    }
    Ok(Parts {
        normalizer: serde_json::Value::Null,
        pre_tokenizer: pre,
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        model: json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}),
    })
}

/// llama.cpp's SentencePiece tokenizer as a BPE model. llama.cpp starts from the characters of
/// the text (spaces written `▁`) and repeatedly joins the adjacent pair whose concatenation is
/// the highest-scoring piece of the vocabulary (leftmost first on ties); characters no piece
/// covers become their UTF-8 bytes `<0xNN>`. A BPE whose merges are every split `(a, b)` of
/// every normal piece with both halves in the vocabulary, ranked by the piece's score, makes
/// the same choices; `byte_fallback` does the rest. User-defined pieces (Gemma's `\n` and runs
/// of spaces) are matched whole before, as added tokens.
fn sentencepiece_model(
    tokens: &[&str],
    types: &[u64],
    scores: &[f64],
    vocab: serde_json::Map<String, serde_json::Value>,
    space_prefix: bool,
) -> Parts {
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| (*t, i))
        .collect();
    // (score of the joined piece, its id, split point) for every usable split
    let mut merges: Vec<(f64, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // 1 = normal; control, user-defined, unused and byte pieces come from elsewhere
        if types[id] != 1 || ids.get(piece) != Some(&id) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            if ids.contains_key(&piece[..at]) && ids.contains_key(&piece[at..]) {
                merges.push((scores[id], id, at));
            }
        }
    }
    // highest score first; one piece's splits together, in split order
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .map(|&(_, id, at)| json!([&tokens[id][..at], &tokens[id][at..]]))
        .collect();
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let unk = ids
        .iter()
        .find(|(_, &i)| types[i] == 2)
        .map(|(t, _)| t.to_string());
    Parts {
        normalizer,
        pre_tokenizer: serde_json::Value::Null,
        decoder: json!({"type": "Sequence", "decoders": decoders}),
        model: json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges}),
    }
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
    if model != "gpt2" && model != "llama" {
        return Err(err("tokenizer.ggml.model", format!("{model:?} is not supported: lorakit builds GGUF tokenizers of type \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece); use the model's Hugging Face directory with its tokenizer.json")));
    }
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
        // a repeated piece keeps its first id, as llama.cpp's lookup does
        if !vocab.contains_key(*tok) {
            vocab.insert(tok.to_string(), json!(id));
        }
        // 3 = control, 4 = user-defined: matched whole, before BPE
        if *ty == 3 || *ty == 4 {
            added.push(
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *ty == 3}),
            );
        }
    }
    let Parts {
        normalizer,
        pre_tokenizer,
        decoder,
        model,
    } = if model == "gpt2" {
        let merges = strings("tokenizer.ggml.merges")?;
        byte_level_model(
            get("tokenizer.ggml.pre").and_then(Value::as_str),
            vocab,
            &merges,
        )?
    } else {
        let scores: Vec<f64> = match get("tokenizer.ggml.scores") {
            Some(Value::Array(a)) if a.len() == tokens.len() => a
                .iter()
                .map(|v| match v {
                    Value::F64(f) => Ok(f),
                    _ => Err(err("tokenizer.ggml.scores", "expected floats".into())),
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(err(
                    "tokenizer.ggml.scores",
                    format!("missing or not {} floats, one per token", tokens.len()),
                ))
            }
        };
        // llama.cpp's default for SentencePiece vocabularies is a space before the text
        let space_prefix = !matches!(
            get("tokenizer.ggml.add_space_prefix"),
            Some(Value::Bool(false))
        );
        sentencepiece_model(&tokens, &types, &scores, vocab, space_prefix)
    };
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
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": decoder,
        "model": model,
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
