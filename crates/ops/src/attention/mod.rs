//! Attention, `softmax(q·kᵀ/√d + mask)·v`, for every architecture: the entry points here pick
//! the implementation — the tiled CPU f32 kernel with an online softmax ([`cpu`]), on an NVIDIA
//! GPU in bf16 the tensor-core kernel with an online softmax (`flash`, built with the `cuda`
//! feature), else query blocks of the op that recomputes the probabilities in its backward pass
//! ([`recompute`], any device and dtype; its softmax rows are [`probs`]). Which keys a query
//! sees is an [`AttnMask`]: a rule (causal, window, padding, packed examples) that no path turns
//! into a `seq × seq` matrix.
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod flash;
pub mod mask;
pub mod probs;
pub mod recompute;

pub use mask::AttnMask;

use candle_core::{Result, Tensor};

/// Attention of `q` `[b, heads, s, d]` over `k`, `v` `[b, kv_heads, t, d]` (grouped kv heads
/// read in place) under `mask`; returns `[b, s, heads·d]`, the output projection's input.
/// Differentiable in q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask) -> Result<Tensor> {
    if let Some(out) = cpu::try_attention(q, k, v, mask) {
        return out;
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = flash::try_attention(q, k, v, mask, flash::Heads::First) {
        return out;
    }
    recompute::attention_blocks(q, k, v, mask)
}

/// [`attention`] of the projections' outputs as they are: q `[b, s, heads·d]`, k and v
/// `[b, t, kv_heads·d]`, heads side by side. The CPU kernel reads that layout in place (no
/// transposes, none in the backward pass either).
pub fn attention_heads_last(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    if let Some(out) = cpu::try_attention_heads_last(q, k, v, mask, heads, kv_heads) {
        return out;
    }
    #[cfg(feature = "cuda")]
    {
        let layout = flash::Heads::Last {
            heads,
            kv: kv_heads,
        };
        if let Some(out) = flash::try_attention(q, k, v, mask, layout) {
            return out;
        }
    }
    let (q, k, v) = split_heads(q, k, v, heads, kv_heads)?;
    attention(&q, &k, &v, mask)
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
    mask: &AttnMask,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let q_rot = crate::fused::try_rope_heads_last(q, cos, sin, heads);
    let k_rot = crate::fused::try_rope_heads_last(k, cos, sin, kv_heads);
    if let (Some(q), Some(k)) = (q_rot, k_rot) {
        let (q, k) = (q?, k?);
        if let Some(out) = cpu::try_attention_heads_last(&q, &k, v, mask, heads, kv_heads) {
            return out;
        }
    }
    let (q, k, v) = split_heads(q, k, v, heads, kv_heads)?;
    let q = crate::layers::apply_rope(&q, cos, sin)?;
    let k = crate::layers::apply_rope(&k, cos, sin)?;
    attention(&q, &k, &v, mask)
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
