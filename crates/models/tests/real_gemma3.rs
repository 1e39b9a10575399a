//! The real Gemma 3 270M (a Q4_K_M GGUF: Q8_0, Q5_0, Q4_K and Q6_K tensors; `bash
//! scripts/fetch-real.sh`, CI runs it) against transformers reading the same file
//! (tests/fixtures/make_gemma3_fixtures.py --logits): f32 logits on the same ids, and the same
//! greedy continuation through the KV cache.
use candle_core::{DType, Device, Tensor};
use lorakit_adapter::Adapters;
use lorakit_models::BaseModel;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn gguf() -> Option<PathBuf> {
    let cache = std::env::var_os("LORAKIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/lorakit"));
    let file = cache.join("gemma3/gemma-3-270m-q4_k_m.gguf");
    if file.is_file() {
        return Some(file);
    }
    let why = format!(
        "no {}; run `bash scripts/fetch-real.sh` (CI does)",
        file.display()
    );
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true, but {why}"
    );
    eprintln!("SKIPPED: {why}");
    None
}

#[test]
fn gemma3_270m_gguf_logits_and_greedy_text_equal_transformers() {
    let Some(file) = gguf() else { return };
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/real/gemma3_logits.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = fx["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let (model, _) = BaseModel::open(&file)
        .unwrap()
        .load_causal_lm(Adapters::None, DType::F32, &Device::Cpu)
        .unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&x, None, false).unwrap().squeeze(0).unwrap();
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let mut worst = 0f32;
    for (pos, (ours, want)) in rows.iter().zip(fx["rows"].as_array().unwrap()).enumerate() {
        let first: Vec<f32> = want["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        for (a, b) in ours.iter().zip(&first) {
            worst = worst.max((a - b).abs());
        }
        let top = want["top_ids"].as_array().unwrap();
        let top_logits = want["top_logits"].as_array().unwrap();
        for (id, l) in top.iter().zip(top_logits) {
            let (id, l) = (id.as_u64().unwrap() as usize, l.as_f64().unwrap() as f32);
            worst = worst.max((ours[id] - l).abs());
        }
        let argmax = ours
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(argmax as u64, top[0].as_u64().unwrap(), "position {pos}");
    }
    eprintln!("max |lorakit - transformers| over the compared logits: {worst:e}");
    assert!(worst < 1e-4, "logits differ by {worst}");

    // greedy decoding through the KV cache (the sliding layers' window is 512: all in view)
    let mut cache = model.new_cache();
    let mut next = model.forward_cached(&x, &mut cache).unwrap();
    let mut out = Vec::new();
    for _ in 0..8 {
        let last = next.squeeze(0).unwrap();
        let last = last.get(last.dim(0).unwrap() - 1).unwrap();
        let id = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        out.push(id as u64);
        let t = Tensor::new(&[[id]], &Device::Cpu).unwrap();
        next = model.forward_cached(&t, &mut cache).unwrap();
    }
    let want: Vec<u64> = fx["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(out, want);
}
