//! Differentiable building blocks shared by the architectures (composed from candle ops that
//! have a backward pass: candle 0.11's fused `softmax_last_dim`, `rms_norm` and `rope*` are built
//! without one, so gradients silently stop at them).
use crate::frozen::frozen_mul;
use candle_core::{DType, Device, Result, Tensor, D};

/// HF-style RMSNorm: normalise in f32, cast back, scale by the frozen weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = crate::fused::try_rms_norm(x, weight, eps) {
        return y;
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(var + eps)?.sqrt()?)?;
    frozen_mul(&normed.to_dtype(dtype)?, weight)
}

/// `cos` and `sin` tables `[seq_len, head_dim / 2]` for positions `0..seq_len`.
pub fn rope_tables(
    inv_freq: &[f64],
    position_scale: f64,
    seq_len: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(seq_len * half);
    let mut sin = Vec::with_capacity(seq_len * half);
    for p in 0..seq_len {
        for f in inv_freq {
            // f32 angles, like the reference implementation's float32 freqs
            let angle = ((p as f64 * position_scale) as f32) * (*f as f32);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (seq_len, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (seq_len, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Rotary embedding on `[b, heads, seq, head_dim]` (non-interleaved halves, as in HF). Tables
/// are `[seq, head_dim / 2]`, or `[b, 1, seq, head_dim / 2]` when rows have their own positions.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if let Some(y) = crate::fused::try_rope(x, cos, sin) {
        return y;
    }
    if cos.rank() == 2 {
        return candle_nn::rotary_emb::rope_slow(&x.contiguous()?, cos, sin);
    }
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Additive attention bias `[b, 1, s, s]` in f32: 0 where query i may see key j (j ≤ i, within
/// the sliding window, key not padding), a large negative number elsewhere. A finite value keeps
/// rows that see nothing (padding queries) free of NaN.
pub fn attention_bias(
    batch: usize,
    seq: usize,
    key_mask: Option<&Tensor>,
    sliding_window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    const NEG: f32 = -1.0e9;
    let keep: Vec<Vec<u32>> = match key_mask {
        Some(m) => {
            let m = m.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            m.into_iter()
                .map(|row| row.into_iter().map(|v| (v != 0.0) as u32).collect())
                .collect()
        }
        None => vec![vec![1; seq]; batch],
    };
    let mut bias = Vec::with_capacity(batch * seq * seq);
    for row in keep.iter() {
        for i in 0..seq {
            for (j, k) in row.iter().enumerate() {
                let in_window = sliding_window.is_none_or(|w| i - j.min(i) < w);
                let ok = j <= i && *k != 0 && in_window;
                bias.push(if ok { 0.0 } else { NEG });
            }
        }
    }
    Tensor::from_vec(bias, (batch, 1, seq, seq), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_combines_causal_padding_and_window() -> Result<()> {
        let dev = Device::Cpu;
        let m = Tensor::new(&[[1u32, 1, 1, 0]], &dev)?;
        let b = attention_bias(1, 4, Some(&m), Some(2), &dev)?
            .squeeze(0)?
            .squeeze(0)?;
        let allowed: Vec<Vec<bool>> = b
            .to_vec2::<f32>()?
            .into_iter()
            .map(|r| r.into_iter().map(|v| v == 0.0).collect())
            .collect();
        assert_eq!(
            allowed,
            vec![
                vec![true, false, false, false],
                vec![true, true, false, false],
                vec![false, true, true, false],
                vec![false, false, true, false],
            ]
        );
        Ok(())
    }
}
