//! `y·diag(s)`: every row of `y` `[.., n]` multiplied by the vector `s` `[n]` (DoRA's per-output
//! magnitude scale), differentiable in both. Composed, candle reads `s` through a zero-stride
//! broadcast layout in the forward and the backward product and reduces the gradient of `s` over
//! the broadcast dims — strided passes over a `[rows, n]` tensor per adapted module and step.
//! The CPU f32 op does each pass in contiguous row sweeps on all cores; the gradient of `s` sums
//! fixed blocks of rows and then the blocks in order, so it does not depend on the thread count.
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per block of the gradient reduction (fixed, for a reproducible sum).
const BLOCK_ROWS: usize = 64;

/// `y·diag(s)` for `y` `[.., n]` and `s` `[n]`, in y's dtype.
pub fn scale_columns(y: &Tensor, s: &Tensor) -> Result<Tensor> {
    if let Some(out) = try_scale_columns(y, s) {
        return out;
    }
    y.broadcast_mul(&s.to_dtype(y.dtype())?)
}

/// The CPU f32 op, when `y` and `s` are CPU f32 tensors (`None` otherwise).
pub fn try_scale_columns(y: &Tensor, s: &Tensor) -> Option<Result<Tensor>> {
    let fits = y.device().is_cpu()
        && y.dtype() == DType::F32
        && s.dtype() == DType::F32
        && s.rank() == 1
        && y.dims().last() == Some(&s.dim(0).ok()?);
    if !fits {
        return None;
    }
    Some(
        y.contiguous()
            .and_then(|y| Ok((y, s.contiguous()?)))
            .and_then(|(y, s)| y.apply_op2(&s, ScaleColumns)),
    )
}

struct ScaleColumns;

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("scale-columns: expected contiguous f32"),
    }
}

impl CustomOp2 for ScaleColumns {
    fn name(&self) -> &'static str {
        "scale-columns"
    }

    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, s) = (slice(sy, ly)?, slice(ss, ls)?);
        let n = s.len().max(1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(n * BLOCK_ROWS)
            .zip(y.par_chunks(n * BLOCK_ROWS))
            .for_each(|(o, y)| {
                for (orow, yrow) in o.chunks_mut(n).zip(y.chunks(n)) {
                    for ((o, y), s) in orow.iter_mut().zip(yrow).zip(s) {
                        *o = y * s;
                    }
                }
            });
        Ok((CpuStorage::F32(out), ly.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grad_y = grad.apply_op2_no_bwd(s, &ScaleColumns)?;
        // ds[j] = Σ_rows grad[r, j]·y[r, j]: per block of rows, then the blocks in order
        let n = s.dim(0)?;
        let (gs, gl) = grad.storage_and_layout();
        let (ys, yl) = y.storage_and_layout();
        let (g, yv) = match (&*gs, &*ys) {
            (candle_core::Storage::Cpu(g), candle_core::Storage::Cpu(y)) => {
                (slice(g, gl)?, slice(y, yl)?)
            }
            _ => candle_core::bail!("scale-columns: backward expects CPU tensors"),
        };
        let partial: Vec<Vec<f32>> = g
            .par_chunks(n.max(1) * BLOCK_ROWS)
            .zip(yv.par_chunks(n.max(1) * BLOCK_ROWS))
            .map(|(g, y)| {
                let mut acc = vec![0f32; n];
                for (grow, yrow) in g.chunks(n.max(1)).zip(y.chunks(n.max(1))) {
                    for ((a, g), y) in acc.iter_mut().zip(grow).zip(yrow) {
                        *a += g * y;
                    }
                }
                acc
            })
            .collect();
        let mut ds = vec![0f32; n];
        for p in &partial {
            for (d, v) in ds.iter_mut().zip(p) {
                *d += v;
            }
        }
        Ok((Some(grad_y), Some(Tensor::from_vec(ds, n, s.device())?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::max_abs_diff;
    use crate::seeded::{randn, var_randn};
    use candle_core::Device;

    /// Values and both gradients equal candle's composed broadcast multiply, over sizes that
    /// leave a partial block.
    #[test]
    fn equals_the_broadcast_multiply_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (b, rows, n) in [(2, 70, 33), (1, 1, 5), (3, 64, 8)] {
            let y = var_randn(0f32, 1., (b, rows, n), &dev)?;
            let s = var_randn(1f32, 0.5, n, &dev)?;
            let w = randn(0f32, 1., (b, rows, n), &dev)?;
            let ours = try_scale_columns(y.as_tensor(), s.as_tensor()).expect("CPU f32")?;
            let want = y.as_tensor().broadcast_mul(s.as_tensor())?;
            assert!(max_abs_diff(&ours, &want)? < 1e-6);
            let g1 = (ours * &w)?.sum_all()?.backward()?;
            let g2 = (want * &w)?.sum_all()?.backward()?;
            for v in [&y, &s] {
                let (a, b) = (g1.get(v).expect("grad"), g2.get(v).expect("grad"));
                assert!(max_abs_diff(a, b)? < 1e-4, "{:?}", v.dims());
            }
        }
        // other dtypes take the composed path
        let y = randn(0f32, 1., (4, 3), &dev)?.to_dtype(DType::F64)?;
        assert!(try_scale_columns(&y, &Tensor::ones(3, DType::F64, &dev)?).is_none());
        Ok(())
    }
}
