//! lorakit-kernels: lorakit's own CUDA kernels (`csrc/fused.cu`, compiled by nvcc into sm_80 and
//! sm_90 cubins with the `cuda` feature) and their launchers on candle's storage (`cuda`). The
//! kernels' element math lives in `csrc/row_math.h`, which build.rs also compiles for the CPU
//! ([`row_math`]) so that CPU tests check the formulas the GPU runs. Knows no model and no
//! adapter: callers (lorakit-adapter, lorakit-models) wrap these in differentiable ops; the
//! optimizer's in-place step is here whole ([`adamw_step`]).
pub mod adamw;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod row_math;

pub use adamw::{adamw_step, AdamWStep};
