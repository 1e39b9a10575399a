//! One op for a LoRA layer's output on the CPU (f32): `y = x·Wᵀ + u·Bᵀ` with `u = s·x·Aᵀ`
//! computed outside (rank r). The low-rank product is accumulated into the base product's
//! buffer by the matmul kernel itself, so there is no `[rows, out]` delta buffer and no add
//! pass, and the backward pass has one node where it had an add, a matmul and a transpose
//! (candle's backward pays a zero-filled buffer and an add for every input of every node).
//! W is frozen: captured, never differentiated.
use crate::cpu_gemm::{gemm_f32, Threads};
use crate::frozen::frozen_matmul_cpu;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `x·Wᵀ + u·Bᵀ` for `x` `[.., in]`, `u` `[rows, r]`, `b` `[out, r]`; differentiable in x, u
/// and b. `None` when the fused op does not apply (not CPU f32): compose instead.
pub fn lora_matmul(x: &Tensor, w: &Tensor, u: &Tensor, b: &Tensor) -> Option<Result<Tensor>> {
    if !fits(&[x, w, u, b]) {
        return None;
    }
    Some((|| {
        x.contiguous()?.apply_op3(
            &u.contiguous()?,
            &b.contiguous()?,
            LoraMatmul { w: w.clone() },
        )
    })())
}

/// Whether the op runs on these operands: all f32 on the CPU.
pub fn fits(operands: &[&Tensor]) -> bool {
    operands
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

struct LoraMatmul {
    w: Tensor,
}

impl CustomOp3 for LoraMatmul {
    fn name(&self) -> &'static str {
        "lora-matmul"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        su: &CpuStorage,
        lu: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inner) = self.w.dims2()?;
        let (rows, r) = lu.shape().dims2()?;
        let k = lx.shape().dims().last().copied().unwrap_or(0);
        if k != inner || lx.shape().elem_count() != rows * inner || lb.shape().dims() != [out, r] {
            candle_core::bail!(
                "lora matmul: x {:?}, u {:?} and B {:?} do not fit W {:?}",
                lx.shape(),
                lu.shape(),
                lb.shape(),
                self.w.shape()
            );
        }
        let (u, b) = match (su, sb, lu.contiguous_offsets(), lb.contiguous_offsets()) {
            (CpuStorage::F32(u), CpuStorage::F32(b), Some((u0, u1)), Some((b0, b1))) => {
                (&u[u0..u1], &b[b0..b1])
            }
            _ => candle_core::bail!("lora matmul: u and B must be contiguous f32"),
        };
        // base product: the frozen-weight matmul's own forward
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("lora matmul: W must be on the CPU");
        };
        let (y, shape) = frozen_matmul_cpu(sx, lx, ws, wl)?;
        let CpuStorage::F32(mut y) = y else {
            candle_core::bail!("lora matmul: expected f32");
        };
        // y += u·Bᵀ, accumulated by the kernel
        // SAFETY: y is rows×out, u rows×r and b out×r, all contiguous, as checked above.
        unsafe {
            gemm_f32(
                (rows, out, r),
                y.as_mut_ptr(),
                out,
                true,
                u.as_ptr(),
                (r, 1),
                b.as_ptr(),
                (1, r),
                1.0,
                Threads::All,
            );
        }
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        u: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, _) = self.w.dims2()?;
        let rows = u.dim(0)?;
        // u and B are tracked (B is a variable): products with them must not carry a graph
        // into the gradients, or the optimizer state would keep every step's graph alive
        let (u, b) = (u.detach(), b.detach());
        let g = grad.contiguous()?.reshape((rows, out))?;
        let dx = g.matmul(&self.w)?.reshape(x.shape())?;
        let du = g.matmul(&b)?;
        // (uᵀ·g)ᵀ: the kernel packs the small uᵀ instead of a transposed copy of g
        let db = u.t()?.matmul(&g)?.t()?;
        Ok((Some(dx), Some(du), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::max_abs_diff;
    use candle_core::{Device, Var};

    #[test]
    fn fused_lora_matmul_matches_the_composed_layer_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, inner, out, r) = (10, 24, 18, 4);
        let x = Var::randn(0f32, 1., (2, rows / 2, inner), &dev)?;
        let w = Tensor::randn(0f32, 1., (out, inner), &dev)?;
        let u = Var::randn(0f32, 1., (rows, r), &dev)?;
        let b = Var::randn(0f32, 1., (out, r), &dev)?;
        let fused = lora_matmul(x.as_tensor(), &w, u.as_tensor(), b.as_tensor()).unwrap()?;
        let base = x.as_tensor().broadcast_matmul(&w.t()?)?;
        let delta = u
            .as_tensor()
            .matmul(&b.as_tensor().t()?)?
            .reshape((2, rows / 2, out))?;
        let want = (base + delta)?;
        assert_eq!(fused.dims(), [2, rows / 2, out]);
        assert!(max_abs_diff(&fused, &want)? < 1e-4);
        let up = Tensor::randn(0f32, 1., fused.shape(), &dev)?;
        let g1 = (fused * &up)?.sum_all()?.backward()?;
        let g2 = (want * &up)?.sum_all()?.backward()?;
        for v in [&x, &u, &b] {
            let d = max_abs_diff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            )?;
            assert!(d < 1e-4, "{:?}: {d}", v.dims());
        }
        assert!(g1.get(&w).is_none());
        // the gradients carry no graph (one that did leaked every step's activations through
        // the optimizer's moments)
        for v in [&x, &u, &b] {
            assert!(!g1.get(v.as_tensor()).unwrap().track_op());
        }
        // other dtypes are not fused
        let x64 = x.as_tensor().to_dtype(DType::F64)?;
        assert!(lora_matmul(&x64, &w, u.as_tensor(), b.as_tensor()).is_none());
        Ok(())
    }
}
