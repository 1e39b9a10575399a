//! Comparing tensors: what `merge --verify` reports and what parity tests assert on.
use candle_core::{DType, Result, Tensor};

/// Largest absolute element-wise difference of two same-shaped tensors, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?;
    d.max(0)?.to_scalar::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reports_the_largest_gap_across_dtypes() -> Result<()> {
        let a = Tensor::new(&[[1.0f32, -2.0], [3.0, 4.0]], &Device::Cpu)?;
        let b = Tensor::new(&[[1.0f32, -2.5], [3.0, 4.25]], &Device::Cpu)?.to_dtype(DType::BF16)?;
        assert_eq!(max_abs_diff(&a, &b)?, 0.5);
        Ok(())
    }
}
