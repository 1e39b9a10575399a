//! A second, independent oracle: candle-transformers' own llama, qwen2, qwen3, phi3, mistral and
//! gemma3 on the same random weights must give the same last-position logits as our models.
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{gemma3, llama, mistral, phi3, qwen2, qwen3};
use lorakit_adapter::Adapters;
use lorakit_models::llama::LlamaConfig;
use lorakit_models::{build_causal_lm, CausalLm};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

const SEQ: usize = 9;

/// Random weights with Hugging Face names for `cfg`.
fn weights(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut w = HashMap::new();
    let mut put = |name: String, shape: &[usize], scale: f64| {
        // xorshift64*: deterministic values in [-scale, scale]
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let u =
                    (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
                ((2.0 * u - 1.0) * scale * 1.7) as f32
            })
            .collect();
        w.insert(name, Tensor::from_vec(v, shape, &dev).unwrap());
    };
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    put(
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, h],
        0.5,
    );
    put("model.norm.weight".into(), &[h], 1.0);
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[cfg.vocab_size, h], 0.2);
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let attn: &[(&str, usize, usize)] = if cfg.fused_projections {
            &[("qkv_proj", q + 2 * kv, h), ("o_proj", h, q)]
        } else {
            &[
                ("q_proj", q, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("o_proj", h, q),
            ]
        };
        for &(n, out, inp) in attn {
            put(format!("{p}.self_attn.{n}.weight"), &[out, inp], 0.2);
            if cfg.qkv_bias && n != "o_proj" {
                put(format!("{p}.self_attn.{n}.bias"), &[out], 0.2);
            }
        }
        let mlp: &[(&str, usize, usize)] = if cfg.fused_projections {
            &[("gate_up_proj", 2 * i, h), ("down_proj", h, i)]
        } else {
            &[("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]
        };
        for &(n, out, inp) in mlp {
            put(format!("{p}.mlp.{n}.weight"), &[out, inp], 0.2);
        }
        if cfg.qk_norm {
            put(format!("{p}.self_attn.q_norm.weight"), &[d], 1.0);
            put(format!("{p}.self_attn.k_norm.weight"), &[d], 1.0);
        }
        put(format!("{p}.input_layernorm.weight"), &[h], 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0);
        if cfg.gemma_norms {
            put(format!("{p}.pre_feedforward_layernorm.weight"), &[h], 1.0);
            put(format!("{p}.post_feedforward_layernorm.weight"), &[h], 1.0);
        }
    }
    // norms near 1
    for (k, v) in w.iter_mut() {
        if k.ends_with("norm.weight") {
            *v = ((&*v * 0.1).unwrap() + 1.0).unwrap();
        }
    }
    w
}

fn ours_last_logits(cfg: &LlamaConfig, w: &HashMap<String, Tensor>, ids: &Tensor) -> Tensor {
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let (model, _) = build_causal_lm(cfg, vb, Adapters::None).unwrap();
    model
        .forward(ids, None, false)
        .unwrap()
        .narrow(1, SEQ - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    lorakit_ops::compare::max_abs_diff(a, b).unwrap()
}

fn ids(vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..SEQ as u32)
        .map(|i| (i * 7 + 3) % vocab as u32)
        .collect();
    Tensor::from_vec(v, (1, SEQ), &Device::Cpu).unwrap()
}

fn small(model_type: &str) -> serde_json::Value {
    json!({"model_type": model_type, "vocab_size": 50, "hidden_size": 32, "intermediate_size": 40,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 64})
}

#[test]
fn llama_with_gqa_and_llama3_rope_matches_candle_transformers() {
    let mut v = small("llama");
    v["rope_theta"] = json!(500000.0);
    v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 4});
    let cfg = LlamaConfig::from_json(v, Path::new("config.json")).unwrap();
    let w = weights(&cfg, 1);
    let ccfg = llama::Config {
        hidden_size: 32,
        intermediate_size: 40,
        vocab_size: 50,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        use_flash_attn: false,
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: Some(llama::Llama3RopeConfig {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 4,
            rope_type: llama::Llama3RopeType::Llama3,
        }),
        max_position_embeddings: 64,
        tie_word_embeddings: false,
    };
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let theirs_model = llama::Llama::load(vb, &ccfg).unwrap();
    let mut cache = llama::Cache::new(false, DType::F32, &ccfg, &Device::Cpu).unwrap();
    let x = ids(50);
    let theirs = theirs_model
        .forward(&x, 0, &mut cache)
        .unwrap()
        .flatten_all()
        .unwrap();
    let ours = ours_last_logits(&cfg, &w, &x);
    let d = max_diff(&ours, &theirs);
    assert!(d <= 1e-5, "llama: max abs diff {d}");
}

#[test]
fn qwen2_with_bias_and_tied_embeddings_matches_candle_transformers() {
    let mut v = small("qwen2");
    v["tie_word_embeddings"] = json!(true);
    v["rope_theta"] = json!(10000.0);
    let cfg = LlamaConfig::from_json(v, Path::new("config.json")).unwrap();
    let w = weights(&cfg, 2);
    let ccfg = qwen2::Config {
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 64,
        sliding_window: 64,
        max_window_layers: 0,
        tie_word_embeddings: true,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let mut theirs_model = qwen2::ModelForCausalLM::new(&ccfg, vb).unwrap();
    let x = ids(50);
    let theirs = theirs_model.forward(&x, 0).unwrap().flatten_all().unwrap();
    let ours = ours_last_logits(&cfg, &w, &x);
    let d = max_diff(&ours, &theirs);
    assert!(d <= 1e-5, "qwen2: max abs diff {d}");
}

#[test]
fn qwen3_with_qk_norm_and_a_wider_head_matches_candle_transformers() {
    let mut v = small("qwen3");
    v["head_dim"] = json!(16);
    v["rope_theta"] = json!(1000000.0);
    let cfg = LlamaConfig::from_json(v, Path::new("config.json")).unwrap();
    assert!(cfg.qk_norm);
    let w = weights(&cfg, 4);
    let ccfg = qwen3::Config {
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        head_dim: 16,
        attention_bias: false,
        num_key_value_heads: 2,
        max_position_embeddings: 64,
        sliding_window: None,
        max_window_layers: 0,
        tie_word_embeddings: false,
        rope_theta: 1000000.0,
        rms_norm_eps: 1e-5,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let mut theirs_model = qwen3::ModelForCausalLM::new(&ccfg, vb).unwrap();
    let x = ids(50);
    let theirs = theirs_model.forward(&x, 0).unwrap().flatten_all().unwrap();
    let ours = ours_last_logits(&cfg, &w, &x);
    let d = max_diff(&ours, &theirs);
    assert!(d <= 1e-5, "qwen3: max abs diff {d}");
}

#[test]
fn phi3_with_fused_projections_matches_candle_transformers() {
    let v = small("phi3");
    let cfg = LlamaConfig::from_json(v, Path::new("config.json")).unwrap();
    assert!(cfg.fused_projections);
    let w = weights(&cfg, 5);
    let ccfg = phi3::Config {
        vocab_size: 50,
        hidden_act: candle_nn::Activation::Silu,
        hidden_size: 32,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: 64,
        original_max_position_embeddings: None,
        partial_rotary_factor: None,
        tie_word_embeddings: false,
    };
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let mut theirs_model = phi3::Model::new(&ccfg, vb).unwrap();
    let x = ids(50);
    let theirs = theirs_model.forward(&x, 0).unwrap().flatten_all().unwrap();
    let ours = ours_last_logits(&cfg, &w, &x);
    let d = max_diff(&ours, &theirs);
    assert!(d <= 1e-5, "phi3: max abs diff {d}");
}

#[test]
fn mistral_with_sliding_window_matches_candle_transformers() {
    let mut v = small("mistral");
    v["sliding_window"] = json!(4);
    v["rope_theta"] = json!(10000.0);
    let cfg = LlamaConfig::from_json(v, Path::new("config.json")).unwrap();
    assert_eq!(cfg.sliding_window, Some(4));
    let w = weights(&cfg, 3);
    let ccfg = mistral::Config {
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        head_dim: None,
        num_key_value_heads: 2,
        hidden_act: candle_nn::Activation::Silu,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        // candle-transformers masks keys with `j + w < i` (sees w + 1 keys), transformers with
        // `i - j >= w` (sees w; the PEFT fixture `mistral_window` pins that): candle 3 = HF 4.
        sliding_window: Some(3),
        use_flash_attn: false,
    };
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let mut theirs_model = mistral::Model::new(&ccfg, vb).unwrap();
    let x = ids(50);
    let theirs = theirs_model.forward(&x, 0).unwrap().flatten_all().unwrap();
    let ours = ours_last_logits(&cfg, &w, &x);
    let d = max_diff(&ours, &theirs);
    assert!(d <= 1e-5, "mistral: max abs diff {d}");
    // and the window matters: without it the answer differs
    let mut cfg_nowin = cfg.clone();
    cfg_nowin.sliding_window = None;
    assert!(max_diff(&ours_last_logits(&cfg_nowin, &w, &x), &theirs) > 1e-4);
}

#[test]
fn merged_backend_runs_a_peft_adapter_in_candle_transformers() {
    // The fixture adapter through MergedBackend in candle-transformers' llama equals our
    // unmerged forward pass on the same adapter.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft/llama_gqa");
    let adapter = lorakit_adapter::PeftAdapter::load(&root.join("adapters/all_f32")).unwrap();
    let ckpt = lorakit_adapter::Checkpoint::open_dir(&root.join("base")).unwrap();
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> =
        Box::new(lorakit_adapter::MergedBackend::new(ckpt, adapter));
    let vb = VarBuilder::from_backend(backend, DType::F32, Device::Cpu);
    let ccfg = llama::Config {
        hidden_size: 32,
        intermediate_size: 48,
        vocab_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        use_flash_attn: false,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
    };
    let theirs_model = llama::Llama::load(vb, &ccfg).unwrap();
    let mut cache = llama::Cache::new(false, DType::F32, &ccfg, &Device::Cpu).unwrap();
    let x = ids(96);
    let theirs = theirs_model
        .forward(&x, 0, &mut cache)
        .unwrap()
        .flatten_all()
        .unwrap();

    let adapter = lorakit_adapter::PeftAdapter::load(&root.join("adapters/all_f32")).unwrap();
    let (ours_model, _) = lorakit_models::BaseModel::open(&root.join("base"))
        .unwrap()
        .load_causal_lm(Adapters::Loaded(adapter), DType::F32, &Device::Cpu)
        .unwrap();
    let ours = ours_model
        .forward(&x, None, false)
        .unwrap()
        .narrow(1, SEQ - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap();
    let d = max_diff(&ours, &theirs);
    assert!(d <= 1e-5, "merged backend: max abs diff {d}");
    // the Module impl is the same forward pass
    let via_module = <dyn CausalLm as Module>::forward(&*ours_model, &x).unwrap();
    let via_module = via_module
        .narrow(1, SEQ - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap();
    assert_eq!(max_diff(&via_module, &ours), 0.0);
}

/// Gemma 3. candle-transformers 0.11.1's gemma3 counts one more key inside the sliding window than
/// transformers does (it hides key j from query i only when i − j > window), scales scores by
/// `head_dim^-½` whatever `query_pre_attn_scalar` says, and its KV cache refuses a prompt of more
/// than one token (a non-contiguous value tensor): so here the window (16) is longer than the row,
/// the scalar equals head_dim, and candle's model is fed one token at a time. The window and the
/// scalar are checked against transformers in `peft_parity.rs`.
#[test]
fn gemma3_with_sandwich_norms_and_two_rope_bases_matches_candle_transformers() {
    let mut v = small("gemma3_text");
    v["head_dim"] = json!(16);
    v["query_pre_attn_scalar"] = json!(16);
    v["sliding_window"] = json!(16);
    v["layer_types"] = json!(["sliding_attention", "full_attention"]);
    v["rope_parameters"] = json!({
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}});
    let cfg = LlamaConfig::from_json(v, Path::new("config.json")).unwrap();
    assert!(cfg.gemma_norms && cfg.qk_norm && cfg.tie_word_embeddings);
    let w = weights(&cfg, 6);
    let ccfg = gemma3::Config {
        attention_bias: false,
        head_dim: 16,
        hidden_activation: candle_nn::Activation::GeluPytorchTanh,
        hidden_size: 32,
        intermediate_size: 40,
        num_attention_heads: 4,
        num_hidden_layers: 2,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 1000000.0,
        rope_local_base_freq: 10000.0,
        vocab_size: 50,
        final_logit_softcapping: None,
        attn_logit_softcapping: None,
        query_pre_attn_scalar: 16,
        sliding_window: 16,
        sliding_window_pattern: 2,
        max_position_embeddings: 64,
    };
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let mut theirs_model = gemma3::Model::new(false, &ccfg, vb).unwrap();
    let x = ids(50);
    let mut theirs = None;
    for i in 0..SEQ {
        let t = x.narrow(1, i, 1).unwrap();
        theirs = Some(theirs_model.forward(&t, i).unwrap().flatten_all().unwrap());
    }
    let theirs = theirs.unwrap();
    let ours = ours_last_logits(&cfg, &w, &x);
    let d = max_diff(&ours, &theirs);
    // Gemma's logits are larger (√hidden-scaled embeddings, (1 + w) norms): relative to them
    let size = theirs
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        d <= 1e-5 * size.max(1.0),
        "gemma3: max abs diff {d} (max logit {size})"
    );
}
