//! Our forward pass, with PEFT adapters applied unmerged, against logits computed by
//! PyTorch + transformers + PEFT (tests/fixtures/make_peft_fixtures.py).
use candle_core::{DType, Device, Tensor, D};
use lorakit_adapter::{Adapters, PeftAdapter};
use lorakit_models::BaseModel;
use std::collections::HashMap;
use std::path::PathBuf;

fn case(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/peft")
        .join(name)
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(case(name).join("expected.safetensors"), &Device::Cpu).unwrap()
}

/// Max |a - b| over positions where the attention mask is 1.
fn masked_max_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
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

fn logits(case_name: &str, adapter: Option<&str>) -> Tensor {
    let dir = case(case_name);
    let exp = expected(case_name);
    let adapters = match adapter {
        Some(a) => Adapters::Loaded(PeftAdapter::load(&dir.join("adapters").join(a)).unwrap()),
        None => Adapters::None,
    };
    let (model, report) = BaseModel::open(&dir.join("base"))
        .unwrap()
        .load_causal_lm(adapters, DType::F32, &Device::Cpu)
        .unwrap();
    if adapter.is_some() {
        assert!(report.wrapped().count() > 0);
    }
    model
        .forward(&exp["input_ids"], Some(&exp["attention_mask"]), false)
        .unwrap()
}

fn check(case_name: &str, adapter: Option<&str>) {
    let exp = expected(case_name);
    let key = format!("logits_{}", adapter.unwrap_or("base"));
    let ours = logits(case_name, adapter);
    let diff = masked_max_diff(&ours, &exp[&key], &exp["attention_mask"]);
    eprintln!("{case_name}/{key}: max abs diff {diff}");
    assert!(diff <= 1e-5, "{case_name}/{key}: max abs diff {diff}");
    // the adapter must actually change the output
    if adapter.is_some() {
        let base_diff = masked_max_diff(&exp["logits_base"], &exp[&key], &exp["attention_mask"]);
        assert!(
            base_diff > 1e-3,
            "{case_name}/{key}: adapter changes nothing ({base_diff})"
        );
    }
}

#[test]
fn llama_gqa_base_matches_transformers() {
    check("llama_gqa", None);
}

#[test]
fn llama_gqa_all_linear_f32_adapter_matches_peft() {
    check("llama_gqa", Some("all_f32"));
}

#[test]
fn llama_gqa_bf16_subset_with_layers_to_transform_matches_peft() {
    check("llama_gqa", Some("subset_bf16"));
}

#[test]
fn llama_gqa_rslora_regex_rank_and_alpha_patterns_match_peft() {
    check("llama_gqa", Some("rslora_patterns"));
}

#[test]
fn qwen2_tied_with_qkv_bias_and_full_path_targets_matches_peft() {
    check("qwen2_tied", None);
    check("qwen2_tied", Some("all_linear"));
}

#[test]
fn adapter_on_the_tied_output_head_matches_peft() {
    // PEFT saves `lm_head.base_layer.weight` (a copy of the tied embeddings) with such adapters
    check("qwen2_tied", Some("lm_head_tied"));
}

#[test]
fn sharded_llama3_rope_with_bias_and_lm_head_adapter_matches_peft() {
    check("llama3_sharded", None);
    check("llama3_sharded", Some("qv"));
}

#[test]
fn mistral_sliding_window_matches_transformers_and_peft() {
    check("mistral_window", None);
    check("mistral_window", Some("qv"));
}

#[test]
fn qwen3_with_per_head_qk_norm_and_its_own_head_dim_matches_peft() {
    check("qwen3_qk_norm", None);
    check("qwen3_qk_norm", Some("all_linear"));
}

#[test]
fn phi3_fused_projections_with_a_window_match_peft() {
    check("phi3_fused", None);
    check("phi3_fused", Some("all_linear"));
    check("phi3_fused", Some("qkv"));
}

#[test]
fn gemma3_norms_scales_and_sliding_layers_with_their_own_rope_base_match_peft() {
    check("gemma3_text", None);
    check("gemma3_text", Some("all_linear"));
}

#[test]
fn gpt2_conv1d_fused_attention_and_learned_positions_match_peft() {
    check("gpt2_conv1d", None);
    check("gpt2_conv1d", Some("all"));
    check("gpt2_conv1d", Some("attn_only"));
}

/// The multimodal `gemma3` checkpoint: its text model configured under `text_config`, weights
/// under `model.language_model.` (transformers 5) or `language_model.model.` (the original
/// releases), a vision tower beside them that the language model leaves alone.
#[test]
fn gemma3_multimodal_checkpoint_builds_its_language_model() {
    let dir = case("gemma3_text");
    let exp = expected("gemma3_text");
    let text_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("base/config.json")).unwrap()).unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("base/model.safetensors"), &Device::Cpu).unwrap();
    for prefix in ["model.language_model.", "language_model.model."] {
        let tmp = tempfile::tempdir().unwrap();
        let config = serde_json::json!({
            "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": text_config, "vision_config": {"hidden_size": 8}});
        std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
        let mut renamed: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| (k.replacen("model.", prefix, 1), v.clone()))
            .collect();
        renamed.insert(
            "model.vision_tower.patch_embedding.weight".into(),
            Tensor::zeros((8, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&renamed, tmp.path().join("model.safetensors")).unwrap();
        let (model, _) = BaseModel::open(tmp.path())
            .unwrap()
            .load_causal_lm(Adapters::None, DType::F32, &Device::Cpu)
            .unwrap();
        let ours = model
            .forward(&exp["input_ids"], Some(&exp["attention_mask"]), false)
            .unwrap();
        let diff = masked_max_diff(&ours, &exp["logits_base"], &exp["attention_mask"]);
        assert!(diff <= 1e-5, "{prefix}: {diff}");
    }
}
