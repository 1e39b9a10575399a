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

/// LayerNorm over the last dimension in f32, with frozen weight and bias (BERT, GPT-2).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?;
    crate::frozen::frozen_add(&frozen_mul(&normed, w)?, b)
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

/// The rows of an attention mask `[b, s]`: 0 = padding, else the number of the example a token
/// belongs to — 1 for every token of an unpacked row; 1, 2, 3, ... in order along a row that
/// packs several examples.
pub fn mask_segments(mask: &Tensor) -> Result<Vec<Vec<u32>>> {
    mask.to_dtype(DType::U32)?.to_vec2::<u32>()
}

/// Each token's position when rows pack several examples: counting restarts at 0 where the
/// example number changes. `None` when no row packs more than one example (positions are then
/// `0..s`, as for any unpacked row).
pub fn packed_positions(segments: &[Vec<u32>]) -> Option<Vec<Vec<usize>>> {
    if !segments.iter().flatten().any(|v| *v > 1) {
        return None;
    }
    Some(
        segments
            .iter()
            .map(|row| {
                let mut start = 0;
                (0..row.len())
                    .map(|t| {
                        if t > 0 && row[t] != row[t - 1] {
                            start = t;
                        }
                        t - start
                    })
                    .collect()
            })
            .collect(),
    )
}

/// `cos` and `sin` tables `[b, 1, s, head_dim / 2]` for explicit per-token `positions` `[b][s]`.
pub fn rope_tables_at(
    inv_freq: &[f64],
    position_scale: f64,
    positions: &[Vec<usize>],
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let b = positions.len();
    let s = positions.first().map(|p| p.len()).unwrap_or(0);
    if positions.iter().any(|p| p.len() != s) {
        candle_core::bail!("rope: rows of positions differ in length");
    }
    let longest = positions.iter().flatten().copied().max().unwrap_or(0) + 1;
    let (cos, sin) = rope_tables(inv_freq, position_scale, longest, DType::F32, &Device::Cpu)?;
    let idx: Vec<u32> = positions.iter().flatten().map(|p| *p as u32).collect();
    let idx = Tensor::from_vec(idx, b * s, &Device::Cpu)?;
    let half = inv_freq.len();
    let rows = |t: &Tensor| -> Result<Tensor> {
        t.index_select(&idx, 0)?
            .reshape((b, 1, s, half))?
            .to_dtype(dtype)?
            .to_device(device)
    };
    Ok((rows(&cos)?, rows(&sin)?))
}

/// Additive bias `[b, 1, s, s]` hiding key j from query i when `positions[i] − positions[j]`
/// reaches `window` (0 elsewhere): a sliding window over rows whose tokens carry explicit
/// positions, to add to a bias that says what else each token sees.
pub fn window_bias_at(positions: &[Vec<usize>], window: usize, device: &Device) -> Result<Tensor> {
    let batch = positions.len();
    let seq = positions.first().map(|r| r.len()).unwrap_or(0);
    let mut bias = Vec::with_capacity(batch * seq * seq);
    for row in positions {
        if row.len() != seq {
            candle_core::bail!("position rows differ in length");
        }
        for &pi in row {
            for &pj in row {
                let hidden = pi >= pj && pi - pj >= window;
                bias.push(if hidden { -1.0e9f32 } else { 0.0 });
            }
        }
    }
    Tensor::from_vec(bias, (batch, 1, seq, seq), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::AttnMask;

    #[test]
    fn packed_examples_see_only_themselves_and_positions_restart() -> Result<()> {
        let dev = Device::Cpu;
        let m = Tensor::new(&[[1u32, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]], &dev)?;
        let segments = mask_segments(&m)?;
        assert_eq!(
            packed_positions(&segments),
            Some(vec![vec![0, 1, 0, 1, 2, 0], vec![0, 1, 2, 3, 4, 5]])
        );
        assert_eq!(packed_positions(&[vec![1, 1, 0]]), None);
        let b: Vec<Vec<Vec<f32>>> = AttnMask::causal(&segments, None)?
            .to_bias(2, 6, 6, &dev)?
            .squeeze(1)?
            .to_vec3::<f32>()?;
        let seen = |row: usize, i: usize| -> Vec<usize> {
            (0..6).filter(|j| b[row][i][*j] == 0.0).collect()
        };
        assert_eq!(seen(0, 1), vec![0, 1]);
        assert_eq!(seen(0, 2), vec![2]);
        assert_eq!(seen(0, 4), vec![2, 3, 4]);
        assert_eq!(
            seen(0, 5),
            vec![0, 1, 2, 3, 4],
            "padding sees earlier tokens"
        );
        assert_eq!(seen(1, 5), vec![0, 1, 2, 3, 4, 5]);
        let (cos, _) = rope_tables_at(&[1.0, 0.5], 1.0, &[vec![0, 1, 0]], DType::F32, &dev)?;
        let (want, _) = rope_tables(&[1.0, 0.5], 1.0, 2, DType::F32, &dev)?;
        let cos = cos.squeeze(0)?.squeeze(0)?;
        assert_eq!(
            cos.get(2)?.to_vec1::<f32>()?,
            want.get(0)?.to_vec1::<f32>()?
        );
        assert_eq!(
            cos.get(1)?.to_vec1::<f32>()?,
            want.get(1)?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn mask_combines_causal_padding_and_window() -> Result<()> {
        let dev = Device::Cpu;
        let m = Tensor::new(&[[1u32, 1, 1, 0]], &dev)?;
        let b = AttnMask::causal(&mask_segments(&m)?, Some(2))?
            .to_bias(1, 4, 4, &dev)?
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
