//! lorakit-ops: every compute op lorakit trains with, and the one place that picks how each runs
//! — a CPU f32 kernel, a CUDA kernel (`csrc/fused.cu`, compiled by nvcc into sm_80 and sm_90
//! cubins with the `cuda` feature) or a composed candle fallback. Knows no model and no adapter.
//!
//! Entry points (each chooses its implementation itself; callers never test device or dtype):
//! - [`layers::rms_norm`], [`layers::apply_rope`], [`layers::rope_tables`], [`fused::swiglu`]
//! - [`attention::attention`] (any layout `[b, heads, s, d]`), [`attention::rope_attention`]
//!   (the projections' `[b, s, heads·d]` outputs, rotary embedding included), under an
//!   [`attention::AttnMask`] (causal, window, padding, packed examples: a rule, no dense matrix)
//! - [`fused::cross_entropy`], [`chunked_loss::linear_cross_entropy`] (a frozen output head and
//!   its loss, chunked over rows)
//! - [`frozen::frozen_matmul`], [`frozen::frozen_mul`], [`frozen::frozen_add`] (products with a
//!   frozen operand: no gradient for it), [`lora::lora_forward`] (a frozen layer plus its
//!   low-rank update, with [`dropout`]); [`quantized::quant_matmul`] and [`quantized::Frozen`]
//!   (frozen weights kept in GGML blocks, dequantized just in time)
//! - [`adamw_step`] (the optimizer's in-place step)
//!
//! The kernels' element math lives in `csrc/row_math.h`, which build.rs also compiles for the
//! CPU ([`row_math`]) so that CPU tests check the formulas the GPU runs.
pub mod adamw;
pub mod attention;
pub mod chunked_loss;
pub mod column_scale;
pub mod compare;
pub mod cpu_gemm;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dropout;
pub mod frozen;
pub mod fused;
pub mod layers;
pub mod linalg;
pub mod lora;
pub mod lora_any_device;
pub mod lora_cpu;
pub mod quantized;
pub mod row_math;
pub mod seeded;
pub mod softmax_row;

pub use adamw::{adamw_step, AdamWStep};
