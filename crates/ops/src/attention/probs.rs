//! The element-wise middle of attention, fused: probabilities `softmax(scale·scores + bias)`
//! straight from the scores' matmul output (any float dtype, math in f32), and the scores'
//! gradient `scale · p ∘ (dp − Σ p∘dp)` from the scores and `dp` (p recomputed in registers).
//! Composed, these are a cast, a scale, a broadcast bias add, a softmax and a cast back, and
//! four more passes for the gradient, each over a `[b, heads, s, t]` buffer in f32: most of a
//! GPU attention step's memory traffic. CPU versions for every float dtype here, CUDA kernels
//! (f32, bf16) in `cuda.rs`; graph-free (used inside `attention_recompute`).
use crate::softmax_row::softmax_in_place;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use crate::cuda as gpu;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// How score rows find their bias row: scores are `[b, groups, rows_per_group, t]` with query
/// position `row mod s`; the bias is f32 `[bias_b, 1, s, t]`, `bias_b` 1 or b.
#[derive(Clone)]
pub struct ScoreRows {
    pub bias: Tensor,
    pub scale: f32,
    /// Query positions (the bias's rows).
    pub s: usize,
    /// Score rows per batch element.
    pub batch_rows: usize,
}

impl ScoreRows {
    fn check(&self, l: &Layout) -> Result<(usize, usize)> {
        let t = l.shape().dims().last().copied().unwrap_or(0);
        let rows = l.shape().elem_count() / t.max(1);
        let (bias_b, one, bs, bt) = self.bias.dims4()?;
        let fits = one == 1
            && bs == self.s
            && bt == t
            && self.bias.dtype() == DType::F32
            && self.batch_rows > 0
            && rows.is_multiple_of(self.batch_rows)
            && self.batch_rows.is_multiple_of(self.s.max(1))
            && (bias_b == 1 || bias_b == rows / self.batch_rows);
        if !fits || !l.is_contiguous() {
            candle_core::bail!(
                "attention probabilities: scores {:?} (contiguous) and bias {:?} do not fit",
                l.shape(),
                self.bias.shape()
            );
        }
        Ok((rows, t))
    }

    /// Bias row of score row `r`.
    fn bias_row<'a>(&self, bias: &'a [f32], r: usize, t: usize) -> &'a [f32] {
        let bias_b = bias.len() / (self.s * t);
        let at = ((r / self.batch_rows) % bias_b * self.s + r % self.s) * t;
        &bias[at..at + t]
    }

    /// The CUDA kernel (probabilities, or with `dp` the scores' gradient).
    #[cfg(feature = "cuda")]
    fn on_gpu(
        &self,
        s: &CudaStorage,
        l: &Layout,
        dp: Option<(&CudaStorage, &Layout)>,
        (rows, t): (usize, usize),
    ) -> Result<CudaStorage> {
        let (bias, lb) = self.bias.storage_and_layout();
        let candle_core::Storage::Cuda(bias) = &*bias else {
            candle_core::bail!("attention probabilities: bias is not on the GPU");
        };
        let rows_of = gpu::AttnRows {
            bias: (bias, lb),
            bias_b: self.bias.dim(0)?,
            s: self.s,
            batch_rows: self.batch_rows,
            scale: self.scale,
        };
        gpu::attention_probs(s, l, dp, &rows_of, rows, t)
    }

    fn bias_f32(&self) -> Result<Vec<f32>> {
        self.bias.flatten_all()?.to_vec1::<f32>()
    }

    fn bias_cpu_row(&self, bias: &[f32], r: usize, t: usize, row: &[f32], out: &mut [f32]) {
        let b = self.bias_row(bias, r, t);
        for ((o, x), c) in out.iter_mut().zip(row).zip(b) {
            *o = self.scale * x + c;
        }
    }
}

/// Rows of a contiguous float storage as f32 (copied for other dtypes).
fn rows_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("attention probabilities: not contiguous".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F64(v) => v[a..b].iter().map(|x| *x as f32).collect(),
        _ => candle_core::bail!("attention probabilities: scores must be floats"),
    })
}

/// f32 values stored in `dtype`.
fn store(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        DType::F64 => CpuStorage::F64(v.into_iter().map(|x| x as f64).collect()),
        d => candle_core::bail!("attention probabilities: no {d:?} output"),
    })
}

struct Probs(ScoreRows);

impl CustomOp1 for Probs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, t) = self.0.check(l)?;
        let out = self.0.on_gpu(s, l, None, (rows, t))?;
        Ok((out, l.shape().clone()))
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, t) = self.0.check(l)?;
        let scores = rows_f32(s, l)?;
        let bias = self.0.bias_f32()?;
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(t)
            .zip(scores.par_chunks(t))
            .enumerate()
            .for_each(|(r, (o, row))| {
                self.0.bias_cpu_row(&bias, r, t, row, o);
                softmax_in_place(o);
            });
        Ok((store(out, s.dtype())?, l.shape().clone()))
    }
}

struct ProbsGrad(ScoreRows);

impl CustomOp2 for ProbsGrad {
    fn name(&self) -> &'static str {
        "attention-probs-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        dp: &CudaStorage,
        ldp: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, t) = self.0.check(l)?;
        same_shape(l, ldp)?;
        let out = self.0.on_gpu(s, l, Some((dp, ldp)), (rows, t))?;
        Ok((out, l.shape().clone()))
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        dp: &CpuStorage,
        ldp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, t) = self.0.check(l)?;
        same_shape(l, ldp)?;
        let scores = rows_f32(s, l)?;
        let dp = rows_f32(dp, ldp)?;
        let bias = self.0.bias_f32()?;
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(t)
            .zip(scores.par_chunks(t).zip(dp.par_chunks(t)))
            .enumerate()
            .for_each(|(r, (o, (row, g)))| {
                self.0.bias_cpu_row(&bias, r, t, row, o);
                softmax_in_place(o);
                let dot = o.iter().zip(g).map(|(p, g)| (p * g) as f64).sum::<f64>() as f32;
                for (p, g) in o.iter_mut().zip(g) {
                    *p = self.0.scale * *p * (g - dot);
                }
            });
        Ok((store(out, s.dtype())?, l.shape().clone()))
    }
}

fn same_shape(a: &Layout, b: &Layout) -> Result<()> {
    if a.shape() != b.shape() || !b.is_contiguous() {
        candle_core::bail!(
            "attention probabilities: dp {:?} (contiguous) must match the scores {:?}",
            b.shape(),
            a.shape()
        );
    }
    Ok(())
}

/// `softmax(scale·scores + bias)` over the last dimension, in the scores' dtype; no graph.
pub fn attention_probs(scores: &Tensor, rows: &ScoreRows) -> Result<Tensor> {
    scores.contiguous()?.apply_op1_no_bwd(&Probs(rows.clone()))
}

/// The scores' gradient `scale · p ∘ (dp − Σ p∘dp)`, p as [`attention_probs`] computes it, in
/// the scores' dtype; no graph.
pub fn attention_probs_grad(scores: &Tensor, dp: &Tensor, rows: &ScoreRows) -> Result<Tensor> {
    let dp = dp.to_dtype(scores.dtype())?.contiguous()?;
    scores
        .contiguous()?
        .apply_op2_no_bwd(&dp, &ProbsGrad(rows.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::max_abs_diff;
    use candle_core::{Device, D};

    /// scores `[2, 3, 4·5, 7]`: 2 batch rows, 3 groups of 4 query heads over 5 positions.
    fn setup(bias_b: usize) -> Result<(Tensor, ScoreRows)> {
        let dev = Device::Cpu;
        let (b, g, rep, s, t) = (2, 3, 4, 5, 7);
        let scores = crate::seeded::randn(0f32, 2., (b, g, rep * s, t), &dev)?;
        let bias = (crate::seeded::randn(0f32, 1., (bias_b, 1, s, t), &dev)?
            .ge(1.0)?
            .to_dtype(DType::F32)?
            * -1e9)?;
        let rows = ScoreRows {
            bias,
            scale: 0.3,
            s,
            batch_rows: g * rep * s,
        };
        Ok((scores, rows))
    }

    /// The composed version in f32.
    fn composed(scores: &Tensor, rows: &ScoreRows) -> Result<Tensor> {
        let (b, g, rs, t) = scores.dims4()?;
        let s = rows.s;
        let bb = rows.bias.dim(0)?;
        let x = (scores.to_dtype(DType::F32)? * rows.scale as f64)?
            .reshape((b, g, rs / s, s, t))?
            .broadcast_add(&rows.bias.reshape((bb, 1, 1, s, t))?)?;
        candle_nn::ops::softmax(&x, D::Minus1)?.reshape((b, g, rs, t))
    }

    #[test]
    fn fused_attention_probs_match_the_composed_softmax() -> Result<()> {
        for bias_b in [1, 2] {
            let (scores, rows) = setup(bias_b)?;
            let want = composed(&scores, &rows)?;
            assert!(max_abs_diff(&attention_probs(&scores, &rows)?, &want)? < 1e-6);
            let bf = attention_probs(&scores.to_dtype(DType::BF16)?, &rows)?;
            assert_eq!(bf.dtype(), DType::BF16);
            assert!(max_abs_diff(&bf.to_dtype(DType::F32)?, &want)? < 1e-2);
        }
        Ok(())
    }

    #[test]
    fn fused_attention_probs_gradient_matches_autograd() -> Result<()> {
        for bias_b in [1, 2] {
            let (scores, rows) = setup(bias_b)?;
            let var = candle_core::Var::from_tensor(&scores)?;
            let p = composed(var.as_tensor(), &rows)?;
            let dp = crate::seeded::randn(0f32, 1., p.shape(), p.device())?;
            let want = (p * &dp)?.sum_all()?.backward()?;
            let want = want.get(var.as_tensor()).unwrap();
            let got = attention_probs_grad(&scores, &dp, &rows)?;
            assert!(
                max_abs_diff(&got, want)? < 1e-5,
                "{}",
                max_abs_diff(&got, want)?
            );
        }
        Ok(())
    }

    #[test]
    fn fused_attention_probs_refuse_a_misfit_bias() -> Result<()> {
        let (scores, mut rows) = setup(1)?;
        rows.s = 4;
        let e = attention_probs(&scores, &rows).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
        Ok(())
    }
}
