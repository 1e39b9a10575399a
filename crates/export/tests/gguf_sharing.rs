//! GGUF adapters and merged GGUF models against independent references: PEFT's merged weights
//! (tests/fixtures/make_peft_fixtures.py) for the updates llama.cpp will apply, PEFT's
//! `add_weighted_adapter` for combining (`--combine`), and lorakit's and candle's GGUF readers
//! for what was written. The tiny Llama has 4 attention heads over 2 key/value heads, so the q
//! and k row permutations differ.
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use lorakit_adapter::combine::{combine, Method};
use lorakit_adapter::compare::max_abs_diff;
use lorakit_adapter::PeftAdapter;
use lorakit_export::adapter_gguf::{export, gguf_pairs, import, AdapterDType, Base};
use lorakit_export::gguf_writer::{self, TensorSpec};
use lorakit_export::merged_gguf::{merge_to_gguf, Quantize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn case() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft/llama_gqa")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// llama.cpp's `permute` of q/k rows (written here from its converter, independently of the
/// crate's), and its inverse.
fn permute(w: &Tensor, heads: usize, inverse: bool) -> Tensor {
    let (out, cols) = w.dims2().unwrap();
    let d = out / heads;
    let shape = if inverse {
        (heads, d / 2, 2, cols)
    } else {
        (heads, 2, d / 2, cols)
    };
    w.reshape(shape)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, cols))
        .unwrap()
}

fn heads_of(gguf_name: &str) -> Option<usize> {
    if gguf_name.contains(".attn_q.") {
        Some(4)
    } else if gguf_name.contains(".attn_k.") {
        Some(2)
    } else {
        None
    }
}

fn hf_name(gguf: &str) -> String {
    let (blk, rest) = gguf.strip_prefix("blk.").unwrap().split_once('.').unwrap();
    let part = rest.split('.').next().unwrap();
    let module = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => panic!("unexpected {other}"),
    };
    format!("model.layers.{blk}.{module}")
}

#[test]
fn exported_adapters_apply_peft_s_updates_the_way_llama_cpp_reads_them() {
    let base = Base::open(&case().join("base")).unwrap();
    let base_w = load(&case().join("base/model.safetensors"));
    let t = tempfile::tempdir().unwrap();
    for name in ["all_f32", "rslora_patterns", "subset_bf16"] {
        let adapter = PeftAdapter::load(&case().join("adapters").join(name)).unwrap();
        let file = t.path().join(format!("{name}.gguf"));
        let report = export(&adapter, &base, &file, AdapterDType::F32).unwrap();
        assert_eq!(report.modules, adapter.pairs().len());
        // rsLoRA and both patterns: every module's scale differs from alpha / r somewhere
        assert_eq!(report.folded > 0, name == "rslora_patterns", "{name}");

        let mut f = std::fs::File::open(&file).unwrap();
        let c = Content::read(&mut f).unwrap();
        let s = |k: &str| match &c.metadata[k] {
            Value::String(s) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(
            (s("general.type"), s("adapter.type")),
            ("adapter".into(), "lora".into())
        );
        assert_eq!(s("general.architecture"), "llama");
        let Value::F32(alpha) = c.metadata["adapter.lora.alpha"] else {
            panic!("adapter.lora.alpha must be FLOAT32 (llama.cpp aborts on any other type)");
        };
        assert_eq!(c.tensor_infos.len(), 2 * adapter.pairs().len());

        // llama.cpp's update: alpha / r · B·A with r from B, rows in llama.cpp order; mapped back
        // and compared with PEFT's merge_and_unload() − base
        let merged = load(&case().join(format!("merged_{name}.safetensors")));
        let mut worst = 0f32;
        for (tname, info) in &c.tensor_infos {
            let Some(w) = tname.strip_suffix(".lora_a") else {
                continue;
            };
            let a = info
                .read(&mut f, c.tensor_data_offset, &Device::Cpu)
                .unwrap();
            let a = a.dequantize(&Device::Cpu).unwrap();
            let b = c
                .tensor(&mut f, &format!("{w}.lora_b"), &Device::Cpu)
                .unwrap();
            let b = b.dequantize(&Device::Cpu).unwrap();
            let (r, cols) = a.dims2().unwrap();
            // ggml shapes: lora_a ne = [in, r], lora_b ne = [r, out]
            assert_eq!(info.shape.dims(), &[r, cols]);
            let mut delta = (b.matmul(&a).unwrap() * (alpha as f64 / r as f64)).unwrap();
            if let Some(h) = heads_of(w) {
                delta = permute(&delta, h, true);
            }
            let key = format!("{}.weight", hf_name(w));
            let peft = (&merged[&key] - &base_w[&key]).unwrap();
            worst = worst.max(max_abs_diff(&delta, &peft).unwrap());
        }
        assert!(
            worst < 1e-5,
            "{name}: llama.cpp's update vs PEFT's: {worst:e}"
        );

        // back in: the same updates as the adapter itself
        let back = import(&file, &base).unwrap();
        assert_eq!(back.pairs().len(), adapter.pairs().len());
        for m in adapter.modules() {
            let d = max_abs_diff(
                &back.delta(m).unwrap().unwrap(),
                &adapter.delta(m).unwrap().unwrap(),
            )
            .unwrap();
            assert!(d <= 1e-6, "{name} {m}: {d:e}");
        }
    }
}

#[test]
fn q8_0_adapters_fall_back_to_f16_where_rows_are_not_whole_blocks() {
    let base = Base::open(&case().join("base")).unwrap();
    let adapter = PeftAdapter::load(&case().join("adapters/all_f32")).unwrap();
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("a.gguf");
    let r = export(&adapter, &base, &file, AdapterDType::Q8_0).unwrap();
    // A rows are `in` (32 or 48) long, B rows r = 4: every B and the 48-wide down_proj A fall back
    let mut f = std::fs::File::open(&file).unwrap();
    let c = Content::read(&mut f).unwrap();
    let types: Vec<_> = c.tensor_infos.values().map(|i| i.ggml_dtype).collect();
    let q8 = types.iter().filter(|d| format!("{d:?}") == "Q8_0").count();
    assert_eq!(q8 + r.fell_back, types.len());
    assert!(q8 > 0 && r.fell_back > 0);
    let back = import(&file, &base).unwrap();
    for m in adapter.modules() {
        let want = adapter.delta(m).unwrap().unwrap();
        let got = back.delta(m).unwrap().unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(max_abs_diff(&got, &want).unwrap() < 0.02 * scale, "{m}");
    }
}

#[test]
fn what_llama_cpp_cannot_take_is_refused_by_name() {
    let root = case().join("..");
    let base = Base::open(&case().join("base")).unwrap();
    let dora = PeftAdapter::load(&root.join("variants/adapters/dora")).unwrap();
    let err = gguf_pairs(&dora, &base).unwrap_err().to_string();
    assert!(
        err.to_lowercase().contains("dora")
            && err.contains("llama.cpp")
            && err.contains("merge first"),
        "{err}"
    );
    let tied = Base::open(&root.join("qwen2_tied/base")).unwrap();
    let head = PeftAdapter::load(&root.join("qwen2_tied/adapters/lm_head_tied")).unwrap();
    let err = gguf_pairs(&head, &tied).unwrap_err().to_string();
    assert!(
        err.contains("modules_to_save") && err.contains("lm_head"),
        "{err}"
    );
    // an adapter for another architecture
    let t = tempfile::tempdir().unwrap();
    let qwen = PeftAdapter::load(&root.join("qwen2_tied/adapters/all_linear")).unwrap();
    let file = t.path().join("q.gguf");
    export(&qwen, &tied, &file, AdapterDType::F32).unwrap();
    let err = import(&file, &base).err().unwrap().to_string();
    assert!(
        err.contains("general.architecture") && err.contains("qwen2"),
        "{err}"
    );
}

#[test]
fn combining_equals_peft_add_weighted_adapter() {
    let dir = case().join("adapters");
    let x = PeftAdapter::load(&dir.join("all_f32")).unwrap();
    let y = PeftAdapter::load(&dir.join("rslora_patterns")).unwrap();
    let z = PeftAdapter::load(&dir.join("subset_bf16")).unwrap();
    let want = load(&case().join("combined.safetensors"));
    for (method, other, rank) in [
        (Method::Cat, &y, None),
        (Method::Linear, &z, None),
        (Method::Svd, &y, Some(3)),
    ] {
        let c = combine(&[(&x, 0.7), (other, -0.4)], method, rank, Path::new("c")).unwrap();
        let mut seen = 0;
        for (m, (a, b)) in c.pairs() {
            let key = |w: &str| format!("{}.{m}.lora_{w}", method.name());
            let (pa, pb) = (&want[&key("A")], &want[&key("B")]);
            let d = if method == Method::Svd {
                // singular vectors carry an arbitrary sign: compare the product
                max_abs_diff(&b.matmul(a).unwrap(), &pb.matmul(pa).unwrap()).unwrap()
            } else {
                max_abs_diff(a, pa)
                    .unwrap()
                    .max(max_abs_diff(b, pb).unwrap())
            };
            assert!(
                d <= 1e-6 || (method == Method::Svd && d <= 1e-5),
                "{} {m}: {d:e}",
                method.name()
            );
            seen += 1;
        }
        assert_eq!(
            seen * 2,
            want.keys()
                .filter(|k| k.starts_with(&format!("{}.", method.name())))
                .count()
        );
        // the combined adapter's scale is 1 (r = alpha)
        assert_eq!(c.config.lora_alpha, c.config.r as f64);
    }
}

/// The llama_gqa base as a llama GGUF (F32, q/k rows permuted as llama.cpp's converter writes
/// them), with the metadata lorakit reads.
fn write_gguf_base(path: &Path) {
    let w = load(&case().join("base/model.safetensors"));
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    let gguf_of = |hf: &str| -> String {
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
    };
    let mut tensors = Vec::new();
    let mut specs = Vec::new();
    for n in names {
        let g = gguf_of(n);
        let mut t = w[n].to_dtype(DType::F32).unwrap();
        if let Some(h) = heads_of(&g) {
            t = permute(&t, h, false);
        }
        specs.push(TensorSpec {
            name: g,
            dims: t.dims().to_vec(),
            dtype: candle_core::quantized::GgmlDType::F32,
        });
        tensors.push(t);
    }
    let u = |v: u32| Value::U32(v);
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("llama.block_count".to_string(), u(2)),
        ("llama.embedding_length".to_string(), u(32)),
        ("llama.feed_forward_length".to_string(), u(48)),
        ("llama.attention.head_count".to_string(), u(4)),
        ("llama.attention.head_count_kv".to_string(), u(2)),
        ("llama.context_length".to_string(), u(64)),
        ("llama.rope.freq_base".to_string(), Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".to_string(),
            Value::F32(1e-5),
        ),
    ];
    gguf_writer::write(path, &meta, &specs, |i| {
        gguf_writer::encode(&tensors[i], specs[i].dtype)
    })
    .unwrap();
}

#[test]
fn a_merged_gguf_reads_back_as_peft_s_merged_model() {
    let t = tempfile::tempdir().unwrap();
    let base_file = t.path().join("base.gguf");
    write_gguf_base(&base_file);
    let base = Base::open(&base_file).unwrap();
    let want = load(&case().join("merged_all_f32.safetensors"));
    let adapter = PeftAdapter::load(&case().join("adapters/all_f32")).unwrap();

    // the GGUF base gives the same adapter file as the Hugging Face directory
    let from_gguf = t.path().join("a1.gguf");
    let from_dir = t.path().join("a2.gguf");
    export(&adapter, &base, &from_gguf, AdapterDType::F32).unwrap();
    export(
        &adapter,
        &Base::open(&case().join("base")).unwrap(),
        &from_dir,
        AdapterDType::F32,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(&from_gguf).unwrap(),
        std::fs::read(&from_dir).unwrap()
    );

    for (q, tolerance) in [(Quantize::F32, 1e-5f32), (Quantize::Q8_0, 0.0)] {
        let out = t.path().join(format!("merged-{q:?}.gguf"));
        let r = merge_to_gguf(&adapter, &base, &out, Some(q)).unwrap();
        assert_eq!(r.merged, adapter.pairs().len());
        let (_, got) = lorakit_models::gguf::load_hf(&out, &Device::Cpu).unwrap();
        assert_eq!(got.len(), want.len());
        for (name, w) in &want {
            let g = &got[name];
            let d = max_abs_diff(g, w).unwrap();
            // q8_0: each value within a step of its 32-value block's scale (max/127, the scale
            // itself stored as f16: half a step plus the scale's rounding)
            let bound = if tolerance > 0.0 {
                tolerance
            } else if w.rank() == 1 {
                0.0 // 1-D tensors stay F32
            } else {
                w.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    / 127.0
            };
            assert!(d <= bound.max(1e-6), "{q:?} {name}: {d:e} > {bound:e}");
        }
    }
}

#[test]
fn every_family_round_trips_under_its_llama_cpp_architecture() {
    let trained = case().join("../../trained");
    let t = tempfile::tempdir().unwrap();
    for (fam, arch) in [
        ("gemma3", "gemma3"),
        ("gpt2", "gpt2"),
        ("qwen3", "qwen3"),
        ("phi3", "phi3"),
    ] {
        let base = Base::open(&trained.join(format!("{fam}_base"))).unwrap();
        assert_eq!(base.layout.arch, arch);
        let adapter = PeftAdapter::load(&trained.join(format!("lorakit_{fam}_adapter"))).unwrap();
        let file = t.path().join(format!("{fam}.gguf"));
        export(&adapter, &base, &file, AdapterDType::F32).unwrap();
        let mut f = std::fs::File::open(&file).unwrap();
        let c = Content::read(&mut f).unwrap();
        assert!(matches!(&c.metadata["general.architecture"], Value::String(a) if a == arch));
        // llama.cpp's names for this architecture (GPT-2's fused c_attn is attn_qkv, Phi-3's
        // gate_up_proj is ffn_up)
        let names: Vec<&String> = c.tensor_infos.keys().collect();
        let want = match fam {
            "gpt2" => "blk.0.attn_qkv.weight.lora_a",
            "phi3" => "blk.0.ffn_up.weight.lora_b",
            _ => "blk.0.attn_q.weight.lora_a",
        };
        assert!(c.tensor_infos.contains_key(want), "{fam}: {names:?}");
        let back = import(&file, &base).unwrap();
        assert_eq!(
            back.config.fan_in_fan_out, adapter.config.fan_in_fan_out,
            "{fam}"
        );
        for m in adapter.modules() {
            let d = max_abs_diff(
                &back.delta(m).unwrap().unwrap(),
                &adapter.delta(m).unwrap().unwrap(),
            )
            .unwrap();
            assert!(d <= 1e-6, "{fam} {m}: {d:e}");
        }
    }
}

#[test]
fn broken_gguf_adapters_are_named_errors() {
    let base = Base::open(&case().join("base")).unwrap();
    let t = tempfile::tempdir().unwrap();
    let a = Tensor::ones((4, 32), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::ones((32, 4), DType::F32, &Device::Cpu).unwrap();
    let spec = |name: &str, t: &Tensor| TensorSpec {
        name: name.into(),
        dims: t.dims().to_vec(),
        dtype: candle_core::quantized::GgmlDType::F32,
    };
    let meta = |alpha: Value| {
        vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("general.type".to_string(), Value::String("adapter".into())),
            ("adapter.type".to_string(), Value::String("lora".into())),
            ("adapter.lora.alpha".to_string(), alpha),
        ]
    };
    let write = |name: &str, meta: Vec<(String, Value)>, tensors: Vec<(&str, &Tensor)>| {
        let path = t.path().join(name);
        let specs: Vec<TensorSpec> = tensors.iter().map(|(n, t)| spec(n, t)).collect();
        gguf_writer::write(&path, &meta, &specs, |i| {
            gguf_writer::encode(tensors[i].1, specs[i].dtype)
        })
        .unwrap();
        path
    };
    let err = |path: &Path| import(path, &base).expect_err("refused").to_string();
    // one half of a pair
    let p = write(
        "half.gguf",
        meta(Value::F32(8.0)),
        vec![("blk.0.attn_v.weight.lora_a", &a)],
    );
    let e = err(&p);
    assert!(
        e.contains("blk.0.attn_v.weight.lora_b") && e.contains("both halves"),
        "{e}"
    );
    // a shape that is not the base's (attn_v is [16, 32]: 2 kv heads of 8)
    let p = write(
        "shape.gguf",
        meta(Value::F32(8.0)),
        vec![
            ("blk.0.attn_v.weight.lora_a", &a),
            ("blk.0.attn_v.weight.lora_b", &b),
        ],
    );
    let e = err(&p);
    assert!(
        e.contains("blk.0.attn_v.weight") && e.contains("another base model"),
        "{e}"
    );
    // a tensor that is not LoRA, alpha of the wrong type, a model instead of an adapter
    let p = write(
        "other.gguf",
        meta(Value::F32(8.0)),
        vec![("blk.0.attn_v.weight", &a)],
    );
    assert!(err(&p).contains(".lora_a or .lora_b"));
    let p = write("alpha.gguf", meta(Value::String("8".into())), vec![]);
    assert!(err(&p).contains("adapter.lora.alpha"));
    let mut m = meta(Value::F32(8.0));
    m[1].1 = Value::String("model".into());
    let p = write("model.gguf", m, vec![]);
    assert!(err(&p).contains("general.type"));
    // truncated: the header reader says so before anything is allocated
    let good = t.path().join("good.gguf");
    let adapter = PeftAdapter::load(&case().join("adapters/all_f32")).unwrap();
    export(&adapter, &base, &good, AdapterDType::F32).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = t.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&cut);
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
}
