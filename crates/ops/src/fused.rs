//! Fused CPU kernels with their own backward, for the ops whose composed candle versions cost
//! the most passes over memory: RMSNorm (frozen weight: gradient for x only), cross-entropy
//! over a large vocabulary (softmax, log and gather in one pass; the backward writes
//! `softmax − one-hot` directly), SwiGLU (`silu(gate)·up`) and
//! rotary embeddings (the backward is the inverse rotation). Each is checked against the
//! composed version (values and gradients) in the tests below. With the `cuda` feature the same ops run lorakit-ops'
//! CUDA kernels (f32 and bf16; their element math is shared with `csrc/row_math.c`, which the
//! tests below check against these CPU kernels). Elsewhere the composed versions run.
//!
//! One convention: a `try_*` function returns `None` when its kernel does not apply (the caller,
//! an entry point in `layers` or `attention`, then runs the composed version); every other
//! function here always answers, falling back to the composed version itself.
use crate::softmax_row;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use crate::cuda as gpu;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// Whether `t` has a fused kernel: on the CPU for `cpu` dtypes, on CUDA (built with the `cuda`
/// feature) for `cuda` dtypes.
fn fused_for(t: &Tensor, cpu: &[DType], cuda: &[DType]) -> bool {
    match t.device() {
        candle_core::Device::Cpu => cpu.contains(&t.dtype()),
        candle_core::Device::Cuda(_) => cfg!(feature = "cuda") && cuda.contains(&t.dtype()),
        _ => false,
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

fn contiguous_u32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("{what}: expected u32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// `1 / sqrt(mean(row²) + eps)`, the sum taken in f64 (rows can hold values in the thousands).
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|a| (*a as f64) * (*a as f64)).sum::<f64>() / row.len() as f64;
    1.0 / (ms as f32 + eps).sqrt()
}

/// Per-row cross-entropy `[n]` of logits `[n, vocab]` against labels `[n]`.
struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = l1.shape().dims2()?.0;
        Ok((gpu::cross_entropy(s1, l1, s2, l2, None)?, Shape::from(n)))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let x = contiguous_f32(s1, l1, "logits")?;
        let y = contiguous_u32(s2, l2, "labels")?;
        let out: Vec<f32> = x
            .par_chunks(v)
            .zip(y.par_iter())
            .map(|(row, &label)| {
                let max = softmax_row::max(row);
                let sum = softmax_row::sum_exp_shifted(row, max);
                (sum.ln() as f32) + max - row.get(label as usize).copied().unwrap_or(f32::NAN)
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(labels, &grad.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(g), None))
    }
}

/// `grad[i] · (softmax(logits[i]) − onehot(labels[i]))`.
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = gpu::cross_entropy(s1, l1, s2, l2, Some((s3, l3)))?;
        Ok((out, l1.shape().clone()))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let x = contiguous_f32(s1, l1, "logits")?;
        let y = contiguous_u32(s2, l2, "labels")?;
        let g = contiguous_f32(s3, l3, "grad")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(y.par_iter().zip(g.par_iter()))
            .for_each(|((o, row), (&label, &gi))| {
                o.copy_from_slice(row);
                softmax_row::softmax_in_place(o);
                softmax_row::scale(o, gi);
                if let Some(t) = o.get_mut(label as usize) {
                    *t -= gi;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Per-row cross-entropy of `logits` `[n, vocab]` against `labels` `[n]` (u32), differentiable
/// in the logits. Fused on the CPU for f32; composed elsewhere.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let labels = labels.to_dtype(DType::U32)?;
    if fused_for(logits, &[DType::F32], &[DType::F32]) {
        return logits
            .contiguous()?
            .apply_op2(&labels.contiguous()?, CrossEntropy);
    }
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    logp.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// `scale[i] · (softmax(logits[i]) − onehot(labels[i]))` `[n, vocab]`, the gradient of
/// [`cross_entropy`] under an upstream gradient `scale` `[n]`, without building a graph.
pub fn cross_entropy_grad(logits: &Tensor, labels: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let labels = labels.to_dtype(DType::U32)?.contiguous()?;
    if fused_for(logits, &[DType::F32], &[DType::F32]) {
        return logits.contiguous()?.apply_op3_no_bwd(
            &labels,
            &scale.to_dtype(DType::F32)?.contiguous()?,
            &CrossEntropyGrad,
        );
    }
    let logits = logits.to_dtype(DType::F32)?.detach();
    let p = candle_nn::ops::softmax_last_dim(&logits)?;
    let minus_one = Tensor::full(-1f32, (labels.dim(0)?, 1), logits.device())?;
    p.scatter_add(&labels.unsqueeze(1)?, &minus_one, 1)?
        .broadcast_mul(&scale.to_dtype(DType::F32)?.unsqueeze(1)?)
}

/// RMSNorm with a frozen weight: `x / sqrt(mean(x²) + eps) · w`, gradient for `x` only.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = gpu::rms_norm(s1, l1, s2, l2, None, self.eps)?;
        Ok((out, l1.shape().clone()))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l1.shape().dims().last().copied().unwrap_or(1);
        let x = contiguous_f32(s1, l1, "x")?;
        let w = contiguous_f32(s2, l2, "weight")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let r = inv_rms(row, self.eps);
                for ((oj, a), wj) in o.iter_mut().zip(row).zip(w) {
                    *oj = a * r * wj;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// dx = r·(w∘g) − x·r³·mean(w∘g∘x), r = 1/sqrt(mean(x²) + eps).
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = gpu::rms_norm(s1, l1, s2, l2, Some((s3, l3)), self.eps)?;
        Ok((out, l1.shape().clone()))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l1.shape().dims().last().copied().unwrap_or(1);
        let x = contiguous_f32(s1, l1, "x")?;
        let w = contiguous_f32(s2, l2, "weight")?;
        let g = contiguous_f32(s3, l3, "grad")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (row, gr))| {
                let r = inv_rms(row, self.eps);
                let dot = row
                    .iter()
                    .zip(gr)
                    .zip(w)
                    .map(|((a, b), c)| (a * b * c) as f64)
                    .sum::<f64>()
                    / d as f64;
                let k = (dot as f32) * r * r * r;
                for (((oj, a), gj), wj) in o.iter_mut().zip(row).zip(gr).zip(w) {
                    *oj = r * wj * gj - a * k;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Fused RMSNorm when `x` is f32 on the CPU (else `None`: use the composed version).
pub fn try_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Option<Result<Tensor>> {
    if !fused_for(x, &[DType::F32], &[DType::F32, DType::BF16]) || weight.dtype() != x.dtype() {
        return None;
    }
    Some((|| {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
    })())
}

/// `silu(gate) · up`.
struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Ok((gpu::swiglu(s1, l1, s2, l2, None)?, l1.shape().clone()))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s1, l1, "gate")?;
        let u = contiguous_f32(s2, l2, "up")?;
        let out: Vec<f32> = g
            .par_iter()
            .zip(u.par_iter())
            .map(|(a, b)| a * sigmoid(*a) * b)
            .collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `[d_gate, d_up]` stacked: d_gate = g·up·silu'(gate), d_up = g·silu(gate).
struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = gpu::swiglu(s1, l1, s2, l2, Some((s3, l3)))?;
        let mut dims = vec![2];
        dims.extend(l1.shape().dims());
        Ok((out, Shape::from(dims)))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s1, l1, "gate")?;
        let u = contiguous_f32(s2, l2, "up")?;
        let d = contiguous_f32(s3, l3, "grad")?;
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_iter_mut()
            .zip(du.par_iter_mut())
            .zip(g.par_iter().zip(u.par_iter()).zip(d.par_iter()))
            .for_each(|((dgi, dui), ((a, b), gi))| {
                let s = sigmoid(*a);
                *dgi = gi * b * s * (1.0 + a * (1.0 - s));
                *dui = gi * a * s;
            });
        let mut dims = vec![2];
        dims.extend(l1.shape().dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `silu(gate) · up`, differentiable in both; fused on the CPU for f32.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let same = gate.dims() == up.dims() && gate.dtype() == up.dtype();
    if same && fused_for(gate, &[DType::F32], &[DType::F32, DType::BF16]) {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

/// Rotary embedding over `[b, h, s, d]` with tables `[s, d/2]` (non-interleaved halves).
struct Rope {
    inverse: bool,
    /// Rows (of `d` values) per position: 1 for `[b, h, s, d]`, `heads` for `[b, s, heads·d]`.
    rows_per_position: usize,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if self.rows_per_position != 1 {
            candle_core::bail!("rope: the heads-side-by-side layout has no CUDA kernel");
        }
        let out = gpu::rope(s1, l1, s2, l2, s3, l3, self.inverse)?;
        Ok((out, l1.shape().clone()))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, half) = l2.shape().dims2()?;
        let d = 2 * half;
        let inner = self.rows_per_position.max(1);
        if d == 0 || !l1.shape().elem_count().is_multiple_of(d * inner * s) {
            candle_core::bail!(
                "rope: {:?} does not fit tables {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let x = contiguous_f32(s1, l1, "x")?;
        let cos = contiguous_f32(s2, l2, "cos")?;
        let sin = contiguous_f32(s3, l3, "sin")?;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(i, (o, row))| {
                let t = (i / inner) % s;
                let (c, sn) = (
                    &cos[t * half..(t + 1) * half],
                    &sin[t * half..(t + 1) * half],
                );
                for j in 0..half {
                    let (a, b) = (row[j], row[j + half]);
                    let sj = sign * sn[j];
                    o[j] = a * c[j] - b * sj;
                    o[j + half] = b * c[j] + a * sj;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rope {
            inverse: !self.inverse,
            rows_per_position: self.rows_per_position,
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary embedding of `x` `[b, h, s, d]` with `[s, d/2]` tables, differentiable in `x`; fused
/// on the CPU for f32 (else `None`).
pub fn try_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Option<Result<Tensor>> {
    let ok = fused_for(x, &[DType::F32], &[DType::F32, DType::BF16])
        && cos.dtype() == x.dtype()
        && sin.dtype() == x.dtype()
        && x.rank() == 4
        && cos.rank() == 2
        && x.dim(2).ok() == cos.dim(0).ok();
    if !ok {
        return None;
    }
    Some((|| {
        x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rope {
                inverse: false,
                rows_per_position: 1,
            },
        )
    })())
}

/// Rotary embedding of `x` `[b, s, heads·d]` — a projection's output, heads side by side — with
/// `[s, d/2]` tables, or `[b, 1, s, d/2]` when rows have their own positions (packed examples),
/// differentiable in `x`, without the transposes to `[b, heads, s, d]` and back. CPU f32 only
/// (else `None`).
pub fn try_rope_heads_last(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
) -> Option<Result<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let (b, s, width) = x.dims3().ok()?;
    let half = cos.dim(D::Minus1).ok()?;
    // per-row tables are one table row per token: the kernel's row index runs over b·s
    let rows = match cos.dims() {
        [rows, _] if *rows == s => s,
        [rb, 1, rs, _] if *rb == b && *rs == s => b * s,
        _ => return None,
    };
    let ok = f32_cpu(x)
        && f32_cpu(cos)
        && f32_cpu(sin)
        && sin.dims() == cos.dims()
        && 2 * half * heads == width;
    if !ok {
        return None;
    }
    Some((|| {
        x.contiguous()?.apply_op3(
            &cos.contiguous()?.reshape((rows, half))?,
            &sin.contiguous()?.reshape((rows, half))?,
            Rope {
                inverse: false,
                rows_per_position: heads,
            },
        )
    })())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The heads-side-by-side layout gives the `[b, h, s, d]` result, transposed, and its
    /// gradient.
    #[test]
    fn rope_with_heads_last_matches_the_transposed_layout() -> Result<()> {
        let dev = Device::Cpu;
        let (b, s, h, d) = (2, 5, 3, 8);
        let x = crate::seeded::var_randn(0f32, 1., (b, s, h * d), &dev)?;
        let cos = crate::seeded::randn(0f32, 1., (s, d / 2), &dev)?;
        let sin = crate::seeded::randn(0f32, 1., (s, d / 2), &dev)?;
        let got = try_rope_heads_last(x.as_tensor(), &cos, &sin, h).unwrap()?;
        let bhsd = x
            .as_tensor()
            .reshape((b, s, h, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let want = try_rope(&bhsd, &cos, &sin)
            .unwrap()?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h * d))?;
        assert!(max_diff(&got, &want) < 1e-6);
        let up = crate::seeded::randn(0f32, 1., got.shape(), &dev)?;
        let g1 = (got * &up)?.sum_all()?.backward()?;
        let g2 = (want * &up)?.sum_all()?.backward()?;
        let d = max_diff(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-6, "{d}");
        assert!(try_rope_heads_last(x.as_tensor(), &cos, &sin, h + 1).is_none());
        Ok(())
    }

    /// Per-row tables `[b, 1, s, d/2]` (packed examples, positions restarting) give the composed
    /// rotary embedding's values and gradients.
    #[test]
    fn rope_with_per_row_tables_matches_the_composed_version() -> Result<()> {
        let dev = Device::Cpu;
        let (b, s, h, d) = (2, 5, 3, 8);
        let x = crate::seeded::var_randn(0f32, 1., (b, s, h * d), &dev)?;
        let cos = crate::seeded::randn(0f32, 1., (b, 1, s, d / 2), &dev)?;
        let sin = crate::seeded::randn(0f32, 1., (b, 1, s, d / 2), &dev)?;
        let got = try_rope_heads_last(x.as_tensor(), &cos, &sin, h).unwrap()?;
        let bhsd = x.as_tensor().reshape((b, s, h, d))?.transpose(1, 2)?;
        let want = crate::layers::apply_rope(&bhsd, &cos, &sin)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h * d))?;
        assert!(max_diff(&got, &want) < 1e-6);
        let up = crate::seeded::randn(0f32, 1., got.shape(), &dev)?;
        let g1 = (got * &up)?.sum_all()?.backward()?;
        let g2 = (want * &up)?.sum_all()?.backward()?;
        let dg = max_diff(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(dg < 1e-6, "{dg}");
        // a table for another batch size is not taken for per-row positions
        let other = crate::seeded::randn(0f32, 1., (b + 1, 1, s, d / 2), &dev)?;
        assert!(try_rope_heads_last(x.as_tensor(), &other, &other, h).is_none());
        Ok(())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::compare::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn cross_entropy_matches_the_composed_version_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(crate::seeded::randn(0f32, 3., (7, 301), &dev)?))?;
        let labels = Tensor::new(&[0u32, 5, 300, 17, 17, 42, 299], &dev)?;
        let weights = crate::seeded::randn(0f32, 1., 7, &dev)?; // a non-uniform upstream gradient
        let fused = cross_entropy(x.as_tensor(), &labels)?;
        let logp = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)?;
        let composed = logp.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        assert!(max_diff(&fused, &composed) < 1e-5);
        let g1 = (fused * &weights)?.sum_all()?.backward()?;
        let g2 = (composed * &weights)?.sum_all()?.backward()?;
        let (a, b) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(max_diff(a, b) < 1e-6, "{}", max_diff(a, b));
        Ok(())
    }

    #[test]
    fn rms_norm_matches_the_composed_version_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(crate::seeded::randn(0f32, 2., (3, 5, 64), &dev)?))?;
        let w = crate::seeded::randn(1f32, 0.3, 64, &dev)?;
        let up = crate::seeded::randn(0f32, 1., (3, 5, 64), &dev)?;
        let fused = try_rms_norm(x.as_tensor(), &w, 1e-5).unwrap()?;
        let var = x.as_tensor().sqr()?.mean_keepdim(D::Minus1)?;
        let composed = x
            .as_tensor()
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&w)?;
        assert!(max_diff(&fused, &composed) < 1e-5);
        let g1 = (fused * &up)?.sum_all()?.backward()?;
        let g2 = (composed * &up)?.sum_all()?.backward()?;
        let (a, b) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(max_diff(a, b) < 1e-5, "{}", max_diff(a, b));
        // the frozen weight gets no gradient
        assert!(g1.get(&w).is_none());
        // other dtypes fall back
        assert!(try_rms_norm(&x.as_tensor().to_dtype(DType::BF16)?, &w, 1e-5).is_none());
        Ok(())
    }

    /// Values and gradients (under a random upstream gradient) of `f` and `g` agree.
    fn same_grads(
        f: impl Fn(&[&Tensor]) -> Result<Tensor>,
        g: impl Fn(&[&Tensor]) -> Result<Tensor>,
        inputs: &[Var],
        tol: f32,
    ) -> Result<()> {
        let ts: Vec<&Tensor> = inputs.iter().map(|v| v.as_tensor()).collect();
        let (a, b) = (f(&ts)?, g(&ts)?);
        assert!(max_diff(&a, &b) < tol, "values {}", max_diff(&a, &b));
        let up = crate::seeded::randn(0f32, 1., a.shape(), a.device())?;
        let ga = (a * &up)?.sum_all()?.backward()?;
        let gb = (b * &up)?.sum_all()?.backward()?;
        for t in ts {
            let d = max_diff(ga.get(t).unwrap(), gb.get(t).unwrap());
            assert!(d < tol, "gradient {d}");
        }
        Ok(())
    }

    #[test]
    fn swiglu_and_rope_match_the_composed_versions() -> Result<()> {
        let dev = Device::Cpu;
        let gate = Var::from_tensor(&crate::seeded::randn(0f32, 2., (4, 7, 24), &dev)?)?;
        let up = Var::from_tensor(&crate::seeded::randn(0f32, 2., (4, 7, 24), &dev)?)?;
        same_grads(
            |t| swiglu(t[0], t[1]),
            |t| t[0].silu()? * t[1],
            &[gate, up],
            1e-5,
        )?;
        let inv: Vec<f64> = (0..8)
            .map(|i| 1.0 / 10000f64.powf(i as f64 / 8.0))
            .collect();
        let (cos, sin) = crate::layers::rope_tables(&inv, 1.0, 5, DType::F32, &dev)?;
        let x = Var::from_tensor(&crate::seeded::randn(0f32, 2., (2, 3, 5, 16), &dev)?)?;
        same_grads(
            |t| try_rope(t[0], &cos, &sin).unwrap(),
            |t| candle_nn::rotary_emb::rope_slow(t[0], &cos, &sin),
            &[x],
            1e-5,
        )?;
        Ok(())
    }

    /// Real models have a few huge activations (SmolLM2: thousands) and 49k-token rows: the
    /// reductions must not lose precision to sequential f32 summation (a 1e-4 shift of
    /// SmolLM2's loss before they accumulated in f64).
    #[test]
    fn reductions_keep_precision_on_large_rows() -> Result<()> {
        let dev = Device::Cpu;
        let d = 576;
        let mut row: Vec<f32> = (0..d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        row[3] = 3000.0;
        row[200] = -2500.0;
        let ms: f64 = row.iter().map(|a| (*a as f64).powi(2)).sum::<f64>() / d as f64;
        let w = Tensor::ones(d, DType::F32, &dev)?;
        let x = Tensor::from_vec(row.clone(), (1, d), &dev)?;
        let y = try_rms_norm(&x, &w, 1e-5).unwrap()?.to_vec2::<f32>()?;
        for (a, b) in row.iter().zip(&y[0]) {
            let want = *a as f64 / (ms + 1e-5).sqrt();
            assert!(
                (*b as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{b} vs {want}"
            );
        }
        let v = 49152;
        let logits: Vec<f32> = (0..v).map(|i| ((i * 7919 % 1000) as f32) / 100.0).collect();
        let lse: f64 = {
            let m = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
            m + logits
                .iter()
                .map(|a| (*a as f64 - m).exp())
                .sum::<f64>()
                .ln()
        };
        let t = Tensor::from_vec(logits.clone(), (1, v), &dev)?;
        let ce = cross_entropy(&t, &Tensor::new(&[17u32], &dev)?)?.to_vec1::<f32>()?[0] as f64;
        let want = lse - logits[17] as f64;
        assert!((ce - want).abs() < 2e-6 * want.abs(), "{ce} vs {want}");
        Ok(())
    }

    // The element math of the CUDA kernels (`csrc/row_math.h`), built for the
    // CPU by its build.rs.
    use crate::row_math::{
        lk_c_rms_norm, lk_c_rms_norm_grad, lk_c_rope, lk_c_swiglu, lk_c_swiglu_grad,
    };

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn worst(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
            .fold(0f32, f32::max)
    }

    /// The formulas and indexing the CUDA kernels use give what the CPU kernels give (values and
    /// gradients), so the GPU path is checked without a GPU; only the order of the f32 sums
    /// differs.
    #[test]
    fn cuda_row_math_matches_the_cpu_kernels() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, s, d) = (2, 3, 5, 64);
        let rows = b * h * s;
        let x = crate::seeded::randn(0f32, 2., (b, h, s, d), &dev)?;
        let g = crate::seeded::randn(0f32, 1., (b, h, s, d), &dev)?;
        let w = crate::seeded::randn(1f32, 0.3, d, &dev)?;
        let (xv, gv, wv) = (flat(&x), flat(&g), flat(&w));
        let mut out = vec![0f32; xv.len()];

        unsafe {
            lk_c_rms_norm(
                xv.as_ptr(),
                wv.as_ptr(),
                out.as_mut_ptr(),
                rows,
                d as i32,
                1e-5,
            )
        };
        assert!(worst(&out, &flat(&try_rms_norm(&x, &w, 1e-5).unwrap()?)) < 1e-5);
        let want = x.apply_op3_no_bwd(&w, &g, &RmsNormGrad { eps: 1e-5 })?;
        unsafe {
            lk_c_rms_norm_grad(
                xv.as_ptr(),
                wv.as_ptr(),
                gv.as_ptr(),
                out.as_mut_ptr(),
                rows,
                d as i32,
                1e-5,
            )
        };
        assert!(worst(&out, &flat(&want)) < 1e-5);

        let up = crate::seeded::randn(0f32, 1., (b, h, s, d), &dev)?;
        let uv = flat(&up);
        unsafe { lk_c_swiglu(xv.as_ptr(), uv.as_ptr(), out.as_mut_ptr(), xv.len()) };
        assert!(worst(&out, &flat(&swiglu(&x, &up)?)) < 1e-6);
        let want = x.apply_op3_no_bwd(&up, &g, &SwiGluGrad)?;
        let mut both = vec![0f32; 2 * xv.len()];
        unsafe {
            lk_c_swiglu_grad(
                xv.as_ptr(),
                uv.as_ptr(),
                gv.as_ptr(),
                both.as_mut_ptr(),
                xv.len(),
            )
        };
        assert!(worst(&both, &flat(&want)) < 1e-6);

        let cos = crate::seeded::randn(0f32, 1., (s, d / 2), &dev)?;
        let sin = crate::seeded::randn(0f32, 1., (s, d / 2), &dev)?;
        let (cv, sv) = (flat(&cos), flat(&sin));
        for inverse in [false, true] {
            let sign = if inverse { -1.0 } else { 1.0 };
            unsafe {
                lk_c_rope(
                    xv.as_ptr(),
                    cv.as_ptr(),
                    sv.as_ptr(),
                    out.as_mut_ptr(),
                    rows,
                    s as i32,
                    d as i32,
                    sign,
                )
            };
            let want = x.apply_op3_no_bwd(
                &cos,
                &sin,
                &Rope {
                    inverse,
                    rows_per_position: 1,
                },
            )?;
            assert!(worst(&out, &flat(&want)) < 1e-6, "inverse {inverse}");
        }
        Ok(())
    }
}
