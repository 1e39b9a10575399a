//! DPO and ORPO against TRL's formulas computed by PyTorch + PEFT
//! (`tests/fixtures/make_preference_fixtures.py` → `tests/fixtures/peft/preference.json`): the
//! policy is the tiny Llama with PEFT's fixture adapter, the reference the same model with the
//! adapter switched off; and a conversational pair is the chat template's rendering.
use candle_core::{DType, Device};
use lorakit_adapter::{Adapters, PeftAdapter};
use lorakit_models::{BaseModel, CausalLm};
use lorakit_train::preference::{answer_logps, reference_logps, Objective, Pair, PreferenceLoss};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture() -> serde_json::Value {
    let p = root().join("tests/fixtures/peft/preference.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn policy() -> Box<dyn CausalLm> {
    let case = root().join("tests/fixtures/peft/llama_gqa");
    let adapter = PeftAdapter::load(&case.join("adapters/all_f32")).unwrap();
    BaseModel::open(&case.join("base"))
        .unwrap()
        .load_causal_lm(Adapters::Loaded(adapter), DType::F32, &Device::Cpu)
        .unwrap()
        .0
}

fn pairs(v: &serde_json::Value) -> Vec<Pair> {
    let ids = |x: &serde_json::Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    v["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Pair {
            prompt: ids(&p["prompt"]),
            chosen: ids(&p["chosen"]),
            rejected: ids(&p["rejected"]),
        })
        .collect()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn answer_log_probabilities_equal_pytorchs_with_and_without_the_adapter() {
    let v = fixture();
    let model = policy();
    let ps = pairs(&v);
    let refs: Vec<&Pair> = ps.iter().collect();
    let dev = Device::Cpu;
    let check = |got: Vec<f32>, key: &str| {
        let want: Vec<f64> = floats(&v[key]["chosen"])
            .into_iter()
            .chain(floats(&v[key]["rejected"]))
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 2e-5, "{key}: {g} vs {w}");
        }
    };
    let policy = answer_logps(&*model, &refs, 0, false, &dev).unwrap();
    check(policy.to_vec1().unwrap(), "policy_logps");
    let reference = reference_logps(&*model, &refs, 0, &dev).unwrap();
    check(reference.to_vec1().unwrap(), "reference_logps");
    // the switch is back on afterwards
    let again = answer_logps(&*model, &refs, 0, false, &dev).unwrap();
    check(again.to_vec1().unwrap(), "policy_logps");
}

#[test]
fn dpo_and_orpo_losses_and_rewards_equal_trls_formulas() {
    let v = fixture();
    let model = policy();
    let ps = pairs(&v);
    let refs: Vec<&Pair> = ps.iter().collect();
    let dev = Device::Cpu;
    let beta = v["beta"].as_f64().unwrap();
    let chosen_tokens: usize = ps.iter().map(|p| p.chosen.len()).sum();
    for (objective, key) in [(Objective::Dpo, "dpo"), (Objective::Orpo, "orpo")] {
        let reference = (objective == Objective::Dpo)
            .then(|| reference_logps(&*model, &refs, 0, &dev).unwrap());
        let out = PreferenceLoss { objective, beta }
            .apply(
                &*model,
                &refs,
                reference.as_ref(),
                0,
                false,
                1.0 / ps.len() as f64,
                1.0 / chosen_tokens as f64,
                &dev,
            )
            .unwrap();
        let want = &v[key];
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        let w = want["loss"].as_f64().unwrap();
        assert!((loss - w).abs() <= 1e-5, "{key}: loss {loss} vs {w}");
        let m = out.stats.means();
        for (name, got) in [
            ("rewards_chosen", m.rewards_chosen),
            ("rewards_rejected", m.rewards_rejected),
            ("reward_margin", m.reward_margin),
            ("reward_accuracy", m.reward_accuracy),
        ] {
            let w = want[name].as_f64().unwrap();
            assert!((got - w).abs() <= 1e-5, "{key}: {name} {got} vs {w}");
        }
        if objective == Objective::Dpo {
            // every pair counts alike: the logged mean is the loss itself
            assert!((m.loss - w).abs() <= 1e-5, "{key}: mean {} vs {w}", m.loss);
        }
    }
}

/// The conversational form: the prompt is the conversation with the generation prompt, each
/// answer the rest of the rendered conversation, the prompt shared by both answers.
#[test]
fn a_conversational_pair_is_the_chat_templates_rendering() {
    let model_dir = root().join("examples/tiny-llama");
    let tok = lorakit_train::TextTokenizer::open(&model_dir).unwrap();
    let set = lorakit_train::preference::load(
        &root().join("examples/data/capitals-preference-chat.jsonl"),
        &tok,
        64,
    )
    .unwrap();
    let template = lorakit_train::data::ChatTemplate::new(&tok).unwrap();
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(root().join("examples/data/capitals-preference-chat.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let prompt = line["messages"].as_array().unwrap().clone();
    let mut conversation = prompt.clone();
    conversation.extend(line["chosen"].as_array().unwrap().iter().cloned());
    let full = template.render(&conversation, &tok, false).unwrap();
    let ids = tok.encode(&full, false).unwrap();
    let pair = &set.pairs[0];
    let joined: Vec<u32> = pair.prompt.iter().chain(&pair.chosen).copied().collect();
    assert_eq!(joined, ids);
    let prompt_text = template.render(&prompt, &tok, true).unwrap();
    assert!(full.starts_with(&prompt_text));
    assert_eq!(set.pairs.len(), 4);
    assert_ne!(pair.chosen, pair.rejected);
}
