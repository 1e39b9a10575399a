//! Cross-entropy through a frozen output head without the full logits: `[n, vocab]` f32 logits
//! are 4 GB for 8 × 512 tokens over a 256k vocabulary, more than the rest of a LoRA step. The
//! rows go through the head a chunk at a time; each chunk's loss and its gradient with respect to
//! the hidden states (`(softmax − onehot) · W`, `[rows, hidden]`) are computed at once and the
//! logits dropped. The gradient is attached to the loss with a straight-through term, so the
//! backward pass never sees the head.
use crate::frozen::frozen_matmul;
use crate::fused::{cross_entropy, cross_entropy_grad};
use crate::quantized::{Frozen, QuantMatrix};
use candle_core::{DType, Result, Tensor};

/// Logit elements computed at once (64 MiB in f32), whatever the vocabulary size.
pub const CHUNK_ELEMENTS: usize = 1 << 24;

/// Per-row cross-entropy `[n]` of `hidden @ weightᵀ` (`hidden` `[n, d]`, `weight` `[vocab, d]`,
/// frozen) against `labels` `[n]`, `chunk_rows` rows at a time. Differentiable in `hidden` when
/// `with_grad` (the gradient is computed in this forward pass); `weight` gets no gradient.
/// `weight_t`, a contiguous `[d, vocab]` copy of `weightᵀ` if the caller keeps one, is what the
/// CPU kernels read for the logits (the matmul kernel repacks a transposed operand per call).
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    weight_t: Option<&Tensor>,
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
    // the gradient is only worth computing when something upstream wants it
    let with_grad = with_grad && n > 0 && hidden.track_op();
    let (loss, dh) =
        match cpu::linear_cross_entropy(&h, weight, weight_t, &labels, rows, with_grad)? {
            Some(done) => done,
            None => composed_chunks(&h, weight, &labels, rows, with_grad)?,
        };
    let Some(dh) = dh else {
        return Ok(loss);
    };
    // value: loss + 0 (x − x is exactly zero); gradient in `hidden`: dh per row
    let zero = (hidden - &h)?.to_dtype(DType::F32)?;
    loss + (zero * dh.to_dtype(DType::F32)?)?.sum(1)?
}

/// [`linear_cross_entropy`] for a head that is dense or quantized ([`Frozen`]). A quantized
/// head on the CPU goes through the vocabulary a chunk of rows at a time instead (each chunk
/// dequantized once per step, [`quantized_head`]); elsewhere it is dequantized for the call.
pub fn frozen_linear_cross_entropy(
    hidden: &Tensor,
    weight: &Frozen,
    weight_t: Option<&Tensor>,
    labels: &Tensor,
    chunk_rows: usize,
    with_grad: bool,
) -> Result<Tensor> {
    let q = match weight {
        Frozen::Dense(w) => {
            return linear_cross_entropy(hidden, w, weight_t, labels, chunk_rows, with_grad)
        }
        Frozen::Quant(q) => q,
    };
    if !(q.device().is_cpu() && hidden.device().is_cpu() && hidden.dtype() == DType::F32) {
        let w = q.dequantize(hidden.dtype())?;
        return linear_cross_entropy(hidden, &w, None, labels, chunk_rows, with_grad);
    }
    let (n, d) = hidden.dims2()?;
    if d != q.dims().1 {
        candle_core::bail!(
            "output head expects {} features, hidden states have {d}",
            q.dims().1
        );
    }
    let h = hidden.detach().contiguous()?;
    let with_grad = with_grad && n > 0 && hidden.track_op();
    let labels = labels.to_dtype(DType::U32)?;
    let max_rows = CHUNK_ELEMENTS / n.max(1);
    let (loss, dh) = quantized_head(&h, q, &labels, with_grad, max_rows)?;
    let Some(dh) = dh else {
        return Ok(loss);
    };
    let zero = (hidden - &h)?;
    loss + (zero * dh)?.sum(1)?
}

/// Loss (and `dh`) of a quantized head over CPU f32 hidden states `h` `[n, d]`, one pass over
/// the vocabulary in chunks with an online softmax: per row the running max `m`, the sum
/// `s = Σ exp(l − m)` and, for the gradient, `acc = Σ exp(l − m)·W_v` (rescaled when `m`
/// grows), so that `dh = acc / s − W_label`. Each chunk of the head (`max_rows` rows at most)
/// is dequantized once; no `[n, vocab]` buffer.
fn quantized_head(
    h: &Tensor,
    q: &QuantMatrix,
    labels: &Tensor,
    with_grad: bool,
    max_rows: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    use crate::cpu_gemm::{gemm_f32, Threads};
    use crate::softmax_row;
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;
    let (n, d) = h.dims2()?;
    let vocab = q.dims().0;
    let labels = labels.contiguous()?;
    let y: Vec<u32> = labels.to_vec1()?;
    let (hs, hl) = h.storage_and_layout();
    let hv = match (&*hs, hl.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => candle_core::bail!("output head: hidden states are not contiguous f32"),
    };
    let mut m = vec![f32::NEG_INFINITY; n];
    let mut s = vec![0f64; n];
    let mut picked = vec![f32::NAN; n];
    let mut acc = vec![0f32; if with_grad { n * d } else { 0 }];
    let mut buf = Vec::new();
    q.for_each_chunk(max_rows, |v0, w| {
        let vc = w.len() / d.max(1);
        buf.resize(n * vc, 0f32);
        // SAFETY: buf is n×vc; hv n×d; w vc×d read transposed (d×vc).
        unsafe {
            gemm_f32(
                (n, vc, d),
                buf.as_mut_ptr(),
                vc,
                false,
                hv.as_ptr(),
                (d, 1),
                w.as_ptr(),
                (1, d),
                1.0,
                Threads::All,
            );
        }
        let acc_rows: Vec<&mut [f32]> = if with_grad {
            acc.chunks_mut(d.max(1)).collect()
        } else {
            (0..n).map(|_| <&mut [f32]>::default()).collect()
        };
        buf.par_chunks_mut(vc.max(1))
            .zip(m.par_iter_mut())
            .zip(s.par_iter_mut())
            .zip(picked.par_iter_mut())
            .zip(acc_rows.into_par_iter())
            .zip(y.par_iter())
            .for_each(|(((((row, m), s), picked), acc), &label)| {
                let label = label as usize;
                if (v0..v0 + vc).contains(&label) {
                    *picked = row[label - v0];
                }
                let new_m = m.max(softmax_row::max(row));
                if new_m == f32::NEG_INFINITY {
                    return;
                }
                let rescale = if *m == f32::NEG_INFINITY {
                    0.0
                } else {
                    (*m - new_m).exp()
                };
                let sum = if with_grad {
                    softmax_row::exp_shifted_in_place(row, new_m)
                } else {
                    softmax_row::sum_exp_shifted(row, new_m)
                };
                *s = *s * rescale as f64 + sum;
                if with_grad && rescale != 1.0 {
                    softmax_row::scale(acc, rescale);
                }
                *m = new_m;
            });
        if with_grad {
            // acc += exp(logits − m) · W_chunk
            // SAFETY: acc is n×d; buf n×vc; w vc×d.
            unsafe {
                gemm_f32(
                    (n, d, vc),
                    acc.as_mut_ptr(),
                    d,
                    true,
                    buf.as_ptr(),
                    (vc, 1),
                    w.as_ptr(),
                    (d, 1),
                    1.0,
                    Threads::All,
                );
            }
        }
        Ok(())
    })?;
    let loss: Vec<f32> = (0..n)
        .map(|i| (s[i].ln() as f32) + m[i] - picked[i])
        .collect();
    let dev = h.device();
    let loss = Tensor::from_vec(loss, n, dev)?;
    if !with_grad {
        return Ok((loss, None));
    }
    // dh = acc / s − W_label (an out-of-range label has a NaN loss; its row reads row 0)
    let ids: Vec<u32> = y
        .iter()
        .map(|&l| if (l as usize) < vocab { l } else { 0 })
        .collect();
    let wl = q.rows(&Tensor::new(ids, dev)?, DType::F32)?;
    acc.par_chunks_mut(d.max(1))
        .zip(s.par_iter())
        .for_each(|(row, s)| softmax_row::scale(row, (1.0 / s) as f32));
    let dh = (Tensor::from_vec(acc, (n, d), dev)? - wl)?;
    Ok((loss, Some(dh)))
}

/// The CPU f32 version in one kernel sequence per chunk: logits by the matmul kernel into a
/// buffer reused across chunks, loss and `softmax − onehot` written over the logits in one
/// pass per row (one `exp` per logit), then `dh` by the matmul kernel.
mod cpu {
    use crate::cpu_gemm::{gemm_f32, Threads};
    use crate::softmax_row;
    use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
    use rayon::prelude::*;

    fn data<'a>(s: &'a Storage, l: &Layout) -> Option<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(&v[a..b]),
            _ => None,
        }
    }

    /// `None` when the tensors are not contiguous f32 on the CPU.
    pub(super) fn linear_cross_entropy(
        h: &Tensor,
        w: &Tensor,
        wt: Option<&Tensor>,
        labels: &Tensor,
        chunk: usize,
        with_grad: bool,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !(cpu_f32(h) && cpu_f32(w) && wt.is_none_or(cpu_f32)) {
            return Ok(None);
        }
        let (n, d) = h.dims2()?;
        let vocab = w.dim(0)?;
        let labels = labels.contiguous()?;
        let (hs, hl) = h.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (ys, yl) = labels.storage_and_layout();
        let (Some(hv), Some(wv)) = (data(&hs, hl), data(&ws, wl)) else {
            return Ok(None);
        };
        let wt = wt.map(|t| t.storage_and_layout());
        // the logits' right operand: wt as [d, vocab] rows, or w read transposed
        let (rhs, rhs_strides) = match &wt {
            Some((s, l)) if l.dims() == [d, vocab] => match data(s, l) {
                Some(v) => (v, (vocab, 1)),
                None => return Ok(None),
            },
            Some((_, l)) => candle_core::bail!(
                "output head: transposed weight {:?}, expected [{d}, {vocab}]",
                l.dims()
            ),
            None => (wv, (1, d)),
        };
        let y = match (&*ys, yl.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::U32(v)), Some((a, b))) => &v[a..b],
            _ => return Ok(None),
        };
        let mut loss = vec![0f32; n];
        let mut dh = vec![0f32; if with_grad { n * d } else { 0 }];
        let mut buf = vec![0f32; chunk.min(n) * vocab];
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let logits = &mut buf[..len * vocab];
            // SAFETY: logits is len×vocab, hv holds rows start.. of n×d, rhs is d×vocab by
            // its strides (wv vocab×d read transposed, or wt d×vocab).
            unsafe {
                gemm_f32(
                    (len, vocab, d),
                    logits.as_mut_ptr(),
                    vocab,
                    false,
                    hv[start * d..].as_ptr(),
                    (d, 1),
                    rhs.as_ptr(),
                    rhs_strides,
                    1.0,
                    Threads::All,
                );
            }
            logits
                .par_chunks_mut(vocab)
                .zip(loss[start..start + len].par_iter_mut())
                .zip(y[start..start + len].par_iter())
                .for_each(|((row, l), &label)| {
                    let picked = row.get(label as usize).copied().unwrap_or(f32::NAN);
                    let (max, sum) = if with_grad {
                        let (max, sum) = softmax_row::softmax_in_place(row);
                        if let Some(t) = row.get_mut(label as usize) {
                            *t -= 1.0;
                        }
                        (max, sum)
                    } else {
                        let max = softmax_row::max(row);
                        (max, softmax_row::sum_exp_shifted(row, max))
                    };
                    *l = (sum.ln() as f32) + max - picked;
                });
            if with_grad {
                // SAFETY: dh rows start.. are len×d; logits len×vocab; wv vocab×d.
                unsafe {
                    gemm_f32(
                        (len, d, vocab),
                        dh[start * d..].as_mut_ptr(),
                        d,
                        false,
                        logits.as_ptr(),
                        (vocab, 1),
                        wv.as_ptr(),
                        (d, 1),
                        1.0,
                        Threads::All,
                    );
                }
            }
            start += len;
        }
        let dev = h.device();
        let dh = if with_grad {
            Some(Tensor::from_vec(dh, (n, d), dev)?)
        } else {
            None
        };
        Ok(Some((Tensor::from_vec(loss, n, dev)?, dh)))
    }
}

/// Chunk by chunk with tensor ops (any device and dtype): per-row losses and, with `with_grad`,
/// the gradient for the (detached) hidden states.
fn composed_chunks(
    h: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    rows: usize,
    with_grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let n = h.dim(0)?;
    let (mut losses, mut grads) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let logits =
            frozen_matmul(&h.narrow(0, start, len)?, weight, None)?.to_dtype(DType::F32)?;
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
        0 => Tensor::zeros(0, DType::F32, h.device())?,
        1 => losses.remove(0),
        _ => Tensor::cat(&losses, 0)?,
    };
    let dh = match grads.len() {
        0 => None,
        1 => Some(grads.remove(0)),
        _ => Some(Tensor::cat(&grads, 0)?),
    };
    Ok((loss, dh))
}

/// Rows per chunk for a vocabulary of `vocab`.
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_ELEMENTS / vocab.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::max_abs_diff;
    use candle_core::{Device, D};

    fn composed(h: &Tensor, w: &Tensor, y: &Tensor) -> Result<Tensor> {
        let logits = h.matmul(&w.t()?)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
    }

    /// A quantized head gives the loss and hidden-state gradient of the dense head over its
    /// dequantized values, for vocabulary chunks of one row, a ragged last chunk and one chunk
    /// (the online softmax across chunks), through the public entry point too.
    #[test]
    fn quantized_head_matches_the_dequantized_head() -> Result<()> {
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        let (n, d, vocab) = (9, 64, 97);
        let h = crate::seeded::var_randn(0f32, 1., (n, d), &dev)?;
        let w = crate::seeded::randn(0f32, 0.5, (vocab, d), &dev)?;
        let y = Tensor::new(&[0u32, 5, 96, 17, 17, 42, 3, 50, 60], &dev)?;
        for ty in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let q = QuantMatrix::quantize(&w, ty)?;
            let dense = q.dequantize(DType::F32)?;
            let want = composed(h.as_tensor(), &dense, &y)?;
            let gw = want.sum_all()?.backward()?;
            let want_dh = gw.get(h.as_tensor()).unwrap().clone();
            for max_rows in [1, 10, 200] {
                let hd = h.as_tensor().detach();
                let (loss, dh) = quantized_head(&hd, &q, &y, true, max_rows)?;
                assert!(max_abs_diff(&loss, &want)? < 1e-4, "{ty:?} {max_rows}");
                assert!(
                    max_abs_diff(&dh.unwrap(), &want_dh)? < 1e-5,
                    "{ty:?} {max_rows}"
                );
                let (plain, none) = quantized_head(&hd, &q, &y, false, max_rows)?;
                assert!(none.is_none() && max_abs_diff(&plain, &want)? < 1e-4);
            }
            let frozen = Frozen::Quant(q);
            let got = frozen_linear_cross_entropy(h.as_tensor(), &frozen, None, &y, 4, true)?;
            assert!(max_abs_diff(&got, &want)? < 1e-4);
            let g = got.sum_all()?.backward()?;
            assert!(max_abs_diff(g.get(h.as_tensor()).unwrap(), &want_dh)? < 1e-5);
        }
        Ok(())
    }

    /// Every chunking (one row, a ragged last chunk, one chunk) gives the composed loss and
    /// the composed gradient for the hidden states, and none for the frozen head.
    #[test]
    fn chunked_loss_and_gradient_match_the_composed_head() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d, vocab) = (11, 16, 97);
        let h = crate::seeded::var_randn(0f32, 1., (n, d), &dev)?;
        let w = crate::seeded::randn(0f32, 0.5, (vocab, d), &dev)?;
        let y = Tensor::new(&[0u32, 5, 96, 17, 17, 42, 3, 50, 60, 70, 1], &dev)?;
        let up = crate::seeded::randn(0f32, 1., n, &dev)?; // a non-uniform upstream gradient
        let want = composed(h.as_tensor(), &w, &y)?;
        let want_g = (want.clone() * &up)?.sum_all()?.backward()?;
        let want_g = want_g.get(h.as_tensor()).unwrap();
        let wt = w.t()?.contiguous()?;
        for (rows, wt) in [(1, None), (4, Some(&wt)), (n, None), (1000, Some(&wt))] {
            let got = linear_cross_entropy(h.as_tensor(), &w, wt, &y, rows, true)?;
            assert!(max_abs_diff(&got, &want)? < 1e-5, "rows {rows}");
            let g = (got * &up)?.sum_all()?.backward()?;
            let d = max_abs_diff(g.get(h.as_tensor()).unwrap(), want_g)?;
            assert!(d < 1e-5, "rows {rows}: gradient differs by {d}");
            assert!(g.get(&w).is_none());
            // without the gradient: same values, nothing to backpropagate into
            let plain = linear_cross_entropy(h.as_tensor(), &w, wt, &y, rows, false)?;
            assert!(max_abs_diff(&plain, &want)? < 1e-5);
            assert!(!plain.track_op());
        }
        Ok(())
    }

    /// The CPU kernel sequence and the tensor-op chunks (what other devices run) agree.
    #[test]
    fn cpu_kernels_and_composed_chunks_agree() -> Result<()> {
        let dev = Device::Cpu;
        let h = crate::seeded::randn(0f32, 1., (9, 16), &dev)?;
        let w = crate::seeded::randn(0f32, 0.5, (301, 16), &dev)?;
        let y = Tensor::new(&[0u32, 5, 300, 17, 17, 42, 3, 299, 1], &dev)?;
        let wt = w.t()?.contiguous()?;
        for rows in [1, 4, 9] {
            let (l2, g2) = composed_chunks(&h, &w, &y, rows, true)?;
            let g2 = g2.unwrap();
            // the weight read transposed, and its transposed copy
            for wt in [None, Some(&wt)] {
                let (l1, g1) = cpu::linear_cross_entropy(&h, &w, wt, &y, rows, true)?.unwrap();
                assert!(max_abs_diff(&l1, &l2)? < 1e-5);
                assert!(max_abs_diff(&g1.unwrap(), &g2)? < 1e-5);
                let (l3, g3) = cpu::linear_cross_entropy(&h, &w, wt, &y, rows, false)?.unwrap();
                assert!(max_abs_diff(&l3, &l2)? < 1e-5 && g3.is_none());
            }
        }
        // a transposed copy of the wrong shape is refused, not read out of bounds
        let bad = Tensor::zeros((16, 300), DType::F32, &dev)?;
        let err = cpu::linear_cross_entropy(&h, &w, Some(&bad), &y, 4, true).unwrap_err();
        assert!(err.to_string().contains("expected [16, 301]"), "{err}");
        Ok(())
    }

    #[test]
    fn composed_fallback_for_other_dtypes_matches() -> Result<()> {
        let dev = Device::Cpu;
        let h = crate::seeded::var_randn(0f64, 1., (5, 8), &dev)?;
        let w = crate::seeded::randn(0f64, 0.5, (33, 8), &dev)?;
        let y = Tensor::new(&[0u32, 5, 32, 17, 9], &dev)?;
        let got = linear_cross_entropy(h.as_tensor(), &w, None, &y, 2, true)?;
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
