//! The Llama-family decoder network, differentiable end to end.
use super::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::model::{CausalLm, KvCache, ModelConfig};
use candle_core::backprop::GradStore;
use candle_core::{DType, Module, Tensor, Var};
use lorakit_adapter::{LayerBuilder, LoraLinear};
use lorakit_ops::attention;
use lorakit_ops::chunked_loss::{chunk_rows, linear_cross_entropy};
use lorakit_ops::layers::{
    apply_rope, mask_segments, packed_positions, rms_norm, rope_tables, rope_tables_at,
    segment_bias,
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
    /// Qwen3's RMSNorm weights `[head_dim]` for each head of q and of k.
    qk_norm: Option<(Tensor, Tensor)>,
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
                    lb.pp("q_norm").tensor(d, "weight")?,
                    lb.pp("k_norm").tensor(d, "weight")?,
                ))
            } else {
                None
            },
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
        bias: &Tensor,
        train: bool,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (mut q, mut k, v) = self.qkv.forward(x, train)?;
        let (h, kv) = (self.heads, self.kv_heads);
        if let Some((qw, kw)) = &self.qk_norm {
            q = per_head_rms_norm(&q, qw, h, self.eps)?;
            k = per_head_rms_norm(&k, kw, kv, self.eps)?;
        }
        let Some(slot) = cache else {
            let out = attention::rope_attention(&q, &k, &v, cos, sin, bias, h, kv)?;
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
        let out = attention::attention(&q, &k, &v, bias)?;
        Ok(self.o_proj.forward_t(&out, train)?)
    }
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
        let h = lorakit_ops::fused::swiglu(&gate, &up)?;
        Ok(self.down_proj.forward_t(&h, train)?)
    }
}

struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// What every layer of one forward pass shares: rotary tables and the attention bias.
struct LayerInputs<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    bias: &'a Tensor,
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
        let h = rms_norm(x, &self.input_layernorm, eps)?;
        let attn = self
            .self_attn
            .forward(&h, inputs.cos, inputs.sin, inputs.bias, train, slot)?;
        let x = (x + attn)?;
        let h = rms_norm(&x, &self.post_attention_layernorm, eps)?;
        Ok((&x + self.mlp.forward(&h, train)?)?)
    }
}

/// A decoder-only causal language model of the Llama family.
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: LoraLinear,
    inv_freq: Vec<f64>,
}

impl Llama {
    /// Builds the model from weights named as in Hugging Face checkpoints
    /// (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn new(cfg: &LlamaConfig, lb: &LayerBuilder) -> Result<Self> {
        let m = lb.pp("model");
        let embed_tokens = m
            .pp("embed_tokens")
            .embedding(cfg.vocab_size, cfg.hidden_size)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            layers.push(DecoderLayer {
                input_layernorm: l.pp("input_layernorm").tensor(cfg.hidden_size, "weight")?,
                self_attn: Attention::new(cfg, &l.pp("self_attn"))?,
                post_attention_layernorm: l
                    .pp("post_attention_layernorm")
                    .tensor(cfg.hidden_size, "weight")?,
                mlp: Mlp::new(cfg, &l.pp("mlp"))?,
            });
        }
        let norm = m.pp("norm").tensor(cfg.hidden_size, "weight")?;
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
            inv_freq: cfg.inv_freq(),
        })
    }

    /// The parsed config, with the Llama-specific fields.
    pub fn llama_config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The checked inputs of a full-sequence pass: embeddings, rotary tables and attention bias.
    fn inputs(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let (b, s) = input_ids.dims2()?;
        if s == 0 {
            return Err(ModelError::Input("empty input sequence".into()));
        }
        if let Some(m) = attention_mask {
            if m.dims() != [b, s] {
                return Err(ModelError::Input(format!(
                    "attention mask has shape {:?}, input ids {:?}",
                    m.dims(),
                    [b, s]
                )));
            }
        }
        let x = self.embed(input_ids)?;
        let dev = self.embed_tokens.device();
        let segments = match attention_mask {
            Some(m) => mask_segments(m)?,
            None => vec![vec![1; s]; b],
        };
        let scale = self.cfg.position_scale();
        // rows that pack several examples: positions restart at each one
        let (cos, sin) = match packed_positions(&segments) {
            Some(p) => rope_tables_at(&self.inv_freq, scale, &p, x.dtype(), dev)?,
            None => rope_tables(&self.inv_freq, scale, s, x.dtype(), dev)?,
        };
        let bias = segment_bias(&segments, self.cfg.sliding_window, dev)?;
        Ok((x, cos, sin, bias))
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
        Ok(self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, self.cfg.hidden_size))?)
    }

    fn layers_forward(
        &self,
        mut x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        train: bool,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        let shared = LayerInputs { cos, sin, bias };
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &shared, eps, train, slot)?;
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
        let (x, cos, sin, bias) = self.inputs(input_ids, attention_mask)?;
        self.layers_forward(x, &cos, &sin, &bias, train, None)
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
        let (b, s, d) = hidden.dims3()?;
        let rows = hidden.reshape((b * s, d))?.index_select(positions, 0)?;
        let head = &self.lm_head;
        let loss = if head.lora().is_none() && head.bias().is_none() && !head.is_trainable() {
            let chunk = chunk_rows(self.cfg.vocab_size);
            linear_cross_entropy(
                &rows,
                head.weight(),
                head.weight_t(train)?,
                labels,
                chunk,
                train,
            )?
        } else {
            let logits = head.forward_t(&rows, train)?.to_dtype(DType::F32)?;
            lorakit_ops::fused::cross_entropy(&logits, labels)?
        };
        Ok(loss.sum_all()?)
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
        let (x, cos, sin, bias) = self.inputs(input_ids, attention_mask)?;
        let shared = LayerInputs {
            cos: &cos,
            sin: &sin,
            bias: &bias,
        };
        let eps = self.cfg.rms_norm_eps;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = x.detach();
        for layer in &self.layers {
            let out = layer.forward(&x, &shared, eps, true, None)?.detach();
            inputs.push(std::mem::replace(&mut x, out));
        }
        let top = Var::from_tensor(&x)?;
        drop(x);
        let hidden = rms_norm(top.as_tensor(), &self.norm, eps)?;
        let loss = (self.head_loss(&hidden, positions, labels, true)? * scale)?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        // Only the wanted gradients are kept from each backward pass: a GradStore also holds
        // gradients of untracked operands (e.g. a broadcast attention bias), views that keep
        // that layer's activation buffers alive.
        let mut wanted: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut collect = |store: &GradStore| -> Result<()> {
            for (slot, v) in wanted.iter_mut().zip(vars) {
                if let Some(g) = store.get(v) {
                    *slot = Some(match slot.take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
            Ok(())
        };
        let lost =
            || ModelError::Input("checkpointed backward: no gradient reached a layer".into());
        let mut grads = loss.backward()?;
        drop(loss);
        collect(&grads)?;
        let mut g = grads.remove(top.as_tensor()).ok_or_else(lost)?;
        drop(grads);
        for (i, (layer, input)) in self.layers.iter().zip(inputs).enumerate().rev() {
            // the first layer's input (the embeddings) needs no gradient
            let var = if i > 0 {
                Some(Var::from_tensor(&input)?)
            } else {
                None
            };
            let x = var.as_ref().map(|v| v.as_tensor()).unwrap_or(&input);
            let out = layer.forward(x, &shared, eps, true, None)?;
            let mut lg = (out * &g)?.sum_all()?.backward()?;
            collect(&lg)?;
            if let Some(v) = &var {
                g = lg.remove(v.as_tensor()).ok_or_else(lost)?;
            }
        }
        Ok((value, wanted))
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
        let scale = self.cfg.position_scale();
        let (cos, sin) = rope_tables_at(&self.inv_freq, scale, positions, x.dtype(), &dev)?;
        let hidden = self.layers_forward(x, &cos, &sin, bias, false, None)?;
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
        let (b, s) = input_ids.dims2()?;
        if b != 1 || s == 0 {
            return Err(ModelError::Input(format!(
                "cached forward takes one non-empty sequence, got shape {:?}",
                [b, s]
            )));
        }
        let x = self.embed(input_ids)?;
        let dev = x.device().clone();
        let past = cache.len;
        let total = past + s;
        let (cos, sin) = rope_tables(
            &self.inv_freq,
            self.cfg.position_scale(),
            total,
            x.dtype(),
            &dev,
        )?;
        let (cos, sin) = (cos.narrow(0, past, s)?, sin.narrow(0, past, s)?);
        let mut bias = Vec::with_capacity(s * total);
        for i in 0..s {
            let qi = past + i;
            for j in 0..total {
                let in_window = self.cfg.sliding_window.is_none_or(|w| qi - j.min(qi) < w);
                bias.push(if j <= qi && in_window { 0f32 } else { -1.0e9 });
            }
        }
        let bias = Tensor::from_vec(bias, (1, 1, s, total), &dev)?;
        let hidden = self.layers_forward(x, &cos, &sin, &bias, false, Some(cache))?;
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
