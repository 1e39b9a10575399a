//! `config.json` of Llama-family models, read in both transformers 4 and 5 forms
//! (`rope_theta` top-level or inside `rope_parameters`; `torch_dtype` or `dtype`).
use crate::error::{ModelError, Result};
use candle_core::DType;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The architectures this crate builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma3 => "gemma3_text",
        }
    }
}

/// How rotary frequencies are scaled.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x frequency-band scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Which attention a layer has: over the whole prefix, or over the last `sliding_window` keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Full,
    Sliding,
}

/// The attention kind of every layer, without a per-layer list until the weights have confirmed
/// the layer count (a config may claim any number of layers).
#[derive(Clone, Debug, PartialEq)]
pub enum LayerKinds {
    /// Every layer alike.
    All(LayerKind),
    /// Every `n`-th layer full, the others sliding (Gemma 3 without `layer_types`).
    EveryNthFull(usize),
    /// One entry per layer (`layer_types`).
    Listed(Vec<LayerKind>),
}

impl LayerKinds {
    /// The kind of layer `i`.
    pub fn of(&self, i: usize) -> LayerKind {
        match self {
            LayerKinds::All(k) => *k,
            LayerKinds::EveryNthFull(n) if (i + 1).is_multiple_of(*n) => LayerKind::Full,
            LayerKinds::EveryNthFull(_) => LayerKind::Sliding,
            LayerKinds::Listed(v) => v.get(i).copied().unwrap_or(LayerKind::Full),
        }
    }
}

/// The MLP's gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `up · silu(gate)` (Llama and most others).
    Silu,
    /// `up · gelu_tanh(gate)` (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// The raw fields we read; everything else in config.json is ignored.
#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f64>,
    sliding_window_pattern: Option<usize>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    partial_rotary_factor: Option<f64>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// A resolved Llama-family configuration.
#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v projections (Qwen2: always; Llama: `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// The attention window of the [`LayerKind::Sliding`] layers (Mistral, Phi-3: every layer;
    /// Gemma 3: those `layer_types` names).
    pub sliding_window: Option<usize>,
    /// Each layer's attention: all `Full`, unless a window is configured.
    pub layer_types: LayerKinds,
    /// Gemma 3: the sliding layers' own RoPE base (unscaled); others use `rope_theta` throughout.
    pub sliding_rope_theta: Option<f64>,
    /// Gemma 3: RMSNorms compute `x·(1 + w)` (the checkpoint stores `w`), four per layer (the
    /// attention and MLP outputs are normed before the residual add, `pre_feedforward_layernorm`
    /// before the MLP), and embeddings are scaled by √hidden.
    pub gemma_norms: bool,
    pub activation: Activation,
    /// Gemma 3: attention scores scaled by `query_pre_attn_scalar^-½` instead of `head_dim^-½`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Qwen3: RMSNorm over each head of q and k (`q_norm`, `k_norm`, weight `[head_dim]`)
    /// before the rotary embedding.
    pub qk_norm: bool,
    /// Phi-3: q, k and v are one `qkv_proj` (rows q, then k, then v) and gate and up one
    /// `gate_up_proj` (gate rows first) — the module names PEFT targets.
    pub fused_projections: bool,
    /// The dtype the checkpoint declares (`torch_dtype` / `dtype`).
    pub dtype: Option<DType>,
    /// A multimodal checkpoint (`gemma3`) of which lorakit builds the language model: its
    /// weights live under `model.language_model.` (transformers 5) or `language_model.model.`.
    pub multimodal: bool,
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(crate::registry::read_json(path)?, path)
    }

    pub fn from_json(v: Value, file: &Path) -> Result<Self> {
        let err = |key: &str, message: String| ModelError::Config {
            file: file.to_path_buf(),
            key: key.into(),
            message,
        };
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama")
            .to_string();
        if model_type == "gemma3" {
            // the multimodal checkpoint: its text model is configured under `text_config`
            let mut text = v
                .get("text_config")
                .filter(|t| t.is_object())
                .cloned()
                .ok_or_else(|| {
                    err(
                        "text_config",
                        "missing: a gemma3 config.json describes its language model there".into(),
                    )
                })?;
            text["model_type"] = "gemma3_text".into();
            if text.get("dtype").is_none() && text.get("torch_dtype").is_none() {
                for k in ["dtype", "torch_dtype"] {
                    if let Some(d) = v.get(k) {
                        text[k] = d.clone();
                    }
                }
            }
            let mut cfg = Self::from_json(text, file)?;
            cfg.multimodal = true;
            return Ok(cfg);
        }
        let arch = match model_type.as_str() {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "phi3" => Arch::Phi3,
            "gemma3_text" => Arch::Gemma3,
            other => {
                return Err(err(
                    "model_type",
                    format!(
                        "{other:?} is not supported (supported: llama, mistral, qwen2, qwen3, phi3, gemma3_text, gemma3)"
                    ),
                ))
            }
        };
        let raw: Raw = serde_json::from_value(v).map_err(|e| {
            let msg = e.to_string();
            let key = msg.split('`').nth(1).unwrap_or("(config)").to_string();
            err(&key, msg)
        })?;
        debug_assert_eq!(raw.model_type.as_deref().unwrap_or("llama"), model_type);
        let gemma = arch == Arch::Gemma3;
        let activation = match (
            gemma,
            raw.hidden_activation.as_ref().or(raw.hidden_act.as_ref()),
        ) {
            (false, None) => Activation::Silu,
            (false, Some(a)) if a == "silu" => Activation::Silu,
            (true, None) => Activation::GeluTanh,
            (true, Some(a)) if a == "gelu_pytorch_tanh" || a == "gelu_new" => Activation::GeluTanh,
            (_, Some(act)) => {
                let key = if raw.hidden_activation.is_some() {
                    "hidden_activation"
                } else {
                    "hidden_act"
                };
                let want = if gemma {
                    "\"gelu_pytorch_tanh\""
                } else {
                    "\"silu\""
                };
                return Err(err(
                    key,
                    format!("{act:?} is not supported (expected {want})"),
                ));
            }
        };
        if gemma {
            if let Some(q) = raw
                .query_pre_attn_scalar
                .filter(|q| !(q.is_finite() && *q > 0.0))
            {
                return Err(err(
                    "query_pre_attn_scalar",
                    format!("must be a positive number, got {q}"),
                ));
            }
            for (key, v) in [
                ("final_logit_softcapping", raw.final_logit_softcapping),
                ("attn_logit_softcapping", raw.attn_logit_softcapping),
            ] {
                if let Some(v) = v {
                    return Err(err(
                        key,
                        format!("{v} is not supported (Gemma 3 has none: null)"),
                    ));
                }
            }
            if raw.use_bidirectional_attention == Some(true) {
                return Err(err(
                    "use_bidirectional_attention",
                    "bidirectional attention is not supported (causal language models only)".into(),
                ));
            }
        }
        if raw.num_attention_heads == 0 || raw.hidden_size == 0 || raw.num_hidden_layers == 0 {
            return Err(err(
                "num_attention_heads",
                "hidden_size, num_hidden_layers and num_attention_heads must be positive".into(),
            ));
        }
        let kv = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if kv == 0 || !raw.num_attention_heads.is_multiple_of(kv) {
            return Err(err(
                "num_key_value_heads",
                format!(
                    "{kv} does not divide num_attention_heads = {}",
                    raw.num_attention_heads
                ),
            ));
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if !head_dim.is_multiple_of(2) || head_dim == 0 {
            return Err(err(
                "head_dim",
                format!("{head_dim} must be even and positive for rotary embeddings"),
            ));
        }
        // Gemma 3 in transformers 5 keys `rope_parameters` by layer type
        let by_kind = |kind: &str| {
            raw.rope_parameters
                .as_ref()
                .and_then(|p| p.get(kind))
                .filter(|p| p.is_object())
        };
        let full_params = if gemma {
            by_kind("full_attention")
        } else {
            raw.rope_parameters.as_ref()
        };
        let params = full_params.and_then(Value::as_object);
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(if gemma { 1_000_000.0 } else { 10_000.0 });
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(err(
                "rope_theta",
                format!("must be a positive number, got {rope_theta}"),
            ));
        }
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(err(
                "rms_norm_eps",
                format!("must be a small positive number, got {rms_norm_eps}"),
            ));
        }
        let scaling = raw
            .rope_scaling
            .as_ref()
            .filter(|v| !v.is_null())
            .or(full_params);
        let rope_scaling = parse_rope_scaling(scaling, file)?;
        let partial = raw.partial_rotary_factor.or_else(|| {
            params
                .and_then(|p| p.get("partial_rotary_factor"))
                .and_then(Value::as_f64)
        });
        if let Some(f) = partial.filter(|f| *f != 1.0) {
            return Err(err(
                "partial_rotary_factor",
                format!("{f} is not supported (rotary embedding over the whole head only)"),
            ));
        }
        if matches!(arch, Arch::Qwen2 | Arch::Qwen3) && raw.use_sliding_window == Some(true) {
            return Err(err(
                "use_sliding_window",
                format!(
                    "sliding-window attention for {} is not supported",
                    arch.name()
                ),
            ));
        }
        let dtype_name = raw.dtype.or(raw.torch_dtype);
        let dtype = match dtype_name.as_deref() {
            None => None,
            Some("float32") => Some(DType::F32),
            Some("bfloat16") => Some(DType::BF16),
            Some("float16") => Some(DType::F16),
            Some(other) => {
                return Err(err(
                    "torch_dtype",
                    format!("{other:?} is not supported (float32, bfloat16 or float16)"),
                ))
            }
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let sliding_window = match arch {
            Arch::Mistral | Arch::Phi3 => raw.sliding_window,
            Arch::Gemma3 => Some(raw.sliding_window.unwrap_or(4096)),
            _ => None,
        };
        if sliding_window == Some(0) {
            return Err(err("sliding_window", "must be at least 1".into()));
        }
        let n = raw.num_hidden_layers;
        let layer_types = if gemma {
            gemma_layer_types(raw.layer_types.as_deref(), raw.sliding_window_pattern, n)
                .map_err(|m| err("layer_types", m))?
        } else if sliding_window.is_some() {
            LayerKinds::All(LayerKind::Sliding)
        } else {
            LayerKinds::All(LayerKind::Full)
        };
        let sliding_rope_theta = if gemma {
            let theta = by_kind("sliding_attention")
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .or(raw.rope_local_base_freq)
                .unwrap_or(10_000.0);
            if !(theta.is_finite() && theta > 0.0) {
                return Err(err(
                    "rope_local_base_freq",
                    format!("must be a positive number, got {theta}"),
                ));
            }
            Some(theta)
        } else {
            None
        };
        Ok(LlamaConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            // Qwen2 always has q/k/v biases; Llama and Qwen3 as `attention_bias` says (Qwen3's
            // `o_proj` too)
            qkv_bias: arch == Arch::Qwen2
                || (matches!(arch, Arch::Llama | Arch::Qwen3 | Arch::Gemma3) && attention_bias),
            o_bias: matches!(arch, Arch::Llama | Arch::Qwen3 | Arch::Gemma3) && attention_bias,
            mlp_bias: arch == Arch::Llama && raw.mlp_bias.unwrap_or(false),
            sliding_window,
            layer_types,
            sliding_rope_theta,
            gemma_norms: gemma,
            activation,
            query_pre_attn_scalar: gemma.then(|| raw.query_pre_attn_scalar.unwrap_or(256.0)),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            fused_projections: arch == Arch::Phi3,
            dtype,
            multimodal: false,
        })
    }

    /// Rotary inverse frequencies `[head_dim / 2]` of one kind of layer, and the factor
    /// positions are multiplied by (linear scaling), as configured. Gemma 3's sliding layers
    /// have their own base and no scaling.
    pub fn rope_for(&self, kind: LayerKind) -> (Vec<f64>, f64) {
        match (kind, self.sliding_rope_theta) {
            (LayerKind::Sliding, Some(theta)) => (rope_base(theta, self.head_dim), 1.0),
            _ => (self.inv_freq(), self.position_scale()),
        }
    }

    /// Rotary inverse frequencies `[head_dim / 2]`, scaled as configured.
    pub fn inv_freq(&self) -> Vec<f64> {
        let base = rope_base(self.rope_theta, self.head_dim);
        match self.rope_scaling {
            RopeScaling::None | RopeScaling::Linear { .. } => base,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Positions are divided by this before rotation (linear scaling), else 1.
    pub fn position_scale(&self) -> f64 {
        match self.rope_scaling {
            RopeScaling::Linear { factor } => 1.0 / factor,
            _ => 1.0,
        }
    }
}

/// `1 / theta^(2i / d)` for `i < d / 2`.
fn rope_base(theta: f64, d: usize) -> Vec<f64> {
    (0..d / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64))
        .collect()
}

/// Gemma 3's layer kinds: `layer_types` when given (it is what transformers reads), else every
/// `pattern`-th layer (default 6) full.
fn gemma_layer_types(
    names: Option<&[String]>,
    pattern: Option<usize>,
    layers: usize,
) -> std::result::Result<LayerKinds, String> {
    let Some(names) = names else {
        return Ok(LayerKinds::EveryNthFull(pattern.unwrap_or(6).max(1)));
    };
    if names.len() != layers {
        return Err(format!(
            "{} entries for num_hidden_layers = {layers}",
            names.len()
        ));
    }
    names
        .iter()
        .map(|n| match n.as_str() {
            "full_attention" => Ok(LayerKind::Full),
            "sliding_attention" => Ok(LayerKind::Sliding),
            other => Err(format!(
                "{other:?} is not a layer type (full_attention or sliding_attention)"
            )),
        })
        .collect::<std::result::Result<_, _>>()
        .map(LayerKinds::Listed)
}

fn parse_rope_scaling(v: Option<&Value>, file: &Path) -> Result<RopeScaling> {
    let Some(obj) = v.and_then(Value::as_object) else {
        return Ok(RopeScaling::None);
    };
    let err = |message: String| ModelError::Config {
        file: PathBuf::from(file),
        key: "rope_scaling".into(),
        message,
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| {
        obj.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| err(format!("rope_type {kind:?} needs a number `{k}`")))
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(err(format!(
                "rope_type {other:?} is not supported (default, linear, llama3)"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    }

    #[test]
    fn reads_transformers_4_and_5_forms_alike() {
        let mut v4 = base();
        v4["rope_theta"] = json!(500000.0);
        v4["torch_dtype"] = json!("bfloat16");
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = base();
        v5["dtype"] = json!("bfloat16");
        v5["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let a = LlamaConfig::from_json(v4, Path::new("config.json")).unwrap();
        let b = LlamaConfig::from_json(v5, Path::new("config.json")).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_theta, b.rope_theta);
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!(a.dtype, Some(DType::BF16));
        assert_eq!(b.dtype, Some(DType::BF16));
        assert_eq!(a.head_dim, 4);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut v = base();
        v["hidden_size"] = json!(512);
        v["num_attention_heads"] = json!(4);
        v["num_key_value_heads"] = json!(4);
        v["rope_theta"] = json!(500000.0);
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = LlamaConfig::from_json(v.clone(), Path::new("c")).unwrap();
        v["rope_scaling"] = Value::Null;
        let plain = LlamaConfig::from_json(v, Path::new("c")).unwrap();
        let (s, p) = (c.inv_freq(), plain.inv_freq());
        assert_eq!(s[0], p[0]);
        let last = s.len() - 1;
        assert!((s[last] - p[last] / 8.0).abs() < 1e-15);
        assert!(s.iter().zip(&p).any(|(a, b)| a < b && *a > b / 8.0));
    }

    #[test]
    fn bad_configs_name_the_key() {
        let mut v = base();
        v["model_type"] = json!("gpt2");
        let e = LlamaConfig::from_json(v, Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/config.json") && e.contains("model_type") && e.contains("gpt2"),
            "{e}"
        );
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let e = LlamaConfig::from_json(v, Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = LlamaConfig::from_json(v, Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }

    #[test]
    fn qwen3_has_qk_norm_its_own_head_dim_and_no_bias_by_default() {
        let mut v = base();
        v["model_type"] = json!("qwen3");
        v["head_dim"] = json!(8);
        let c = LlamaConfig::from_json(v.clone(), Path::new("c")).unwrap();
        assert!(c.qk_norm && !c.qkv_bias && !c.o_bias && c.arch == Arch::Qwen3);
        assert_eq!(c.head_dim, 8);
        v["attention_bias"] = json!(true);
        let c = LlamaConfig::from_json(v.clone(), Path::new("c")).unwrap();
        assert!(c.qkv_bias && c.o_bias);
        v["use_sliding_window"] = json!(true);
        let e = LlamaConfig::from_json(v, Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("use_sliding_window"), "{e}");
    }

    #[test]
    fn phi3_has_fused_projections_and_its_window() {
        let mut v = base();
        v["model_type"] = json!("phi3");
        v["sliding_window"] = json!(2047);
        let c = LlamaConfig::from_json(v.clone(), Path::new("c")).unwrap();
        assert!(c.fused_projections && !c.qkv_bias && c.arch == Arch::Phi3);
        assert_eq!(c.sliding_window, Some(2047));
        v["partial_rotary_factor"] = json!(0.75);
        let e = LlamaConfig::from_json(v, Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("partial_rotary_factor"), "{e}");
    }

    #[test]
    fn gemma3_reads_both_config_forms_and_names_what_it_refuses() {
        let mut v = base();
        v["model_type"] = json!("gemma3_text");
        v["num_hidden_layers"] = json!(12);
        v["head_dim"] = json!(8);
        // transformers 4 form: rope_theta + rope_local_base_freq, the layer pattern by default
        v["rope_theta"] = json!(1000000.0);
        v["rope_local_base_freq"] = json!(10000.0);
        let c = LlamaConfig::from_json(v.clone(), Path::new("c")).unwrap();
        assert!(c.gemma_norms && c.qk_norm && c.tie_word_embeddings);
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(c.query_pre_attn_scalar, Some(256.0));
        assert_eq!(c.sliding_window, Some(4096));
        let kinds: Vec<LayerKind> = (0..12).map(|i| c.layer_types.of(i)).collect();
        assert_eq!(kinds[5], LayerKind::Full);
        assert_eq!(kinds[11], LayerKind::Full);
        assert_eq!(kinds.iter().filter(|k| **k == LayerKind::Full).count(), 2);
        let (full, _) = c.rope_for(LayerKind::Full);
        let (local, _) = c.rope_for(LayerKind::Sliding);
        assert_eq!(full[1], 1.0 / 1e6f64.powf(2.0 / 8.0));
        assert_eq!(local[1], 1.0 / 1e4f64.powf(2.0 / 8.0));
        // the multimodal config: the same text model under text_config
        let mm = json!({"model_type": "gemma3", "text_config": v.clone(), "dtype": "bfloat16"});
        let m = LlamaConfig::from_json(mm, Path::new("c")).unwrap();
        assert!(m.multimodal && m.dtype == Some(DType::BF16));
        assert_eq!(m.layer_types, c.layer_types);
        for (key, value) in [
            ("final_logit_softcapping", json!(30.0)),
            ("use_bidirectional_attention", json!(true)),
            ("query_pre_attn_scalar", json!(0)),
            ("sliding_window", json!(0)),
            ("layer_types", json!(["full_attention"])),
            ("hidden_activation", json!("relu")),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            let e = LlamaConfig::from_json(bad, Path::new("c")).unwrap_err();
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
        let e =
            LlamaConfig::from_json(json!({"model_type": "gemma3"}), Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("text_config"), "{e}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_no_o_bias() {
        let mut v = base();
        v["model_type"] = json!("qwen2");
        let c = LlamaConfig::from_json(v, Path::new("c")).unwrap();
        assert!(c.qkv_bias && !c.o_bias && c.arch == Arch::Qwen2);
    }
}
