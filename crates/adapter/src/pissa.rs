//! PiSSA (Meng et al. 2024; `init_lora_weights: "pissa"` / `"pissa_niter_N"`): A and B start as
//! the principal singular components of W, `B₀ = U_r·√(Σ_r/s)`, `A₀ = √(Σ_r/s)·V_rᵀ`, so
//! `s·B₀·A₀` is W's best rank-r approximation, and training runs on the residual
//! ([`crate::residual`]). `pissa` takes the exact leading triplets; `pissa_niter_N` the
//! randomized SVD with N power iterations (`torch.svd_lowrank`'s method, seeded per module).
use crate::residual;
use crate::variant::{InitInput, Initial, LoraVariant};
use candle_core::Result;
use lorakit_ops::linalg::{randomized_svd, top_singular, Mat};

#[derive(Debug)]
pub struct Pissa {
    /// Power iterations of the randomized SVD; `None`: the exact SVD.
    pub niter: Option<usize>,
}

impl LoraVariant for Pissa {
    fn name(&self) -> &'static str {
        "pissa"
    }

    fn rewrites_base(&self) -> bool {
        true
    }

    fn init(&self, m: &InitInput) -> Result<Initial> {
        residual::check_rank(m.rank, m.weight, "PiSSA")?;
        let w = Mat::from_tensor(m.weight)?;
        let (mut u, sigma, mut vt) = match self.niter {
            None => top_singular(&w, m.rank)?,
            Some(n) => randomized_svd(&w, m.rank, n, m.seed)?,
        };
        let root: Vec<f64> = sigma.iter().map(|s| (s / m.scaling).sqrt()).collect();
        for i in 0..u.rows {
            for (j, r) in root.iter().enumerate() {
                u.data[i * u.cols + j] *= r;
            }
        }
        for (j, r) in root.iter().enumerate() {
            vt.data[j * vt.cols..(j + 1) * vt.cols]
                .iter_mut()
                .for_each(|x| *x *= r);
        }
        Ok(Initial {
            a: vt.to_tensor(m.device)?,
            b: u.to_tensor(m.device)?,
            extra: Vec::new(),
        })
    }
}
