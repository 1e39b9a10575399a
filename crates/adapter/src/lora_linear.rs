//! `LoraLinear`: a frozen linear layer plus an optional low-rank update,
//! `y = x·Wᵀ + b + scaling · dropout(x)·Aᵀ·Bᵀ` with `A: [r, in]`, `B: [out, r]`.
use crate::dropout::Dropout;
use crate::frozen::{frozen_add, frozen_matmul};
use crate::lora_matmul::{self, lora_matmul};
use crate::lora_op::lora_op;
use candle_core::{Module, Result, Tensor};

/// The trainable (or loaded) low-rank pair of one module.
#[derive(Clone, Debug)]
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    /// Applied to the input in training mode only.
    pub dropout: Option<Dropout>,
}

impl LowRank {
    /// `scaling · dropout(x)·Aᵀ` as `[rows, r]` (leading dims of x folded into rows), in the
    /// adapter's dtype. The scaling goes on the rank-r side: a pass over `rows × r` values
    /// instead of `rows × out`, in the forward and the backward pass.
    pub fn down(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (r, inner) = self.a.dims2()?;
        let (_, r2) = self.b.dims2()?;
        if r != r2 {
            candle_core::bail!("LoRA A has rank {r} but B has rank {r2}");
        }
        let x = match (&self.dropout, train) {
            (Some(d), true) => d.apply(x)?,
            _ => x.clone(),
        };
        let rows = x.elem_count() / inner.max(1);
        // Folding leading dims into rows keeps the left operand 2-D and contiguous (DESIGN §3.6).
        let x2 = x.to_dtype(self.a.dtype())?.reshape((rows, inner))?;
        x2.matmul(&self.a.t()?)? * self.scaling
    }

    /// `scaling · B·A`, the dense `[out, in]` update, in f32.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let a = self.a.to_dtype(candle_core::DType::F32)?;
        let b = self.b.to_dtype(candle_core::DType::F32)?;
        b.matmul(&a)? * self.scaling
    }
}

/// A linear layer whose base weight and bias are frozen, with an optional LoRA update.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LowRank>,
    /// Weight and bias receive gradients (a module trained whole); otherwise they are frozen.
    trainable: bool,
}

impl LoraLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>, lora: Option<LowRank>) -> Self {
        LoraLinear {
            weight,
            bias,
            lora,
            trainable: false,
        }
    }

    /// A plain linear layer whose weight and bias are trained (PEFT `modules_to_save`).
    pub fn trainable(weight: Tensor, bias: Option<Tensor>) -> Self {
        LoraLinear {
            weight,
            bias,
            lora: None,
            trainable: true,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Whether weight and bias are trained (a `modules_to_save` module).
    pub fn is_trainable(&self) -> bool {
        self.trainable
    }

    pub fn lora(&self) -> Option<&LowRank> {
        self.lora.as_ref()
    }

    /// Forward pass; `train` switches LoRA dropout on.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.trainable {
            let y = x.contiguous()?.broadcast_matmul(&self.weight.t()?)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        let add_bias = |y: Tensor| match &self.bias {
            Some(b) => frozen_add(&y, b),
            None => Ok(y),
        };
        let Some(l) = &self.lora else {
            return add_bias(frozen_matmul(x, &self.weight)?);
        };
        let x = x.contiguous()?;
        if lora_matmul::fits(&[&x, &self.weight, &l.a, &l.b]) {
            let u = l.down(&x, train)?;
            if let Some(y) = lora_matmul(&x, &self.weight, &u, &l.b) {
                return add_bias(y?);
            }
        }
        // the GPU path, and other dtypes: keeps x and the rank-r u for the backward pass
        let mask = if train {
            l.dropout.as_ref().and_then(|d| d.draw())
        } else {
            None
        };
        add_bias(lora_op(&x, &self.weight, &l.a, &l.b, l.scaling, mask)?)
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Central finite differences of a scalar loss against the backprop gradients of A and B.
    #[test]
    fn lora_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (inp, out, r, n) = (6, 5, 3, 4);
        let w = Tensor::randn(0f64, 1., (out, inp), &dev)?;
        let bias = Tensor::randn(0f64, 1., out, &dev)?;
        let x = Tensor::randn(0f64, 1., (2, n, inp), &dev)?;
        let target = Tensor::randn(0f64, 1., (2, n, out), &dev)?;
        let a = Var::randn(0f64, 0.5, (r, inp), &dev)?;
        let b = Var::randn(0f64, 0.5, (out, r), &dev)?;
        let loss_of = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
            let layer = LoraLinear::new(
                w.clone(),
                Some(bias.clone()),
                Some(LowRank {
                    a: a.clone(),
                    b: b.clone(),
                    scaling: 1.7,
                    dropout: None,
                }),
            );
            // a non-quadratic loss so second-order terms show up if the gradient is wrong
            (layer.forward(&x)? - &target)?.tanh()?.sqr()?.sum_all()
        };
        let grads = loss_of(a.as_tensor(), b.as_tensor())?.backward()?;
        let eps = 1e-6;
        for (var, other, is_a) in [(&a, &b, true), (&b, &a, false)] {
            let analytic = grads
                .get(var)
                .expect("gradient for LoRA tensor")
                .flatten_all()?;
            let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            for i in 0..base.len() {
                let bump = |d: f64| -> Result<f64> {
                    let mut v = base.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, var.shape(), &dev)?;
                    let l = if is_a {
                        loss_of(&t, other.as_tensor())?
                    } else {
                        loss_of(other.as_tensor(), &t)?
                    };
                    l.to_scalar::<f64>()
                };
                let numeric = (bump(eps)? - bump(-eps)?) / (2.0 * eps);
                let got = analytic.get(i)?.to_scalar::<f64>()?;
                assert!(
                    (numeric - got).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "d/d{}[{i}]: numeric {numeric}, backprop {got}",
                    if is_a { "A" } else { "B" }
                );
            }
        }
        assert!(grads.get(&w).is_none() && grads.get(&bias).is_none());
        Ok(())
    }

    #[test]
    fn zero_b_leaves_the_base_output_unchanged() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (4, 3), &dev)?;
        let x = Tensor::randn(0f32, 1., (2, 3), &dev)?;
        let plain = LoraLinear::new(w.clone(), None, None).forward(&x)?;
        let lora = LoraLinear::new(
            w,
            None,
            Some(LowRank {
                a: Tensor::randn(0f32, 1., (2, 3), &dev)?,
                b: Tensor::zeros((4, 2), DType::F32, &dev)?,
                scaling: 2.0,
                dropout: None,
            }),
        )
        .forward(&x)?;
        assert_eq!(plain.to_vec2::<f32>()?, lora.to_vec2::<f32>()?);
        Ok(())
    }
}
