//! The LoRA-variant hook: everything that differs between LoRA and its variants (DoRA, PiSSA,
//! ...) for one adapted linear layer — how its tensors start, how the layer runs, what the
//! merged weight is, which tensors it stores under PEFT's keys. The layer ([`crate::LoraLinear`]),
//! the builder, the PEFT reader/writer, merged backends and `lorakit merge` all go through it and
//! never re-derive the math. Plain LoRA is [`Lora`]; a variant is one more implementation, chosen
//! by [`crate::LoraConfig::variant`].
use crate::lora_linear::LowRank;
use candle_core::{DType, Device, Result, Tensor};
use lorakit_ops::dropout::DropoutMask;
use lorakit_ops::lora::lora_forward;
use lorakit_ops::quantized::Frozen;
use std::sync::Arc;

/// What a variant needs to initialise one module's tensors for training.
pub struct InitInput<'a> {
    /// The frozen base weight `[out, in]`.
    pub weight: &'a Tensor,
    pub rank: usize,
    pub scaling: f64,
    /// Deterministic U(-bound, bound) values of `n` elements for the tensor named `key`.
    pub uniform: &'a dyn Fn(&str, usize, f64) -> Vec<f32>,
    /// PEFT key of A; other tensors' keys follow from the module path.
    pub key_a: &'a str,
    /// Seeds a random draw of the variant's own (a function of the run's seed and the module).
    pub seed: u64,
    pub device: &'a Device,
}

/// A module's tensors at the start of training.
pub struct Initial {
    pub a: Tensor,
    pub b: Tensor,
    /// The variant's own tensors, by the name in [`LoraVariant::extra_tensors`].
    pub extra: Vec<(&'static str, Tensor)>,
}

pub trait LoraVariant: Send + Sync + std::fmt::Debug {
    /// As adapter_config.json would call it ("lora", "dora", ...), for messages.
    fn name(&self) -> &'static str;

    /// Per-module tensors stored besides A and B, by their PEFT key suffix after the module path
    /// (`base_model.model.<module>.<name>`).
    fn extra_tensors(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether the saved adapter is plain LoRA (A and B only), which tools that implement
    /// nothing else (llama.cpp's GGUF adapters, vLLM) can take; exporters check
    /// [`crate::PeftAdapter::check_plain_lora`].
    fn saved_as_plain_lora(&self) -> bool {
        self.extra_tensors().is_empty()
    }

    /// The shape of extra tensor `name` for a base layer `[out_dim, in_dim]`.
    fn extra_shape(&self, _name: &str, _in_dim: usize, out_dim: usize) -> Vec<usize> {
        vec![out_dim]
    }

    /// Whether [`init`](Self::init) derives A and B from the base weight and training runs on
    /// the residual `W − s·B₀·A₀` (PiSSA, OLoRA) — so the model starts where the base is. Such
    /// an adapter is saved for the original base ([`crate::residual`]).
    fn rewrites_base(&self) -> bool {
        false
    }

    /// Initial A `[r, in]`, B `[out, r]` and extra tensors. LoRA: Kaiming-uniform A (as PEFT's
    /// `init_lora_weights=True`), zero B, so training starts at the base model.
    fn init(&self, m: &InitInput) -> Result<Initial> {
        let (out_dim, in_dim) = m.weight.dims2()?;
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a = (m.uniform)(m.key_a, m.rank * in_dim, bound);
        Ok(Initial {
            a: Tensor::from_vec(a, (m.rank, in_dim), m.device)?,
            b: Tensor::zeros((out_dim, m.rank), DType::F32, m.device)?,
            extra: Vec::new(),
        })
    }

    /// The layer's output without bias: `x·Wᵀ` plus the update. `weight` is dense or kept
    /// quantized (products with it go through [`Frozen::matmul_t`] or `lora_forward`, which
    /// dequantize just in time); `weight_t` is a dense W's transposed CPU copy when one exists; `dropout` is this step's mask; `train` says whether this is a
    /// training pass (the adapter's tensors may change after it, see [`LowRank::remembered`]).
    /// LoRA's: `x·Wᵀ + s·dropout(x)·Aᵀ·Bᵀ`, on the fused CPU f32 op where it fits, else on the
    /// any-device op (`lorakit_ops::lora`).
    fn forward(
        &self,
        x: &Tensor,
        weight: &Frozen,
        weight_t: Option<&Tensor>,
        low: &LowRank,
        dropout: Option<DropoutMask>,
        _train: bool,
    ) -> Result<Tensor> {
        lora_forward(x, weight, weight_t, &low.a, &low.b, low.scaling, dropout)
    }

    /// The dense f32 weight with the update folded in (`lorakit merge`, merged backends), for
    /// the original base weight `weight`. LoRA's: `W + s·B·A`; for an init that rewrote the
    /// base, `W − s·B₀·A₀ + s·B·A` ([`crate::residual`]).
    fn merged_weight(&self, weight: &Tensor, low: &LowRank) -> Result<Tensor> {
        if self.rewrites_base() {
            return crate::residual::merged_weight(self, weight, low);
        }
        weight.to_dtype(DType::F32)? + low.delta_weight()?
    }
}

/// Plain LoRA: `y = x·Wᵀ + scaling · dropout(x)·Aᵀ·Bᵀ`; merged `W + scaling·B·A` (the trait's
/// defaults).
#[derive(Debug)]
pub struct Lora;

impl LoraVariant for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }
}

/// Plain LoRA, shared.
pub fn lora() -> Arc<dyn LoraVariant> {
    Arc::new(Lora)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LoraLinear;
    use candle_core::Module;
    use std::collections::{BTreeMap, HashMap};

    /// A toy variant with its own per-module tensor: the low-rank update scaled per output row.
    #[derive(Debug)]
    struct RowScaled;

    impl LoraVariant for RowScaled {
        fn name(&self) -> &'static str {
            "row-scaled"
        }
        fn extra_tensors(&self) -> &'static [&'static str] {
            &["lora_row_scale"]
        }
        fn forward(
            &self,
            x: &Tensor,
            weight: &Frozen,
            _: Option<&Tensor>,
            low: &LowRank,
            _: Option<DropoutMask>,
            _: bool,
        ) -> Result<Tensor> {
            let u = x.matmul(&low.a.t()?)?.matmul(&low.b.t()?)?;
            let update = (u.broadcast_mul(&low.extra["lora_row_scale"])? * low.scaling)?;
            weight.matmul_t(x, None)? + update
        }
        fn merged_weight(&self, weight: &Tensor, low: &LowRank) -> Result<Tensor> {
            let m = low.extra["lora_row_scale"].unsqueeze(1)?;
            weight + low.delta_weight()?.broadcast_mul(&m)?
        }
    }

    fn toy() -> Result<LowRank> {
        let dev = Device::Cpu;
        let extra = BTreeMap::from([(
            "lora_row_scale",
            Tensor::new(&[0.5f32, -1.0, 2.0, 3.0], &dev)?,
        )]);
        Ok(LowRank::new(
            lorakit_ops::seeded::randn(0f32, 1., (2, 3), &dev)?,
            lorakit_ops::seeded::randn(0f32, 1., (4, 2), &dev)?,
            1.5,
        )
        .with_variant(Arc::new(RowScaled), extra))
    }

    /// The layer runs the variant's forward, and the merged weight is the same function.
    #[test]
    fn a_variant_decides_forward_and_merge() -> Result<()> {
        let dev = Device::Cpu;
        let w = lorakit_ops::seeded::randn(0f32, 1., (4, 3), &dev)?;
        let x = lorakit_ops::seeded::randn(0f32, 1., (5, 3), &dev)?;
        let low = toy()?;
        let merged = low.merged_weight(&w)?;
        let layer = LoraLinear::new(w.clone(), None, Some(low.clone()));
        let y = layer.forward(&x)?;
        let want = x.matmul(&merged.t()?)?;
        assert!(lorakit_ops::compare::max_abs_diff(&y, &want)? < 1e-5);
        // and differs from plain LoRA on the same tensors: the hook has teeth
        let plain = LoraLinear::new(w, None, Some(LowRank::new(low.a, low.b, 1.5))).forward(&x)?;
        assert!(lorakit_ops::compare::max_abs_diff(&y, &plain)? > 1e-2);
        Ok(())
    }

    /// The variant's own tensors are saved under PEFT's key scheme next to A and B.
    #[test]
    fn a_variants_tensors_are_saved_under_peft_keys() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        let config = crate::LoraConfig {
            r: 2,
            lora_alpha: 3.0,
            target_modules: Some(crate::ModuleSpec::List(vec!["q_proj".into()])),
            ..Default::default()
        };
        let modules = vec![("model.q_proj".to_string(), toy()?)];
        crate::save_adapter(tmp.path(), &config, &modules, &HashMap::new())
            .map_err(candle_core::Error::wrap)?;
        let saved = candle_core::safetensors::load(
            tmp.path().join(crate::peft_format::WEIGHTS_FILE),
            &Device::Cpu,
        )?;
        let mut keys: Vec<&str> = saved.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "base_model.model.model.q_proj.lora_A.weight",
                "base_model.model.model.q_proj.lora_B.weight",
                "base_model.model.model.q_proj.lora_row_scale"
            ]
        );
        let scale = saved["base_model.model.model.q_proj.lora_row_scale"].to_vec1::<f32>()?;
        assert_eq!(scale, [0.5, -1.0, 2.0, 3.0]);
        Ok(())
    }
}
