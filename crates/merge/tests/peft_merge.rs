//! Our merge against PEFT's `merge_and_unload()` (tests/fixtures/make_peft_fixtures.py).
use candle_core::{DType, Device, Tensor, D};
use lorakit_adapter::{Checkpoint, PeftAdapter};
use lorakit_merge::{merge, MergeOptions, OutDType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/peft")
        .join(case)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    lorakit_adapter::compare::max_abs_diff(a, b).unwrap()
}

fn opts(dtype: OutDType) -> MergeOptions {
    MergeOptions {
        dtype,
        force: false,
    }
}

fn compare_with_peft(case: &str, adapter: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = fixture(case);
    let ad = PeftAdapter::load(&dir.join("adapters").join(adapter)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let summary = merge(&dir.join("base"), &ad, &out, &opts(OutDType::Auto)).unwrap();
    assert!(!summary.merged.is_empty());
    let ours = Checkpoint::open_dir(&out).unwrap();
    let peft: HashMap<String, Tensor> = candle_core::safetensors::load(
        dir.join(format!("merged_{adapter}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let names: Vec<&str> = ours.names().collect();
    assert_eq!(names.len(), peft.len(), "{case}/{adapter}: tensor count");
    for (name, expected) in &peft {
        let got = ours.load(name, &Device::Cpu).unwrap();
        assert_eq!(got.dims(), expected.dims(), "{name}");
        let d = max_diff(&got, expected);
        assert!(d <= 1e-6, "{case}/{adapter}: {name} differs by {d}");
    }
    // every merged tensor really changed, and nothing else did
    let base = Checkpoint::open_dir(&dir.join("base")).unwrap();
    for name in base.names() {
        let changed = max_diff(
            &base.load(name, &Device::Cpu).unwrap(),
            &ours.load(name, &Device::Cpu).unwrap(),
        ) > 0.0;
        assert_eq!(
            changed,
            summary.merged.contains(&name.to_string()),
            "{case}/{adapter}: {name}"
        );
    }
    (tmp, out)
}

#[test]
fn merges_equal_peft_merge_and_unload() {
    compare_with_peft("llama_gqa", "all_f32");
    compare_with_peft("llama_gqa", "subset_bf16");
    compare_with_peft("llama_gqa", "rslora_patterns");
    compare_with_peft("qwen2_tied", "all_linear");
    compare_with_peft("mistral_window", "qv");
    compare_with_peft("qwen3_qk_norm", "all_linear");
    compare_with_peft("phi3_fused", "all_linear");
    compare_with_peft("phi3_fused", "qkv");
    compare_with_peft("gemma3_text", "all_linear");
    // GPT-2's Conv1D weights are stored [in, out]: the update goes in transposed (the
    // attention's c_proj is square, so only the values would show a missing transpose)
    compare_with_peft("gpt2_conv1d", "all");
    compare_with_peft("gpt2_conv1d", "attn_only");
}

#[test]
fn sharded_base_gives_sharded_output_with_index_and_side_files() {
    let (_tmp, out) = compare_with_peft("llama3_sharded", "qv");
    let base = fixture("llama3_sharded").join("base");
    let list = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    // the base's files, and lorakit's mark on the directory it made
    let mut expected = list(&base);
    expected.insert(0, lorakit_adapter::output_guard::MARKER.to_string());
    assert_eq!(list(&out), expected);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let base_index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(base.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["weight_map"], base_index["weight_map"]);
    assert_eq!(
        std::fs::read(out.join("generation_config.json")).unwrap(),
        std::fs::read(base.join("generation_config.json")).unwrap()
    );
}

#[test]
fn bf16_output_is_the_f32_merge_rounded_once() {
    let dir = fixture("llama_gqa");
    let ad = PeftAdapter::load(&dir.join("adapters/all_f32")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    merge(
        &dir.join("base"),
        &ad,
        &out,
        &opts(OutDType::Fixed(DType::BF16)),
    )
    .unwrap();
    let ours = Checkpoint::open_dir(&out).unwrap();
    let peft = candle_core::safetensors::load(dir.join("merged_all_f32.safetensors"), &Device::Cpu)
        .unwrap();
    for (name, expected) in &peft {
        let got = ours.load(name, &Device::Cpu).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        // rounding the f32 reference once gives the same bf16 value (up to the reference's own
        // 1e-7 float noise landing on a rounding boundary: at most one bf16 step)
        let once = expected.to_dtype(DType::BF16).unwrap();
        let step = (expected.abs().unwrap() * (1.0 / 128.0)).unwrap();
        let err = (got.to_dtype(DType::F32).unwrap() - once.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap();
        let excess = (err - step)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(excess <= 1e-12, "{name}");
        let exact = (got
            .to_dtype(DType::F32)
            .unwrap()
            .eq(&once.to_dtype(DType::F32).unwrap())
            .unwrap())
        .to_dtype(DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!(
            exact > 0.99,
            "{name}: only {exact} of values rounded identically"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
}

#[test]
fn lm_head_adapter_on_tied_model_unties_the_head() {
    // qwen2_tied ties lm_head to embed_tokens; an adapter on lm_head must not change the embeddings.
    let dir = fixture("qwen2_tied");
    let tmp = tempfile::tempdir().unwrap();
    let adir = tmp.path().join("adapter");
    let dev = Device::Cpu;
    let config: lorakit_adapter::LoraConfig = serde_json::from_value(serde_json::json!({
        "r": 2, "lora_alpha": 4, "target_modules": ["lm_head", "q_proj"]}))
    .unwrap();
    let varmap = candle_nn::VarMap::new();
    let (_, report) = lorakit_models::BaseModel::open(&dir.join("base"))
        .unwrap()
        .load_causal_lm(
            lorakit_adapter::Adapters::Train {
                config: config.clone(),
                varmap: varmap.clone(),
                seed: 3,
                dropout_seed: Default::default(),
            },
            DType::F32,
            &dev,
        )
        .unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.contains("lora_B") {
            var.set(&(Tensor::randn(0f32, 0.3, var.shape(), &dev).unwrap()))
                .unwrap();
        }
    }
    lorakit_adapter::save_adapter(
        &adir,
        &config,
        &report.trained_modules(&varmap).unwrap(),
        &HashMap::new(),
    )
    .unwrap();
    let ad = PeftAdapter::load(&adir).unwrap();
    let out = tmp.path().join("merged");
    let summary = merge(&dir.join("base"), &ad, &out, &opts(OutDType::Auto)).unwrap();
    assert_eq!(summary.untied.as_deref(), Some("lm_head.weight"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], false);
    let base = Checkpoint::open_dir(&dir.join("base")).unwrap();
    let ours = Checkpoint::open_dir(&out).unwrap();
    let embed = "model.embed_tokens.weight";
    assert_eq!(
        max_diff(
            &base.load(embed, &dev).unwrap(),
            &ours.load(embed, &dev).unwrap()
        ),
        0.0
    );

    // the merged model (untied) computes what the base + adapter computes
    let ids = Tensor::new(&[[4u32, 8, 15, 16, 23, 42]], &dev).unwrap();
    let (with_adapter, _) = lorakit_models::BaseModel::open(&dir.join("base"))
        .unwrap()
        .load_causal_lm(
            lorakit_adapter::Adapters::Loaded(PeftAdapter::load(&adir).unwrap()),
            DType::F32,
            &dev,
        )
        .unwrap();
    let (merged, _) = lorakit_models::BaseModel::open(&out)
        .unwrap()
        .load_causal_lm(lorakit_adapter::Adapters::None, DType::F32, &dev)
        .unwrap();
    let d = max_diff(
        &with_adapter.forward(&ids, None, false).unwrap(),
        &merged.forward(&ids, None, false).unwrap(),
    );
    assert!(d < 1e-5, "{d}");
}

#[test]
fn refuses_to_overwrite_and_leaves_nothing_on_error() {
    let dir = fixture("llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let ad = PeftAdapter::load(&dir.join("adapters/all_f32")).unwrap();
    let err = merge(&dir.join("base"), &ad, &out, &opts(OutDType::Auto))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");

    // an adapter whose A does not fit the base layer: shapes named, no output written
    let other = fixture("mistral_window");
    let bad_dims = Tensor::randn(0f32, 1., (4, 20), &Device::Cpu).unwrap();
    let bad = tmp.path().join("bad_adapter");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(
        other.join("adapters/qv/adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let mut map = HashMap::new();
    map.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
        bad_dims,
    );
    map.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(),
        Tensor::zeros((32, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&map, bad.join("adapter_model.safetensors")).unwrap();
    let ad = PeftAdapter::load(&bad).unwrap();
    let out3 = tmp.path().join("out3");
    let err = merge(&dir.join("base"), &ad, &out3, &opts(OutDType::Auto))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("q_proj.lora_A.weight") && err.contains("[4, 32]") && err.contains("[4, 20]"),
        "{err}"
    );
    assert!(!out3.exists());
    let mut leftovers: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    leftovers.sort();
    assert_eq!(
        leftovers,
        vec!["bad_adapter", "out"],
        "a temporary directory was left behind"
    );

    // a module the base does not have
    let missing = tmp.path().join("missing_adapter");
    std::fs::create_dir(&missing).unwrap();
    std::fs::copy(
        other.join("adapters/qv/adapter_config.json"),
        missing.join("adapter_config.json"),
    )
    .unwrap();
    let mut map = HashMap::new();
    map.insert(
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight".to_string(),
        Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    map.insert(
        "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight".to_string(),
        Tensor::zeros((32, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&map, missing.join("adapter_model.safetensors")).unwrap();
    let err = merge(
        &dir.join("base"),
        &PeftAdapter::load(&missing).unwrap(),
        &out3,
        &opts(OutDType::Auto),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("model.layers.9.self_attn.q_proj") && err.contains("another base"),
        "{err}"
    );
    assert!(!out3.exists());
}

#[test]
fn merging_a_tied_head_adapter_matches_peft_unmerged_logits() {
    // PEFT's own merge would change the shared embeddings too; ours unties the head, so the merged
    // model computes exactly what PEFT computes with the adapter unmerged.
    let dir = fixture("qwen2_tied");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let s = merge(
        &dir.join("base"),
        &PeftAdapter::load(&dir.join("adapters/lm_head_tied")).unwrap(),
        &out,
        &opts(OutDType::Auto),
    )
    .unwrap();
    assert_eq!(s.untied.as_deref(), Some("lm_head.weight"));
    let exp =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let (model, _) = lorakit_models::BaseModel::open(&out)
        .unwrap()
        .load_causal_lm(lorakit_adapter::Adapters::None, DType::F32, &Device::Cpu)
        .unwrap();
    let logits = model
        .forward(&exp["input_ids"], Some(&exp["attention_mask"]), false)
        .unwrap();
    let mask = exp["attention_mask"]
        .to_dtype(DType::F32)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    let d = (logits - &exp["logits_lm_head_tied"])
        .unwrap()
        .abs()
        .unwrap()
        .broadcast_mul(&mask)
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(D::Minus1)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d <= 1e-5, "{d}");
}

#[test]
fn refuses_to_write_infinite_weights() {
    let dir = fixture("llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let ad = tmp.path().join("huge");
    std::fs::create_dir(&ad).unwrap();
    std::fs::copy(
        dir.join("adapters/all_f32/adapter_config.json"),
        ad.join("adapter_config.json"),
    )
    .unwrap();
    let mut map = candle_core::safetensors::load(
        dir.join("adapters/all_f32/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for t in map.values_mut() {
        *t = (t.ones_like().unwrap() * 1e30).unwrap(); // finite, but B·A overflows f32
    }
    candle_core::safetensors::save(&map, ad.join("adapter_model.safetensors")).unwrap();
    let out = tmp.path().join("out");
    let err = merge(
        &dir.join("base"),
        &PeftAdapter::load(&ad).unwrap(),
        &out,
        &opts(OutDType::Auto),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("NaN or infinite") && err.contains(".weight"),
        "{err}"
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "temporary output left behind"
    );
}
