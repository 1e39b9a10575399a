//! What the initialisations that start from the base weight (PiSSA, OLoRA) share. They set
//! `A₀`, `B₀` from a decomposition of W and train on the residual `W_res = W − s·B₀·A₀`, so the
//! model starts exactly where the base is; the base files are never touched. A trained adapter
//! `(A, B)` then means `W_res + s·B·A = W + s·(B·A − B₀·A₀)`, which is plain LoRA on the
//! original base with rank 2r: `A' = [A; A₀]`, `B' = [B, −B₀]`, α doubled (×√2 with rsLoRA, so
//! the scale `s` is unchanged) — the conversion PEFT applies with
//! `path_initial_model_for_weight_conversion`. lorakit saves that form (checkpoints included:
//! their second half is `A₀`, `B₀`, which is how a resumed run gets them back exactly).
//!
//! An adapter saved in residual form (`init_lora_weights: "pissa"` / `"olora"`, rank r) is read
//! as PEFT reads it: the decomposition runs again on the base it is loaded onto.
use crate::config::{InitLoraWeights, LoraConfig};
use crate::lora_linear::LowRank;
use crate::variant::{InitInput, LoraVariant};
use candle_core::{DType, Result, Tensor};
use serde_json::{Map, Value};

/// `W − s·B₀·A₀` in W's dtype and on W's device.
pub fn residual_weight(weight: &Tensor, a0: &Tensor, b0: &Tensor, scaling: f64) -> Result<Tensor> {
    let start = (b0.matmul(a0)? * scaling)?.to_device(weight.device())?;
    (weight.to_dtype(DType::F32)? - start)?.to_dtype(weight.dtype())
}

/// `A₀`, `B₀` of `low`: kept from training, else derived again from the original base `weight`.
pub fn initial_of<V: LoraVariant + ?Sized>(
    variant: &V,
    weight: &Tensor,
    low: &LowRank,
) -> Result<(Tensor, Tensor)> {
    if let Some((a0, b0)) = &low.initial {
        return Ok((a0.clone(), b0.clone()));
    }
    let no_uniform = |_: &str, n: usize, _: f64| vec![0f32; n];
    let init = variant.init(&InitInput {
        weight,
        rank: low.a.dim(0)?,
        scaling: low.scaling,
        uniform: &no_uniform,
        key_a: "",
        seed: 0,
        device: weight.device(),
    })?;
    Ok((init.a, init.b))
}

/// The merged f32 weight of an adapter over the original base `weight`: `W − s·B₀·A₀ + s·B·A`.
pub fn merged_weight<V: LoraVariant + ?Sized>(
    variant: &V,
    weight: &Tensor,
    low: &LowRank,
) -> Result<Tensor> {
    let (a0, b0) = initial_of(variant, weight, low)?;
    let w = residual_weight(&weight.to_dtype(DType::F32)?, &a0, &b0, low.scaling)?;
    w + low.delta_weight()?
}

/// The config of the converted adapter: rank and `rank_pattern` doubled, α and `alpha_pattern`
/// ×2 (×√2 with rsLoRA), `init_lora_weights: true`.
pub fn config_for_original_base(config: &LoraConfig) -> LoraConfig {
    let alpha_factor = if config.use_rslora { 2f64.sqrt() } else { 2.0 };
    let scale = |map: &Map<String, Value>, f: &dyn Fn(&Value) -> Value| -> Map<String, Value> {
        map.iter().map(|(k, v)| (k.clone(), f(v))).collect()
    };
    LoraConfig {
        r: config.r * 2,
        lora_alpha: config.lora_alpha * alpha_factor,
        rank_pattern: scale(&config.rank_pattern, &|v| {
            Value::from(v.as_u64().unwrap_or(0) * 2)
        }),
        alpha_pattern: scale(&config.alpha_pattern, &|v| {
            Value::from(v.as_f64().unwrap_or(0.0) * alpha_factor)
        }),
        init_lora_weights: InitLoraWeights::Bool(true),
        ..config.clone()
    }
}

/// One module's adapter for the original base: `[A; A₀]`, `[B, −B₀]` (plain LoRA).
pub fn module_for_original_base(low: &LowRank, a0: &Tensor, b0: &Tensor) -> Result<LowRank> {
    let a = Tensor::cat(&[&low.a, &a0.to_device(low.a.device())?], 0)?;
    let b = Tensor::cat(&[&low.b, &b0.to_device(low.b.device())?.neg()?], 1)?;
    Ok(LowRank::new(a, b, low.scaling))
}

/// Splits a converted module (`A'` `[2r, in]`, `B'` `[out, 2r]`) back into the trained `A`, `B`
/// and the initial `A₀`, `B₀` — exactly (concatenation and negation round-trip).
pub fn split_converted(a: &Tensor, b: &Tensor, r: usize) -> Result<[Tensor; 4]> {
    Ok([
        a.narrow(0, 0, r)?,
        b.narrow(1, 0, r)?,
        a.narrow(0, r, r)?,
        b.narrow(1, r, r)?.neg()?,
    ])
}

/// The rank a base layer `[out, in]` allows a decomposition-based init.
pub fn check_rank(rank: usize, weight: &Tensor, method: &str) -> Result<()> {
    let (out, inp) = weight.dims2()?;
    if rank > out.min(inp) {
        candle_core::bail!(
            "{method} initialisation needs r ≤ min(out, in) = {} for a [{out}, {inp}] layer, got r = {rank}",
            out.min(inp)
        )
    }
    Ok(())
}

/// `(A, B)` with one sign per rank component chosen so the largest-magnitude entry of each
/// column of B is positive (A's row flipped with it; `B·A` is unchanged): SVD factors are
/// defined up to these signs, so comparisons of PiSSA factors go through this.
pub fn canonical_pair(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    use lorakit_ops::linalg::{canonical_signs, Mat};
    let (mut u, mut vt) = (Mat::from_tensor(b)?, Mat::from_tensor(a)?);
    canonical_signs(&mut u, &mut vt);
    Ok((vt.to_tensor(a.device())?, u.to_tensor(b.device())?))
}
