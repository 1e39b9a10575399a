//! Device and dtype choice: `auto` means CUDA with bf16 when built with `--features cuda` and a
//! GPU is present, else CPU with f32.
use crate::error::{Result, TrainError};
use candle_core::{DType, Device};

pub fn device(spec: &str) -> Result<Device> {
    let cuda = |n: usize| {
        Device::new_cuda(n).map_err(|e| TrainError::InvalidRecipe {
            file: "recipe".into(),
            field: "model.device".into(),
            message: format!("cuda:{n} is not available ({e}); build with --features cuda on a machine with an NVIDIA GPU, or use device: cpu"),
        })
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        "cuda" => cuda(0),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => cuda(n),
            None => Err(TrainError::InvalidRecipe {
                file: "recipe".into(),
                field: "model.device".into(),
                message: format!("{s:?} is not one of auto, cpu, cuda, cuda:N"),
            }),
        },
    }
}

pub fn dtype(spec: &str, device: &Device) -> DType {
    match spec {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ if device.is_cuda() => DType::BF16,
        _ => DType::F32,
    }
}

/// Process settings for fast CPU training; call at start-up, before any tensor op (and before
/// other threads exist). Measured on the 2-core CI-class machine, `small` preset, 2 × 128:
/// - candle's CPU pool for elementwise ops spins (25,000 iterations by default) after every op,
///   waiting for the next; with few cores the spinning thread takes the core the matmul threads
///   need (482 → 530 tokens/s without spinning). An explicit
///   `CANDLE_BARRIER_POOL_SPIN_LIMIT` is kept.
/// - glibc returns freed heap memory to the kernel eagerly, and every reuse then page-faults
///   through fresh zeroed pages (activation and logits buffers are re-allocated each step). A
///   fixed mmap threshold of 32 MiB (glibc's maximum) and a 1 GiB trim threshold keep them in
///   the heap: 198k → 121k page faults over 7 steps. Explicit `MALLOC_MMAP_THRESHOLD_` /
///   `MALLOC_TRIM_THRESHOLD_` are kept.
pub fn tune_process() {
    const SPIN: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN).is_none() {
        std::env::set_var(SPIN, "0");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before other threads run.
        unsafe {
            if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            }
            if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    }
}
