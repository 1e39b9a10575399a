//! Trainable adapters on a real (fixture) model: gradients reach every adapter tensor and no
//! frozen base tensor, and an adapter we save has PEFT's key names, shapes and config values.
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use lorakit_adapter::{save_adapter, Adapters, LoraConfig};
use lorakit_models::BaseModel;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/peft")
        .join(case)
}

fn next_token_loss(logits: &Tensor, ids: &Tensor) -> Tensor {
    let (b, s, v) = logits.dims3().unwrap();
    let pred = logits
        .narrow(1, 0, s - 1)
        .unwrap()
        .reshape((b * (s - 1), v))
        .unwrap();
    let target = ids
        .narrow(1, 1, s - 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    candle_nn::loss::cross_entropy(&pred, &target).unwrap()
}

#[test]
fn backward_reaches_every_adapter_tensor_and_no_frozen_tensor() {
    let dir = fixture("qwen2_tied");
    let config: LoraConfig = serde_json::from_value(serde_json::json!({
        "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    }))
    .unwrap();
    let varmap = VarMap::new();
    let (model, report) = BaseModel::open(&dir.join("base"))
        .unwrap()
        .load_causal_lm(
            Adapters::Train {
                config,
                varmap: varmap.clone(),
                seed: 7,
                dropout_seed: Default::default(),
            },
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    assert_eq!(report.wrapped().count(), 2 * 7 + 1);
    let ids = Tensor::new(&[[1u32, 5, 9, 13, 2, 7, 11, 3]], &Device::Cpu).unwrap();
    let loss = next_token_loss(&model.forward(&ids, None, true).unwrap(), &ids);
    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    assert_eq!(vars.len(), 2 * report.wrapped().count());
    for (name, var) in vars.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dims(), var.dims());
    }
    // B starts at zero, so only B's gradients are non-zero at step 0 (dL/dA = 0 through B = 0)
    let b_norm: f32 = vars
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, v)| {
            grads
                .get(v.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(b_norm > 0.0);
    assert!(report.frozen.len() >= 2 * 9 + 2, "{}", report.frozen.len());
    for (name, t) in &report.frozen {
        assert!(
            grads.get(t).is_none(),
            "frozen tensor {name} received a gradient"
        );
    }
    // nothing in the store has the shape of a frozen matrix
    let frozen_shapes: BTreeSet<Vec<usize>> = report
        .frozen
        .iter()
        .map(|(_, t)| t.dims().to_vec())
        .filter(|d| d.len() == 2)
        .collect();
    for id in grads.get_ids() {
        let d = grads.get_id(*id).unwrap().dims().to_vec();
        let var_shape = vars.values().any(|v| v.dims() == d.as_slice());
        assert!(
            var_shape || !frozen_shapes.contains(&d),
            "a frozen-sized gradient {d:?} was stored"
        );
    }
}

#[test]
fn step_zero_equals_the_base_model() {
    let dir = fixture("llama_gqa");
    let config: LoraConfig = serde_json::from_value(
        serde_json::json!({"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}),
    )
    .unwrap();
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu).unwrap();
    let (base, _) = BaseModel::open(&dir.join("base"))
        .unwrap()
        .load_causal_lm(Adapters::None, DType::F32, &Device::Cpu)
        .unwrap();
    let (lora, report) = BaseModel::open(&dir.join("base"))
        .unwrap()
        .load_causal_lm(
            Adapters::Train {
                config,
                varmap: VarMap::new(),
                seed: 1,
                dropout_seed: Default::default(),
            },
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    // all-linear wraps everything but the output head
    assert_eq!(report.wrapped().count(), 14);
    assert!(report
        .linears
        .iter()
        .any(|l| l.path == "lm_head" && l.lora.is_none()));
    let d = (base.forward(&ids, None, false).unwrap() - lora.forward(&ids, None, false).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(D::Minus1)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
}

/// The PEFT keys (without saved base layers) and shapes from expected.json.
fn peft_keys(meta: &Value) -> BTreeMap<String, Vec<usize>> {
    meta["keys"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !k.ends_with(".base_layer.weight"))
        .map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).unwrap()))
        .collect()
}

#[test]
fn saved_adapters_have_peft_key_names_shapes_and_config_values() {
    for (case, adapter) in [
        ("llama_gqa", "all_f32"),
        ("llama_gqa", "subset_bf16"),
        ("llama_gqa", "rslora_patterns"),
        ("qwen2_tied", "all_linear"),
        ("llama3_sharded", "qv"),
        ("mistral_window", "qv"),
    ] {
        let dir = fixture(case);
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let meta = &expected["adapters"][adapter];
        let (config, _) =
            LoraConfig::from_peft_json(meta["config"].clone(), "expected.json").unwrap();
        let varmap = VarMap::new();
        let (_, report) = BaseModel::open(&dir.join("base"))
            .unwrap()
            .load_causal_lm(
                Adapters::Train {
                    config: config.clone(),
                    varmap: varmap.clone(),
                    seed: 0,
                    dropout_seed: Default::default(),
                },
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let out = tempfile::tempdir().unwrap();
        save_adapter(
            out.path(),
            &config,
            &report.trained_modules(&varmap).unwrap(),
            &HashMap::new(),
        )
        .unwrap();

        let ours = lorakit_adapter::Checkpoint::open_dir(out.path()).err();
        assert!(ours.is_some(), "adapter dir is not a model dir");
        let st = lorakit_adapter::Checkpoint::open_files(&[out
            .path()
            .join("adapter_model.safetensors")])
        .unwrap();
        let our_keys: BTreeMap<String, Vec<usize>> = st
            .names()
            .map(|n| (n.to_string(), st.meta(n).unwrap().shape))
            .collect();
        assert_eq!(
            our_keys,
            peft_keys(meta),
            "{case}/{adapter}: keys or shapes differ"
        );
        assert_eq!(
            st.user_metadata(0).get("format").map(String::as_str),
            Some("pt")
        );

        let written: Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let peft = &meta["config"];
        for (key, value) in written.as_object().unwrap() {
            // task_type: PEFT wrote null (no task given); we name the task we trained for.
            if key == "task_type" || key == "base_model_name_or_path" {
                continue;
            }
            let theirs = peft
                .get(key)
                .unwrap_or_else(|| panic!("{case}/{adapter}: PEFT does not know key {key}"));
            if key == "target_modules" && value.is_array() {
                let set =
                    |v: &Value| -> BTreeSet<String> { serde_json::from_value(v.clone()).unwrap() };
                assert_eq!(set(value), set(theirs), "{case}/{adapter}: {key}");
            } else if value.is_number() {
                assert_eq!(value.as_f64(), theirs.as_f64(), "{case}/{adapter}: {key}");
            } else {
                assert_eq!(value, theirs, "{case}/{adapter}: {key}");
            }
        }
    }
}
