//! Several LoRA adapters of one base model as one, with the semantics of PEFT's
//! `add_weighted_adapter` (`peft/tuners/lora/model.py`) for its three exact-or-documented
//! methods. Each input `i` has a weight `wᵢ` and its own per-module scale `sᵢ` (`alpha/r`, rsLoRA
//! and patterns included); the result has `r = lora_alpha = R` (scale 1) with `R`:
//!
//! - **cat** (exact): `R = Σ rᵢ`; `A' = cat(wᵢ·sᵢ·Aᵢ)` (rows), `B' = cat(Bᵢ)` (columns), so
//!   `B'·A' = Σ wᵢ·sᵢ·Bᵢ·Aᵢ`, the weighted sum of the updates.
//! - **linear** (PEFT's approximation): all ranks equal, `R = r`;
//!   `A' = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ`, `B' = Σ √|wᵢsᵢ|·Bᵢ`. `B'·A'` carries the cross terms
//!   `Bᵢ·Aⱼ`, so it is *not* the weighted sum unless one adapter is given; kept because PEFT users
//!   ask for it by name.
//! - **svd**: `R` = `rank` or the largest input rank; the best rank-`R` approximation of
//!   `Σ wᵢ·sᵢ·Bᵢ·Aᵢ`: `B' = U·Σ`, `A' = Vᵀ` (exact when `R ≥ Σ rᵢ`). PEFT takes a full SVD of
//!   the dense `out × in` update; here the update is factored first (`B_cat = Q_b·R_b`,
//!   `A_catᵀ = Q_a·R_a`, SVD of the small `R_b·R_aᵀ`), the same factors in `O((out + in)·Σrᵢ²)`.
//!
//! Where lorakit differs from PEFT, on purpose: PEFT copies the first adapter's `use_rslora`
//! into the result, so a combination of rsLoRA adapters comes out scaled by `√R` rather than 1;
//! lorakit writes `use_rslora: false`, so the result is what the method promises. Modules only
//! some inputs adapt take the others as absent (as PEFT); ranks below `R` are zero-padded (as
//! PEFT, whose result has one rank for every module).
use crate::config::{LoraConfig, ModuleSpec};
use crate::error::{AdapterError, Result};
use crate::peft_format::{PeftAdapter, CONFIG_FILE};
use candle_core::{DType, Device, Tensor};
use lorakit_ops::linalg::{self, Mat};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Cat,
    Linear,
    Svd,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Cat => "cat",
            Method::Linear => "linear",
            Method::Svd => "svd",
        }
    }
}

/// The rank PEFT allots an input: its `r`, or the largest of `r` and its `rank_pattern`.
fn allotted_rank(c: &LoraConfig) -> usize {
    c.rank_pattern
        .values()
        .filter_map(|v| v.as_u64())
        .map(|v| v as usize)
        .fold(c.r, usize::max)
}

/// One adapter from `inputs` (adapter, weight) by `method`; `svd_rank` sets `R` for `svd`. `dir`
/// names the result in messages. Inputs must be plain LoRA pairs of the same base layout
/// (`fan_in_fan_out`), with no whole-trained modules.
pub fn combine(
    inputs: &[(&PeftAdapter, f64)],
    method: Method,
    svd_rank: Option<usize>,
    dir: &Path,
) -> Result<PeftAdapter> {
    let invalid = |a: &PeftAdapter, key: &str, message: String| AdapterError::InvalidConfig {
        file: a.dir.join(CONFIG_FILE).display().to_string(),
        key: key.into(),
        message,
    };
    let Some((first, _)) = inputs.first() else {
        return Err(AdapterError::RefusedOutput(
            "combining needs at least one adapter".into(),
        ));
    };
    for (a, w) in inputs {
        a.check_pairs_only(&format!("combining adapters ({})", method.name()))?;
        if !w.is_finite() {
            return Err(invalid(a, "weight", format!("{w} is not a finite number")));
        }
        if a.config.fan_in_fan_out != first.config.fan_in_fan_out {
            return Err(invalid(
                a,
                "fan_in_fan_out",
                format!(
                    "{} here, {} in {}: the adapters are for different base layouts",
                    a.config.fan_in_fan_out,
                    first.config.fan_in_fan_out,
                    first.dir.display()
                ),
            ));
        }
    }
    // PEFT: one adapter alone is always combined linearly (exact for a single input)
    let method = if inputs.len() == 1 {
        Method::Linear
    } else {
        method
    };
    let ranks: Vec<usize> = inputs
        .iter()
        .map(|(a, _)| allotted_rank(&a.config))
        .collect();
    let rank = match method {
        Method::Cat => ranks.iter().sum(),
        Method::Svd => svd_rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1)),
        Method::Linear => {
            if let Some((i, _)) = ranks.iter().enumerate().find(|(_, r)| **r != ranks[0]) {
                return Err(invalid(
                    inputs[i].0,
                    "r",
                    format!(
                        "{} here, {} in {}: `linear` needs every adapter at the same rank (use `cat`, exact, or `svd`)",
                        ranks[i],
                        ranks[0],
                        first.dir.display()
                    ),
                ));
            }
            ranks[0]
        }
    };
    if rank == 0 {
        return Err(AdapterError::RefusedOutput(
            "the combined rank must be at least 1".into(),
        ));
    }
    let modules: BTreeSet<&str> = inputs.iter().flat_map(|(a, _)| a.modules()).collect();
    let mut pairs = BTreeMap::new();
    for module in modules {
        // (wᵢ·sᵢ, Aᵢ, Bᵢ) of the inputs that adapt this module
        let mut parts = Vec::new();
        for (a, w) in inputs {
            if let Some((la, lb)) = a.pairs().get(module) {
                parts.push((w * a.config.for_module(module).scaling, la, lb));
            }
        }
        let (in_dim, out_dim) = (parts[0].1.dim(1)?, parts[0].2.dim(0)?);
        for (_, la, lb) in &parts {
            if la.dim(1)? != in_dim || lb.dim(0)? != out_dim {
                return Err(AdapterError::RefusedOutput(format!(
                    "module `{module}` is [{out_dim}, {in_dim}] in one adapter and [{}, {}] in another: they are for different base models",
                    lb.dim(0)?, la.dim(1)?
                )));
            }
        }
        let (a, b) = match method {
            Method::Cat => {
                let a_parts: Vec<Tensor> = parts
                    .iter()
                    .map(|(ws, la, _)| la.affine(*ws, 0.0))
                    .collect::<candle_core::Result<_>>()?;
                let b_parts: Vec<Tensor> = parts.iter().map(|(_, _, lb)| (*lb).clone()).collect();
                (Tensor::cat(&a_parts, 0)?, Tensor::cat(&b_parts, 1)?)
            }
            Method::Linear => {
                let mut a = parts[0].1.zeros_like()?;
                let mut b = parts[0].2.zeros_like()?;
                for (ws, la, lb) in &parts {
                    let root = ws.abs().sqrt();
                    a = (a + la.affine(root * ws.signum(), 0.0)?)?;
                    b = (b + lb.affine(root, 0.0)?)?;
                }
                (a, b)
            }
            Method::Svd => low_rank_of_sum(&parts, rank)?,
        };
        pairs.insert(module.to_string(), (pad(&a, 0, rank)?, pad(&b, 1, rank)?));
    }
    let mut config = first.config.clone();
    config.r = rank;
    config.lora_alpha = rank as f64;
    config.use_rslora = false;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    config.lora_dropout = 0.0;
    let same = |f: &dyn Fn(&LoraConfig) -> String| {
        inputs.iter().all(|(a, _)| f(&a.config) == f(&first.config))
    };
    let lists: Option<BTreeSet<String>> = inputs
        .iter()
        .map(|(a, _)| match &a.config.target_modules {
            Some(ModuleSpec::List(v)) => Some(v.to_vec()),
            _ => None,
        })
        .try_fold(BTreeSet::new(), |mut acc, v| {
            acc.extend(v?);
            Some(acc)
        });
    let same_scope = same(&|c| format!("{:?}", c.layers_to_transform))
        && same(&|c| format!("{:?}", c.layers_pattern))
        && same(&|c| format!("{:?}", c.exclude_modules));
    config.target_modules = Some(match lists {
        // PEFT's union of target sets, when the inputs agree on everything else that scopes them
        Some(names) if same_scope => ModuleSpec::List(names.into_iter().collect()),
        // else exactly the modules that carry tensors
        _ => {
            config.layers_to_transform = None;
            config.layers_pattern = None;
            config.exclude_modules = None;
            crate::target::exact_regex(pairs.keys().map(String::as_str))
        }
    });
    PeftAdapter::from_pairs(dir, config, pairs)
}

/// Zero columns (`dim` 1) or rows (`dim` 0) appended up to `rank`.
fn pad(t: &Tensor, dim: usize, rank: usize) -> Result<Tensor> {
    let have = t.dim(dim)?;
    if have >= rank {
        return Ok(t.narrow(dim, 0, rank)?.contiguous()?);
    }
    let mut shape = t.dims().to_vec();
    shape[dim] = rank - have;
    let zeros = Tensor::zeros(shape, t.dtype(), t.device())?;
    Ok(Tensor::cat(&[t, &zeros], dim)?)
}

/// The best rank-`rank` factors `(A [k, in], B [out, k])` of `Σ sᵢ·Bᵢ·Aᵢ`, `k ≤ rank`, largest
/// singular values first, with the sign of each triplet fixed (largest entry of each column of
/// `U` positive) so the factors do not depend on the algorithm's arbitrary signs.
fn low_rank_of_sum(parts: &[(f64, &Tensor, &Tensor)], rank: usize) -> Result<(Tensor, Tensor)> {
    let a_parts: Vec<Tensor> = parts
        .iter()
        .map(|(ws, la, _)| la.affine(*ws, 0.0))
        .collect::<candle_core::Result<_>>()?;
    let b_parts: Vec<Tensor> = parts.iter().map(|(_, _, lb)| (*lb).clone()).collect();
    let a_cat = Mat::from_tensor(&Tensor::cat(&a_parts, 0)?.to_dtype(DType::F64)?)?; // R × in
    let b_cat = Mat::from_tensor(&Tensor::cat(&b_parts, 1)?.to_dtype(DType::F64)?)?; // out × R
    let total = a_cat.rows;
    let (u, sigma, mut vt) = if total <= a_cat.cols && total <= b_cat.rows {
        let (qb, rb) = linalg::qr(&b_cat); // out × R, R × R
        let (qa, ra) = linalg::qr(&a_cat.transpose()); // in × R, R × R
        let small = rb.matmul(&ra.transpose())?;
        let (us, sigma, vts) = linalg::top_singular(&small, rank)?;
        (qb.matmul(&us)?, sigma, vts.matmul(&qa.transpose())?)
    } else {
        linalg::top_singular(&b_cat.matmul(&a_cat)?, rank)?
    };
    let mut u = u;
    linalg::canonical_signs(&mut u, &mut vt);
    let k = sigma.len();
    for i in 0..u.rows {
        for (j, s) in sigma.iter().enumerate() {
            u.data[i * k + j] *= s;
        }
    }
    let a = vt.to_tensor(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = u.to_tensor(&Device::Cpu)?.to_dtype(DType::F32)?;
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora_linear::LowRank;

    /// A plain adapter with modules `m0` (`[6, 5]`) and, if `both`, `m1`.
    fn adapter(
        dir: &Path,
        r: usize,
        alpha: f64,
        rslora: bool,
        seed: u64,
        both: bool,
    ) -> PeftAdapter {
        let json = serde_json::json!({
            "r": r, "lora_alpha": alpha, "use_rslora": rslora,
            "target_modules": ["m0", "m1"],
        });
        let config = LoraConfig::from_peft_json(json, "test").unwrap().0;
        let dev = Device::Cpu;
        let mut modules = Vec::new();
        for (i, m) in ["m0", "m1"]
            .iter()
            .enumerate()
            .take(if both { 2 } else { 1 })
        {
            let s = seed + i as u64 * 100;
            let a = Tensor::rand(-1f32, 1., (r, 5), &dev).unwrap();
            let b = Tensor::rand(-1f32, 1., (6, r), &dev).unwrap();
            // distinct inputs per seed
            let a = (a + s as f64 * 0.01).unwrap();
            modules.push((m.to_string(), LowRank::new(a, b, 1.0)));
        }
        crate::save_adapter(dir, &config, &modules, &Default::default()).unwrap();
        PeftAdapter::load(dir).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        lorakit_ops::compare::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn cat_is_the_weighted_sum_of_updates_and_svd_reproduces_it_at_full_rank() {
        let t = tempfile::tempdir().unwrap();
        let x = adapter(&t.path().join("x"), 2, 4.0, false, 1, true);
        let y = adapter(&t.path().join("y"), 3, 3.0, true, 2, false); // rsLoRA, m0 only
        let inputs = [(&x, 0.7), (&y, -0.4)];
        let cat = combine(&inputs, Method::Cat, None, t.path()).unwrap();
        assert_eq!(cat.config.r, 5);
        assert!(!cat.config.use_rslora);
        for m in ["m0", "m1"] {
            let mut want = (x.delta(m).unwrap().unwrap() * 0.7).unwrap();
            if let Some(d) = y.delta(m).unwrap() {
                want = (want + (d * -0.4).unwrap()).unwrap();
            }
            let got = cat.delta(m).unwrap().unwrap();
            assert!(max_diff(&got, &want) < 1e-6, "{m}");
            // rank 5 ≥ 2 + 3: svd is exact too
            let svd = combine(&inputs, Method::Svd, Some(5), t.path()).unwrap();
            assert!(
                max_diff(&svd.delta(m).unwrap().unwrap(), &want) < 1e-5,
                "{m}"
            );
        }
        // m1 exists in x only: padded to rank 5 with zeros
        let (a, b) = &cat.pairs()["m1"];
        assert_eq!((a.dims(), b.dims()), (&[5, 5][..], &[6, 5][..]));
    }

    #[test]
    fn svd_keeps_the_leading_singular_triplets() {
        let t = tempfile::tempdir().unwrap();
        let x = adapter(&t.path().join("x"), 3, 3.0, false, 3, false);
        let y = adapter(&t.path().join("y"), 3, 3.0, false, 4, false);
        let inputs = [(&x, 1.0), (&y, 1.0)];
        let svd = combine(&inputs, Method::Svd, Some(2), t.path()).unwrap();
        let want = (x.delta("m0").unwrap().unwrap() + y.delta("m0").unwrap().unwrap()).unwrap();
        let w = Mat::from_tensor(&want.to_dtype(DType::F64).unwrap()).unwrap();
        let (u, s, vt) = linalg::top_singular(&w, 2).unwrap();
        let mut us = u.clone();
        for row in us.data.chunks_mut(2) {
            for (x, sj) in row.iter_mut().zip(&s) {
                *x *= sj;
            }
        }
        let best = us.matmul(&vt).unwrap().to_tensor(&Device::Cpu).unwrap();
        let got = svd
            .delta("m0")
            .unwrap()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert!(
            max_diff(
                &got.to_dtype(DType::F32).unwrap(),
                &best.to_dtype(DType::F32).unwrap()
            ) < 1e-5
        );
    }

    #[test]
    fn linear_follows_peft_and_refuses_mixed_ranks() {
        let t = tempfile::tempdir().unwrap();
        let x = adapter(&t.path().join("x"), 2, 4.0, false, 5, false);
        let y = adapter(&t.path().join("y"), 2, 2.0, false, 6, false);
        let lin = combine(&[(&x, 0.5), (&y, -1.0)], Method::Linear, None, t.path()).unwrap();
        let (xa, xb) = &x.pairs()["m0"];
        let (ya, yb) = &y.pairs()["m0"];
        // weights·scales: 0.5·2 = 1, −1·1 = −1
        let a = (xa.clone() - ya.clone()).unwrap();
        let b = (xb.clone() + yb.clone()).unwrap();
        let (la, lb) = &lin.pairs()["m0"];
        assert!(max_diff(la, &a) < 1e-6 && max_diff(lb, &b) < 1e-6);
        let z = adapter(&t.path().join("z"), 3, 2.0, false, 7, false);
        let err = combine(&[(&x, 1.0), (&z, 1.0)], Method::Linear, None, t.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("same rank") && err.contains("`r`"), "{err}");
    }
}
