//! A Hugging Face model directory, with an adapter folded in, written as a GGUF model llama.cpp
//! runs — what llama.cpp's `convert_hf_to_gguf.py` does for the dense text models whose
//! metadata llama.cpp reads without extra tensors: Llama (and Mistral without a sliding window,
//! which llama.cpp converts as `llama`), Qwen2 and Qwen3. Their `<arch>.*` keys come from
//! config.json, the tokenizer's from the caller (`tokenizer.ggml.*`), tensors under llama.cpp's
//! names, q/k rows permuted for `llama`. Refused, by name: RoPE scaling (llama.cpp's `rope_freqs`
//! tensor), sliding windows, other architectures (their GGUF base works: `merged_gguf`).
use crate::adapter_gguf::Base;
use crate::error::{ExportError, Result};
use crate::gguf_writer::{self, TensorSpec};
use crate::merged_gguf::{add_finite, fitting, MergedGguf, Quantize};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use lorakit_adapter::PeftAdapter;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::Path;

/// `<arch>.*` and `general.*` metadata from config.json.
fn model_metadata(
    config: &Json,
    arch: &str,
    file: &Path,
    name: &str,
) -> Result<Vec<(String, Value)>> {
    let int = |k: &str| -> Result<u32> {
        config[k]
            .as_u64()
            .map(|v| v as u32)
            .ok_or_else(|| ExportError::invalid(file, k, "missing or not an integer"))
    };
    let rope = &config["rope_parameters"];
    let scaling = config["rope_scaling"]
        .get("rope_type")
        .or_else(|| config["rope_scaling"].get("type"))
        .or_else(|| rope.get("rope_type"))
        .and_then(Json::as_str)
        .unwrap_or("default");
    if scaling != "default" {
        return Err(ExportError::Unsupported(format!(
            "{}: RoPE scaling {scaling:?}: llama.cpp reads it from extra tensors lorakit does not write; pass the base as GGUF (convert_hf_to_gguf.py), or merge into a directory",
            file.display()
        )));
    }
    let window = config["sliding_window"].as_u64();
    let positions = config["max_position_embeddings"].as_u64().unwrap_or(2048);
    if config["use_sliding_window"] != Json::Bool(false) && window.is_some_and(|w| w < positions) {
        return Err(ExportError::Unsupported(format!(
            "{}: sliding_window {}: the llama.cpp `{arch}` architecture attends over the whole context; pass the base as GGUF, or merge into a directory",
            file.display(),
            window.unwrap_or(0)
        )));
    }
    let theta = config["rope_theta"]
        .as_f64()
        .or_else(|| rope["rope_theta"].as_f64())
        .unwrap_or(10_000.0);
    let heads = int("num_attention_heads")?;
    let head_dim = config["head_dim"]
        .as_u64()
        .map(|d| d as u32)
        .unwrap_or(int("hidden_size")? / heads.max(1));
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.name".to_string(), Value::String(name.into())),
        (k("block_count"), Value::U32(int("num_hidden_layers")?)),
        (k("context_length"), Value::U32(positions as u32)),
        (k("embedding_length"), Value::U32(int("hidden_size")?)),
        (
            k("feed_forward_length"),
            Value::U32(int("intermediate_size")?),
        ),
        (k("attention.head_count"), Value::U32(heads)),
        (
            k("attention.head_count_kv"),
            Value::U32(
                config["num_key_value_heads"]
                    .as_u64()
                    .map(|v| v as u32)
                    .unwrap_or(heads),
            ),
        ),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(config["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32),
        ),
        (k("rope.freq_base"), Value::F32(theta as f32)),
        (k("attention.key_length"), Value::U32(head_dim)),
        (k("attention.value_length"), Value::U32(head_dim)),
    ];
    if arch == "llama" {
        m.push((k("vocab_size"), Value::U32(int("vocab_size")?)));
        m.push((k("rope.dimension_count"), Value::U32(head_dim)));
    }
    Ok(m)
}

/// Writes the Hugging Face model `base` with `adapter` folded in as the GGUF model `out`, its
/// 2-D weights as `quantize` (F16 by default, as llama.cpp's converter), `tokenizer` the
/// `tokenizer.ggml.*` metadata.
pub fn merge_hf_to_gguf(
    adapter: &PeftAdapter,
    base: &Base,
    out: &Path,
    quantize: Option<Quantize>,
    tokenizer: Vec<(String, Value)>,
) -> Result<MergedGguf> {
    let dir = base.model.path.as_path();
    let arch = base.layout.arch;
    if !["llama", "qwen2", "qwen3"].contains(&arch) {
        return Err(ExportError::Unsupported(format!(
            "{}: lorakit writes merged GGUF models from Hugging Face directories for llama, mistral, qwen2 and qwen3 ({arch} needs metadata llama.cpp's converter derives); pass the base as GGUF, or merge into a directory",
            dir.display()
        )));
    }
    adapter.check_pairs_only("a merged GGUF model")?;
    let config_file = dir.join("config.json");
    let config = lorakit_models::registry::read_json(&config_file)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let quantize = quantize.unwrap_or(Quantize::F16);
    let mut metadata = model_metadata(&config, arch, &config_file, &name)?;
    metadata.push(("general.file_type".into(), Value::U32(quantize.file_type())));
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    metadata.extend(tokenizer);

    let ckpt = base.model.checkpoint().ok_or_else(|| {
        ExportError::Unsupported(format!("{}: not a safetensors checkpoint", dir.display()))
    })?;
    // adapted weight (Hugging Face name) → module
    let mut adapted: BTreeMap<String, &str> = BTreeMap::new();
    for m in adapter.modules() {
        let key = format!("{m}.weight");
        if ckpt.meta(&key).is_err() {
            return Err(ExportError::Unsupported(format!(
                "{}: module `{m}`: the base {} has no weight `{key}`",
                adapter.weights_file(),
                dir.display()
            )));
        }
        adapted.insert(key, m);
    }
    let mut names: Vec<(String, String)> = Vec::new();
    for n in ckpt.names() {
        if n.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        let g = base.layout.gguf_tensor(n).ok_or_else(|| {
            ExportError::invalid(
                dir,
                n,
                format!("no llama.cpp `{arch}` tensor of this name; lorakit cannot place it"),
            )
        })?;
        names.push((n.to_string(), g));
    }
    names.sort_by(|a, b| a.1.cmp(&b.1));
    let mut specs = Vec::new();
    let mut fell_back = 0;
    for (hf, g) in &names {
        let dims = ckpt.meta(hf)?.shape.clone();
        let dtype = if dims.len() < 2 {
            GgmlDType::F32
        } else {
            let want = quantize.ggml();
            let got = fitting(want, dims[dims.len() - 1]);
            if got != want {
                fell_back += 1;
            }
            got
        };
        specs.push(TensorSpec {
            name: g.clone(),
            dims,
            dtype,
        });
    }
    let mut merged = 0;
    let bytes = gguf_writer::write(out, &metadata, &specs, |i| {
        let (hf, _) = &names[i];
        let mut w = ckpt.load(hf, &Device::Cpu)?.to_dtype(DType::F32)?;
        if let Some(m) = adapted.get(hf) {
            let delta = adapter.delta(m)?.ok_or_else(|| {
                ExportError::Unsupported(format!("internal: module `{m}` has no LoRA pair"))
            })?;
            w = add_finite(&w, &delta, hf)?;
            merged += 1;
        }
        if base.layout.permutes_qk() {
            let module = hf.rsplit_once('.').map(|(m, _)| m).unwrap_or(hf);
            w = if w.rank() == 1 {
                let n = w.dim(0)?;
                base.layout
                    .rows_to_gguf(module, &w.reshape((n, 1))?)?
                    .reshape(n)?
            } else {
                base.layout.rows_to_gguf(module, &w)?
            };
        }
        gguf_writer::encode(&w, specs[i].dtype)
    })?;
    Ok(MergedGguf {
        merged,
        tensors: specs.len(),
        bytes,
        fell_back,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_scaling_and_windows_are_refused_by_name() {
        let f = Path::new("config.json");
        let base = serde_json::json!({"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
            "num_attention_heads": 4, "vocab_size": 96, "max_position_embeddings": 64});
        let mut c = base.clone();
        c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
        let e = model_metadata(&c, "llama", f, "m").unwrap_err().to_string();
        assert!(e.contains("RoPE scaling") && e.contains("llama3"), "{e}");
        let mut c = base.clone();
        c["sliding_window"] = 16.into();
        let e = model_metadata(&c, "llama", f, "m").unwrap_err().to_string();
        assert!(e.contains("sliding_window 16"), "{e}");
        let m = model_metadata(&base, "llama", f, "m").unwrap();
        assert!(m
            .iter()
            .any(|(k, v)| k == "llama.rope.dimension_count" && matches!(v, Value::U32(8))));
    }
}
