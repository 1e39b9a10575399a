//! BERT sequence classification against PEFT's logits (tests/fixtures/make_bert_fixture.py),
//! and the BERT encoder against candle-transformers' `bert` on the same weights (the tiny
//! fixture, and the real all-MiniLM-L6-v2 when `scripts/fetch-real.sh` has run).
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lorakit_adapter::{Adapters, PeftAdapter};
use lorakit_models::bert::BertConfig;
use lorakit_models::BaseModel;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/peft/bert_seq_cls")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    lorakit_ops::compare::max_abs_diff(a, b).unwrap()
}

/// Hidden states at real (unpadded) positions only.
fn masked(h: &Tensor, mask: &Tensor) -> Tensor {
    h.broadcast_mul(&mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap())
        .unwrap()
}

#[test]
fn seq_cls_adapter_matches_peft() {
    let exp = candle_core::safetensors::load(fixture().join("expected.safetensors"), &Device::Cpu)
        .unwrap();
    let adapter = PeftAdapter::load(&fixture().join("adapter")).unwrap();
    let (model, report) = BaseModel::open(&fixture().join("base"))
        .unwrap()
        .load_classifier(Adapters::Loaded(adapter), 3, DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(report.wrapped().count(), 4);
    let (ids, mask) = (&exp["input_ids"], &exp["attention_mask"]);
    let logits = model.forward(ids, mask, false).unwrap();
    let d = max_diff(&logits, &exp["logits"]);
    eprintln!("bert seq_cls logits vs PEFT: {d:.2e}");
    assert!(d < 1e-5, "{d}");
    let h = model.encode(ids, mask, false).unwrap();
    let d = max_diff(&masked(&h, mask), &masked(&exp["hidden_lora"], mask));
    assert!(d < 1e-5, "{d}");
}

#[test]
fn a_bare_encoder_has_no_head_until_an_adapter_brings_one() {
    let exp = candle_core::safetensors::load(fixture().join("expected.safetensors"), &Device::Cpu)
        .unwrap();
    let (model, _) = BaseModel::open(&fixture().join("base"))
        .unwrap()
        .load_classifier(Adapters::None, 3, DType::F32, &Device::Cpu)
        .unwrap();
    let (ids, mask) = (&exp["input_ids"], &exp["attention_mask"]);
    let h = model.encode(ids, mask, false).unwrap();
    assert!(max_diff(&masked(&h, mask), &masked(&exp["hidden_base"], mask)) < 1e-5);
    let e = model.forward(ids, mask, false).err().unwrap().to_string();
    assert!(e.contains("classifier"), "{e}");
}

/// Our encoder against candle-transformers' BertModel on the same directory.
fn check_against_candle(dir: &Path, ids: &Tensor, mask: &Tensor) -> f32 {
    let cfg_text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg: candle_transformers::models::bert::Config = serde_json::from_str(&cfg_text).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let oracle = candle_transformers::models::bert::BertModel::load(vb, &cfg).unwrap();
    let want = oracle
        .forward(ids, &ids.zeros_like().unwrap(), Some(mask))
        .unwrap();
    let (ours, _) = BaseModel::open(dir)
        .unwrap()
        .load_classifier(Adapters::None, 2, DType::F32, &Device::Cpu)
        .unwrap();
    let got = ours.encode(ids, mask, false).unwrap();
    max_diff(&masked(&got, mask), &masked(&want, mask))
}

#[test]
fn encoder_matches_candle_transformers_bert() {
    let exp = candle_core::safetensors::load(fixture().join("expected.safetensors"), &Device::Cpu)
        .unwrap();
    let d = check_against_candle(
        &fixture().join("base"),
        &exp["input_ids"],
        &exp["attention_mask"],
    );
    assert!(d < 1e-5, "{d}");
    assert!(BertConfig::from_file(&fixture().join("base/config.json")).is_ok());
}

#[test]
fn minilm_matches_candle_transformers_bert() {
    let cache = std::env::var_os("LORAKIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/lorakit"));
    let dir = cache.join("minilm");
    if !dir.join("model.safetensors").is_file() {
        let why = format!(
            "{} absent; run `bash scripts/fetch-real.sh` (CI does)",
            dir.display()
        );
        // CI fetches the real models first: there a skip means a broken setup
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true, but {why}"
        );
        eprintln!("SKIPPED: {why}");
        return;
    }
    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.with_padding(None);
    let a = tok
        .encode("A gorgeous, witty, seductive movie.", true)
        .unwrap();
    let b = tok.encode("Dull.", true).unwrap();
    let s = a.len();
    assert!(b.len() < s && a.get_ids()[0] == 101, "[CLS] first");
    let mut ids = a.get_ids().to_vec();
    let mut m = vec![1u32; s];
    ids.extend(b.get_ids());
    ids.extend(vec![0; s - b.len()]);
    m.extend(vec![1; b.len()]);
    m.extend(vec![0; s - b.len()]);
    let ids = Tensor::from_vec(ids, (2, s), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(m, (2, s), &Device::Cpu).unwrap();
    let d = check_against_candle(&dir, &ids, &mask);
    eprintln!("all-MiniLM-L6-v2 vs candle-transformers bert: {d:.2e}");
    assert!(d < 1e-4, "{d}");
}
