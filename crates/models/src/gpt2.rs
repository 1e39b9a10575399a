//! GPT-2: learned position embeddings, pre-LayerNorm blocks with biases, one fused `c_attn`
//! projection (rows q, k, v), a GELU MLP, a head tied to the token embeddings. Its linear
//! layers are `Conv1D`s storing weights `[in, out]` ([`LayerBuilder::conv1d`]); PEFT adapters on
//! them say `fan_in_fan_out: true` and keep the usual A `[r, in]`, B `[out, r]`.
use crate::decoder;
use crate::error::{ModelError, Result};
use crate::model::{CausalLm, Dimensions, KvCache, Model, ModelConfig, Task};
use crate::registry::Architecture;
use candle_core::{DType, Tensor};
use lorakit_adapter::{Frozen, LayerBuilder, LoraLinear};
use lorakit_ops::attention::{self, AttnMask};
use lorakit_ops::layers::{layer_norm, packed_positions};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The registry entry of GPT-2.
pub struct Gpt2Family;

impl Architecture for Gpt2Family {
    fn model_types(&self) -> &'static [&'static str] {
        &["gpt2"]
    }

    fn parse_config(&self, json: Value, file: &Path) -> Result<Box<dyn ModelConfig>> {
        Ok(Box::new(Gpt2Config::from_json(json, file)?))
    }
}

/// The MLP activation `activation_function` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    Tanh,
    /// `gelu`: the exact (erf) form.
    Erf,
}

#[derive(Deserialize)]
struct Raw {
    vocab_size: usize,
    n_positions: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    activation_function: Option<String>,
    layer_norm_epsilon: Option<f64>,
    tie_word_embeddings: Option<bool>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    add_cross_attention: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// A resolved GPT-2 configuration.
#[derive(Clone, Debug)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_inner: usize,
    pub activation: Gelu,
    pub layer_norm_epsilon: f64,
    pub tie_word_embeddings: bool,
    pub dtype: Option<DType>,
}

impl Gpt2Config {
    pub fn from_json(v: Value, file: &Path) -> Result<Self> {
        let err = |key: &str, message: String| ModelError::Config {
            file: file.to_path_buf(),
            key: key.into(),
            message,
        };
        let raw: Raw = serde_json::from_value(v).map_err(|e| {
            let msg = e.to_string();
            let key = msg.split('`').nth(1).unwrap_or("(config)").to_string();
            err(&key, msg)
        })?;
        if raw.n_head == 0 || raw.n_layer == 0 || !raw.n_embd.is_multiple_of(raw.n_head) {
            return Err(err(
                "n_head",
                format!(
                    "n_embd = {} must be a positive multiple of n_head = {} (and n_layer positive)",
                    raw.n_embd, raw.n_head
                ),
            ));
        }
        let activation = match raw.activation_function.as_deref().unwrap_or("gelu_new") {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Gelu::Tanh,
            "gelu" => Gelu::Erf,
            other => {
                return Err(err(
                    "activation_function",
                    format!("{other:?} is not supported (gelu_new, gelu_pytorch_tanh, gelu)"),
                ))
            }
        };
        for (key, on, what) in [
            (
                "scale_attn_by_inverse_layer_idx",
                raw.scale_attn_by_inverse_layer_idx == Some(true),
                "per-layer attention scaling",
            ),
            (
                "scale_attn_weights",
                raw.scale_attn_weights == Some(false),
                "unscaled attention scores",
            ),
            (
                "add_cross_attention",
                raw.add_cross_attention == Some(true),
                "cross-attention",
            ),
        ] {
            if on {
                return Err(err(key, format!("{what} is not supported")));
            }
        }
        let dtype = match raw.dtype.or(raw.torch_dtype).as_deref() {
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
        Ok(Gpt2Config {
            vocab_size: raw.vocab_size,
            n_positions: raw.n_positions,
            n_embd: raw.n_embd,
            n_layer: raw.n_layer,
            n_head: raw.n_head,
            n_inner: raw.n_inner.unwrap_or(4 * raw.n_embd),
            activation,
            layer_norm_epsilon: raw.layer_norm_epsilon.unwrap_or(1e-5),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            dtype,
        })
    }
}

impl ModelConfig for Gpt2Config {
    fn model_type(&self) -> &'static str {
        "gpt2"
    }

    fn dimensions(&self) -> Dimensions {
        Dimensions {
            layers: self.n_layer,
            hidden: self.n_embd,
            heads: self.n_head,
            kv_heads: self.n_head,
            head_dim: self.n_embd / self.n_head,
            vocab: self.vocab_size,
            tied_embeddings: self.tie_word_embeddings,
        }
    }

    fn declared_dtype(&self) -> Option<DType> {
        self.dtype
    }

    fn default_task(&self) -> Task {
        Task::CausalLm
    }

    fn build(&self, lb: &LayerBuilder, task: Task) -> Result<Model> {
        match task {
            Task::CausalLm => Ok(Model::CausalLm(Box::new(Gpt2::new(self, lb)?))),
            other => Err(ModelError::Input(format!(
                "a gpt2 model is built for causal_lm, not {}",
                other.name()
            ))),
        }
    }

    /// The attention's causal-mask buffers (`attn.bias`, `attn.masked_bias`) of older saves.
    fn may_leave_unused(&self, name: &str) -> bool {
        name.ends_with("attn.bias")
            || name.ends_with("attn.masked_bias")
            || (self.tie_word_embeddings && name == "lm_head.weight")
    }

    /// Hub originals name tensors without `transformer.` (`h.0.attn.c_attn.weight`).
    fn optional_prefix(&self) -> Option<&'static str> {
        Some("transformer.")
    }

    fn stores_transposed(&self, module: &str) -> bool {
        module.ends_with("c_attn") || module.ends_with("c_proj") || module.ends_with("c_fc")
    }
}

/// LayerNorm weight and bias.
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn new(lb: &LayerBuilder, n: usize) -> Result<Self> {
        Ok(Norm {
            weight: lb.tensor(n, "weight")?,
            bias: lb.tensor(n, "bias")?,
        })
    }

    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(layer_norm(x, &self.weight, &self.bias, eps)?)
    }
}

struct Block {
    ln_1: Norm,
    c_attn: LoraLinear,
    attn_proj: LoraLinear,
    ln_2: Norm,
    c_fc: LoraLinear,
    mlp_proj: LoraLinear,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        mask: &AttnMask,
        cfg: &Gpt2Config,
        train: bool,
        slot: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let eps = cfg.layer_norm_epsilon;
        let h = cfg.n_embd;
        let qkv = self.c_attn.forward_t(&self.ln_1.forward(x, eps)?, train)?;
        let q = qkv.narrow(2, 0, h)?.contiguous()?;
        let k = qkv.narrow(2, h, h)?.contiguous()?;
        let v = qkv.narrow(2, 2 * h, h)?.contiguous()?;
        let heads = cfg.n_head;
        let out = match slot {
            None => attention::attention_heads_last(&q, &k, &v, mask, heads, heads)?,
            Some(slot) => {
                let (q, mut k, mut v) = attention::split_heads(&q, &k, &v, heads, heads)?;
                if let Some((pk, pv)) = slot.as_ref() {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                *slot = Some((k.clone(), v.clone()));
                attention::attention(&q, &k, &v, mask)?
            }
        };
        let x = (x + self.attn_proj.forward_t(&out, train)?)?;
        let m = self.c_fc.forward_t(&self.ln_2.forward(&x, eps)?, train)?;
        let m = match cfg.activation {
            Gelu::Tanh => m.gelu()?,
            Gelu::Erf => m.gelu_erf()?,
        };
        Ok((&x + self.mlp_proj.forward_t(&m, train)?)?)
    }
}

/// The GPT-2 language model (`GPT2LMHeadModel`).
pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Frozen,
    wpe: Frozen,
    /// The model's dtype (embedding rows come out in it).
    dtype: DType,
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: LoraLinear,
}

impl Gpt2 {
    pub fn new(cfg: &Gpt2Config, lb: &LayerBuilder) -> Result<Self> {
        let t = lb.pp("transformer");
        let (h, inner) = (cfg.n_embd, cfg.n_inner);
        let wte = t.pp("wte").embedding(cfg.vocab_size, h)?;
        let wpe = t.pp("wpe").embedding(cfg.n_positions, h)?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let b = t.pp("h").pp(i);
            blocks.push(Block {
                ln_1: Norm::new(&b.pp("ln_1"), h)?,
                c_attn: b.pp("attn").pp("c_attn").conv1d(h, 3 * h)?,
                attn_proj: b.pp("attn").pp("c_proj").conv1d(h, h)?,
                ln_2: Norm::new(&b.pp("ln_2"), h)?,
                c_fc: b.pp("mlp").pp("c_fc").conv1d(h, inner)?,
                mlp_proj: b.pp("mlp").pp("c_proj").conv1d(inner, h)?,
            });
        }
        let head = lb.pp("lm_head");
        let lm_head = if cfg.tie_word_embeddings {
            head.linear_from(wte.clone(), None)?
        } else {
            head.linear(h, cfg.vocab_size, false)?
        };
        Ok(Gpt2 {
            cfg: cfg.clone(),
            wte,
            wpe,
            dtype: lb.dtype(),
            blocks,
            ln_f: Norm::new(&t.pp("ln_f"), h)?,
            lm_head,
        })
    }

    /// Token plus position embeddings `[b, s, hidden]` of `ids` at `positions` (`[b][s]`).
    fn embed(&self, ids: &Tensor, positions: &[Vec<usize>]) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let ids = ids.to_dtype(DType::U32)?.flatten_all()?;
        let max_id = ids.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max_id} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let flat: Vec<u32> = positions.iter().flatten().map(|&p| p as u32).collect();
        if let Some(&p) = flat.iter().max() {
            if p as usize >= self.cfg.n_positions {
                return Err(ModelError::Input(format!(
                    "position {p} is beyond the {} positions GPT-2 has embeddings for (n_positions)",
                    self.cfg.n_positions
                )));
            }
        }
        let pos = Tensor::from_vec(flat, b * s, &self.wte.device())?;
        let x = (self.wte.rows(&ids, self.dtype)? + self.wpe.rows(&pos, self.dtype)?)?;
        Ok(x.reshape((b, s, self.cfg.n_embd))?)
    }

    /// Embeddings and attention mask of a full-sequence pass; packed rows (segment numbers in
    /// the mask) restart their positions at each example.
    fn inputs(&self, input_ids: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, AttnMask)> {
        let segments = decoder::segments(input_ids, mask)?;
        let (b, s) = input_ids.dims2()?;
        let positions = packed_positions(&segments).unwrap_or_else(|| vec![(0..s).collect(); b]);
        let x = self.embed(input_ids, &positions)?;
        Ok((x, AttnMask::causal(&segments, None)?))
    }

    fn blocks_forward(
        &self,
        mut x: Tensor,
        mask: &AttnMask,
        train: bool,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, mask, &self.cfg, train, slot)?;
        }
        self.ln_f.forward(&x, self.cfg.layer_norm_epsilon)
    }

    fn logits(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self
            .lm_head
            .forward_t(hidden, train)?
            .to_dtype(DType::F32)?)
    }
}

impl CausalLm for Gpt2 {
    fn config(&self) -> &dyn ModelConfig {
        &self.cfg
    }

    fn max_positions(&self) -> usize {
        self.cfg.n_positions
    }

    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, train)?;
        self.logits(&hidden, train)
    }

    fn logits_at(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        positions: &Tensor,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, train)?;
        let (b, s, d) = hidden.dims3()?;
        let rows = hidden.reshape((b * s, d))?.index_select(positions, 0)?;
        self.logits(&rows, train)
    }

    fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (x, mask) = self.inputs(input_ids, attention_mask)?;
        self.blocks_forward(x, &mask, train, None)
    }

    fn head_loss(
        &self,
        hidden: &Tensor,
        positions: &Tensor,
        labels: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        decoder::head_loss(
            &self.lm_head,
            self.cfg.vocab_size,
            hidden,
            positions,
            labels,
            train,
        )
    }

    fn checkpointed_loss_and_grads(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: &Tensor,
        labels: &Tensor,
        scale: f64,
        vars: &[Tensor],
    ) -> Result<(f32, Vec<Option<Tensor>>)> {
        let (x, mask) = self.inputs(input_ids, attention_mask)?;
        decoder::checkpointed_loss_and_grads(
            x,
            self.blocks.len(),
            |i, x| self.blocks[i].forward(x, &mask, &self.cfg, true, None),
            |top| {
                let hidden = self.ln_f.forward(top, self.cfg.layer_norm_epsilon)?;
                self.head_loss(&hidden, positions, labels, true)
            },
            scale,
            vars,
        )
    }

    fn logits_packed(
        &self,
        input_ids: &Tensor,
        positions: &[Vec<usize>],
        bias: &Tensor,
        at: &Tensor,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if positions.len() != b || positions.iter().any(|p| p.len() != s) {
            return Err(ModelError::Input(format!(
                "positions must be [{b}][{s}] like the input ids"
            )));
        }
        let x = self.embed(input_ids, positions)?;
        let hidden = self.blocks_forward(x, &AttnMask::bias(bias.clone()), false, None)?;
        let d = hidden.dim(2)?;
        let picked = hidden.reshape((b * s, d))?.index_select(at, 0)?;
        self.logits(&picked, false)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.blocks.len())
    }

    fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let s = decoder::cached_len(input_ids)?;
        let past = cache.len;
        let total = past + s;
        let x = self.embed(input_ids, &[(past..total).collect()])?;
        let hidden = self.blocks_forward(x, &AttnMask::cached(past, None), false, Some(cache))?;
        cache.len = total;
        self.logits(&hidden, false)
    }
}
