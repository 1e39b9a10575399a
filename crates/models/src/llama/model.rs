//! The Llama-family decoder network, differentiable end to end.
use super::config::{Activation, LayerKind, LlamaConfig};
use crate::decoder;
use crate::error::{ModelError, Result};
use crate::model::{CausalLm, KvCache, ModelConfig};
use candle_core::{DType, Module, Tensor};
use lorakit_adapter::{Frozen, LayerBuilder, LoraLinear};
use lorakit_ops::attention::{self, AttnMask};
use lorakit_ops::layers::{
    apply_rope, packed_positions, rms_norm, rope_tables, rope_tables_at, window_bias_at,
};

/// The q, k and v projections: three modules, or Phi-3's one `qkv_proj` whose output rows are
/// q, then k, then v.
#[allow(clippy::large_enum_variant)] // one per layer: its size does not matter
enum QkvProjections {
    Separate {
        q_proj: LoraLinear,
        k_proj: LoraLinear,
        v_proj: LoraLinear,
    },
    Fused {
        qkv_proj: LoraLinear,
        q_out: usize,
        kv_out: usize,
    },
}

impl QkvProjections {
    fn forward(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor, Tensor)> {
        Ok(match self {
            QkvProjections::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => (
                q_proj.forward_t(x, train)?,
                k_proj.forward_t(x, train)?,
                v_proj.forward_t(x, train)?,
            ),
            QkvProjections::Fused {
                qkv_proj,
                q_out,
                kv_out,
            } => {
                let qkv = qkv_proj.forward_t(x, train)?;
                (
                    qkv.narrow(2, 0, *q_out)?.contiguous()?,
                    qkv.narrow(2, *q_out, *kv_out)?.contiguous()?,
                    qkv.narrow(2, q_out + kv_out, *kv_out)?.contiguous()?,
                )
            }
        })
    }
}

struct Attention {
    qkv: QkvProjections,
    o_proj: LoraLinear,
    /// Qwen3's and Gemma 3's RMSNorm weights `[head_dim]` for each head of q and of k.
    qk_norm: Option<(Tensor, Tensor)>,
    /// Multiplies q when the score scale is not `head_dim^-½` (Gemma 3's
    /// `query_pre_attn_scalar`): `√(head_dim / query_pre_attn_scalar)`.
    query_scale: Option<f64>,
    eps: f64,
    heads: usize,
    kv_heads: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, lb: &LayerBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let q_out = cfg.num_attention_heads * d;
        let kv_out = cfg.num_key_value_heads * d;
        let qkv = if cfg.fused_projections {
            QkvProjections::Fused {
                qkv_proj: lb
                    .pp("qkv_proj")
                    .linear(h, q_out + 2 * kv_out, cfg.qkv_bias)?,
                q_out,
                kv_out,
            }
        } else {
            QkvProjections::Separate {
                q_proj: lb.pp("q_proj").linear(h, q_out, cfg.qkv_bias)?,
                k_proj: lb.pp("k_proj").linear(h, kv_out, cfg.qkv_bias)?,
                v_proj: lb.pp("v_proj").linear(h, kv_out, cfg.qkv_bias)?,
            }
        };
        Ok(Attention {
            qkv,
            o_proj: lb.pp("o_proj").linear(q_out, h, cfg.o_bias)?,
            qk_norm: if cfg.qk_norm {
                Some((
                    norm_weight(cfg, &lb.pp("q_norm"), d)?,
                    norm_weight(cfg, &lb.pp("k_norm"), d)?,
                ))
            } else {
                None
            },
            query_scale: cfg
                .query_pre_attn_scalar
                .map(|s| (d as f64 / s).sqrt())
                .filter(|f| *f != 1.0),
            eps: cfg.rms_norm_eps,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        train: bool,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (mut q, mut k, v) = self.qkv.forward(x, train)?;
        let (h, kv) = (self.heads, self.kv_heads);
        if let Some((qw, kw)) = &self.qk_norm {
            q = per_head_rms_norm(&q, qw, h, self.eps)?;
            k = per_head_rms_norm(&k, kw, kv, self.eps)?;
        }
        if let Some(f) = self.query_scale {
            q = (q * f)?;
        }
        let Some(slot) = cache else {
            let out = attention::rope_attention(&q, &k, &v, cos, sin, mask, h, kv)?;
            return Ok(self.o_proj.forward_t(&out, train)?);
        };
        // generation: keys and values after RoPE are kept, in `[b, kv_heads, t, d]`
        let (q, mut k, mut v) = attention::split_heads(&q, &k, &v, h, kv)?;
        let q = apply_rope(&q, cos, sin)?;
        k = apply_rope(&k, cos, sin)?;
        if let Some((pk, pv)) = slot.as_ref() {
            k = Tensor::cat(&[pk, &k], 2)?;
            v = Tensor::cat(&[pv, &v], 2)?;
        }
        *slot = Some((k.clone(), v.clone()));
        let out = attention::attention(&q, &k, &v, mask)?;
        Ok(self.o_proj.forward_t(&out, train)?)
    }
}

/// An RMSNorm weight `[dim]` as [`rms_norm`] uses it: Gemma stores `w` and computes `x·(1 + w)`,
/// so `1 + w` (added in f32).
fn norm_weight(cfg: &LlamaConfig, lb: &LayerBuilder, dim: usize) -> Result<Tensor> {
    let w = lb.tensor(dim, "weight")?;
    if !cfg.gemma_norms {
        return Ok(w);
    }
    Ok((w.to_dtype(DType::F32)? + 1.0)?.to_dtype(w.dtype())?)
}

/// RMSNorm over each head of `x` `[b, s, heads·d]` with weight `[d]`, layout kept.
fn per_head_rms_norm(x: &Tensor, weight: &Tensor, heads: usize, eps: f64) -> Result<Tensor> {
    let (b, s, width) = x.dims3()?;
    let normed = rms_norm(&x.reshape((b, s, heads, width / heads))?, weight, eps)?;
    Ok(normed.reshape((b, s, width))?)
}

/// The gate and up projections: two modules, or Phi-3's one `gate_up_proj` (gate rows first).
#[allow(clippy::large_enum_variant)] // one per layer: its size does not matter
enum GateUp {
    Separate {
        gate_proj: LoraLinear,
        up_proj: LoraLinear,
    },
    Fused {
        gate_up_proj: LoraLinear,
        intermediate: usize,
    },
}

struct Mlp {
    gate_up: GateUp,
    down_proj: LoraLinear,
    activation: Activation,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, lb: &LayerBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let gate_up = if cfg.fused_projections {
            GateUp::Fused {
                gate_up_proj: lb.pp("gate_up_proj").linear(h, 2 * i, cfg.mlp_bias)?,
                intermediate: i,
            }
        } else {
            GateUp::Separate {
                gate_proj: lb.pp("gate_proj").linear(h, i, cfg.mlp_bias)?,
                up_proj: lb.pp("up_proj").linear(h, i, cfg.mlp_bias)?,
            }
        };
        Ok(Mlp {
            gate_up,
            down_proj: lb.pp("down_proj").linear(i, h, cfg.mlp_bias)?,
            activation: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                (gate_proj.forward_t(x, train)?, up_proj.forward_t(x, train)?)
            }
            GateUp::Fused {
                gate_up_proj,
                intermediate: i,
            } => {
                let both = gate_up_proj.forward_t(x, train)?;
                (
                    both.narrow(2, 0, *i)?.contiguous()?,
                    both.narrow(2, *i, *i)?.contiguous()?,
                )
            }
        };
        let h = match self.activation {
            Activation::Silu => lorakit_ops::fused::swiglu(&gate, &up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        Ok(self.down_proj.forward_t(&h, train)?)
    }
}

struct DecoderLayer {
    kind: LayerKind,
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    /// Gemma 3's norms around the MLP (`pre_feedforward_layernorm`,
    /// `post_feedforward_layernorm`); with them `post_attention_layernorm` norms the attention
    /// output before the residual add instead of the MLP input.
    feedforward_norms: Option<(Tensor, Tensor)>,
    mlp: Mlp,
}

/// Rotary tables and attention mask of one kind of layer.
#[derive(Clone)]
struct KindInputs {
    cos: Tensor,
    sin: Tensor,
    mask: AttnMask,
}

/// What the layers of one forward pass share: rotary tables and attention mask per layer kind
/// (only the kinds the model has).
struct LayerInputs {
    full: Option<KindInputs>,
    sliding: Option<KindInputs>,
}

impl LayerInputs {
    fn of(&self, kind: LayerKind) -> Result<&KindInputs> {
        match kind {
            LayerKind::Full => self.full.as_ref(),
            LayerKind::Sliding => self.sliding.as_ref(),
        }
        .ok_or_else(|| ModelError::Input(format!("no inputs prepared for {kind:?} layers")))
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        inputs: &LayerInputs,
        eps: f64,
        train: bool,
        slot: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let t = inputs.of(self.kind)?;
        let h = rms_norm(x, &self.input_layernorm, eps)?;
        let attn = self
            .self_attn
            .forward(&h, &t.cos, &t.sin, &t.mask, train, slot)?;
        let Some((pre_ff, post_ff)) = &self.feedforward_norms else {
            let x = (x + attn)?;
            let h = rms_norm(&x, &self.post_attention_layernorm, eps)?;
            return Ok((&x + self.mlp.forward(&h, train)?)?);
        };
        let x = (x + rms_norm(&attn, &self.post_attention_layernorm, eps)?)?;
        let h = rms_norm(&x, pre_ff, eps)?;
        let m = rms_norm(&self.mlp.forward(&h, train)?, post_ff, eps)?;
        Ok((&x + m)?)
    }
}

/// A decoder-only causal language model of the Llama family.
pub struct Llama {
    cfg: LlamaConfig,
    /// Dense, or in GGML blocks (a quantized GGUF base).
    embed_tokens: Frozen,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: LoraLinear,
    /// Rotary frequencies and position scale of each layer kind.
    rope_full: (Vec<f64>, f64),
    rope_sliding: (Vec<f64>, f64),
    /// Gemma: embeddings × √hidden.
    embed_scale: Option<f64>,
}

impl Llama {
    /// Builds the model from weights named as in Hugging Face checkpoints
    /// (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn new(cfg: &LlamaConfig, lb: &LayerBuilder) -> Result<Self> {
        let m = if !cfg.multimodal {
            lb.pp("model")
        } else if lb.contains_tensor("language_model.model.embed_tokens.weight") {
            lb.pp("language_model").pp("model")
        } else {
            lb.pp("model").pp("language_model")
        };
        let embed_tokens = m
            .pp("embed_tokens")
            .embedding(cfg.vocab_size, cfg.hidden_size)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            let h = cfg.hidden_size;
            layers.push(DecoderLayer {
                kind: cfg.layer_types.of(i),
                input_layernorm: norm_weight(cfg, &l.pp("input_layernorm"), h)?,
                self_attn: Attention::new(cfg, &l.pp("self_attn"))?,
                post_attention_layernorm: norm_weight(cfg, &l.pp("post_attention_layernorm"), h)?,
                feedforward_norms: if cfg.gemma_norms {
                    Some((
                        norm_weight(cfg, &l.pp("pre_feedforward_layernorm"), h)?,
                        norm_weight(cfg, &l.pp("post_feedforward_layernorm"), h)?,
                    ))
                } else {
                    None
                },
                mlp: Mlp::new(cfg, &l.pp("mlp"))?,
            });
        }
        let norm = norm_weight(cfg, &m.pp("norm"), cfg.hidden_size)?;
        let head = lb.pp("lm_head");
        let lm_head = if cfg.tie_word_embeddings {
            head.linear_from(embed_tokens.clone(), None)?
        } else {
            head.linear(cfg.hidden_size, cfg.vocab_size, false)?
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope_full: cfg.rope_for(LayerKind::Full),
            rope_sliding: cfg.rope_for(LayerKind::Sliding),
            embed_scale: cfg
                .gemma_norms
                .then(|| (cfg.hidden_size as f64).sqrt() as f32 as f64),
        })
    }

    /// The parsed config, with the Llama-specific fields.
    pub fn llama_config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Whether some layer is of `kind`.
    fn has(&self, kind: LayerKind) -> bool {
        self.layers.iter().any(|l| l.kind == kind)
    }

    /// The rotary tables of each layer kind the model has, for `positions` (`[b][s]`) or, when
    /// `None`, for `0..seq` shared by every row. Kinds with the same frequencies share tables.
    fn rope_by_kind(
        &self,
        positions: Option<&[Vec<usize>]>,
        seq: usize,
        dtype: DType,
    ) -> Result<[Option<(Tensor, Tensor)>; 2]> {
        let dev = &self.embed_tokens.device();
        let table = |(freq, scale): &(Vec<f64>, f64)| -> Result<(Tensor, Tensor)> {
            Ok(match positions {
                Some(p) => rope_tables_at(freq, *scale, p, dtype, dev)?,
                None => rope_tables(freq, *scale, seq, dtype, dev)?,
            })
        };
        let full = self
            .has(LayerKind::Full)
            .then(|| table(&self.rope_full))
            .transpose()?;
        let sliding = match (&full, self.has(LayerKind::Sliding)) {
            (_, false) => None,
            (Some(f), true) if self.rope_sliding == self.rope_full => Some(f.clone()),
            _ => Some(table(&self.rope_sliding)?),
        };
        Ok([full, sliding])
    }

    /// Pairs the rotary tables with each kind's attention mask.
    fn by_kind(
        [full, sliding]: [Option<(Tensor, Tensor)>; 2],
        mut mask: impl FnMut(LayerKind) -> Result<AttnMask>,
    ) -> Result<LayerInputs> {
        let mut make = |t: Option<(Tensor, Tensor)>, kind| -> Result<Option<KindInputs>> {
            t.map(|(cos, sin)| {
                Ok(KindInputs {
                    cos,
                    sin,
                    mask: mask(kind)?,
                })
            })
            .transpose()
        };
        Ok(LayerInputs {
            full: make(full, LayerKind::Full)?,
            sliding: make(sliding, LayerKind::Sliding)?,
        })
    }

    /// The sliding window, if it can hide anything from a row of `seq` tokens.
    fn window_within(&self, seq: usize) -> Option<usize> {
        self.cfg.sliding_window.filter(|w| *w < seq)
    }

    /// The checked inputs of a full-sequence pass: embeddings, and rotary tables and attention
    /// mask per layer kind.
    fn inputs(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, LayerInputs)> {
        let segments = decoder::segments(input_ids, attention_mask)?;
        let s = input_ids.dim(1)?;
        let x = self.embed(input_ids)?;
        // rows that pack several examples: positions restart at each one
        let positions = packed_positions(&segments);
        let tables = self.rope_by_kind(positions.as_deref(), s, x.dtype())?;
        let window = self.window_within(s);
        let inputs = Self::by_kind(tables, |kind| {
            let w = if kind == LayerKind::Sliding {
                window
            } else {
                None
            };
            Ok(AttnMask::causal(&segments, w)?)
        })?;
        Ok((x, inputs))
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?;
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max_id} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let x = self.embed_tokens.rows(&ids, self.norm.dtype())?.reshape((
            b,
            s,
            self.cfg.hidden_size,
        ))?;
        Ok(match self.embed_scale {
            Some(f) => (x * f)?,
            None => x,
        })
    }

    fn layers_forward(
        &self,
        mut x: Tensor,
        shared: &LayerInputs,
        train: bool,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, shared, eps, train, slot)?;
        }
        Ok(rms_norm(&x, &self.norm, eps)?)
    }
}

impl CausalLm for Llama {
    fn config(&self) -> &dyn ModelConfig {
        &self.cfg
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// Logits `[batch, seq, vocab]` (f32) for every position. `attention_mask` `[batch, seq]`
    /// is 1 for real tokens and 0 for padding; `train` switches LoRA dropout on.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, train)?;
        Ok(self
            .lm_head
            .forward_t(&hidden, train)?
            .to_dtype(DType::F32)?)
    }

    /// Logits (f32) `[n, vocab]` only at `positions` (flat indices into `batch × seq`): a loss
    /// needs a few positions, and the output head over a large vocabulary is a good share of a
    /// small model's compute.
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
        Ok(self.lm_head.forward_t(&rows, train)?.to_dtype(DType::F32)?)
    }

    /// The final normalised hidden states `[batch, seq, hidden]`, before the output head.
    fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (x, shared) = self.inputs(input_ids, attention_mask)?;
        self.layers_forward(x, &shared, train, None)
    }

    /// Summed cross-entropy of the output head over `hidden` `[batch, seq, hidden]` at
    /// `positions` against `labels` (the second half of [`CausalLm::summed_loss`]).
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

    /// `scale ×` [`CausalLm::summed_loss`] (training mode) and the gradients of `vars` (in
    /// their order; `None` where none arrived), computed with activation checkpointing: the
    /// forward pass keeps only each layer's input; the backward pass recomputes one layer at a
    /// time and backpropagates through it, so at most one layer's activations are alive. Costs
    /// one more forward pass of the layers. LoRA dropout masks are a function of the step seed,
    /// so the recomputed layer is the same function.
    fn checkpointed_loss_and_grads(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: &Tensor,
        labels: &Tensor,
        scale: f64,
        vars: &[Tensor],
    ) -> Result<(f32, Vec<Option<Tensor>>)> {
        let (x, shared) = self.inputs(input_ids, attention_mask)?;
        let eps = self.cfg.rms_norm_eps;
        decoder::checkpointed_loss_and_grads(
            x,
            self.layers.len(),
            |i, x| self.layers[i].forward(x, &shared, eps, true, None),
            |top| {
                let hidden = rms_norm(top, &self.norm, eps)?;
                self.head_loss(&hidden, positions, labels, true)
            },
            scale,
            vars,
        )
    }

    /// Logits (f32) `[n, vocab]` at `at` (flat indices into `b × s`) of rows that pack several
    /// sequences sharing a prefix (e.g. one prompt followed by each candidate answer): every
    /// token has an explicit position (`positions`, `[b][s]`) and `bias` `[b, 1, s, s]` (0 =
    /// may attend, large negative = may not) says what it sees. Inference only.
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
        let x = self.embed(input_ids)?;
        let dev = x.device().clone();
        let tables = self.rope_by_kind(Some(positions), s, x.dtype())?;
        let shared = Self::by_kind(tables, |kind| match self.cfg.sliding_window {
            // the window counts positions, so the caller's bias knows nothing of it
            Some(w) if kind == LayerKind::Sliding => Ok(AttnMask::bias(
                (bias + window_bias_at(positions, w, &dev)?)?,
            )),
            _ => Ok(AttnMask::bias(bias.clone())),
        })?;
        let hidden = self.layers_forward(x, &shared, false, None)?;
        let d = hidden.dim(2)?;
        let picked = hidden.reshape((b * s, d))?.index_select(at, 0)?;
        Ok(self
            .lm_head
            .forward_t(&picked, false)?
            .to_dtype(DType::F32)?)
    }

    /// An empty key/value cache for [`CausalLm::forward_cached`].
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Logits (f32) `[1, s, vocab]` of `input_ids` `[1, s]` that continue the tokens already in
    /// `cache` (inference only: no dropout). Generation feeds the prompt once, then one token at
    /// a time.
    fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let s = decoder::cached_len(input_ids)?;
        let x = self.embed(input_ids)?;
        let past = cache.len;
        let total = past + s;
        let mut tables = self.rope_by_kind(None, total, x.dtype())?;
        for t in tables.iter_mut().flatten() {
            *t = (t.0.narrow(0, past, s)?, t.1.narrow(0, past, s)?);
        }
        let window = self.cfg.sliding_window;
        let shared = Self::by_kind(tables, |kind| {
            let w = if kind == LayerKind::Sliding {
                window
            } else {
                None
            };
            Ok(AttnMask::cached(past, w))
        })?;
        let hidden = self.layers_forward(x, &shared, false, Some(cache))?;
        cache.len = total;
        Ok(self
            .lm_head
            .forward_t(&hidden, false)?
            .to_dtype(DType::F32)?)
    }
}

impl Module for Llama {
    fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        CausalLm::forward(self, input_ids, None, false)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
