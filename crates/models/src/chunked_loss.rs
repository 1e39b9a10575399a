//! Cross-entropy through a frozen output head without the full logits: `[n, vocab]` f32 logits
//! are 4 GB for 8 × 512 tokens over a 256k vocabulary, more than the rest of a LoRA step. The
//! rows go through the head a chunk at a time; each chunk's loss and its gradient with respect to
//! the hidden states (`(softmax − onehot) · W`, `[rows, hidden]`) are computed at once and the
//! logits dropped. The gradient is attached to the loss with a straight-through term, so the
//! backward pass never sees the head.
use crate::fused::{cross_entropy, cross_entropy_grad};
use candle_core::{DType, Result, Tensor};
use lorakit_adapter::frozen::frozen_matmul;

/// Logit elements computed at once (64 MiB in f32), whatever the vocabulary size.
pub const CHUNK_ELEMENTS: usize = 1 << 24;

/// Per-row cross-entropy `[n]` of `hidden @ weightᵀ` (`hidden` `[n, d]`, `weight` `[vocab, d]`,
/// frozen) against `labels` `[n]`, `chunk_rows` rows at a time. Differentiable in `hidden` when
/// `with_grad` (the gradient is computed in this forward pass); `weight` gets no gradient.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk_rows: usize,
    with_grad: bool,
) -> Result<Tensor> {
    let (n, d) = hidden.dims2()?;
    let (_, wd) = weight.dims2()?;
    if d != wd {
        candle_core::bail!("output head expects {wd} features, hidden states have {d}");
    }
    let labels = labels.to_dtype(DType::U32)?;
    let h = hidden.detach();
    let rows = chunk_rows.max(1);
    let (mut losses, mut grads) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let logits = frozen_matmul(&h.narrow(0, start, len)?, weight)?.to_dtype(DType::F32)?;
        let y = labels.narrow(0, start, len)?;
        losses.push(cross_entropy(&logits, &y)?.detach());
        if with_grad {
            let ones = Tensor::ones(len, DType::F32, logits.device())?;
            let dlogits = cross_entropy_grad(&logits, &y, &ones)?;
            grads.push(dlogits.to_dtype(weight.dtype())?.matmul(weight)?);
        }
        start += len;
    }
    let loss = match losses.len() {
        0 => Tensor::zeros(0, DType::F32, hidden.device())?,
        1 => losses.remove(0),
        _ => Tensor::cat(&losses, 0)?,
    };
    if !with_grad || n == 0 || !hidden.track_op() {
        return Ok(loss);
    }
    let dh = if grads.len() == 1 {
        grads.remove(0)
    } else {
        Tensor::cat(&grads, 0)?
    };
    // value: loss + 0 (x − x is exactly zero); gradient in `hidden`: dh per row
    let zero = (hidden - &h)?.to_dtype(DType::F32)?;
    loss + (zero * dh.to_dtype(DType::F32)?)?.sum(1)?
}

/// Rows per chunk for a vocabulary of `vocab`.
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_ELEMENTS / vocab.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};
    use lorakit_adapter::compare::max_abs_diff;

    fn composed(h: &Tensor, w: &Tensor, y: &Tensor) -> Result<Tensor> {
        let logits = h.matmul(&w.t()?)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
    }

    /// Every chunking (one row, a ragged last chunk, one chunk) gives the composed loss and
    /// the composed gradient for the hidden states, and none for the frozen head.
    #[test]
    fn chunked_loss_and_gradient_match_the_composed_head() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d, vocab) = (11, 16, 97);
        let h = Var::randn(0f32, 1., (n, d), &dev)?;
        let w = Tensor::randn(0f32, 0.5, (vocab, d), &dev)?;
        let y = Tensor::new(&[0u32, 5, 96, 17, 17, 42, 3, 50, 60, 70, 1], &dev)?;
        let up = Tensor::randn(0f32, 1., n, &dev)?; // a non-uniform upstream gradient
        let want = composed(h.as_tensor(), &w, &y)?;
        let want_g = (want.clone() * &up)?.sum_all()?.backward()?;
        let want_g = want_g.get(h.as_tensor()).unwrap();
        for rows in [1, 4, n, 1000] {
            let got = linear_cross_entropy(h.as_tensor(), &w, &y, rows, true)?;
            assert!(max_abs_diff(&got, &want)? < 1e-5, "rows {rows}");
            let g = (got * &up)?.sum_all()?.backward()?;
            let d = max_abs_diff(g.get(h.as_tensor()).unwrap(), want_g)?;
            assert!(d < 1e-5, "rows {rows}: gradient differs by {d}");
            assert!(g.get(&w).is_none());
            // without the gradient: same values, nothing to backpropagate into
            let plain = linear_cross_entropy(h.as_tensor(), &w, &y, rows, false)?;
            assert!(max_abs_diff(&plain, &want)? < 1e-5);
            assert!(!plain.track_op());
        }
        Ok(())
    }

    #[test]
    fn composed_fallback_for_other_dtypes_matches() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::randn(0f64, 1., (5, 8), &dev)?;
        let w = Tensor::randn(0f64, 0.5, (33, 8), &dev)?;
        let y = Tensor::new(&[0u32, 5, 32, 17, 9], &dev)?;
        let got = linear_cross_entropy(h.as_tensor(), &w, &y, 2, true)?;
        let want = composed(h.as_tensor(), &w, &y)?.to_dtype(DType::F32)?;
        assert!(max_abs_diff(&got, &want)? < 1e-5);
        let g1 = got.sum_all()?.backward()?;
        let g2 = want.sum_all()?.backward()?;
        let d = max_abs_diff(
            &g1.get(h.as_tensor()).unwrap().to_dtype(DType::F32)?,
            &g2.get(h.as_tensor()).unwrap().to_dtype(DType::F32)?,
        )?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn chunks_stay_under_the_element_budget() {
        assert!(chunk_rows(32000) * 32000 <= CHUNK_ELEMENTS);
        assert_eq!(chunk_rows(usize::MAX / 2), 1);
        assert_eq!(chunk_rows(1), CHUNK_ELEMENTS);
    }
}
