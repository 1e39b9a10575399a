//! The model's tokenizer: `tokenizer.json`, plus special tokens and the Jinja chat template
//! from `tokenizer_config.json` — or, for a GGUF file, all of that from its metadata.
use crate::error::{Result, TrainError};
use std::path::{Path, PathBuf};

/// Token ids and the byte span of each in the encoded text.
pub type IdsWithOffsets = (Vec<u32>, Vec<(usize, usize)>);

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub eos_id: Option<u32>,
    pub pad_id: u32,
    pub chat_template: Option<String>,
    /// Where the template came from, for messages.
    pub config_file: PathBuf,
}

/// `"<s>"` or `{"content": "<s>", ...}` (both forms appear in tokenizer_config.json).
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl TextTokenizer {
    /// The tokenizer of a model directory or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        if lorakit_models::is_gguf(path) {
            Self::from_gguf(path)
        } else {
            Self::from_model_dir(path)
        }
    }

    /// From a GGUF's `tokenizer.ggml.*` metadata and `tokenizer.chat_template`.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let header = lorakit_models::gguf::GgufHeader::from_file(path)?;
        let g = crate::gguf_tokenizer::from_header(&header)
            .map_err(|(key, m)| TrainError::io(path, format!("`{key}`: {m}")))?;
        let name = |id: Option<u32>| id.and_then(|i| g.tokenizer.id_to_token(i));
        Ok(TextTokenizer {
            bos: name(g.bos_id),
            eos: name(g.eos_id),
            eos_id: g.eos_id,
            pad_id: g.pad_id.or(g.eos_id).unwrap_or(0),
            chat_template: g.chat_template.clone(),
            inner: g.tokenizer,
            config_file: path.to_path_buf(),
        })
    }

    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TrainError::io(
                &path,
                "not found: training and eval need the model's tokenizer.json",
            ));
        }
        let mut inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| TrainError::io(&path, e))?;
        // Padding and truncation are ours to do (some tokenizer.json files pad to a fixed length).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TrainError::io(&path, e))?;
        let config_file = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&config_file) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| TrainError::io(&config_file, format!("invalid JSON: {e}")))?,
            Err(_) => serde_json::Value::Null,
        };
        let bos = token_string(cfg.get("bos_token"));
        let mut eos = token_string(cfg.get("eos_token"));
        let mut eos_id = eos.as_ref().and_then(|t| inner.token_to_id(t));
        if eos_id.is_none() {
            // fall back to config.json's eos_token_id
            if let Ok(text) = std::fs::read_to_string(dir.join("config.json")) {
                let c: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                let id = c
                    .get("eos_token_id")
                    .and_then(|v| v.as_u64().or_else(|| v.as_array()?.first()?.as_u64()));
                if let Some(id) = id {
                    eos_id = Some(id as u32);
                    eos = inner.id_to_token(id as u32);
                }
            }
        }
        let pad_id = token_string(cfg.get("pad_token"))
            .and_then(|t| inner.token_to_id(&t))
            .or(eos_id)
            .unwrap_or(0);
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(TextTokenizer {
            inner,
            bos,
            eos,
            eos_id,
            pad_id,
            chat_template,
            config_file,
        })
    }

    /// Token ids of `text`; `special` lets the tokenizer add its BOS/EOS post-processing.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, special)
            .map_err(|e| TrainError::io("tokenizer.json", e))?
            .get_ids()
            .to_vec())
    }

    /// Token ids with the byte span each covers in `text` (special tokens added by the
    /// tokenizer are not added here: chat templates spell them out).
    pub fn encode_with_offsets(&self, text: &str) -> Result<IdsWithOffsets> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TrainError::io("tokenizer.json", e))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`, special tokens included (so a chat transcript reads as the model saw it).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TrainError::io(&self.config_file, e))
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
