//! The families added to the Llama family run every command through the binary. A Phi-3
//! directory made by fusing the tiny Llama's projections (`qkv_proj` = [q; k; v], `gate_up_proj` =
//! [gate; up]) computes exactly the tiny Llama: the same eval loss and the same generated text.
//! It and a Qwen3 directory (the tiny Llama plus per-head q/k norms) are inspected, trained on
//! their fused / normed layers, evaluated, and merged into a model that computes what the
//! unmerged adapter computes.
mod common;
use candle_core::{Device, Tensor};
use common::{lorakit, lorakit_ok, root, text};
use std::collections::HashMap;
use std::path::Path;

/// The tiny Llama's directory with its weights rewritten by `rewrite` and `config.json` edited.
fn family(dir: &Path, model_type: &str, rewrite: impl Fn(&mut HashMap<String, Tensor>)) {
    family_with(dir, &serde_json::json!({"model_type": model_type}), rewrite)
}

/// [`family`] with several config.json fields set.
fn family_with(
    dir: &Path,
    fields: &serde_json::Value,
    rewrite: impl Fn(&mut HashMap<String, Tensor>),
) {
    let src = root().join("examples/tiny-llama");
    std::fs::create_dir_all(dir).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    for (k, v) in fields.as_object().unwrap() {
        config[k] = v.clone();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut w =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    rewrite(&mut w);
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
}

fn fuse(w: &mut HashMap<String, Tensor>, layer: usize, parts: &[&str], fused: &str) {
    let names: Vec<String> = parts
        .iter()
        .map(|p| format!("model.layers.{layer}.{p}.weight"))
        .collect();
    let tensors: Vec<Tensor> = names.iter().map(|n| w.remove(n).unwrap()).collect();
    let cat = Tensor::cat(&tensors, 0).unwrap();
    w.insert(format!("model.layers.{layer}.{fused}.weight"), cat);
}

fn eval_loss(model: &Path, adapter: Option<&Path>) -> f64 {
    let m = model.display().to_string();
    let a = adapter.map(|a| a.display().to_string());
    let mut args = vec![
        "eval",
        "--model",
        &m,
        "--data",
        "examples/data/capitals-eval.jsonl",
        "--json",
    ];
    if let Some(a) = &a {
        args.extend(["--adapter", a.as_str()]);
    }
    let v: serde_json::Value = serde_json::from_str(&lorakit_ok(&args)).unwrap();
    v["loss"].as_f64().unwrap()
}

fn generate(model: &Path) -> String {
    let m = model.display().to_string();
    lorakit_ok(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
    ])
}

/// Trains all linear layers for a few steps, then checks `merge` against the unmerged adapter.
fn train_and_merge(tmp: &Path, model: &Path, name: &str) {
    let out = tmp.join(format!("{name}-run"));
    let o = lorakit(&[
        "train",
        "recipes/tiny-completion.yaml",
        "--set",
        &format!("model.path={}", model.display()),
        "--set",
        &format!("output.dir={}", out.display()),
        "--set",
        "train.max_steps=10",
    ]);
    assert!(o.status.success(), "{name}: {}", text(&o).1);
    let adapter = out.join("last");
    let base = eval_loss(model, None);
    let tuned = eval_loss(model, Some(&adapter));
    assert!(tuned < base, "{name}: eval loss {base} -> {tuned}");
    let merged = tmp.join(format!("{name}-merged"));
    lorakit_ok(&[
        "merge",
        "--base",
        &model.display().to_string(),
        "--adapter",
        &adapter.display().to_string(),
        "--out",
        &merged.display().to_string(),
    ]);
    let m = eval_loss(&merged, None);
    assert!(
        (m - tuned).abs() < 1e-4,
        "{name}: merged {m}, unmerged {tuned}"
    );
}

#[test]
fn phi3_with_fused_projections_is_the_llama_it_was_made_from_and_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let phi3 = tmp.path().join("phi3");
    family(&phi3, "phi3", |w| {
        for l in 0..2 {
            fuse(
                w,
                l,
                &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "self_attn.qkv_proj",
            );
            fuse(w, l, &["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_up_proj");
        }
    });
    let inspect = lorakit_ok(&["inspect", &phi3.display().to_string()]);
    assert!(
        inspect.contains("phi3")
            && inspect.contains("model.layers.0.self_attn.qkv_proj")
            && inspect.contains("model.layers.1.mlp.gate_up_proj"),
        "{inspect}"
    );
    let llama = root().join("examples/tiny-llama");
    let (a, b) = (eval_loss(&llama, None), eval_loss(&phi3, None));
    assert!((a - b).abs() < 1e-5, "llama {a}, phi3 {b}");
    assert_eq!(generate(&llama), generate(&phi3));
    train_and_merge(tmp.path(), &phi3, "phi3");
}

#[test]
fn qwen3_with_qk_norms_trains_evaluates_generates_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let qwen3 = tmp.path().join("qwen3");
    family(&qwen3, "qwen3", |w| {
        for l in 0..2 {
            for n in ["q_norm", "k_norm"] {
                // head_dim 16; weights away from 1 so a norm left out would show
                let v: Vec<f32> = (0..16).map(|i| 0.8 + 0.025 * i as f32).collect();
                let t = Tensor::from_vec(v, 16, &Device::Cpu).unwrap();
                w.insert(format!("model.layers.{l}.self_attn.{n}.weight"), t);
            }
        }
    });
    let inspect = lorakit_ok(&["inspect", &qwen3.display().to_string()]);
    assert!(inspect.contains("qwen3"), "{inspect}");
    let llama = root().join("examples/tiny-llama");
    let (a, b) = (eval_loss(&llama, None), eval_loss(&qwen3, None));
    assert!(
        (a - b).abs() > 1e-4,
        "the q/k norms changed nothing: {a} vs {b}"
    );
    assert!(!generate(&qwen3).trim().is_empty());
    train_and_merge(tmp.path(), &qwen3, "qwen3");
}

/// Gemma 3 from the tiny Llama: the four norms per layer, q/k norms, GELU-tanh, √hidden-scaled
/// embeddings, one full layer between sliding ones (window 4, shorter than the rows). A base
/// model without a chat template: `chat` data is refused by name, completion data trains.
#[test]
fn gemma3_trains_evaluates_generates_and_merges_and_refuses_chat_without_a_template() {
    let tmp = tempfile::tempdir().unwrap();
    let gemma = tmp.path().join("gemma3");
    let fields = serde_json::json!({
        "model_type": "gemma3_text", "hidden_act": null, "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4,
        "query_pre_attn_scalar": 16, "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}});
    family_with(&gemma, &fields, |w| {
        for l in 0..2 {
            // Gemma norms compute x·(1 + w): weights near 0
            for n in [
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ] {
                let t = Tensor::full(0.05f32, 64, &Device::Cpu).unwrap();
                w.insert(format!("model.layers.{l}.{n}.weight"), t);
            }
            for n in ["q_norm", "k_norm"] {
                let t = Tensor::full(-0.1f32, 16, &Device::Cpu).unwrap();
                w.insert(format!("model.layers.{l}.self_attn.{n}.weight"), t);
            }
        }
        w.insert(
            "model.norm.weight".into(),
            Tensor::zeros(64, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    // a base model: no chat template
    let tc = gemma.join("tokenizer_config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&tc).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&tc, v.to_string()).unwrap();

    let inspect = lorakit_ok(&["inspect", &gemma.display().to_string()]);
    assert!(
        inspect.contains("gemma3_text") && inspect.contains("model.layers.1.mlp.gate_proj"),
        "{inspect}"
    );
    assert!(!generate(&gemma).trim().is_empty());
    let o = lorakit(&[
        "train",
        "recipes/tiny-chat.yaml",
        "--set",
        &format!("model.path={}", gemma.display()),
        "--set",
        &format!("output.dir={}", tmp.path().join("chat-run").display()),
    ]);
    let err = text(&o).1;
    assert!(
        !o.status.success() && err.contains("chat_template") && err.contains("completion"),
        "{err}"
    );
    train_and_merge(tmp.path(), &gemma, "gemma3");
}

/// GPT-2 (Conv1D weights stored [in, out], fused c_attn, learned positions) through every
/// command: the adapter is saved with `fan_in_fan_out: true` and the merge transposes the update
/// into the stored layout (the merged model computes what the unmerged adapter computes).
#[test]
fn gpt2_with_conv1d_layers_trains_evaluates_generates_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let gpt2 = root().join("tests/fixtures/trained/gpt2_base");
    let inspect = lorakit_ok(&["inspect", &gpt2.display().to_string()]);
    assert!(
        inspect.contains("gpt2")
            && inspect.contains("transformer.h.1.attn.c_attn  [192, 64] +bias")
            && inspect.contains("transformer.h.0.mlp.c_proj"),
        "{inspect}"
    );
    assert!(!generate(&gpt2).trim().is_empty());
    train_and_merge(tmp.path(), &gpt2, "gpt2");
}
