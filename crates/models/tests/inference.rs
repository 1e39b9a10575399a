//! The inference paths (KV cache, packed prompt + candidates) compute what the plain forward
//! pass computes, on the PEFT fixtures (with an adapter, and with a sliding window).
use candle_core::{DType, Device, Tensor};
use lorakit_adapter::{Adapters, PeftAdapter};
use lorakit_models::{BaseModel, CausalLm};
use std::path::PathBuf;

fn model(case: &str, adapter: &str) -> Box<dyn CausalLm> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/peft")
        .join(case);
    let a = PeftAdapter::load(&dir.join("adapters").join(adapter)).unwrap();
    BaseModel::open(&dir.join("base"))
        .unwrap()
        .load_causal_lm(Adapters::Loaded(a), DType::F32, &Device::Cpu)
        .unwrap()
        .0
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    lorakit_ops::compare::max_abs_diff(a, b).unwrap()
}

fn ids(v: &[u32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    // Gemma 3's sliding layers (window 3) and full layers alternate, each with its own RoPE base
    for (case, adapter) in [
        ("llama_gqa", "all_f32"),
        ("mistral_window", "qv"),
        ("gemma3_text", "all_linear"),
        ("gpt2_conv1d", "all"),
    ] {
        let m = model(case, adapter);
        let seq: Vec<u32> = vec![3, 17, 5, 9, 22, 4, 11, 8, 30, 2];
        let full = m.forward(&ids(&seq), None, false).unwrap();
        let mut cache = m.new_cache();
        // prompt of 4, then 1, 3 and 2 tokens at a time
        let mut parts = Vec::new();
        let mut at = 0;
        for n in [4, 1, 3, 2] {
            parts.push(
                m.forward_cached(&ids(&seq[at..at + n]), &mut cache)
                    .unwrap(),
            );
            at += n;
        }
        assert_eq!(cache.len, seq.len());
        let inc = Tensor::cat(&parts, 1).unwrap();
        let d = max_diff(&inc, &full);
        assert!(d < 1e-5, "{case}: {d}");
    }
}

#[test]
fn packed_candidates_equal_separate_sequences() {
    // Gemma 3: the sliding layers' window (3) counts positions, not places in the packed row
    for (case, adapter) in [
        ("llama_gqa", "all_f32"),
        ("gemma3_text", "all_linear"),
        ("gpt2_conv1d", "all"),
    ] {
        packed_candidates(case, adapter);
    }
}

fn packed_candidates(case: &str, adapter: &str) {
    let m = model(case, adapter);
    let prompt = [3u32, 17, 5, 9];
    let cands: [&[u32]; 3] = [&[22, 4], &[11], &[8, 30, 2]];
    // one row: prompt, then each candidate at positions 4.. seeing the prompt and itself
    let mut row = prompt.to_vec();
    let mut pos: Vec<usize> = (0..prompt.len()).collect();
    let mut seg = vec![0usize; prompt.len()];
    for (k, c) in cands.iter().enumerate() {
        for (i, t) in c.iter().enumerate() {
            row.push(*t);
            pos.push(prompt.len() + i);
            seg.push(k + 1);
        }
    }
    let n = row.len();
    let mut bias = vec![-1e9f32; n * n];
    for i in 0..n {
        for j in 0..=i {
            if seg[j] == 0 || seg[j] == seg[i] {
                bias[i * n + j] = 0.0;
            }
        }
    }
    let bias = Tensor::from_vec(bias, (1, 1, n, n), &Device::Cpu).unwrap();
    let at = Tensor::arange(0u32, n as u32, &Device::Cpu).unwrap();
    let packed = m.logits_packed(&ids(&row), &[pos], &bias, &at).unwrap();
    let mut offset = prompt.len();
    for c in cands {
        let seq: Vec<u32> = prompt.iter().chain(c.iter()).copied().collect();
        let full = m
            .forward(&ids(&seq), None, false)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let d = max_diff(
            &packed.narrow(0, offset, c.len()).unwrap(),
            &full.narrow(0, prompt.len(), c.len()).unwrap(),
        );
        assert!(d < 1e-5, "{case}: {d}");
        let d = max_diff(
            &packed.narrow(0, 0, prompt.len()).unwrap(),
            &full.narrow(0, 0, prompt.len()).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
        offset += c.len();
    }
}

#[test]
fn logits_at_picks_rows_of_the_full_forward() {
    let m = model("llama_gqa", "all_f32");
    let x = Tensor::new(&[[3u32, 17, 5, 9], [22, 4, 11, 8]], &Device::Cpu).unwrap();
    let full = m
        .forward(&x, None, false)
        .unwrap()
        .reshape((8, ()))
        .unwrap();
    let at = Tensor::new(&[6u32, 1, 3], &Device::Cpu).unwrap();
    let rows = m.logits_at(&x, None, false, &at).unwrap();
    assert!(max_diff(&rows, &full.index_select(&at, 0).unwrap()) < 1e-6);
}
