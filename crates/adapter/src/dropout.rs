//! Seeded LoRA dropout. candle's dropout draws from an unseedable device RNG, which would make a
//! resumed run differ from an uninterrupted one; here the mask is a pure function of the step
//! seed (set by the trainer before each forward pass) and the module's path.
use candle_core::{DType, Result, Tensor};
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

    /// `x * mask / (1 - p)` with a mask drawn from (step seed, module).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let scale = 1.0 / keep;
        let mut state = self.seed.get() ^ self.module;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let u = (splitmix(state) >> 40) as f32 / (1u64 << 24) as f32;
                if u < keep {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), &candle_core::Device::Cpu)?
            .to_device(x.device())?
            .to_dtype(if x.dtype() == DType::F64 {
                DType::F64
            } else {
                x.dtype()
            })?;
        x * mask
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
}
