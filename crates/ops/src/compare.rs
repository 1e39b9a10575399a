//! Comparing tensors: what `merge --verify` reports and what parity tests assert on.
use candle_core::{DType, Result, Tensor};

/// Largest absolute element-wise difference of two same-shaped tensors, in f32; NaN when
/// either holds a NaN, or an infinity the other does not (a reduction's max would skip NaN and
/// report agreement).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if a.len() != b.len() {
        return Err(candle_core::Error::Msg(format!(
            "max_abs_diff: {} vs {} elements",
            a.len(),
            b.len()
        )));
    }
    let mut max = 0f32;
    for (x, y) in a.iter().zip(&b) {
        if x == y {
            continue; // equal values, equal infinities (a masked score) included
        }
        if !x.is_finite() || !y.is_finite() {
            return Ok(f32::NAN);
        }
        max = max.max((x - y).abs());
    }
    Ok(max)
}

/// [`max_abs_diff`] over the largest magnitude in `reference` (0 when both are all zeros): the
/// difference relative to the tensor's scale.
pub fn max_rel_diff(a: &Tensor, reference: &Tensor) -> Result<f32> {
    let d = max_abs_diff(a, reference)?;
    let scale = reference
        .to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    Ok(if d == 0.0 { 0.0 } else { d / scale })
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
        let nan = Tensor::new(&[[1.0f32, f32::NAN], [3.0, 4.0]], &Device::Cpu)?;
        assert!(max_abs_diff(&nan, &nan)?.is_nan());
        let inf = Tensor::new(&[[1.0f32, f32::INFINITY], [3.0, 4.0]], &Device::Cpu)?;
        assert!(max_abs_diff(&a, &inf)?.is_nan());
        assert_eq!(max_abs_diff(&inf, &inf)?, 0.0);
        Ok(())
    }
}
