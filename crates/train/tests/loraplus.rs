//! LoRA+ parameter groups against PEFT's `create_loraplus_optimizer`
//! (tests/fixtures/make_variant_fixtures.py): the same learning rate and weight-decay choice
//! for every trained tensor, on a DoRA causal LM (1-D magnitudes) and a BERT classifier whose
//! head is trained whole (a bias).
use candle_core::{DType, Device, Var};
use candle_nn::VarMap;
use lorakit_adapter::{Adapters, LoraConfig};
use lorakit_models::BaseModel;
use lorakit_train::optim::AdamW;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft")
}

fn groups_of(
    varmap: &VarMap,
    ratio: f64,
    weight_decay: f64,
    lr: f64,
) -> BTreeMap<String, (f64, f64)> {
    let vars: BTreeMap<String, Var> = varmap.data().lock().unwrap().clone().into_iter().collect();
    let opt = AdamW::new(vars, weight_decay).unwrap().with_loraplus(ratio);
    opt.vars()
        .iter()
        .zip(opt.groups())
        .map(|((name, _), g)| {
            (
                name.clone(),
                (lr * g.lr_scale, if g.decays { weight_decay } else { 0.0 }),
            )
        })
        .collect()
}

#[test]
fn loraplus_groups_equal_peft_s() {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("variants/expected.json")).unwrap())
            .unwrap();
    let lp = &meta["loraplus"];
    let (lr, ratio, wd) = (
        lp["lr"].as_f64().unwrap(),
        lp["ratio"].as_f64().unwrap(),
        lp["weight_decay"].as_f64().unwrap(),
    );
    let cases = [
        (
            "llama_dora",
            "llama_gqa/base",
            serde_json::json!({"r": 4, "lora_alpha": 8, "use_dora": true,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}),
            None,
        ),
        (
            "bert_cls",
            "bert_seq_cls/base",
            serde_json::json!({"r": 4, "lora_alpha": 8,
            "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
            Some(3),
        ),
    ];
    for (case, base, config, labels) in cases {
        let config: LoraConfig = serde_json::from_value(config).unwrap();
        let varmap = VarMap::new();
        let adapters = Adapters::Train {
            config,
            varmap: varmap.clone(),
            seed: 0,
            dropout_seed: Default::default(),
        };
        let base = BaseModel::open(&fixtures().join(base)).unwrap();
        match labels {
            None => drop(
                base.load_causal_lm(adapters, DType::F32, &Device::Cpu)
                    .unwrap(),
            ),
            Some(n) => drop(
                base.load_classifier(adapters, n, DType::F32, &Device::Cpu)
                    .unwrap(),
            ),
        }
        let ours = groups_of(&varmap, ratio, wd, lr);
        let peft = lp["groups"][case].as_object().unwrap();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            peft.keys().collect::<Vec<_>>(),
            "{case}: trained tensors"
        );
        for (key, (our_lr, our_wd)) in &ours {
            let want_lr = peft[key]["lr"].as_f64().unwrap();
            let want_wd = peft[key]["weight_decay"].as_f64().unwrap();
            assert!(
                (our_lr - want_lr).abs() < 1e-12 && (our_wd - want_wd).abs() < 1e-12,
                "{case} {key}: ours lr {our_lr} wd {our_wd}, PEFT lr {want_lr} wd {want_wd}"
            );
        }
        // both speeds occur
        assert!(ours.values().any(|v| v.0 == lr) && ours.values().any(|v| v.0 == lr * ratio));
    }
}
