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
