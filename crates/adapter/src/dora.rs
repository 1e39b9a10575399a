//! DoRA (weight-decomposed LoRA, Liu et al. 2024) as PEFT computes it (`use_dora: true`): each
//! adapted module also trains a magnitude `m` `[out]`, PEFT key
//! `base_model.model.<module>.lora_magnitude_vector`, and the layer is
//! `y = (m/n)·(W + s·B·A)·x + b` where `n` holds the row norms of `W + s·B·A` — treated as a
//! constant (detached, paper §4.3), so no gradient flows through it.
//!
//! With LoRA dropout the base product is recomputed on the dropped input, as PEFT does:
//! `y = W·x + b + (m/n − 1)·W·drop(x) + (m/n)·s·B·A·drop(x)`.
//!
//! The norm is cheap: `‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·⟨B_i, (W·Aᵀ)_i⟩ + s²·⟨B_i, (B·A·Aᵀ)_i⟩`
//! costs one `[out, in]×[in, r]` product per module and step (the `‖W_i‖²` are kept: W is
//! frozen), never a dense `[out, in]` update. In inference passes `n` is kept too.
use crate::lora_linear::LowRank;
use crate::variant::{InitInput, Initial, Lora, LoraVariant};
use candle_core::{DType, Result, Tensor, D};
use lorakit_ops::column_scale::scale_columns;
use lorakit_ops::dropout::DropoutMask;
use lorakit_ops::lora::lora_forward;
use lorakit_ops::quantized::Frozen;

/// PEFT's key suffix of the magnitude (`base_model.model.<module>.lora_magnitude_vector`).
pub const MAGNITUDE: &str = "lora_magnitude_vector";

#[derive(Debug)]
pub struct Dora;

/// Row norms of `W + s·B·A` as a detached `[out]` in the adapter's dtype (f32), by the
/// expansion in the module docs. A quantized W is dequantized once, for `‖W_i‖²`.
fn weight_norm(
    weight: &Frozen,
    weight_t: Option<&Tensor>,
    low: &LowRank,
    train: bool,
) -> Result<Tensor> {
    let dt = low.a.dtype();
    low.remembered("weight_norm", !train, || {
        let base_sq = low.remembered("base_row_sq", true, || {
            weight.dense(dt)?.sqr()?.sum(D::Minus1)
        })?;
        let a = low.a.detach();
        let b = low.b.detach();
        // W·Aᵀ `[out, r]`, from the transposed copy when there is one (no repacking)
        let wa = match weight_t {
            Some(wt) if wt.dtype() == dt => a.matmul(wt)?.t()?,
            _ => {
                let a = match weight {
                    Frozen::Dense(w) => a.to_dtype(w.dtype())?,
                    Frozen::Quant(_) => a.clone(),
                };
                // (A·Wᵀ)ᵀ
                weight.matmul_t(&a, None)?.t()?.to_dtype(dt)?
            }
        };
        let cross = (&b * &wa)?.sum(D::Minus1)?;
        let quad = (b.matmul(&a.matmul(&a.t()?)?)? * &b)?.sum(D::Minus1)?;
        let s = low.scaling;
        let sq = ((base_sq + (cross * (2.0 * s))?)? + (quad * (s * s))?)?;
        sq.relu()?.sqrt()
    })
}

/// The module's magnitude vector (the builder and the PEFT reader always supply it).
fn magnitude(low: &LowRank) -> Result<&Tensor> {
    low.extra
        .get(MAGNITUDE)
        .ok_or_else(|| candle_core::Error::Msg(format!("a DoRA module without `{MAGNITUDE}`")))
}

impl LoraVariant for Dora {
    fn name(&self) -> &'static str {
        "dora"
    }

    fn extra_tensors(&self) -> &'static [&'static str] {
        &[MAGNITUDE]
    }

    /// LoRA's A and B, and `m` = the row norms of `W + s·B·A` (of W, B being zero).
    fn init(&self, m: &InitInput) -> Result<Initial> {
        let mut init = Lora.init(m)?;
        let low = LowRank::new(init.a.clone(), init.b.clone(), m.scaling);
        let w = m.weight.to_dtype(DType::F32)?.to_device(m.device)?;
        let magnitude = (w + low.delta_weight()?)?.sqr()?.sum(D::Minus1)?.sqrt()?;
        init.extra.push((MAGNITUDE, magnitude));
        Ok(init)
    }

    fn forward(
        &self,
        x: &Tensor,
        weight: &Frozen,
        weight_t: Option<&Tensor>,
        low: &LowRank,
        dropout: Option<DropoutMask>,
        train: bool,
    ) -> Result<Tensor> {
        let norm = weight_norm(weight, weight_t, low, train)?;
        let scale = magnitude(low)?.broadcast_div(&norm)?;
        let Some(mask) = dropout else {
            // (m/n)·(W·x + s·B·A·x): the fused LoRA op, then one scale per output
            let y = lora_forward(x, weight, weight_t, &low.a, &low.b, low.scaling, None)?;
            return scale_columns(&y, &scale);
        };
        let base = weight.matmul_t(x, weight_t)?;
        let dropped = mask.apply(x, true)?;
        let base_dropped = weight.matmul_t(&dropped, weight_t)?;
        let low_dtype = low.a.dtype();
        let update = (dropped
            .to_dtype(low_dtype)?
            .broadcast_matmul(&low.a.t()?)?
            .broadcast_matmul(&low.b.t()?)?
            * low.scaling)?;
        let scale_x = scale.to_dtype(x.dtype())?;
        let rescaled_base = base_dropped.broadcast_mul(&(&scale_x - 1.0)?)?;
        let scaled_update = update.broadcast_mul(&scale)?.to_dtype(x.dtype())?;
        (base + rescaled_base)? + scaled_update
    }

    /// `(m/n)[:, None]·(W + s·B·A)`, with `n` from the dense sum (exact, once per module).
    fn merged_weight(&self, weight: &Tensor, low: &LowRank) -> Result<Tensor> {
        let dense = (weight.to_dtype(DType::F32)? + low.delta_weight()?)?;
        let norm = dense.sqr()?.sum(D::Minus1)?.sqrt()?;
        let scale = magnitude(low)?.to_dtype(DType::F32)?.broadcast_div(&norm)?;
        dense.broadcast_mul(&scale.unsqueeze(1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LoraLinear;
    use candle_core::{Device, Module};
    use lorakit_ops::compare::max_abs_diff;
    use lorakit_ops::seeded::{randn, var_randn};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn layer_parts(dev: &Device) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        Ok((
            randn(0f32, 1., (6, 5), dev)?,
            randn(0f32, 0.5, (2, 5), dev)?,
            randn(0f32, 0.5, (6, 2), dev)?,
            (randn(0f32, 0.3, 6, dev)? + 2.0)?,
        ))
    }

    fn dora(a: Tensor, b: Tensor, m: Tensor) -> LowRank {
        LowRank::new(a, b, 1.5).with_variant(Arc::new(Dora), BTreeMap::from([(MAGNITUDE, m)]))
    }

    /// The layer equals the dense formula `(m/n)·(W + s·B·A)·x + b`, with n from the dense
    /// sum; eval passes (which keep n) and training passes (which recompute it) agree, and after
    /// the tensors change a training pass is what refreshes the kept n.
    #[test]
    fn forward_is_the_dense_formula_and_the_kept_norm_follows_changes() -> Result<()> {
        let dev = Device::Cpu;
        let (w, a, b, m) = layer_parts(&dev)?;
        let bias = randn(0f32, 1., 6, &dev)?;
        let x = randn(0f32, 1., (3, 4, 5), &dev)?;
        let low = dora(a.clone(), b.clone(), m.clone());
        let merged = low.merged_weight(&w)?;
        let want = x.broadcast_matmul(&merged.t()?)?.broadcast_add(&bias)?;
        let layer = LoraLinear::new(w.clone(), Some(bias.clone()), Some(low.clone()));
        for train in [false, false, true, false] {
            assert!(max_abs_diff(&layer.forward_t(&x, train)?, &want)? < 1e-5);
        }
        // the dense formula by hand
        let dense = (&w + (b.matmul(&a)? * 1.5)?)?;
        let n = dense.sqr()?.sum(1)?.sqrt()?;
        let by_hand = dense.broadcast_mul(&(m / n)?.unsqueeze(1)?)?;
        assert!(max_abs_diff(&merged, &by_hand)? < 1e-6);
        Ok(())
    }

    /// Gradients of A, B and m against central finite differences (f64), with n held constant
    /// as PEFT detaches it; and the dropout form against its formula.
    #[test]
    fn gradients_treat_the_norm_as_a_constant() -> Result<()> {
        let dev = Device::Cpu;
        let w = randn(0f64, 1., (5, 4), &dev)?;
        let x = randn(0f64, 1., (2, 3, 4), &dev)?;
        let a = var_randn(0f64, 0.5, (2, 4), &dev)?;
        let b = var_randn(0f64, 0.5, (5, 2), &dev)?;
        let m = var_randn(2f64, 0.3, 5, &dev)?;
        let n_fixed = {
            let dense = (&w + (b.as_tensor().matmul(a.as_tensor())? * 1.5)?)?;
            dense.sqr()?.sum(1)?.sqrt()?
        };
        let loss_of = |a: &Tensor, b: &Tensor, m: &Tensor, by_layer: bool| -> Result<Tensor> {
            let y = if by_layer {
                LoraLinear::new(w.clone(), None, Some(dora(a.clone(), b.clone(), m.clone())))
                    .forward(&x)?
            } else {
                let dense = (&w + (b.matmul(a)? * 1.5)?)?;
                let merged = dense.broadcast_mul(&(m / &n_fixed)?.unsqueeze(1)?)?;
                x.broadcast_matmul(&merged.t()?)?
            };
            y.tanh()?.sqr()?.sum_all()
        };
        let grads = loss_of(a.as_tensor(), b.as_tensor(), m.as_tensor(), true)?.backward()?;
        let eps = 1e-6;
        for (which, var) in [(0, &a), (1, &b), (2, &m)] {
            let g = grads
                .get(var)
                .expect("gradient")
                .flatten_all()?
                .to_vec1::<f64>()?;
            let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            for i in 0..base.len() {
                let at = |d: f64| -> Result<f64> {
                    let mut v = base.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, var.shape(), &dev)?;
                    let mut args = [
                        a.as_tensor().clone(),
                        b.as_tensor().clone(),
                        m.as_tensor().clone(),
                    ];
                    args[which] = t;
                    loss_of(&args[0], &args[1], &args[2], false)?.to_scalar::<f64>()
                };
                let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
                assert!(
                    (numeric - g[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "tensor {which}[{i}]: numeric {numeric}, backprop {}",
                    g[i]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn dropout_form_is_peft_s() -> Result<()> {
        let dev = Device::Cpu;
        let (w, a, b, m) = layer_parts(&dev)?;
        let x = randn(0f32, 1., (7, 5), &dev)?;
        let seed = lorakit_ops::dropout::StepSeed::default();
        seed.set(3, 1, 0);
        let drop = lorakit_ops::dropout::Dropout::new(0.5, "m.q_proj", seed);
        let low = dora(a.clone(), b.clone(), m.clone()).with_dropout(Some(drop.clone()));
        let y = LoraLinear::new(w.clone(), None, Some(low)).forward_t(&x, true)?;
        let xd = drop.draw().expect("p > 0").apply(&x, false)?;
        let dense = (&w + (b.matmul(&a)? * 1.5)?)?;
        let scale = (m / dense.sqr()?.sum(1)?.sqrt()?)?;
        let want = ((x.matmul(&w.t()?)?
            + xd.matmul(&w.t()?)?.broadcast_mul(&(&scale - 1.0)?)?)?
            + xd.matmul(&(b.matmul(&a)? * 1.5)?.t()?)?
                .broadcast_mul(&scale)?)?;
        assert!(max_abs_diff(&y, &want)? < 1e-5);
        // and differs from the naive (m/n)·(W·x + s·B·A·drop(x))
        let naive = (x.matmul(&w.t()?)? + xd.matmul(&(b.matmul(&a)? * 1.5)?.t()?)?)?
            .broadcast_mul(&scale)?;
        assert!(max_abs_diff(&y, &naive)? > 1e-2);
        Ok(())
    }

    /// A fresh DoRA module starts at the base layer: m = ‖W‖ rows, B = 0.
    #[test]
    fn init_starts_at_the_base_model() -> Result<()> {
        let dev = Device::Cpu;
        let w = randn(0f32, 1., (6, 5), &dev)?;
        let uniform = |_: &str, n: usize, bound: f64| vec![bound as f32 * 0.5; n];
        let init = Dora.init(&InitInput {
            weight: &w,
            rank: 2,
            scaling: 2.0,
            uniform: &uniform,
            key_a: "k",
            seed: 0,
            device: &dev,
        })?;
        let (name, m) = &init.extra[0];
        assert_eq!(*name, MAGNITUDE);
        let norms = w.sqr()?.sum(1)?.sqrt()?;
        assert!(max_abs_diff(m, &norms)? < 1e-6);
        let low = dora(init.a, init.b, m.clone());
        let x = randn(0f32, 1., (3, 5), &dev)?;
        let y = LoraLinear::new(w.clone(), None, Some(low)).forward(&x)?;
        assert!(max_abs_diff(&y, &x.matmul(&w.t()?)?)? < 1e-5);
        Ok(())
    }
}
