//! LoRA variants against PEFT (tests/fixtures/make_variant_fixtures.py, on the llama_gqa tiny
//! model): DoRA logits, merge and gradients; PiSSA and OLoRA initial tensors, residual base,
//! initial model, and adapters saved for the original base or in residual form.
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use lorakit_adapter::compare::max_abs_diff;
use lorakit_adapter::residual::canonical_pair;
use lorakit_adapter::{save_adapter, Adapters, LoraConfig, PeftAdapter};
use lorakit_models::BaseModel;
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft")
}

fn variants() -> PathBuf {
    fixtures().join("variants")
}

fn base_dir() -> PathBuf {
    fixtures().join("llama_gqa/base")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(variants().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn meta() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(variants().join("expected.json")).unwrap()).unwrap()
}

/// Max |a − b| over positions the attention mask keeps.
fn masked_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .broadcast_mul(&m)
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(D::Minus1)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn logits_with(adapters: Adapters) -> Tensor {
    let exp = expected();
    let (model, _) = BaseModel::open(&base_dir())
        .unwrap()
        .load_causal_lm(adapters, DType::F32, &Device::Cpu)
        .unwrap();
    model
        .forward(&exp["input_ids"], Some(&exp["attention_mask"]), false)
        .unwrap()
}

fn loaded(name: &str) -> Adapters {
    Adapters::Loaded(PeftAdapter::load(&variants().join("adapters").join(name)).unwrap())
}

fn assert_logits(got: &Tensor, key: &str, tol: f32) {
    let exp = expected();
    let diff = masked_diff(got, &exp[key], &exp["attention_mask"]);
    eprintln!("{key}: max abs diff {diff:.2e}");
    assert!(diff <= tol, "{key}: max abs diff {diff}");
}

/// Mean next-token cross-entropy over targets that are not padding (the fixture's loss).
fn masked_loss(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Tensor {
    let (b, s, v) = logits.dims3().unwrap();
    let lp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, s - 1).unwrap(), D::Minus1).unwrap();
    let target = ids
        .narrow(1, 1, s - 1)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let picked = lp
        .reshape((b * (s - 1), v))
        .unwrap()
        .gather(&target.reshape((b * (s - 1), 1)).unwrap(), 1)
        .unwrap()
        .reshape((b, s - 1))
        .unwrap();
    let keep = mask
        .narrow(1, 1, s - 1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let total = (picked * &keep).unwrap().sum_all().unwrap();
    (total.neg().unwrap() / keep.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64).unwrap()
}

#[test]
fn dora_unmerged_logits_match_peft() {
    assert_logits(&logits_with(loaded("dora")), "logits_dora", 1e-5);
    // DoRA changes the output, and differs from the same A, B as plain LoRA
    let exp = expected();
    assert!(
        masked_diff(
            &exp["logits_dora"],
            &logits_with(Adapters::None),
            &exp["attention_mask"]
        ) > 1e-2
    );
}

#[test]
fn dora_merge_matches_merge_and_unload() {
    let adapter = PeftAdapter::load(&variants().join("adapters/dora")).unwrap();
    let merged =
        candle_core::safetensors::load(variants().join("merged_dora.safetensors"), &Device::Cpu)
            .unwrap();
    let base =
        candle_core::safetensors::load(base_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut checked = 0;
    for module in adapter.modules() {
        let w = &base[&format!("{module}.weight")];
        let (out, inp) = w.dims2().unwrap();
        let low = adapter
            .low_rank(module, inp, out, &Device::Cpu)
            .unwrap()
            .unwrap();
        let diff = max_abs_diff(
            &low.merged_weight(w).unwrap(),
            &merged[&format!("{module}.weight")],
        )
        .unwrap();
        assert!(diff <= 1e-6, "{module}: {diff}");
        checked += 1;
    }
    assert_eq!(checked, 14);
}

/// The adapter's tensors as trainable variables (what a resumed run holds), the masked loss,
/// and its gradients against PEFT's after `loss.backward()`.
#[test]
fn dora_gradients_match_peft() {
    let exp = expected();
    let adapter_dir = variants().join("adapters/dora");
    let (config, _) = LoraConfig::from_peft_file(&adapter_dir.join("adapter_config.json")).unwrap();
    assert!(config.use_dora);
    let saved =
        candle_core::safetensors::load(adapter_dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let varmap = VarMap::new();
    {
        let mut vars = varmap.data().lock().unwrap();
        for (k, t) in &saved {
            vars.insert(k.clone(), Var::from_tensor(t).unwrap());
        }
    }
    let (model, _) = BaseModel::open(&base_dir())
        .unwrap()
        .load_causal_lm(
            Adapters::Train {
                config,
                varmap: varmap.clone(),
                seed: 0,
                dropout_seed: Default::default(),
            },
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    let logits = model
        .forward(&exp["input_ids"], Some(&exp["attention_mask"]), true)
        .unwrap();
    let loss = masked_loss(&logits, &exp["input_ids"], &exp["attention_mask"]);
    let want_loss = meta()["loss_dora"].as_f64().unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() as f64 - want_loss).abs() < 1e-5);
    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    assert_eq!(vars.len(), 14 * 3);
    let mut worst = 0f32;
    for (key, var) in vars.iter() {
        let want = &exp[&format!("grad.{key}")];
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        let diff = max_abs_diff(got, want).unwrap();
        worst = worst.max(diff);
        assert!(diff <= 1e-5, "{key}: {diff}");
    }
    eprintln!("DoRA gradients: max abs diff {worst:.2e}");
}

fn init_config(method: &str) -> LoraConfig {
    serde_json::from_value(serde_json::json!({
        "r": 4, "lora_alpha": 8, "init_lora_weights": method,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    }))
    .unwrap()
}

/// PiSSA / OLoRA: initial A, B and the residual base equal PEFT's (PiSSA's singular vectors up
/// to one sign per component: both sides made canonical — the largest entry of each column of B
/// positive, A's row flipped with it); the initial model computes the base model's logits.
fn check_init(method: &str, canonicalise: bool) {
    let exp = expected();
    let varmap = VarMap::new();
    let (model, report) = BaseModel::open(&base_dir())
        .unwrap()
        .load_causal_lm(
            Adapters::Train {
                config: init_config(method),
                varmap,
                seed: 0,
                dropout_seed: Default::default(),
            },
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    let base =
        candle_core::safetensors::load(base_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(report.initial.len(), 14);
    let (mut worst_ab, mut worst_res) = (0f32, 0f32);
    for (module, (a0, b0)) in &report.initial {
        let key = |w: &str| format!("init.{method}.{module}.{w}");
        let (mut a, mut b) = (a0.clone(), b0.clone());
        let (mut pa, mut pb) = (exp[&key("A")].clone(), exp[&key("B")].clone());
        if canonicalise {
            (a, b) = canonical_pair(&a, &b).unwrap();
            (pa, pb) = canonical_pair(&pa, &pb).unwrap();
        }
        worst_ab = worst_ab
            .max(max_abs_diff(&a, &pa).unwrap())
            .max(max_abs_diff(&b, &pb).unwrap());
        let w = &base[&format!("{module}.weight")];
        let residual = lorakit_adapter::residual::residual_weight(w, a0, b0, 2.0).unwrap();
        worst_res = worst_res.max(max_abs_diff(&residual, &exp[&key("residual")]).unwrap());
    }
    eprintln!("{method}: A, B max abs diff {worst_ab:.2e}, residual {worst_res:.2e}");
    assert!(worst_ab <= 1e-5, "{method}: A/B differ by {worst_ab}");
    assert!(
        worst_res <= 1e-5,
        "{method}: residual differs by {worst_res}"
    );
    let logits = model
        .forward(&exp["input_ids"], Some(&exp["attention_mask"]), false)
        .unwrap();
    assert_logits(&logits, &format!("logits_{method}_init"), 1e-5);
}

#[test]
fn pissa_init_matches_peft() {
    check_init("pissa", true);
}

#[test]
fn olora_init_matches_peft_with_lapacks_signs() {
    check_init("olora", false);
}

/// Adapters PEFT saved for the original base load as plain LoRA; in residual form, lorakit
/// derives A₀, B₀ from the base again (as PEFT does) — both give the trained model's logits.
#[test]
fn converted_and_residual_form_adapters_give_the_trained_models_logits() {
    for method in ["pissa", "olora"] {
        let key = format!("logits_{method}_trained");
        assert_logits(
            &logits_with(loaded(&format!("{method}_converted"))),
            &key,
            1e-5,
        );
        assert_logits(
            &logits_with(loaded(&format!("{method}_residual"))),
            &key,
            1e-5,
        );
    }
}

/// lorakit's own conversion: train-like changes on the residual model, save, load the saved
/// adapter on the original base — the same logits; the saved config is rank 2r, α doubled.
#[test]
fn an_adapter_trained_on_the_residual_is_saved_for_the_original_base() {
    let exp = expected();
    for method in ["pissa", "olora", "pissa_niter_3"] {
        let varmap = VarMap::new();
        let config = init_config(method);
        let (model, report) = BaseModel::open(&base_dir())
            .unwrap()
            .load_causal_lm(
                Adapters::Train {
                    config: config.clone(),
                    varmap: varmap.clone(),
                    seed: 5,
                    dropout_seed: Default::default(),
                },
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        for (i, (_, var)) in varmap.data().lock().unwrap().iter().enumerate() {
            lorakit_ops::seeded::reseed(i as u64);
            let noise = lorakit_ops::seeded::randn(0f32, 0.05, var.shape(), &Device::Cpu).unwrap();
            var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
        }
        let trained = model
            .forward(&exp["input_ids"], Some(&exp["attention_mask"]), false)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_adapter(
            dir.path(),
            &config,
            &report.trained_modules(&varmap).unwrap(),
            &HashMap::new(),
        )
        .unwrap();
        let back = PeftAdapter::load(dir.path()).unwrap();
        assert_eq!((back.config.r, back.config.lora_alpha), (8, 16.0));
        let reloaded = logits_with(Adapters::Loaded(back));
        let diff = masked_diff(&reloaded, &trained, &exp["attention_mask"]);
        eprintln!("{method}: saved-for-original vs residual model {diff:.2e}");
        assert!(diff <= 1e-5, "{method}: {diff}");
        assert!(
            masked_diff(
                &trained,
                &logits_with(Adapters::None),
                &exp["attention_mask"]
            ) > 1e-3
        );
    }
}
