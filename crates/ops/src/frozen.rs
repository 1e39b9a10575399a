//! Ops whose second operand is a frozen base tensor: forward as usual, backward gives the
//! gradient of the activation only. candle's own matmul/mul/add compute (and keep until backward
//! ends) a gradient for every operand, which for a frozen weight is wasted work and a full
//! model-size buffer.
use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Mul};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};

/// `x @ wᵀ` for `x: [.., in]` (contiguous) and `w: [out, in]`; the CPU forward reads `wt`
/// (`[in, out]`, contiguous) when given.
struct FrozenMatmul {
    wt: Option<Tensor>,
}

/// How the storage-level matmul is called: `(b, m, n, k)`, the layouts of x and wᵀ, and the
/// output shape.
struct MatmulPlan {
    bmnk: (usize, usize, usize, usize),
    x2: Layout,
    wt: Layout,
    shape: Shape,
}

impl FrozenMatmul {
    /// Folds the leading dims of x into rows and views w as its transpose, without a copy.
    fn plan(lx: &Layout, lw: &Layout) -> Result<MatmulPlan> {
        let (out, inner) = lw.shape().dims2()?;
        let xd = lx.shape().dims();
        let k = *xd.last().unwrap_or(&0);
        if k != inner {
            candle_core::bail!(
                "frozen linear: input has {k} features, weight {:?} expects {inner}",
                lw.shape()
            );
        }
        if !lx.is_contiguous() {
            candle_core::bail!("frozen linear: input must be contiguous");
        }
        let rows = lx.shape().elem_count() / k.max(1);
        let x2 = Layout::contiguous_with_offset((rows, k), lx.start_offset());
        let wt = Layout::new(
            Shape::from((k, out)),
            vec![lw.stride()[1], lw.stride()[0]],
            lw.start_offset(),
        );
        let mut dims = xd.to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok(MatmulPlan {
            bmnk: (1, rows, out, k),
            x2,
            wt,
            shape: Shape::from(dims),
        })
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = Self::plan(lx, lw)?;
        let Some(wt) = &self.wt else {
            return Ok((sx.matmul(sw, p.bmnk, &p.x2, &p.wt)?, p.shape));
        };
        let (ws, wl) = wt.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen linear: Wᵀ is not on the CPU");
        };
        if wl.dims() != p.wt.dims() || !wl.is_contiguous() {
            candle_core::bail!(
                "frozen linear: Wᵀ {:?}, expected a contiguous {:?}",
                wl.shape(),
                p.wt.shape()
            );
        }
        Ok((sx.matmul(ws, p.bmnk, &p.x2, wl)?, p.shape))
    }

    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let p = Self::plan(lx, lw)?;
        Ok((sx.matmul(sw, p.bmnk, &p.x2, &p.wt)?, p.shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, inner) = w.dims2()?;
        let rows = grad.elem_count() / out.max(1);
        let dx = grad
            .reshape((rows, out))?
            .matmul(&w.to_dtype(grad.dtype())?)?
            .reshape(x.shape())?;
        debug_assert_eq!(dx.dim(candle_core::D::Minus1)?, inner);
        Ok((Some(dx.to_dtype(x.dtype())?), None))
    }
}

/// Elementwise `x ∘ c` with `c` broadcast from the right (a norm weight, a bias).
struct FrozenBroadcast {
    mul: bool,
}

impl FrozenBroadcast {
    fn run<S: BackendStorage>(
        &self,
        sx: &S,
        lx: &Layout,
        sc: &S,
        lc: &Layout,
    ) -> Result<(S, Shape)> {
        let lc = lc.broadcast_as(lx.shape().clone())?;
        let out = if self.mul {
            sx.binary_impl::<Mul>(sc, lx, &lc)?
        } else {
            sx.binary_impl::<Add>(sc, lx, &lc)?
        };
        Ok((out, lx.shape().clone()))
    }
}

impl CustomOp2 for FrozenBroadcast {
    fn name(&self) -> &'static str {
        if self.mul {
            "frozen-broadcast-mul"
        } else {
            "frozen-broadcast-add"
        }
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(sx, lx, sc, lc)
    }

    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sc: &CudaStorage,
        lc: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run(sx, lx, sc, lc)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if self.mul {
            grad.broadcast_mul(c)?
        } else {
            grad.clone()
        };
        Ok((Some(dx), None))
    }
}

/// `x @ wᵀ` where `w: [out, in]` is frozen: no gradient is computed or stored for `w`. `wt`, a
/// contiguous `[in, out]` copy of `wᵀ` if the caller keeps one, is what the CPU forward reads
/// (the CPU matmul kernel repacks a transposed operand on every call).
pub fn frozen_matmul(x: &Tensor, w: &Tensor, wt: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op2(w, FrozenMatmul { wt: wt.cloned() })
}

/// `x * c` (c broadcast from the right), `c` frozen.
pub fn frozen_mul(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    x.apply_op2(c, FrozenBroadcast { mul: true })
}

/// `x + c` (c broadcast from the right), `c` frozen.
pub fn frozen_add(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    x.apply_op2(c, FrozenBroadcast { mul: false })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::compare::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn frozen_ops_match_candle_values_and_input_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = crate::seeded::var_randn(0f32, 1., (2, 3, 8), &dev)?;
        let w = crate::seeded::randn(0f32, 1., (5, 8), &dev)?;
        let b = crate::seeded::randn(0f32, 1., 5, &dev)?;
        let g = crate::seeded::randn(0f32, 1., 5, &dev)?;

        let ours = frozen_mul(
            &frozen_add(&frozen_matmul(x.as_tensor(), &w, None)?, &b)?,
            &g,
        )?;
        let reference = x
            .as_tensor()
            .broadcast_matmul(&w.t()?)?
            .broadcast_add(&b)?
            .broadcast_mul(&g)?;
        assert!(max_diff(&ours, &reference) < 1e-5);
        // reading a transposed copy of W gives the same values and input gradient
        let wt = w.t()?.contiguous()?;
        let with_copy = frozen_matmul(x.as_tensor(), &w, Some(&wt))?;
        let plain = frozen_matmul(x.as_tensor(), &w, None)?;
        assert!(max_diff(&with_copy, &plain) < 1e-5);
        let up = crate::seeded::randn(0f32, 1., plain.shape(), &dev)?;
        let g1 = (with_copy * &up)?.sum_all()?.backward()?;
        let g2 = (plain * &up)?.sum_all()?.backward()?;
        assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-5);
        assert!(g1.get(&wt).is_none() && g1.get(&w).is_none());
        // a copy that is not Wᵀ is refused
        let err = frozen_matmul(x.as_tensor(), &w, Some(&w)).unwrap_err();
        assert!(err.to_string().contains("expected a contiguous"), "{err}");

        let go = ours.sqr()?.sum_all()?.backward()?;
        let gr = reference.sqr()?.sum_all()?.backward()?;
        assert!(max_diff(go.get(&x).unwrap(), gr.get(&x).unwrap()) < 1e-4);
        // candle's composed path stores gradients for the frozen operands (under the ids of
        // their transposed/broadcast views), ours stores none of that shape or size.
        let sizes = |g: &candle_core::backprop::GradStore| -> Vec<Vec<usize>> {
            g.get_ids()
                .map(|id| g.get_id(*id).unwrap().dims().to_vec())
                .collect()
        };
        let (ours_shapes, ref_shapes) = (sizes(&go), sizes(&gr));
        assert!(ref_shapes.contains(&vec![8, 5]), "{ref_shapes:?}");
        assert!(!ours_shapes
            .iter()
            .any(|s| s == &[8, 5] || s == &[5, 8] || s == &[5]));
        let total = |v: &[Vec<usize>]| v.iter().map(|s| s.iter().product::<usize>()).sum::<usize>();
        assert!(total(&ref_shapes) >= total(&ours_shapes) + w.elem_count());
        for t in [&w, &b, &g] {
            assert!(go.get(t).is_none());
        }
        Ok(())
    }

    #[test]
    fn frozen_matmul_accepts_strided_weight_and_offset_input() -> Result<()> {
        let dev = Device::Cpu;
        let big = crate::seeded::randn(0f32, 1., (4, 6, 8), &dev)?;
        let x = big.narrow(0, 1, 2)?; // contiguous with an offset
        let wt = crate::seeded::randn(0f32, 1., (8, 5), &dev)?;
        let w = wt.t()?; // [5, 8] viewed through strides
        let ours = frozen_matmul(&x, &w, None)?;
        let reference = x.reshape((12, 8))?.matmul(&wt)?.reshape((2, 6, 5))?;
        assert!(max_diff(&ours, &reference) < 1e-5);
        let bad = Tensor::zeros((2, 7), DType::F32, &dev)?;
        assert!(frozen_matmul(&bad, &w, None).is_err());
        Ok(())
    }
}
