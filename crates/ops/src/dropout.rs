//! Seeded LoRA dropout. candle's dropout draws from an unseedable device RNG, which would make a
//! resumed run differ from an uninterrupted one; here the mask is a pure function of the step
//! seed (set by the trainer before each forward pass), the module's path and the element's
//! index — a counter-based draw (`csrc/row_math.h`), so the CPU and the CUDA kernel
//! draw the same mask, every element on its own, and the mask is never stored: the backward
//! pass draws it again.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The seed of the current forward pass, shared by every dropout layer of a model.
#[derive(Clone, Debug, Default)]
pub struct StepSeed(Arc<AtomicU64>);

impl StepSeed {
    /// Sets the seed for the next forward pass from the run seed, step and micro-batch.
    pub fn set(&self, run_seed: u64, step: u64, micro_batch: u64) {
        let s =
            splitmix(splitmix(run_seed ^ 0x5eed) ^ splitmix(step) ^ micro_batch.rotate_left(32));
        self.0.store(s, Ordering::SeqCst);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Inverted dropout with probability `p` for one module.
#[derive(Clone, Debug)]
pub struct Dropout {
    p: f32,
    module: u64,
    seed: StepSeed,
}

impl Dropout {
    pub fn new(p: f32, module_path: &str, seed: StepSeed) -> Self {
        Dropout {
            p,
            module: fnv1a(module_path),
            seed,
        }
    }

    /// `x * mask / (1 - p)` with a mask drawn from (step seed, module), differentiable.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self.draw() {
            Some(mask) => mask.apply(x, true),
            None => Ok(x.clone()),
        }
    }

    /// The mask of the current step, fixed: [`DropoutMask::apply`] gives the same mask however
    /// often it is called (a backward pass draws it again). `None` when nothing is dropped.
    pub fn draw(&self) -> Option<DropoutMask> {
        let keep = 1.0 - self.p;
        (self.p > 0.0).then(|| DropoutMask {
            seed: self.seed.get() ^ self.module,
            keep,
            scale: 1.0 / keep,
        })
    }
}

/// One drawn dropout mask: element `i` of a contiguous tensor is kept (and scaled by `scale`)
/// when [`keeps`] says so.
#[derive(Clone, Copy, Debug)]
pub struct DropoutMask {
    seed: u64,
    keep: f32,
    scale: f32,
}

/// Whether element `i` of the mask drawn from `seed` keeps its value; `row_math.h`'s
/// `lk_dropout_keeps` bit for bit.
fn keeps(seed: u64, i: u64, keep: f32) -> bool {
    let state = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN));
    ((splitmix(state) >> 40) as f32 / (1u64 << 24) as f32) < keep
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

impl DropoutMask {
    /// `x ∘ mask · scale`; with `differentiable` its gradient is the same mask on the gradient.
    /// CUDA runs f32 and bf16 in the kernel (other dtypes through f32).
    pub fn apply(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let x = x.contiguous()?;
        let cuda_other = x.device().is_cuda() && !matches!(x.dtype(), DType::F32 | DType::BF16);
        if cuda_other {
            return self
                .apply(&x.to_dtype(DType::F32)?, differentiable)?
                .to_dtype(x.dtype());
        }
        if differentiable {
            x.apply_op1(*self)
        } else {
            x.apply_op1_no_bwd(self)
        }
    }

    fn run<T: Copy + Send + Sync>(&self, x: &[T], f: impl Fn(T, bool) -> T + Sync) -> Vec<T> {
        x.par_iter()
            .enumerate()
            .map(|(i, v)| f(*v, keeps(self.seed, i as u64, self.keep)))
            .collect()
    }
}

impl CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "lora-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dropout: input not contiguous".into()))?;
        let sc = self.scale;
        let out = match s {
            CpuStorage::F32(v) => {
                CpuStorage::F32(self.run(&v[a..b], |x, k| if k { x * sc } else { 0.0 }))
            }
            CpuStorage::F64(v) => {
                CpuStorage::F64(self.run(&v[a..b], |x, k| if k { x * sc as f64 } else { 0.0 }))
            }
            CpuStorage::BF16(v) => CpuStorage::BF16(self.run(&v[a..b], |x, k| {
                half::bf16::from_f32(if k { x.to_f32() * sc } else { 0.0 })
            })),
            CpuStorage::F16(v) => CpuStorage::F16(self.run(&v[a..b], |x, k| {
                half::f16::from_f32(if k { x.to_f32() * sc } else { 0.0 })
            })),
            other => candle_core::bail!("dropout: no {:?} kernel", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            let out = crate::cuda::dropout(s, l, self.seed, self.keep, self.scale)?;
            Ok((out, l.shape().clone()))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s, l);
            candle_core::bail!("dropout: built without CUDA")
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.apply(grad, false)?))
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(crate) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn masks_repeat_for_the_same_step_and_differ_across_steps() -> Result<()> {
        let seed = StepSeed::default();
        let d = Dropout::new(0.25, "model.layers.0.self_attn.q_proj", seed.clone());
        let x = Tensor::ones((64, 64), DType::F32, &Device::Cpu)?;
        seed.set(1, 5, 0);
        let a = d.apply(&x)?.flatten_all()?.to_vec1::<f32>()?;
        seed.set(1, 5, 0);
        let b = d.apply(&x)?.flatten_all()?.to_vec1::<f32>()?;
        seed.set(1, 6, 0);
        let c = d.apply(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        let dropped = a.iter().filter(|v| **v == 0.0).count() as f32 / a.len() as f32;
        assert!((dropped - 0.25).abs() < 0.03, "{dropped}");
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
        Ok(())
    }

    #[test]
    fn the_mask_is_the_cuda_kernels_mask_and_its_own_gradient() -> Result<()> {
        // the C build of the kernels' element math draws the same mask, element by element
        let (seed, keep) = (0x1234_5678_9abc_def0u64, 0.9f32);
        for i in (0..100_000u64).chain([u32::MAX as u64, u64::MAX - 1]) {
            let c = unsafe { crate::row_math::lk_c_dropout_keeps(seed, i, keep) };
            assert_eq!(keeps(seed, i, keep), c != 0, "element {i}");
        }
        // backward: the same mask on the gradient, drawn again (nothing stored)
        let step = StepSeed::default();
        step.set(3, 7, 1);
        let d = Dropout::new(0.3, "m", step);
        let x = crate::seeded::var_randn(0f32, 1., (17, 33), &Device::Cpu)?;
        let up = crate::seeded::randn(0f32, 1., (17, 33), &Device::Cpu)?;
        let grads = (d.apply(x.as_tensor())? * &up)?.sum_all()?.backward()?;
        let want = d
            .draw()
            .unwrap()
            .apply(&up, false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let got = grads.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got, want);
        // bf16: the kept values are x·scale rounded once
        let xb = Tensor::ones(64, DType::BF16, &Device::Cpu)?;
        let yb = d
            .draw()
            .unwrap()
            .apply(&xb, false)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let kept = half::bf16::from_f32(1.0 / 0.7).to_f32();
        assert!(yb.iter().all(|v| *v == 0.0 || *v == kept));
        Ok(())
    }
}
