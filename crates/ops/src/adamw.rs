//! One AdamW step per parameter as one in-place kernel on CUDA, where the composed update is a
//! dozen candle ops (each a launch and a buffer) per parameter.
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Result, Tensor};

/// One AdamW step's constants: PyTorch's AdamW with decoupled weight decay; `c1`, `c2` are the
/// bias corrections `1 − β₁ᵗ`, `1 − β₂ᵗ`.
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub c1: f64,
    pub c2: f64,
}

/// The update of one parameter, in place on the parameter and both moments.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AdamWInPlace<'a> {
    grad: &'a Tensor,
    step: &'a AdamWStep,
}

impl InplaceOp3 for AdamWInPlace<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("fused adamw: CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        lp: &Layout,
        m: &CudaStorage,
        lm: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<()> {
        let (g, lg) = self.grad.storage_and_layout();
        let candle_core::Storage::Cuda(g) = &*g else {
            candle_core::bail!("fused adamw: gradient is not on the GPU");
        };
        crate::cuda::adamw((p, lp), (m, lm), (v, lv), (g, lg), self.step)
    }
}

/// One AdamW step on an f32 parameter `param` with moments `m`, `v` (all three updated in
/// place) from `grad`: one kernel where the composed update is a dozen ops, each a launch and
/// a buffer. On CUDA (f32, contiguous) only; `None` elsewhere: compose instead.
pub fn adamw_step(
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    step: &AdamWStep,
) -> Option<Result<()>> {
    let fits = [param, m, v, grad].iter().all(|t| {
        t.device().is_cuda()
            && cfg!(feature = "cuda")
            && t.dtype() == DType::F32
            && t.is_contiguous()
            && t.dims() == param.dims()
    });
    if !fits {
        return None;
    }
    Some(param.inplace_op3(m, v, &AdamWInPlace { grad, step }))
}
