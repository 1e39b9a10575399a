//! `LoraLinear`: a frozen linear layer plus an optional low-rank update, for plain LoRA
//! `y = x·Wᵀ + b + scaling · dropout(x)·Aᵀ·Bᵀ` with `A: [r, in]`, `B: [out, r]`; what the update
//! is exactly is the module's [`LoraVariant`]'s business.
use crate::variant::LoraVariant;
use candle_core::{Module, Result, Tensor};
use lorakit_ops::dropout::Dropout;
use lorakit_ops::frozen::frozen_add;
use lorakit_ops::lora_cpu;
use lorakit_ops::quantized::Frozen;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The trainable (or loaded) adapter tensors of one module: the low-rank pair, and whatever the
/// variant adds.
#[derive(Clone, Debug)]
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    /// Applied to the input in training mode only.
    pub dropout: Option<Dropout>,
    pub variant: Arc<dyn LoraVariant>,
    /// The variant's own tensors, by [`LoraVariant::extra_tensors`] name.
    pub extra: BTreeMap<&'static str, Tensor>,
    /// A₀ and B₀ of an initialisation that rewrote the base to `W − s·B₀·A₀`
    /// ([`LoraVariant::rewrites_base`]); saving turns the adapter into one for the original base.
    pub initial: Option<(Tensor, Tensor)>,
    /// Values the variant derives and keeps between passes ([`LowRank::remembered`]); shared
    /// by clones.
    memo: Arc<Mutex<BTreeMap<&'static str, Tensor>>>,
}

impl LowRank {
    /// A plain-LoRA pair without dropout.
    pub fn new(a: Tensor, b: Tensor, scaling: f64) -> Self {
        LowRank {
            a,
            b,
            scaling,
            dropout: None,
            variant: crate::variant::lora(),
            extra: BTreeMap::new(),
            initial: None,
            memo: Default::default(),
        }
    }

    pub fn with_initial(mut self, initial: Option<(Tensor, Tensor)>) -> Self {
        self.initial = initial;
        self
    }

    /// The value `make` computes, kept under `key` while `keep` holds: a variant keeps what it
    /// derives from frozen tensors always, and what it derives from the adapter's own tensors
    /// only across inference passes (`keep = !train`). Sound because the adapter's tensors change
    /// only in an optimizer step, which follows a training pass, which drops the value.
    pub fn remembered(
        &self,
        key: &'static str,
        keep: bool,
        make: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        // the lock is not held while `make` runs (it may remember values of its own)
        let memo = || self.memo.lock().unwrap_or_else(|p| p.into_inner());
        if !keep {
            memo().remove(key);
            return make();
        }
        if let Some(t) = memo().get(key) {
            return Ok(t.clone());
        }
        let t = make()?;
        memo().insert(key, t.clone());
        Ok(t)
    }

    pub fn with_dropout(mut self, dropout: Option<Dropout>) -> Self {
        self.dropout = dropout;
        self
    }

    pub fn with_variant(
        mut self,
        variant: Arc<dyn LoraVariant>,
        extra: BTreeMap<&'static str, Tensor>,
    ) -> Self {
        self.variant = variant;
        self.extra = extra;
        self
    }

    /// `scaling · B·A`, the dense `[out, in]` low-rank product, in f32.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let a = self.a.to_dtype(candle_core::DType::F32)?;
        let b = self.b.to_dtype(candle_core::DType::F32)?;
        b.matmul(&a)? * self.scaling
    }

    /// The base weight with this module's update folded in, in f32, as the variant defines it.
    pub fn merged_weight(&self, weight: &Tensor) -> Result<Tensor> {
        self.variant.merged_weight(weight, self)
    }
}

thread_local! {
    /// Set while [`without_adapters`] runs on this thread.
    static ADAPTERS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the LoRA updates of every model on this thread switched off: each adapted
/// layer computes what it computed before training — the frozen weight, or, where an
/// initialisation rewrote the weight to `W − s·B₀·A₀` (PiSSA, OLoRA), that plus `s·B₀·A₀`, so the
/// original `W` — and no gradient reaches an adapter. The reference model of preference tuning,
/// with no second copy of the weights (PEFT's `disable_adapter()`). Modules trained whole
/// (`modules_to_save`) keep their trained weights; callers that need the base refuse them.
pub fn without_adapters<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ADAPTERS_OFF.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(ADAPTERS_OFF.with(|c| c.replace(true)));
    f()
}

fn adapters_off() -> bool {
    ADAPTERS_OFF.with(|c| c.get())
}

/// A linear layer whose base weight and bias are frozen, with an optional LoRA update. The
/// weight is dense or kept in GGML blocks ([`Frozen`]).
#[derive(Clone, Debug)]
pub struct LoraLinear {
    weight: Frozen,
    bias: Option<Tensor>,
    lora: Option<LowRank>,
    /// Weight and bias receive gradients (a module trained whole); otherwise they are frozen.
    trainable: bool,
    /// The frozen weight stored transposed (CPU f32), made by the first training forward pass:
    /// the CPU matmul kernel repacks a transposed operand on every call, so forward products
    /// read this copy and backward products read `weight`. Costs the weight's size again, so
    /// inference alone does not make it.
    weight_t: std::sync::Arc<std::sync::OnceLock<Tensor>>,
}

impl LoraLinear {
    pub fn new(weight: impl Into<Frozen>, bias: Option<Tensor>, lora: Option<LowRank>) -> Self {
        LoraLinear {
            weight: weight.into(),
            bias,
            lora,
            trainable: false,
            weight_t: Default::default(),
        }
    }

    /// A plain linear layer whose weight and bias are trained (PEFT `modules_to_save`).
    pub fn trainable(weight: Tensor, bias: Option<Tensor>) -> Self {
        LoraLinear {
            weight: Frozen::Dense(weight),
            bias,
            lora: None,
            trainable: true,
            weight_t: Default::default(),
        }
    }

    pub fn weight(&self) -> &Frozen {
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

    /// `weightᵀ` as a contiguous `[in, out]` copy, for a CPU f32 weight (`None` elsewhere: the
    /// GPU matmul reads a transposed operand at full speed). Made once, when `make` (training);
    /// otherwise the copy only if one was made.
    pub fn weight_t(&self, make: bool) -> Result<Option<&Tensor>> {
        if let Some(wt) = self.weight_t.get() {
            return Ok(Some(wt));
        }
        let Frozen::Dense(weight) = &self.weight else {
            return Ok(None);
        };
        if !make || !lora_cpu::fits(&[weight]) {
            return Ok(None);
        }
        let wt = transposed_copy(weight)?;
        Ok(Some(self.weight_t.get_or_init(|| wt)))
    }

    /// Forward pass; `train` switches LoRA dropout on.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.trainable {
            let Frozen::Dense(weight) = &self.weight else {
                candle_core::bail!("a module trained whole has a dense weight");
            };
            let y = x.contiguous()?.broadcast_matmul(&weight.t()?)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        let add_bias = |y: Tensor| match &self.bias {
            Some(b) => frozen_add(&y, b),
            None => Ok(y),
        };
        let l = match &self.lora {
            Some(l) if adapters_off() => match &l.initial {
                // the initial update the rewritten base lacks, as constants
                Some((a0, b0)) => {
                    let init = LowRank::new(a0.detach(), b0.detach(), l.scaling);
                    let x = x.contiguous()?;
                    let wt = self.weight_t(train)?;
                    return add_bias(crate::variant::lora().forward(
                        &x,
                        &self.weight,
                        wt,
                        &init,
                        None,
                        false,
                    )?);
                }
                None => return add_bias(self.weight.matmul_t(x, self.weight_t(train)?)?),
            },
            Some(l) => l,
            None => return add_bias(self.weight.matmul_t(x, self.weight_t(train)?)?),
        };
        let x = x.contiguous()?;
        let mask = if train {
            l.dropout.as_ref().and_then(|d| d.draw())
        } else {
            None
        };
        let wt = if lora_cpu::fits(&[&x]) {
            self.weight_t(train)?
        } else {
            None
        };
        add_bias(l.variant.forward(&x, &self.weight, wt, l, mask, train)?)
    }
}

/// `wᵀ` of an f32 CPU matrix as a new contiguous tensor, copied in square tiles on all cores
/// (candle's strided copy walks the source column by column, several times slower for an
/// output head: `benches/README.md`).
fn transposed_copy(w: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    const TILE: usize = 64;
    let (rows, cols) = w.dims2()?;
    let w = w.contiguous()?;
    let (s, l) = w.storage_and_layout();
    let src = match (&*s, l.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => return w.t()?.contiguous(),
    };
    let mut dst = vec![0f32; rows * cols];
    // each task fills TILE rows of the output (TILE columns of w)
    dst.par_chunks_mut(TILE * rows.max(1))
        .enumerate()
        .for_each(|(t, out)| {
            let c0 = t * TILE;
            let tile_cols = out.len() / rows.max(1);
            for r0 in (0..rows).step_by(TILE) {
                for c in 0..tile_cols {
                    for r in r0..(r0 + TILE).min(rows) {
                        out[c * rows + r] = src[r * cols + c0 + c];
                    }
                }
            }
        });
    Tensor::from_vec(dst, (cols, rows), w.device())
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Central finite differences of a scalar loss against the backprop gradients of A and B.
    #[test]
    fn lora_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (inp, out, r, n) = (6, 5, 3, 4);
        let w = lorakit_ops::seeded::randn(0f64, 1., (out, inp), &dev)?;
        let bias = lorakit_ops::seeded::randn(0f64, 1., out, &dev)?;
        let x = lorakit_ops::seeded::randn(0f64, 1., (2, n, inp), &dev)?;
        let target = lorakit_ops::seeded::randn(0f64, 1., (2, n, out), &dev)?;
        let a = lorakit_ops::seeded::var_randn(0f64, 0.5, (r, inp), &dev)?;
        let b = lorakit_ops::seeded::var_randn(0f64, 0.5, (out, r), &dev)?;
        let loss_of = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
            let layer = LoraLinear::new(
                w.clone(),
                Some(bias.clone()),
                Some(LowRank::new(a.clone(), b.clone(), 1.7)),
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
        let w = lorakit_ops::seeded::randn(0f32, 1., (4, 3), &dev)?;
        let x = lorakit_ops::seeded::randn(0f32, 1., (2, 3), &dev)?;
        let plain = LoraLinear::new(w.clone(), None, None).forward(&x)?;
        let lora = LoraLinear::new(
            w,
            None,
            Some(LowRank::new(
                lorakit_ops::seeded::randn(0f32, 1., (2, 3), &dev)?,
                Tensor::zeros((4, 2), DType::F32, &dev)?,
                2.0,
            )),
        )
        .forward(&x)?;
        assert_eq!(plain.to_vec2::<f32>()?, lora.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn transposed_copy_equals_the_transposed_view() -> Result<()> {
        let dev = Device::Cpu;
        for (r, c) in [(3, 5), (130, 70), (64, 64), (1, 200), (0, 4)] {
            let w = lorakit_ops::seeded::randn(0f32, 1., (r, c), &dev)?;
            let got = transposed_copy(&w)?;
            assert_eq!(got.dims(), [c, r]);
            assert!(got.is_contiguous());
            assert_eq!(
                got.flatten_all()?.to_vec1::<f32>()?,
                w.t()?.flatten_all()?.to_vec1::<f32>()?
            );
        }
        // a strided (already transposed) view is copied by its values too
        let w = lorakit_ops::seeded::randn(0f32, 1., (70, 130), &dev)?.t()?;
        assert_eq!(
            transposed_copy(&w)?.flatten_all()?.to_vec1::<f32>()?,
            w.t()?.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    /// Training makes the CPU transposed weight copy once; inference alone does not, and the
    /// layer gives the same output either way.
    #[test]
    fn training_makes_the_transposed_weight_copy_and_outputs_agree() -> Result<()> {
        let dev = Device::Cpu;
        let w = lorakit_ops::seeded::randn(0f32, 1., (6, 5), &dev)?;
        let x = lorakit_ops::seeded::randn(0f32, 1., (3, 5), &dev)?;
        let low = LowRank::new(
            lorakit_ops::seeded::randn(0f32, 1., (2, 5), &dev)?,
            lorakit_ops::seeded::randn(0f32, 1., (6, 2), &dev)?,
            2.0,
        );
        for layer in [
            LoraLinear::new(w.clone(), None, Some(low)),
            LoraLinear::new(w.clone(), None, None),
        ] {
            let eval = layer.forward(&x)?;
            assert!(layer.weight_t(false)?.is_none());
            let train = layer.forward_t(&x, true)?;
            let wt = layer.weight_t(false)?.expect("made by the training pass");
            assert_eq!(wt.dims(), [5, 6]);
            assert!(lorakit_ops::compare::max_abs_diff(&eval, &train)? < 1e-5);
            // clones share the copy
            assert!(layer.clone().weight_t(false)?.is_some());
        }
        // other dtypes keep none
        let layer = LoraLinear::new(w.to_dtype(DType::F64)?, None, None);
        layer.forward_t(&x.to_dtype(DType::F64)?, true)?;
        assert!(layer.weight_t(true)?.is_none());
        Ok(())
    }

    /// Switched off, an adapted layer computes the frozen weight alone — or, after an
    /// initialisation that rewrote the weight, the weight as it was — with no gradient for the
    /// adapter; the switch is back on afterwards.
    #[test]
    fn without_adapters_gives_the_layer_before_training() -> Result<()> {
        let dev = Device::Cpu;
        let (inp, out, r) = (6, 5, 2);
        let w = lorakit_ops::seeded::randn(0f32, 1., (out, inp), &dev)?;
        let x = lorakit_ops::seeded::randn(0f32, 1., (3, inp), &dev)?;
        let a = lorakit_ops::seeded::var_randn(0f32, 0.5, (r, inp), &dev)?;
        let b = lorakit_ops::seeded::var_randn(0f32, 0.5, (out, r), &dev)?;
        let low = LowRank::new(a.as_tensor().clone(), b.as_tensor().clone(), 2.0);
        let plain = x.matmul(&w.t()?)?;
        let layer = LoraLinear::new(w.clone(), None, Some(low.clone()));
        let on = layer.forward_t(&x, true)?;
        let off = without_adapters(|| layer.forward_t(&x, true))?;
        assert!(lorakit_ops::compare::max_abs_diff(&on, &plain)? > 1e-3);
        assert!(lorakit_ops::compare::max_abs_diff(&off, &plain)? < 1e-6);
        let grads = off.sum_all()?.backward()?;
        assert!(grads.get(a.as_tensor()).is_none() && grads.get(b.as_tensor()).is_none());
        let again = layer.forward_t(&x, true)?;
        assert!(lorakit_ops::compare::max_abs_diff(&again, &on)? < 1e-6);

        // a rewritten base W − s·B₀·A₀: switched off, W again
        let (a0, b0) = (
            lorakit_ops::seeded::randn(0f32, 0.5, (r, inp), &dev)?,
            lorakit_ops::seeded::randn(0f32, 0.5, (out, r), &dev)?,
        );
        let residual = (&w - (b0.matmul(&a0)? * 2.0)?)?;
        let rewritten = LoraLinear::new(residual, None, Some(low.with_initial(Some((a0, b0)))));
        let off = without_adapters(|| rewritten.forward_t(&x, true))?;
        assert!(lorakit_ops::compare::max_abs_diff(&off, &plain)? < 1e-5);
        Ok(())
    }
}
