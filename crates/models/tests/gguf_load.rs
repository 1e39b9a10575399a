//! A GGUF written the way llama.cpp's converter writes one (q/k rows permuted for its
//! interleaved RoPE, dims innermost-first) loads into the same model as the safetensors it came
//! from.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lorakit_adapter::Adapters;
use lorakit_models::{build_causal_lm, gguf, BaseModel};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft/llama_gqa/base")
}

/// llama.cpp's `permute`: halves (0..d/2, d/2..d) of each head become interleaved pairs.
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    let d = out / heads;
    w.reshape((heads, 2, d / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.", "token_embd."),
        ("model.norm.", "output_norm."),
        ("lm_head.", "output."),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("post_attention_layernorm", "ffn_norm"),
        ("input_layernorm", "attn_norm"),
        ("model.layers.", "blk."),
    ];
    let mut s = hf.to_string();
    for (a, b) in map {
        s = s.replace(a, b);
    }
    s
}

/// Writes a GGUF v3 with F32 tensors from the fixture's safetensors.
fn write_gguf(path: &Path, permute_qk: bool) {
    let tensors =
        candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut b: Vec<u8> = Vec::new();
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    };
    let meta_u32 = [
        ("llama.block_count", 2u32),
        ("llama.embedding_length", 32),
        ("llama.feed_forward_length", 48),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2),
        ("llama.context_length", 64),
    ];
    let meta_f32 = [
        ("llama.attention.layer_norm_rms_epsilon", 1e-5f32),
        ("llama.rope.freq_base", 10000.0),
    ];
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((names.len() as u64).to_le_bytes());
    b.extend(((1 + meta_u32.len() + meta_f32.len()) as u64).to_le_bytes());
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    for (k, v) in meta_u32 {
        s(&mut b, k);
        b.extend(4u32.to_le_bytes());
        b.extend(v.to_le_bytes());
    }
    for (k, v) in meta_f32 {
        s(&mut b, k);
        b.extend(6u32.to_le_bytes());
        b.extend(v.to_le_bytes());
    }
    let mut data: Vec<u8> = Vec::new();
    for name in &names {
        let mut t = tensors[*name].clone();
        if permute_qk && name.contains("q_proj") {
            t = permute(&t, 4);
        } else if permute_qk && name.contains("k_proj") {
            t = permute(&t, 2);
        }
        s(&mut b, &gguf_name(name));
        let dims: Vec<u64> = t.dims().iter().rev().map(|d| *d as u64).collect();
        b.extend((dims.len() as u32).to_le_bytes());
        for d in &dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(0u32.to_le_bytes()); // F32
        b.extend((data.len() as u64).to_le_bytes());
        for v in t.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            data.extend(v.to_le_bytes());
        }
        while !data.len().is_multiple_of(32) {
            data.push(0);
        }
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(data);
    std::fs::write(path, b).unwrap();
}

fn logits_from_gguf(path: &Path, ids: &Tensor) -> Tensor {
    let (config, tensors) = gguf::load_hf(path, &Device::Cpu).unwrap();
    let config = lorakit_models::registry::parse_config(config, path).unwrap();
    let (model, _) = build_causal_lm(
        &*config,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        Adapters::None,
    )
    .unwrap();
    model.forward(ids, None, false).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    lorakit_ops::compare::max_abs_diff(a, b).unwrap()
}

#[test]
fn a_llama_cpp_gguf_loads_as_the_hugging_face_model() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = Tensor::new(&[[3u32, 17, 42, 5, 88, 1, 60, 9]], &Device::Cpu).unwrap();
    let (hf, _) = BaseModel::open(&fixture())
        .unwrap()
        .load_causal_lm(Adapters::None, DType::F32, &Device::Cpu)
        .unwrap();
    let expected = hf.forward(&ids, None, false).unwrap();

    let path = tmp.path().join("model.gguf");
    write_gguf(&path, true);
    let d = max_diff(&logits_from_gguf(&path, &ids), &expected);
    assert!(d <= 1e-6, "max abs diff {d}");

    // without llama.cpp's permutation the un-permute would scramble q/k: the check has teeth
    let raw = tmp.path().join("unpermuted.gguf");
    write_gguf(&raw, false);
    assert!(max_diff(&logits_from_gguf(&raw, &ids), &expected) > 1e-3);
}
