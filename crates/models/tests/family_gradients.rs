//! Adapter gradients of every causal architecture against central finite differences of its
//! loss, the model in f64 (the adapter weights stay f32, so each nudge is the f32 step actually
//! taken): the backward pass through each family's own
//! pieces (fused projections, q/k norms, Gemma's norms and GELU, sliding layers, GPT-2's
//! transposed Conv1D weights, LayerNorms and learned positions) is the
//! derivative of its forward pass.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use lorakit_adapter::{Adapters, LoraConfig, StepSeed};
use lorakit_models::{BaseModel, CausalLm};
use std::path::PathBuf;

const CASES: [&str; 5] = [
    "llama_gqa",
    "qwen3_qk_norm",
    "phi3_fused",
    "gemma3_text",
    "gpt2_conv1d",
];

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/peft")
        .join(case)
        .join("base")
}

fn trainable(case: &str) -> (Box<dyn CausalLm>, VarMap) {
    let dir = fixture(case);
    let config: LoraConfig = serde_json::from_value(serde_json::json!({
        "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": "all-linear"
    }))
    .unwrap();
    let varmap = VarMap::new();
    let (model, _) = BaseModel::open(&dir)
        .unwrap()
        .load_causal_lm(
            Adapters::Train {
                config,
                varmap: varmap.clone(),
                seed: 5,
                dropout_seed: StepSeed::default(),
            },
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
    // B random: at B = 0 the A gradients vanish and would prove nothing
    lorakit_ops::seeded::reseed(23);
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        if name.contains("lora_B") {
            let r = lorakit_ops::seeded::randn(0f32, 0.3, var.shape(), &Device::Cpu).unwrap();
            var.set(&r).unwrap();
        }
    }
    drop(data);
    (model, varmap)
}

/// The output head's weight `[vocab, hidden]` in f64 (the embeddings when tied).
fn head(case: &str) -> Tensor {
    let file = fixture(case).join("model.safetensors");
    let w = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    w.get("lm_head.weight")
        .or(w.get("model.embed_tokens.weight"))
        .or(w.get("transformer.wte.weight"))
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

/// Mean next-token cross-entropy over a 9-token row (longer than Gemma's window of 3), all in
/// f64: the model's hidden states through the head here (the model's own logits are f32).
fn loss(model: &dyn CausalLm, head: &Tensor) -> Tensor {
    let row = [3u32, 17, 5, 9, 22, 4, 11, 8, 30];
    let ids = Tensor::new(&[row], &Device::Cpu).unwrap();
    let hidden = model.hidden_states(&ids, None, true).unwrap().squeeze(0);
    let logits = hidden.unwrap().matmul(&head.t().unwrap()).unwrap();
    let pred = logits.narrow(0, 0, 8).unwrap();
    let target = Tensor::new(&row[1..], &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(&pred, &target).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Sets element `i` of `var` (f32) to `value`; returns the value actually stored.
fn set(var: &Var, i: usize, value: f64) -> f64 {
    let mut v: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    v[i] = value as f32;
    let t = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
    var.set(&t).unwrap();
    value as f32 as f64
}

#[test]
fn adapter_gradients_equal_finite_differences_on_every_family() {
    for case in CASES {
        let (model, varmap) = trainable(case);
        let head = head(case);
        let l = loss(model.as_ref(), &head);
        let grads = l.backward().unwrap();
        let vars: Vec<(String, Var)> = {
            let data = varmap.data().lock().unwrap();
            let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let mut checked = 0;
        let mut worst = 0f64;
        let mut large = 0;
        // a few elements of A and B in the first, a middle and the last module
        for (name, var) in vars.iter().step_by(vars.len() / 5).chain(vars.last()) {
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{case}: no gradient for {name}"))
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let values: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for i in [0, g.len() / 2, g.len() - 1] {
                let x = values[i] as f64;
                // central differences at h and h/2, extrapolated (Richardson) to cancel the h²
                // term: Gemma's scaled embeddings and (1 + w) norms curve the loss enough for it
                // to show at h = 1e-3, and a smaller h drowns in the f32 adapter's rounding
                let central = |h: f64| {
                    let hi = set(var, i, x + h);
                    let up = scalar(&loss(model.as_ref(), &head));
                    let lo = set(var, i, x - h);
                    let down = scalar(&loss(model.as_ref(), &head));
                    set(var, i, x);
                    (up - down) / (hi - lo)
                };
                let (d1, d2) = (central(1e-3), central(5e-4));
                let numeric = (4.0 * d2 - d1) / 3.0;
                let err = (numeric - g[i]).abs();
                worst = worst.max(err);
                large += usize::from(numeric.abs() > 1e-3);
                assert!(
                    err <= 2e-3 * numeric.abs() + 5e-5,
                    "{case}: {name}[{i}]: backward {} vs finite differences {numeric}",
                    g[i]
                );
                checked += 1;
            }
        }
        eprintln!("{case}: {checked} elements ({large} above 1e-3), worst error {worst:.2e}");
        assert!(
            checked >= 12 && large >= 6,
            "{case}: {large} of {checked} gradients large"
        );
    }
}
