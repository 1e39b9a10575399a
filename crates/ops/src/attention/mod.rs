//! Attention, `softmax(q·kᵀ/√d + bias)·v`, for every architecture: the entry points here pick
//! the implementation — the fused CPU f32 kernel ([`cpu`]), else the memory-light op that
//! recomputes the probabilities in its backward pass ([`recompute`], any device and dtype; its
//! softmax rows are [`probs`]).
pub mod cpu;
pub mod probs;
pub mod recompute;

use candle_core::{Result, Tensor};

/// Attention of `q` `[b, heads, s, d]` over `k`, `v` `[b, kv_heads, t, d]` (grouped kv heads
/// read in place) with an additive f32 `bias` `[1 or b, 1, s, t]`; returns `[b, s, heads·d]`,
/// the output projection's input. Differentiable in q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    match cpu::try_attention(q, k, v, bias) {
        Some(out) => out,
        None => recompute::attention_recompute(q, k, v, bias),
    }
}

/// [`attention`] of the projections' outputs as they are: q `[b, s, heads·d]`, k and v
/// `[b, t, kv_heads·d]`, heads side by side. The CPU kernel reads that layout in place (no
/// transposes, none in the backward pass either).
pub fn attention_heads_last(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    if let Some(out) = cpu::try_attention_heads_last(q, k, v, bias, heads, kv_heads) {
        return out;
    }
    let (q, k, v) = split_heads(q, k, v, heads, kv_heads)?;
    attention(&q, &k, &v, bias)
}

/// Rotary embedding of q and k (tables `[s, d/2]`), then [`attention_heads_last`]: a decoder
/// layer's attention core from its projections' outputs.
#[allow(clippy::too_many_arguments)]
pub fn rope_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    bias: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let q_rot = crate::fused::try_rope_heads_last(q, cos, sin, heads);
    let k_rot = crate::fused::try_rope_heads_last(k, cos, sin, kv_heads);
    if let (Some(q), Some(k)) = (q_rot, k_rot) {
        let (q, k) = (q?, k?);
        if let Some(out) = cpu::try_attention_heads_last(&q, &k, v, bias, heads, kv_heads) {
            return out;
        }
    }
    let (q, k, v) = split_heads(q, k, v, heads, kv_heads)?;
    let q = crate::layers::apply_rope(&q, cos, sin)?;
    let k = crate::layers::apply_rope(&k, cos, sin)?;
    attention(&q, &k, &v, bias)
}

/// `[b, s, n·d]` → `[b, n, s, d]` (contiguous) for q (`heads`) and k, v (`kv_heads`).
pub fn split_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let split = |t: &Tensor, n: usize| -> Result<Tensor> {
        let (b, s, width) = t.dims3()?;
        t.reshape((b, s, n, width / n))?
            .transpose(1, 2)?
            .contiguous()
    };
    Ok((split(q, heads)?, split(k, kv_heads)?, split(v, kv_heads)?))
}
