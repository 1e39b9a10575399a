//! Hugging Face Hub model ids (`HuggingFaceTB/SmolLM2-135M-Instruct`, optionally `@revision`)
//! resolved to a local snapshot directory through `hf-hub` (its cache, `HF_HOME`, `HF_TOKEN`).
use crate::error::{ModelError, Result};
use std::path::{Path, PathBuf};

/// Files a model directory needs; the weights are found from the index or the single file.
const FILES: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &[
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// `org/name` or `org/name@revision`, not a path that exists.
pub fn looks_like_hub_id(spec: &str) -> bool {
    let id = spec.split('@').next().unwrap_or("");
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| ok(p)) && !Path::new(spec).exists()
}

/// A local path as given, or a hub id downloaded (once) into the hub cache.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let spec = path.to_string_lossy();
    if path.exists() || !looks_like_hub_id(&spec) {
        return Ok(path.to_path_buf());
    }
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (spec.to_string(), "main".to_string()),
    };
    download(&id, &revision).map_err(|message| ModelError::Config {
        file: path.to_path_buf(),
        key: "model".into(),
        message: format!(
            "not a local directory or .gguf file, and fetching it from the Hugging Face Hub failed: {message}. \
             Offline, point to a local model directory (config.json + model.safetensors + tokenizer.json) or a .gguf file instead"
        ),
    })
}

fn download(id: &str, revision: &str) -> std::result::Result<PathBuf, String> {
    use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
    let mut builder = ApiBuilder::from_env();
    if token.is_some() {
        builder = builder.with_token(token);
    }
    let api = builder
        .with_progress(false)
        .build()
        .map_err(|e| e.to_string())?;
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let mut dir = None;
    for f in FILES {
        let p = repo.get(f).map_err(|e| format!("{f}: {e}"))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    for f in OPTIONAL {
        let _ = repo.get(f);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let mut shards: Vec<&str> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|s| s.as_str()).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                repo.get(s).map_err(|e| format!("{s}: {e}"))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| format!("model.safetensors: {e}"))?;
        }
    }
    dir.ok_or_else(|| "no snapshot directory".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(looks_like_hub_id("org/model.v2@a1b2c3"));
        for p in [
            "./org/model",
            "/abs/path",
            "model",
            "a/b/c",
            "org/",
            "../x/y",
        ] {
            assert!(!looks_like_hub_id(p), "{p}");
        }
    }

    #[test]
    fn offline_hub_failure_suggests_a_local_path() {
        // Point the hub at a closed local port: fails fast, offline or not.
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
        std::env::set_var("HF_HOME", std::env::temp_dir().join("lorakit-hub-test"));
        let e = resolve(Path::new("no-such-org/no-such-model"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no-such-org/no-such-model"), "{e}");
        assert!(
            e.contains("Hugging Face Hub") && e.contains("local model directory"),
            "{e}"
        );
    }
}
