//! Attention core for any device and dtype, `softmax(q·kᵀ/√d + bias)·v`, that keeps nothing
//! but q, k and v for the backward pass. Composed, candle keeps every `[b, heads, s, t]`
//! intermediate (the scores, their scaled, f32 and biased copies, the probabilities and their
//! cast: about 1.2 GB per layer for a 1B model at 8 × 512 tokens), which is most of a training
//! step's memory; here the backward pass recomputes the probabilities (two more batched
//! matmuls of the five, as FlashAttention's backward does). Grouped kv heads are read in
//! place: the `rep` query heads that share a kv head are one `[rep·s, d]` matrix, so every
//! product is one batched matmul over `b · kv_heads` groups and there is no `repeat_kv` copy.
//! Scores and softmax are f32 whatever the inputs' dtype. Tensor and storage ops only: the CPU
//! runs (and the tests check) the very code the GPU runs.
//!
//! [`attention_blocks`] takes a mask rule instead of a dense bias and goes through the queries
//! in blocks: each block meets only the keys its rule can show it (causal: none after its last
//! query; a sliding window: none before its reach), with that block's bias built on the device
//! from positions and segment numbers. The scores of one block are all that exists at a time,
//! in the forward and the backward pass, so memory grows linearly with the sequence length.
use crate::attention::mask::AttnMask;
use crate::attention::probs::{attention_probs, attention_probs_grad, ScoreRows};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

/// Attention of `q` `[b, heads, s, d]` over `k`, `v` `[b, kv_heads, t, d]` with an additive
/// f32 `bias` `[1 or b, 1, s, t]`, returning `[b, s, heads·d]` (the output projection's
/// input); differentiable in q, k and v.
pub fn attention_recompute(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let shape = Grouping::of(&q, &k, &v, bias)?;
    let out = shape.forward(&q.detach(), &k.detach(), &v.detach(), bias)?;
    q.apply_op3(
        &k,
        &v,
        Attach {
            out: Mutex::new(Some(out)),
            bias: bias.clone(),
            shape,
        },
    )
}

/// Score elements (`b · heads · rows · keys`) one query block may hold: 2²⁶ f32, 256 MiB.
const BLOCK_SCORES: usize = 1 << 26;

/// Attention of `q` `[b, heads, s, d]` over `k`, `v` `[b, kv_heads, t, d]` under `mask`,
/// returning `[b, s, heads·d]`; differentiable in q, k and v. A rule is applied block by block
/// of queries (at least 64 rows, as many as [`BLOCK_SCORES`] allows); a dense bias in one call.
pub fn attention_blocks(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask) -> Result<Tensor> {
    let (b, heads, _, _) = q.dims4()?;
    let rows = (BLOCK_SCORES / (b * heads * k.dim(2)?).max(1)).max(64);
    attention_blocks_of(q, k, v, mask, rows)
}

/// [`attention_blocks`] with query blocks of `rows` rows.
fn attention_blocks_of(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    rows: usize,
) -> Result<Tensor> {
    let (b, _, s, _) = q.dims4()?;
    let t = k.dim(2)?;
    mask.check(b, s, t)?;
    let rule = match mask {
        AttnMask::Bias(bias) => return attention_recompute(q, k, v, bias),
        AttnMask::Rule(r) => r,
    };
    let rows = rows.clamp(1, s.max(1));
    let biases = rule.blocks(b, q.device())?;
    let mut outs = Vec::with_capacity(s.div_ceil(rows));
    for i0 in (0..s).step_by(rows) {
        let n = rows.min(s - i0);
        let (lo, hi) = rule.key_range(i0, i0 + n, t);
        let bias = biases.block((i0, n), (lo, hi - lo))?;
        let (q, k, v) = if n == s && hi - lo == t {
            (q.clone(), k.clone(), v.clone())
        } else {
            (
                q.narrow(2, i0, n)?,
                k.narrow(2, lo, hi - lo)?,
                v.narrow(2, lo, hi - lo)?,
            )
        };
        outs.push(attention_recompute(&q, &k, &v, &bias)?);
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    Tensor::cat(&outs, 1)
}

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Grouping {
    b: usize,
    heads: usize,
    kv: usize,
    s: usize,
    d: usize,
}

impl Grouping {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Self> {
        let (b, heads, s, d) = q.dims4()?;
        let (bk, kv, t, dk) = k.dims4()?;
        if bk != b || dk != d || v.dims() != k.dims() || kv == 0 || heads % kv != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?} and v {:?} do not fit together",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        match bias.dims() {
            [bb, 1, bs, bt] if (*bb == 1 || *bb == b) && *bs == s && *bt == t => {}
            other => {
                candle_core::bail!("attention: bias {other:?} does not fit [{b}, 1, {s}, {t}]")
            }
        }
        Ok(Grouping { b, heads, kv, s, d })
    }

    fn rep(&self) -> usize {
        self.heads / self.kv
    }

    /// q as `[b, kv, rep·s, d]`: each group's query heads stacked (a view, no copy).
    fn grouped(&self, q: &Tensor) -> Result<Tensor> {
        q.reshape((self.b, self.kv, self.rep() * self.s, self.d))
    }

    /// How the score rows meet the bias rows.
    fn rows(&self, bias: &Tensor) -> ScoreRows {
        ScoreRows {
            bias: bias.clone(),
            scale: 1.0 / (self.d as f32).sqrt(),
            s: self.s,
            batch_rows: self.kv * self.rep() * self.s,
        }
    }

    /// `q·kᵀ` per group, `[b, kv, rep·s, t]`, in the inputs' dtype.
    fn scores(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        self.grouped(q)?.matmul(&k.t()?)
    }

    /// `[b, heads, s, d]` from detached inputs.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let p = attention_probs(&self.scores(q, k)?, &self.rows(bias))?;
        p.matmul(v)?.reshape((self.b, self.heads, self.s, self.d))
    }
}

/// Hands the output computed without a graph to the graph, with the backward pass below.
struct Attach {
    /// `[b, heads, s, d]`, contiguous; taken by the forward pass (the op lives as long as the
    /// graph, which need not keep a second copy of the output).
    out: Mutex<Option<Tensor>>,
    bias: Tensor,
    shape: Grouping,
}

impl Attach {
    /// The output in the `[b, s, heads·d]` layout: one strided copy (the transpose the
    /// output projection needs anyway).
    fn take_out(&self) -> Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attention: forward ran twice".into()))
    }

    fn emit<S>(&self, o: &S, lo: &Layout) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let Grouping { b, heads, s, d, .. } = self.shape;
        let shape = Shape::from((b, s, heads * d));
        let mut dst = unsafe { o.device().alloc_uninit(&shape, o.dtype())? };
        o.copy_strided_src(&mut dst, 0, &lo.transpose(1, 2)?)?;
        Ok((dst, shape))
    }
}

impl CustomOp3 for Attach {
    fn name(&self) -> &'static str {
        "attention-recompute"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = self.take_out()?;
        let (o, lo) = out.storage_and_layout();
        match &*o {
            Storage::Cpu(o) => self.emit(o, lo),
            _ => candle_core::bail!("attention: output is not on the CPU"),
        }
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = self.take_out()?;
        let (o, lo) = out.storage_and_layout();
        match &*o {
            Storage::Cuda(o) => self.emit(o, lo),
            _ => candle_core::bail!("attention: output is not on the GPU"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sh = self.shape;
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        // dout as [b, kv, rep·s, d]
        let go = grad
            .reshape((sh.b, sh.s, sh.heads, sh.d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((sh.b, sh.kv, sh.rep() * sh.s, sh.d))?;
        let rows = sh.rows(&self.bias);
        let scores = sh.scores(&q, &k)?;
        let dv = attention_probs(&scores, &rows)?.t()?.matmul(&go)?;
        let dp = go.matmul(&v.t()?)?;
        let ds = attention_probs_grad(&scores, &dp, &rows)?;
        drop((scores, dp));
        let dq = ds.matmul(&k)?.reshape((sh.b, sh.heads, sh.s, sh.d))?;
        let dk = ds.t()?.matmul(&sh.grouped(&q)?)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::cpu::tests::composed;
    use crate::compare::max_abs_diff;
    use candle_core::{DType, Device, Var};

    /// `cached` keys before the `s` queries (a KV cache: `t = cached + s` keys).
    fn check(dtype: DType, bias_b: usize, cached: usize, tol: f32) -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, kv, s, d) = (2, 6, 2, 5, 8);
        let t = cached + s;
        let var = |shape: (usize, usize, usize, usize)| -> Result<Var> {
            Var::from_tensor(&crate::seeded::randn(0f32, 1., shape, &dev)?.to_dtype(dtype)?)
        };
        let (q, k, v) = (var((b, h, s, d))?, var((b, kv, t, d))?, var((b, kv, t, d))?);
        // causal mask, and for a per-row bias a padded first position in row 1
        let mut bias = vec![0f32; bias_b * s * t];
        for r in 0..bias_b {
            for i in 0..s {
                let at = cached + i;
                for j in 0..t {
                    if j > at || (r == 1 && j == 0 && at > 0) {
                        bias[(r * s + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (bias_b, 1, s, t), &dev)?;
        let got = attention_recompute(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias)?;
        let want = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias)?;
        assert_eq!(got.dims(), [b, s, h * d]);
        assert_eq!(got.dtype(), dtype);
        assert!(
            max_abs_diff(&got, &want)? < tol,
            "{}",
            max_abs_diff(&got, &want)?
        );
        let up = crate::seeded::randn(0f32, 1., got.shape(), &dev)?.to_dtype(dtype)?;
        let g1 = (got * &up)?.sum_all()?.backward()?;
        let g2 = (want * &up)?.sum_all()?.backward()?;
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, b) = (
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            let scale = b
                .abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            let diff = max_abs_diff(a, b)?;
            assert!(diff < tol * scale.max(1.0), "{name}: {diff} of {scale}");
            assert!(!a.track_op());
        }
        Ok(())
    }

    #[test]
    fn recomputing_attention_matches_the_composed_version_in_f32() -> Result<()> {
        check(DType::F32, 1, 0, 1e-5)?;
        check(DType::F32, 2, 0, 1e-5)?;
        check(DType::F32, 2, 3, 1e-5)
    }

    #[test]
    fn recomputing_attention_matches_the_composed_version_in_bf16() -> Result<()> {
        check(DType::BF16, 2, 0, 3e-2)?;
        check(DType::BF16, 1, 3, 3e-2)
    }

    /// Query blocks (forced small by a long row) under causal, windowed and packed rules give
    /// the composed values and gradients; bf16 inputs too, to bf16 tolerance.
    #[test]
    fn attention_in_query_blocks_matches_the_composed_version() -> Result<()> {
        use crate::attention::cpu::tests::{assert_same, live_rows};
        let dev = Device::Cpu;
        let (b, h, kv, d) = (1, 4, 2, 8);
        let s = 301; // five blocks of 64 queries, the last ragged
        let segs = vec![(0..s)
            .map(|i| {
                if i < 120 {
                    1
                } else if i < 290 {
                    2
                } else {
                    0
                }
            })
            .collect::<Vec<u32>>()];
        for mask in [
            AttnMask::causal(&segs, None)?,
            AttnMask::causal(&[vec![1; s]], Some(50))?,
            AttnMask::cached(0, None),
        ] {
            let q = crate::seeded::var_randn(0f32, 1., (b, h, s, d), &dev)?;
            let k = crate::seeded::var_randn(0f32, 1., (b, kv, s, d), &dev)?;
            let v = crate::seeded::var_randn(0f32, 1., (b, kv, s, d), &dev)?;
            let got = attention_blocks_of(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 64)?;
            let bias = mask.to_bias(b, s, s, &dev)?;
            let want = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias)?;
            assert_same(got, want, [&q, &k, &v], &live_rows(&bias, b)?)?;
            let bf = |x: &Var| x.as_tensor().to_dtype(DType::BF16);
            let got = attention_blocks_of(&bf(&q)?, &bf(&k)?, &bf(&v)?, &mask, 64)?;
            let live = live_rows(&bias, b)?;
            let want = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias)?;
            let diff = max_abs_diff(
                &got.to_dtype(DType::F32)?.broadcast_mul(&live)?,
                &want.broadcast_mul(&live)?,
            )?;
            assert!(diff < 3e-2, "bf16: {diff}");
        }
        Ok(())
    }

    #[test]
    fn recomputing_attention_refuses_misfit_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 3, 8), DType::F32, &dev)?;
        let k = Tensor::zeros((1, 3, 3, 8), DType::F32, &dev)?;
        let bias = Tensor::zeros((1, 1, 3, 3), DType::F32, &dev)?;
        let e = attention_recompute(&q, &k, &k, &bias)
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit"), "{e}");
        let k = Tensor::zeros((1, 2, 3, 8), DType::F32, &dev)?;
        let bias = Tensor::zeros((1, 1, 3, 4), DType::F32, &dev)?;
        let e = attention_recompute(&q, &k, &k, &bias)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bias"), "{e}");
        Ok(())
    }
}
