//! lorakit-kernels: lorakit's own CUDA kernels (`csrc/fused.cu`, compiled by nvcc into sm_80 and
//! sm_90 cubins with the `cuda` feature) and their launchers on candle's storage ([`cuda`]). The
//! kernels' element math lives in `csrc/row_math.h`, which build.rs also compiles for the CPU
//! ([`row_math`]) so that CPU tests check the formulas the GPU runs. Knows no model and no
//! adapter: callers (lorakit-adapter, lorakit-models) wrap these in differentiable ops.
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod row_math;

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
