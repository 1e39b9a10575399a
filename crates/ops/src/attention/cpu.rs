//! Fused attention core on the CPU (f32): `softmax(q·kᵀ/√d + bias)·v` for every head, with
//! grouped kv heads read in place (no `repeat_kv` copies) and the output written straight in
//! the `[b, s, heads·d]` layout the output projection reads. The composed version costs about
//! ten passes over `[b, heads, s, t]` buffers (copies, scale, bias, softmax, transposes) and as
//! many in its backward pass; here each head is a few calls of the `gemm` crate's kernels plus
//! one softmax pass. The forward pass keeps the probabilities for the backward pass, like the
//! composed version does. Checked against the composed version (values and gradients) below.
use crate::cpu_gemm::{gemm_f32, Threads};
use crate::softmax_row::softmax_in_place;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Causal (or any biased) attention of `q` `[b, heads, s, d]` over `k`, `v`
/// `[b, kv_heads, t, d]` with an additive f32 `bias` `[1 or b, 1, s, t]`, returning
/// `[b, s, heads·d]`; differentiable in q, k and v. `None` when the fused kernel does not apply
/// (not CPU f32): use the composed version.
pub fn try_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Option<Result<Tensor>> {
    fused(q, k, v, bias, None)
}

/// [`attention`] with q `[b, s, heads·d]` and k, v `[b, t, kv_heads·d]`: the projections'
/// outputs as they are, heads side by side, so no transposes (and none in the backward pass).
pub fn try_attention_heads_last(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Option<Result<Tensor>> {
    fused(q, k, v, bias, Some((heads, kv_heads)))
}

fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads_last: Option<(usize, usize)>,
) -> Option<Result<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v) && cpu_f32(bias)) {
        return None;
    }
    Some((|| {
        let op = FusedAttention {
            bias: bias.contiguous()?,
            heads_last,
            probs: Mutex::new(None),
        };
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    })())
}

struct FusedAttention {
    bias: Tensor,
    /// `Some((heads, kv_heads))`: inputs are `[b, s, heads·d]`, else `[b, heads, s, d]`.
    heads_last: Option<(usize, usize)>,
    /// `[b, heads, s, t]`, written by the forward pass for the backward pass.
    probs: Mutex<Option<Vec<f32>>>,
}

/// Sizes of one call, and where each head lives in the inputs.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    kv: usize,
    s: usize,
    t: usize,
    d: usize,
    /// Batch size of the bias (1: shared by every row).
    bias_b: usize,
    heads_last: bool,
}

impl Dims {
    fn of(
        lq: &Layout,
        lk: &Layout,
        lv: &Layout,
        bias: &[usize],
        heads_last: Option<(usize, usize)>,
    ) -> Result<Self> {
        let misfit = || {
            candle_core::Error::Msg(format!(
                "attention: q {:?}, k {:?} and v {:?} do not fit together",
                lq.shape(),
                lk.shape(),
                lv.shape()
            ))
        };
        let (b, heads, kv, s, t, d) = match heads_last {
            None => {
                let (b, heads, s, d) = lq.shape().dims4()?;
                let (bk, kv, t, dk) = lk.shape().dims4()?;
                if bk != b || dk != d {
                    return Err(misfit());
                }
                (b, heads, kv, s, t, d)
            }
            Some((heads, kv)) => {
                let (b, s, hd) = lq.shape().dims3()?;
                let (bk, t, kvd) = lk.shape().dims3()?;
                let d = hd / heads.max(1);
                if bk != b || heads == 0 || d * heads != hd || kvd != kv * d {
                    return Err(misfit());
                }
                (b, heads, kv, s, t, d)
            }
        };
        if lv.shape().dims() != lk.shape().dims() {
            return Err(misfit());
        }
        if kv == 0 || heads % kv != 0 {
            candle_core::bail!("attention: {heads} heads are not a multiple of {kv} kv heads");
        }
        let bias_b = match bias {
            [bb, 1, bs, bt] if (*bb == 1 || *bb == b) && *bs == s && *bt == t => *bb,
            _ => candle_core::bail!("attention: bias {bias:?} does not fit [{b}, 1, {s}, {t}]"),
        };
        Ok(Dims {
            b,
            heads,
            kv,
            s,
            t,
            d,
            bias_b,
            heads_last: heads_last.is_some(),
        })
    }

    fn rep(&self) -> usize {
        self.heads / self.kv
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// Offset of query head `hi` of batch row `bi` and the stride between its positions.
    fn q_at(&self, bi: usize, hi: usize) -> (usize, usize) {
        if self.heads_last {
            (
                bi * self.s * self.heads * self.d + hi * self.d,
                self.heads * self.d,
            )
        } else {
            ((bi * self.heads + hi) * self.s * self.d, self.d)
        }
    }

    /// Offset of kv head `kvi` of batch row `bi` and the stride between its positions.
    fn kv_at(&self, bi: usize, kvi: usize) -> (usize, usize) {
        if self.heads_last {
            (
                bi * self.t * self.kv * self.d + kvi * self.d,
                self.kv * self.d,
            )
        } else {
            ((bi * self.kv + kvi) * self.t * self.d, self.d)
        }
    }
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("attention: {what} must be a contiguous f32 tensor"),
    }
}

/// The contiguous f32 data of a tensor's CPU storage (from `Tensor::storage_and_layout`).
fn cpu_data<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(s) => f32s(s, l, what),
        _ => candle_core::bail!("attention: {what} must be on the CPU"),
    }
}

/// A raw pointer that rayon tasks may share; every task writes a disjoint part.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = Dims::of(lq, lk, lv, self.bias.dims(), self.heads_last)?;
        let (q, k, v) = (f32s(sq, lq, "q")?, f32s(sk, lk, "k")?, f32s(sv, lv, "v")?);
        let Dims {
            b, heads, s, t, d, ..
        } = dm;
        let mut probs = vec![0f32; b * heads * s * t];
        let mut out = vec![0f32; b * s * heads * d];
        let dst = Out(out.as_mut_ptr());
        let (bias_storage, bias_layout) = self.bias.storage_and_layout();
        let bias = cpu_data(&bias_storage, bias_layout, "bias")?;
        probs.par_chunks_mut(s * t).enumerate().for_each(|(bh, p)| {
            let (bi, hi) = (bh / heads, bh % heads);
            let (qo, q_rs) = dm.q_at(bi, hi);
            let (ko, kv_rs) = dm.kv_at(bi, hi / dm.rep());
            let bias = &bias[(bi % dm.bias_b) * s * t..];
            let o = dst;
            // SAFETY: offsets and strides stay inside the operands (checked shapes);
            // each task writes its own probabilities and its own head's columns of `out`.
            unsafe {
                // scores = scale · q kᵀ
                gemm_f32(
                    (s, t, d),
                    p.as_mut_ptr(),
                    t,
                    false,
                    q[qo..].as_ptr(),
                    (q_rs, 1),
                    k[ko..].as_ptr(),
                    (1, kv_rs),
                    dm.scale(),
                    Threads::One,
                );
            }
            for (row, brow) in p.chunks_mut(t).zip(bias.chunks(t)) {
                row.iter_mut().zip(brow).for_each(|(x, c)| *x += c);
                softmax_in_place(row);
            }
            unsafe {
                // out[bi, :, hi, :] = probs · v
                gemm_f32(
                    (s, d, t),
                    o.0.add(bi * s * heads * d + hi * d),
                    heads * d,
                    false,
                    p.as_ptr(),
                    (t, 1),
                    v[ko..].as_ptr(),
                    (kv_rs, 1),
                    1.0,
                    Threads::One,
                );
            }
        });
        *self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))? = Some(probs);
        Ok((CpuStorage::F32(out), Shape::from((b, s, heads * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))?
            .take();
        let Some(probs) = probs else {
            candle_core::bail!("attention: backward without a forward pass");
        };
        let grad = grad.contiguous()?;
        let dm = Dims::of(
            q.layout(),
            k.layout(),
            v.layout(),
            self.bias.dims(),
            self.heads_last,
        )?;
        let Dims {
            b,
            heads,
            s,
            t,
            d,
            kv,
            ..
        } = dm;
        let rep = dm.rep();
        let mut dq = vec![0f32; b * heads * s * d];
        let mut dk = vec![0f32; b * kv * t * d];
        let mut dv = vec![0f32; b * kv * t * d];
        let (pq, pk, pv) = (
            Out(dq.as_mut_ptr()),
            Out(dk.as_mut_ptr()),
            Out(dv.as_mut_ptr()),
        );
        let (q_shape, kv_shape, dev) = (q.shape().clone(), k.shape().clone(), q.device().clone());
        let guards = [q, k, v, &grad].map(|t| t.storage_and_layout());
        let [q, k, v, g] = [("q", 0), ("k", 1), ("v", 2), ("grad", 3)]
            .map(|(what, i)| cpu_data(&guards[i].0, guards[i].1, what));
        let (q, k, v, g) = (q?, k?, v?, g?);
        (0..b * kv).into_par_iter().for_each(|group| {
            let (bi, kvi) = (group / kv, group % kv);
            let (ko, kv_rs) = dm.kv_at(bi, kvi);
            let (dqp, dkp, dvp) = (pq, pk, pv);
            let mut ds = vec![0f32; s * t];
            for r in 0..rep {
                let hi = kvi * rep + r;
                let bh = bi * heads + hi;
                let p = &probs[bh * s * t..(bh + 1) * s * t];
                let (qo, q_rs) = dm.q_at(bi, hi);
                let go = g[bi * s * heads * d + hi * d..].as_ptr();
                let first = r == 0;
                // SAFETY: as in the forward pass; this task alone writes its
                // group's heads of dq and its kv head of dk and dv.
                unsafe {
                    // dv += pᵀ · dout
                    gemm_f32(
                        (t, d, s),
                        dvp.0.add(ko),
                        kv_rs,
                        !first,
                        p.as_ptr(),
                        (1, t),
                        go,
                        (heads * d, 1),
                        1.0,
                        Threads::One,
                    );
                    // dp = dout · vᵀ
                    gemm_f32(
                        (s, t, d),
                        ds.as_mut_ptr(),
                        t,
                        false,
                        go,
                        (heads * d, 1),
                        v[ko..].as_ptr(),
                        (1, kv_rs),
                        1.0,
                        Threads::One,
                    );
                }
                // ds = p ∘ (dp − Σ dp∘p)
                for (dsr, pr) in ds.chunks_mut(t).zip(p.chunks(t)) {
                    let dot: f64 = dsr.iter().zip(pr).map(|(a, b)| (a * b) as f64).sum();
                    let dot = dot as f32;
                    dsr.iter_mut()
                        .zip(pr)
                        .for_each(|(x, pj)| *x = pj * (*x - dot));
                }
                unsafe {
                    // dq = scale · ds · k
                    gemm_f32(
                        (s, d, t),
                        dqp.0.add(qo),
                        q_rs,
                        false,
                        ds.as_ptr(),
                        (t, 1),
                        k[ko..].as_ptr(),
                        (kv_rs, 1),
                        dm.scale(),
                        Threads::One,
                    );
                    // dk += scale · dsᵀ · q
                    gemm_f32(
                        (t, d, s),
                        dkp.0.add(ko),
                        kv_rs,
                        !first,
                        ds.as_ptr(),
                        (1, t),
                        q[qo..].as_ptr(),
                        (q_rs, 1),
                        dm.scale(),
                        Threads::One,
                    );
                }
            }
        });
        Ok((
            Some(Tensor::from_vec(dq, q_shape, &dev)?),
            Some(Tensor::from_vec(dk, kv_shape.clone(), &dev)?),
            Some(Tensor::from_vec(dv, kv_shape, &dev)?),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::compare::max_abs_diff;
    use candle_core::{Device, Var, D};

    /// The composed attention the model used before: repeat kv heads, scale, bias, softmax;
    /// in f32 (inputs of other dtypes are cast), returned in q's dtype.
    pub(crate) fn composed(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, h, s, d) = q.dims4()?;
        let rep = h / k.dim(1)?;
        let f32 = |x: &Tensor| x.to_dtype(DType::F32);
        let expand = |x: &Tensor| -> Result<Tensor> {
            let (b, kv, t, d) = x.dims4()?;
            Tensor::cat(&vec![&f32(x)?; rep], 2)?.reshape((b, kv * rep, t, d))
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let scores =
            (f32(q)?.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?.broadcast_add(bias)?;
        let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
        p.matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h * d))?
            .to_dtype(q.dtype())
    }

    /// Values and the q/k/v gradients (under a random upstream gradient) agree.
    fn assert_same(fused: Tensor, want: Tensor, vars: [&Var; 3]) -> Result<()> {
        assert!(max_abs_diff(&fused, &want)? < 1e-5);
        let up = crate::seeded::randn(0f32, 1., fused.shape(), fused.device())?;
        let g1 = (fused * &up)?.sum_all()?.backward()?;
        let g2 = (want * &up)?.sum_all()?.backward()?;
        for x in vars {
            let (a, b) = (g1.get(x.as_tensor()), g2.get(x.as_tensor()));
            let diff = max_abs_diff(a.unwrap(), b.unwrap())?;
            assert!(
                diff < 1e-4,
                "shape {:?}: gradient differs by {diff}",
                x.dims()
            );
        }
        Ok(())
    }

    fn causal_bias(b: usize, s: usize, t: usize, pad_row: Option<usize>) -> Result<Tensor> {
        let mut v = Vec::with_capacity(b * s * t);
        for bi in 0..b {
            for i in 0..s {
                for j in 0..t {
                    let visible = j <= i + (t - s) && !(pad_row == Some(bi) && j + 2 >= t);
                    v.push(if visible { 0f32 } else { -1.0e9 });
                }
            }
        }
        Tensor::from_vec(v, (b, 1, s, t), &Device::Cpu)
    }

    /// Grouped kv heads, a padded row, a bias shared by the batch, and a query shorter than the
    /// keys (cached decoding): values and q/k/v gradients equal the composed version's.
    #[test]
    fn fused_attention_matches_the_composed_version_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, kv, s, t, d, bias_b) in [
            (2, 4, 2, 7, 7, 16, 2),
            (1, 3, 3, 5, 5, 8, 1),
            (2, 6, 2, 3, 9, 32, 1),
        ] {
            let q = crate::seeded::var_randn(0f32, 1., (b, h, s, d), &dev)?;
            let k = crate::seeded::var_randn(0f32, 1., (b, kv, t, d), &dev)?;
            let v = crate::seeded::var_randn(0f32, 1., (b, kv, t, d), &dev)?;
            let bias = causal_bias(bias_b, s, t, (bias_b == 2).then_some(1))?;
            let fused =
                try_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias).unwrap()?;
            let want = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias)?;
            assert_eq!(fused.dims(), [b, s, h * d]);
            assert_same(fused, want, [&q, &k, &v])?;
        }
        Ok(())
    }

    /// Inputs with heads side by side (`[b, s, heads·d]`, the projections' layout) give the
    /// same values and gradients as the heads-first layout.
    #[test]
    fn heads_last_layout_matches_the_composed_version_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, kv, s, t, d, bias_b) in [(2, 4, 2, 7, 7, 16, 2), (2, 6, 2, 3, 9, 32, 1)] {
            let q = crate::seeded::var_randn(0f32, 1., (b, s, h * d), &dev)?;
            let k = crate::seeded::var_randn(0f32, 1., (b, t, kv * d), &dev)?;
            let v = crate::seeded::var_randn(0f32, 1., (b, t, kv * d), &dev)?;
            let bias = causal_bias(bias_b, s, t, (bias_b == 2).then_some(1))?;
            let fused =
                try_attention_heads_last(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, h, kv)
                    .unwrap()?;
            let first = |x: &Tensor, n: usize| -> Result<Tensor> {
                let (b, s, _) = x.dims3()?;
                x.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous()
            };
            let want = composed(
                &first(q.as_tensor(), h)?,
                &first(k.as_tensor(), kv)?,
                &first(v.as_tensor(), kv)?,
                &bias,
            )?;
            assert_same(fused, want, [&q, &k, &v])?;
        }
        Ok(())
    }

    #[test]
    fn other_devices_and_dtypes_and_bad_shapes_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 3, 4), DType::F64, &dev)?;
        assert!(try_attention(&q, &q, &q, &q).is_none());
        let q = Tensor::zeros((1, 3, 3, 4), DType::F32, &dev)?;
        let k = Tensor::zeros((1, 2, 3, 4), DType::F32, &dev)?;
        let bias = Tensor::zeros((1, 1, 3, 3), DType::F32, &dev)?;
        let e = try_attention(&q, &k, &k, &bias)
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a multiple"), "{e}");
        let e = try_attention(&q, &q, &q, &Tensor::zeros((1, 1, 3, 4), DType::F32, &dev)?)
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("bias"), "{e}");
        Ok(())
    }
}
