//! Seeded normal tensors for the kernels' tests and benches: candle's CPU `randn` draws from an
//! unseeded generator, so a failure it finds could not be reproduced. Each thread has its own
//! stream (libtest runs every test on its own thread), starting from the same state.
use candle_core::{Device, FloatDType, Result, Shape, Tensor, Var};
use std::cell::Cell;

thread_local! {
    static STATE: Cell<u64> = const { Cell::new(0x5eed_1a7e_0fc0_ffee) };
}

/// Restarts this thread's stream at `seed`.
pub fn reseed(seed: u64) {
    STATE.with(|s| s.set(seed));
}

/// SplitMix64: the next 64 random bits of this thread's stream.
fn next_u64() -> u64 {
    STATE.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A uniform draw in (0, 1].
fn unit() -> f64 {
    ((next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
}

/// Like `Tensor::randn`, from this thread's seeded stream (Box–Muller).
pub fn randn<T: FloatDType>(
    mean: T,
    std: T,
    shape: impl Into<Shape>,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    let (mean, std) = (mean.to_f64(), std.to_f64());
    let values: Vec<f64> = (0..n)
        .map(|_| {
            let (u, v) = (unit(), unit());
            mean + std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_dtype(T::DTYPE)?
        .to_device(device)
}

/// Like `Var::randn`, from this thread's seeded stream.
pub fn var_randn<T: FloatDType>(
    mean: T,
    std: T,
    shape: impl Into<Shape>,
    device: &Device,
) -> Result<Var> {
    Var::from_tensor(&randn(mean, std, shape, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_tensor_and_the_moments_are_normal() -> Result<()> {
        reseed(7);
        let a = randn(0f32, 1., 4096, &Device::Cpu)?;
        reseed(7);
        let b = randn(0f32, 1., 4096, &Device::Cpu)?;
        assert_eq!(a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
        let c = randn(0f32, 1., 4096, &Device::Cpu)?;
        assert_ne!(a.to_vec1::<f32>()?, c.to_vec1::<f32>()?);
        let v = randn(2f64, 3., 20_000, &Device::Cpu)?.to_vec1::<f64>()?;
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            (mean - 2.0).abs() < 0.1 && (var.sqrt() - 3.0).abs() < 0.1,
            "{mean} {var}"
        );
        Ok(())
    }
}
