//! A frozen linear layer plus its low-rank update, `x·Wᵀ + scaling · dropout(x)·Aᵀ·Bᵀ`, as one
//! differentiable op (gradients for A and B only): the fused CPU f32 op on the matmul kernel
//! where it applies ([`crate::lora_cpu`]), else the any-device op ([`crate::lora_any_device`]).
use crate::dropout::DropoutMask;
use crate::quantized::Frozen;
use candle_core::{Result, Tensor};

/// `x` `[.., in]`, `w` `[out, in]` (frozen, dense or quantized; `wt` a dense weight's transposed
/// CPU copy if one exists),
/// `a` `[r, in]`, `b` `[out, r]`; returns `[.., out]` without bias.
pub fn lora_forward(
    x: &Tensor,
    w: &Frozen,
    wt: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    dropout: Option<DropoutMask>,
) -> Result<Tensor> {
    if let Some(y) = crate::lora_cpu::try_lora_matmul(x, w, wt, a, b, scaling, dropout) {
        return y;
    }
    // the GPU path, and other dtypes: keeps x and the rank-r u for the backward pass
    crate::lora_any_device::lora_op(x, w, a, b, scaling, dropout)
}
