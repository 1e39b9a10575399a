//! llama.cpp's names and row order for the linear layers lorakit adapts: the map between a
//! Hugging Face module path (`model.layers.3.self_attn.q_proj`) and a llama.cpp tensor
//! (`blk.3.attn_q.weight`), and the permutation llama.cpp's converter applies to the rows of
//! Llama's q/k projections (RoPE as interleaved pairs instead of halves).
use crate::error::Result;
use candle_core::Tensor;
use lorakit_models::ModelConfig;

/// How llama.cpp names and lays out one model's linear layers.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// `general.architecture`.
    pub arch: &'static str,
    /// The Hugging Face path of layer `N` is `<layer_prefix>N.`.
    layer_prefix: &'static str,
    /// (Hugging Face path inside a layer, llama.cpp part)
    parts: &'static [(&'static str, &'static str)],
    /// Attention and key/value head counts, for architectures whose q/k rows llama.cpp permutes.
    rope_rows: Option<(usize, usize)>,
}

const LLAMA_PARTS: &[(&str, &str)] = &[
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.qkv_proj", "attn_qkv"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.gate_up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Norms of the llama-family layers llama.cpp reads (besides the final `output_norm`).
const LLAMA_NORMS: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
];

const GPT2_PARTS: &[(&str, &str)] = &[
    ("attn.c_attn", "attn_qkv"),
    ("attn.c_proj", "attn_output"),
    ("mlp.c_fc", "ffn_up"),
    ("mlp.c_proj", "ffn_down"),
];

/// The llama.cpp architectures lorakit exports to, by Hugging Face `model_type`.
pub fn arch_of_model_type(model_type: &str) -> Option<&'static str> {
    Some(match model_type {
        // llama.cpp converts Mistral (dense) as `llama`
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "phi3" => "phi3",
        "gemma3_text" | "gemma3" => "gemma3",
        "gpt2" => "gpt2",
        _ => return None,
    })
}

impl Layout {
    /// The layout of a model with `config`; `None` for an architecture llama.cpp does not run
    /// (or lorakit cannot name for it).
    pub fn of(config: &dyn ModelConfig) -> Option<Layout> {
        let arch = arch_of_model_type(config.model_type())?;
        let d = config.dimensions();
        Some(Layout {
            arch,
            layer_prefix: if arch == "gpt2" {
                "transformer.h."
            } else {
                "model.layers."
            },
            parts: if arch == "gpt2" {
                GPT2_PARTS
            } else {
                LLAMA_PARTS
            },
            rope_rows: (arch == "llama").then_some((d.heads, d.kv_heads)),
        })
    }

    /// The layer index and the path inside the layer of a module path, wherever the layers sit
    /// (a multimodal checkpoint nests them deeper).
    fn in_layer<'m>(&self, module: &'m str) -> Option<(usize, &'m str)> {
        let marker = self.layer_prefix.rsplit('.').nth(1)?; // "layers" or "h"
        let at = module
            .match_indices(&format!("{marker}."))
            .map(|(i, _)| i)
            .find(|&i| i == 0 || module.as_bytes()[i - 1] == b'.')?;
        let rest = &module[at + marker.len() + 1..];
        let (n, inner) = rest.split_once('.')?;
        Some((n.parse().ok()?, inner))
    }

    /// The llama.cpp weight adapted by Hugging Face module `module`
    /// (`model.layers.3.self_attn.q_proj` → `blk.3.attn_q.weight`, `lm_head` → `output.weight`).
    pub fn gguf_weight(&self, module: &str) -> Option<String> {
        if module == "lm_head" || module.ends_with(".lm_head") {
            return Some("output.weight".into());
        }
        let (n, inner) = self.in_layer(module)?;
        let part = self.parts.iter().find(|(hf, _)| *hf == inner)?.1;
        Some(format!("blk.{n}.{part}.weight"))
    }

    /// The llama.cpp name of any tensor of a Hugging Face checkpoint (weights, biases, norms,
    /// embeddings) for the architectures whose whole checkpoint lorakit writes as GGUF.
    pub fn gguf_tensor(&self, hf: &str) -> Option<String> {
        let (module, suffix) = hf.rsplit_once('.')?;
        let stem = match module {
            "model.embed_tokens" => "token_embd".to_string(),
            "model.norm" => "output_norm".to_string(),
            "lm_head" => "output".to_string(),
            _ => {
                let (n, inner) = self.in_layer(module)?;
                let part = self
                    .parts
                    .iter()
                    .chain(LLAMA_NORMS)
                    .find(|(h, _)| *h == inner)?
                    .1;
                format!("blk.{n}.{part}")
            }
        };
        Some(format!("{stem}.{suffix}"))
    }

    /// The Hugging Face module of a llama.cpp weight name (the inverse of
    /// [`Layout::gguf_weight`] for text models).
    pub fn hf_module(&self, gguf_weight: &str) -> Option<String> {
        let stem = gguf_weight.strip_suffix(".weight")?;
        if stem == "output" {
            return Some("lm_head".into());
        }
        let (n, part) = stem.strip_prefix("blk.")?.split_once('.')?;
        let n: usize = n.parse().ok()?;
        // Phi-3's fused gate/up is `ffn_up` too: the base's own module name decides
        let candidates: Vec<&str> = self
            .parts
            .iter()
            .filter(|(_, g)| *g == part)
            .map(|(hf, _)| *hf)
            .collect();
        let inner = match (self.arch, part) {
            ("phi3", "ffn_up") => "mlp.gate_up_proj",
            ("phi3", "attn_qkv") => "self_attn.qkv_proj",
            _ => candidates.first()?,
        };
        Some(format!("{}{n}.{inner}", self.layer_prefix))
    }

    /// Whether llama.cpp permutes the rows of q/k for this architecture.
    pub fn permutes_qk(&self) -> bool {
        self.rope_rows.is_some()
    }

    /// Head count for the rows of `module`'s output, when llama.cpp stores them permuted.
    fn permuted_heads(&self, module: &str) -> Option<usize> {
        let (heads, kv_heads) = self.rope_rows?;
        if module.ends_with("self_attn.q_proj") {
            Some(heads)
        } else if module.ends_with("self_attn.k_proj") {
            Some(kv_heads)
        } else {
            None
        }
    }

    /// Rows of a tensor whose rows are `module`'s outputs (a weight, a LoRA B) in llama.cpp's
    /// order: within each head, halves `(0..d/2, d/2..d)` become interleaved pairs.
    pub fn rows_to_gguf(&self, module: &str, t: &Tensor) -> Result<Tensor> {
        let Some(heads) = self.permuted_heads(module) else {
            return Ok(t.clone());
        };
        let (out, cols) = t.dims2()?;
        let d = out / heads.max(1);
        Ok(t.reshape((heads, 2, d / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((out, cols))?)
    }

    /// The inverse of [`Layout::rows_to_gguf`].
    pub fn rows_to_hf(&self, module: &str, t: &Tensor) -> Result<Tensor> {
        let Some(heads) = self.permuted_heads(module) else {
            return Ok(t.clone());
        };
        Ok(lorakit_models::llama::gguf::unpermute_rope_rows(t, heads)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn llama(heads: usize, kv: usize) -> Layout {
        Layout {
            arch: "llama",
            layer_prefix: "model.layers.",
            parts: LLAMA_PARTS,
            rope_rows: Some((heads, kv)),
        }
    }

    #[test]
    fn names_map_both_ways() {
        let l = llama(2, 1);
        for (hf, g) in [
            ("model.layers.3.self_attn.q_proj", "blk.3.attn_q.weight"),
            ("model.layers.12.mlp.down_proj", "blk.12.ffn_down.weight"),
            ("lm_head", "output.weight"),
        ] {
            assert_eq!(l.gguf_weight(hf).as_deref(), Some(g));
            assert_eq!(l.hf_module(g).as_deref(), Some(hf));
        }
        assert_eq!(
            l.gguf_weight("model.language_model.layers.0.self_attn.v_proj")
                .as_deref(),
            Some("blk.0.attn_v.weight")
        );
        assert_eq!(l.gguf_weight("model.layers.0.self_attn.q_norm"), None);
        assert_eq!(l.gguf_weight("model.embed_tokens"), None);
    }

    #[test]
    fn q_rows_are_llama_cpps_permutation_and_invert() {
        // 2 heads of dim 4: rows (0 1 2 3 | 4 5 6 7) → (0 2 1 3 | 4 6 5 7)
        let l = llama(2, 1);
        let t = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let g = l
            .rows_to_gguf("model.layers.0.self_attn.q_proj", &t)
            .unwrap();
        assert_eq!(
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 2., 1., 3., 4., 6., 5., 7.]
        );
        let back = l.rows_to_hf("model.layers.0.self_attn.q_proj", &g).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..8).map(|i| i as f32).collect::<Vec<_>>()
        );
        // k with one kv head: one permutation over all 8 rows; v untouched
        let k = l
            .rows_to_gguf("model.layers.0.self_attn.k_proj", &t)
            .unwrap();
        assert_eq!(
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 4., 1., 5., 2., 6., 3., 7.]
        );
        let v = l
            .rows_to_gguf("model.layers.0.self_attn.v_proj", &t)
            .unwrap();
        assert_eq!(
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..8).map(|i| i as f32).collect::<Vec<_>>()
        );
    }
}
