//! One op for a whole LoRA layer on any device: `y = x·Wᵀ + u·Bᵀ` with `u = s·x·Aᵀ` (the
//! low-rank side in the dtype `compute_dtype` picks). Composed, candle keeps for the backward
//! pass an f32 copy of `x` and the `[rows, out]` f32 low-rank product (and its cast) per layer:
//! on a bf16 model that is several times the size of the layer's input. This op keeps `x`
//! (shared with the other projections that read it) and `u` (`r` values a row). W is frozen:
//! captured, never differentiated. Written with storage and tensor ops only, so the CPU runs
//! (and tests) the very code the GPU runs.
use crate::dropout::DropoutMask;
use crate::quantized::Frozen;
use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};

/// `x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ` for `x` `[.., in]`, `w` `[out, in]`, `a` `[r, in]`, `b`
/// `[out, r]`; differentiable in x, A and B, returned in x's dtype. The dropout mask (LoRA
/// dropout in training) is drawn again in the backward pass, never stored.
pub fn lora_op(
    x: &Tensor,
    w: &Frozen,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    dropout: Option<DropoutMask>,
) -> Result<Tensor> {
    let (x, a, b) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
    let mut op = LoraOp {
        w: w.clone(),
        scaling,
        dropout,
        u: None,
    };
    let Sizes { rows, inner, .. } = op.sizes(x.layout(), a.layout(), b.layout())?;
    // u = s·dropout(x)·Aᵀ without a graph, kept for the backward pass
    let xc = op.low_rank_input(&x, a.dtype(), rows, inner)?;
    let compute = xc.dtype();
    op.u = Some((xc.matmul(&a.detach().to_dtype(compute)?.t()?)? * scaling)?);
    x.apply_op3(&a, &b, op)
}

/// The dtype the low-rank products run in: a half-precision input's own (bf16, f16), as
/// PyTorch's autocast runs them, else the adapter's (f32). Adapters, their gradients and the
/// optimizer state stay in the adapter's dtype either way; in half precision this saves the
/// f32 copies of `x` and of the `[rows, out]` product and their passes over memory.
fn compute_dtype(x: DType, adapter: DType) -> DType {
    match x {
        DType::BF16 | DType::F16 => x,
        _ => adapter,
    }
}

struct LoraOp {
    w: Frozen,
    scaling: f64,
    dropout: Option<DropoutMask>,
    /// `s·x·Aᵀ`, `[rows, r]` in the compute dtype.
    u: Option<Tensor>,
}

/// Sizes of one call: rows of x, and W's `[out, in]`, A's rank.
struct Sizes {
    rows: usize,
    out: usize,
    inner: usize,
}

impl LoraOp {
    /// `dropout(x)` as `[rows, in]` in the compute dtype, without a graph.
    fn low_rank_input(
        &self,
        x: &Tensor,
        adapter: DType,
        rows: usize,
        inner: usize,
    ) -> Result<Tensor> {
        let x = x.detach().reshape((rows, inner))?;
        let x = match &self.dropout {
            Some(mask) => mask.apply(&x, false)?,
            None => x,
        };
        x.to_dtype(compute_dtype(x.dtype(), adapter))
    }

    /// W as a dense tensor in `dtype` for one product (a quantized W dequantized and dropped
    /// after it).
    fn weight(&self, dtype: DType) -> Result<Tensor> {
        self.w.dense(dtype)
    }

    fn u(&self) -> Result<&Tensor> {
        self.u
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("lora layer: u was not computed".into()))
    }

    fn sizes(&self, lx: &Layout, la: &Layout, lb: &Layout) -> Result<Sizes> {
        let (out, inner) = self.w.dims2()?;
        let (r, a_in) = la.shape().dims2()?;
        let k = lx.shape().dims().last().copied().unwrap_or(0);
        if k != inner || a_in != inner || lb.shape().dims() != [out, r] {
            candle_core::bail!(
                "lora layer: x {:?}, A {:?} and B {:?} do not fit W {:?}",
                lx.shape(),
                la.shape(),
                lb.shape(),
                self.w.dims2()?
            );
        }
        if !lx.is_contiguous() || !la.is_contiguous() || !lb.is_contiguous() {
            candle_core::bail!("lora layer: x, A and B must be contiguous");
        }
        Ok(Sizes {
            rows: lx.shape().elem_count() / inner.max(1),
            out,
            inner,
        })
    }

    /// The forward pass on one backend's storage: the base product, plus `u·Bᵀ` from the
    /// stored `u`.
    fn run<S: BackendStorage>(
        &self,
        sizes: Sizes,
        (sx, lx): (&S, &Layout),
        (sb, lb): (&S, &Layout),
        (sw, lw): (&S, &Layout),
        (su, lu): (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let Sizes { rows, out, inner } = sizes;
        let r = lb.dims()[1];
        // an operand `[n, k]` read as its transpose `[k, n]`, no copy
        let transposed = |l: &Layout| {
            Layout::new(
                Shape::from((l.dims()[1], l.dims()[0])),
                vec![l.stride()[1], l.stride()[0]],
                l.start_offset(),
            )
        };
        let x2 = Layout::contiguous_with_offset((rows, inner), lx.start_offset());
        let base = sx.matmul(sw, (1, rows, out, inner), &x2, &transposed(lw))?;
        // B in u's dtype (a cast of `out × r` values where they differ)
        let cast;
        let (bl, bl_layout) = if sb.dtype() == su.dtype() {
            (sb, lb.clone())
        } else {
            cast = sb.to_dtype(lb, su.dtype())?;
            (&cast, Layout::contiguous(lb.shape().clone()))
        };
        let delta = su.matmul(bl, (1, rows, out, r), lu, &transposed(&bl_layout))?;
        let rows_out = Layout::contiguous((rows, out));
        let delta = if delta.dtype() == sx.dtype() {
            delta
        } else {
            delta.to_dtype(&rows_out, sx.dtype())?
        };
        let y = base.binary_impl::<Add>(&delta, &rows_out, &rows_out)?;
        let mut dims = lx.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((y, Shape::from(dims)))
    }
}

impl CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "lora-layer"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        _sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let sizes = self.sizes(lx, la, lb)?;
        let w = self.weight(sx.dtype())?;
        let (ws, wl) = w.storage_and_layout();
        let (us, ul) = self.u()?.storage_and_layout();
        let (Storage::Cpu(w), Storage::Cpu(u)) = (&*ws, &*us) else {
            candle_core::bail!("lora layer: W is not on the CPU");
        };
        self.run(sizes, (sx, lx), (sb, lb), (w, wl), (u, ul))
    }

    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        _sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let sizes = self.sizes(lx, la, lb)?;
        let w = self.weight(sx.dtype())?;
        let (ws, wl) = w.storage_and_layout();
        let (us, ul) = self.u()?.storage_and_layout();
        let (Storage::Cuda(w), Storage::Cuda(u)) = (&*ws, &*us) else {
            candle_core::bail!("lora layer: W is not on the GPU");
        };
        self.run(sizes, (sx, lx), (sb, lb), (w, wl), (u, ul))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Sizes {
            rows, out, inner, ..
        } = self.sizes(x.layout(), a.layout(), b.layout())?;
        // A and B are variables: products with them must not carry a graph into the gradients
        // (the optimizer's moments would keep every step's graph alive)
        let compute = compute_dtype(x.dtype(), a.dtype());
        let (ac, bc) = (a.detach().to_dtype(compute)?, b.detach().to_dtype(compute)?);
        let g = grad.contiguous()?.reshape((rows, out))?;
        let gc = g.to_dtype(compute)?;
        let xc = self.low_rank_input(x, a.dtype(), rows, inner)?;
        let u = self.u()?;
        // dL/du = g·B, scaled here (rank-r side) for dA and dx
        let du = (gc.matmul(&bc)? * self.scaling)?;
        let db = gc.t()?.matmul(u)?.to_dtype(b.dtype())?;
        let da = du.t()?.matmul(&xc)?.to_dtype(a.dtype())?;
        let dx_low = du.matmul(&ac)?;
        // dropout's gradient: the same mask
        let dx_low = match &self.dropout {
            Some(mask) => mask.apply(&dx_low, false)?,
            None => dx_low,
        }
        .to_dtype(x.dtype())?;
        let dx = (g.matmul(&self.weight(g.dtype())?)? + dx_low)?.reshape(x.shape())?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::max_abs_diff;
    use candle_core::{Device, Var};

    /// The op against the composed layer with an f32 low-rank side (as PEFT computes it without
    /// autocast), values and the gradients of x, A and B, with x in `dtype`; with `dropout`, LoRA
    /// dropout of that rate on both sides (the composed side through `Dropout::apply`).
    fn check(dtype: DType, dropout: f32, tol: f32) -> Result<()> {
        let dev = Device::Cpu;
        let (rows, inner, out, r, s) = (12, 24, 18, 4, 0.5);
        let x = Var::from_tensor(
            &crate::seeded::randn(0f32, 1., (2, rows / 2, inner), &dev)?.to_dtype(dtype)?,
        )?;
        let w = crate::seeded::randn(0f32, 1., (out, inner), &dev)?.to_dtype(dtype)?;
        let a = crate::seeded::var_randn(0f32, 1., (r, inner), &dev)?;
        let b = crate::seeded::var_randn(0f32, 1., (out, r), &dev)?;
        let step = crate::dropout::StepSeed::default();
        step.set(11, 2, 0);
        let d = crate::dropout::Dropout::new(dropout, "layers.0.q_proj", step);
        let fused = lora_op(
            x.as_tensor(),
            &Frozen::Dense(w.clone()),
            a.as_tensor(),
            b.as_tensor(),
            s,
            d.draw(),
        )?;
        let base = x.as_tensor().broadcast_matmul(&w.t()?)?;
        let xd = d.apply(x.as_tensor())?.to_dtype(DType::F32)?;
        let u = (xd.broadcast_matmul(&a.as_tensor().t()?)? * s)?;
        let delta = u.broadcast_matmul(&b.as_tensor().t()?)?.to_dtype(dtype)?;
        let want = (base + delta)?;
        assert_eq!(fused.dims(), [2, rows / 2, out]);
        assert_eq!(fused.dtype(), dtype);
        let scale = want
            .abs()?
            .max_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        assert!(max_abs_diff(&fused, &want)? < tol * scale);
        let up = crate::seeded::randn(0f32, 1., fused.shape(), &dev)?.to_dtype(dtype)?;
        let g1 = (fused * &up)?.sum_all()?.backward()?;
        let g2 = (want * &up)?.sum_all()?.backward()?;
        for v in [&x, &a, &b] {
            let (g1, g2) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            let scale = g2
                .abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            let d = max_abs_diff(g1, g2)?;
            assert!(d < tol * scale, "{:?}: {d} of {scale}", v.dims());
            // no graph in the gradients (one leaked every step's activations through the
            // optimizer's moments)
            assert!(!g1.track_op());
            assert_eq!(g1.dtype(), v.dtype());
        }
        assert!(g1.get(&w).is_none());
        Ok(())
    }

    #[test]
    fn lora_op_matches_the_composed_layer_in_f32() -> Result<()> {
        check(DType::F32, 0.0, 1e-5)?;
        check(DType::F32, 0.3, 1e-5)
    }

    #[test]
    fn lora_op_matches_the_composed_layer_in_bf16() -> Result<()> {
        // bf16 keeps 8 bits: both sides round the base product and the sum alike, up to order
        check(DType::BF16, 0.0, 2e-2)?;
        check(DType::BF16, 0.3, 2e-2)
    }

    #[test]
    fn lora_op_refuses_misfit_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 8), DType::F32, &dev)?;
        let w = Tensor::zeros((5, 8), DType::F32, &dev)?;
        let a = Tensor::zeros((2, 7), DType::F32, &dev)?;
        let b = Tensor::zeros((5, 2), DType::F32, &dev)?;
        let e = lora_op(&x, &Frozen::Dense(w.clone()), &a, &b, 1.0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit"), "{e}");
        Ok(())
    }
}
