//! QLoRA: a base whose frozen linear weights are held in GGML blocks computes what the same
//! model computes with those weights dequantized — loss, adapter gradients (through the
//! checkpointed backward pass too), logits at the last position for generation — for every GGML
//! type a base may be kept in. Both sides use the very same dequantized values, so they differ
//! only by f32 summation order (the kept path reads W rows in its matmul, the dense path a
//! transposed copy): relative 1e-5 is the bound asserted.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use lorakit_adapter::{Adapters, BuildReport, LoraConfig, StepSeed};
use lorakit_models::{BaseModel, CausalLm, Quantization};
use lorakit_ops::compare::max_rel_diff;
use lorakit_ops::quantized::KEPT_TYPES;
use std::collections::HashMap;
use std::path::Path;

const HIDDEN: usize = 256; // whole blocks for the K-quants (256)
const INTER: usize = 512;
const VOCAB: usize = 64;

/// A two-layer GQA Llama (4 heads of 64 over 2 kv heads, untied head) with seeded weights.
fn weights() -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut w = HashMap::new();
    let mut put = |name: &str, shape: &[usize], std: f32| {
        let t = lorakit_ops::seeded::randn(0f32, std, shape, &dev).unwrap();
        w.insert(name.to_string(), t);
    };
    put("model.embed_tokens.weight", &[VOCAB, HIDDEN], 1.0);
    put("lm_head.weight", &[VOCAB, HIDDEN], 0.06);
    put("model.norm.weight", &[HIDDEN], 0.1);
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        put(&format!("{p}.input_layernorm.weight"), &[HIDDEN], 0.1);
        put(
            &format!("{p}.post_attention_layernorm.weight"),
            &[HIDDEN],
            0.1,
        );
        for (m, out, inp) in [
            ("self_attn.q_proj", HIDDEN, HIDDEN),
            ("self_attn.k_proj", 128, HIDDEN),
            ("self_attn.v_proj", 128, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HIDDEN),
            ("mlp.gate_proj", INTER, HIDDEN),
            ("mlp.up_proj", INTER, HIDDEN),
            ("mlp.down_proj", HIDDEN, INTER),
        ] {
            put(&format!("{p}.{m}.weight"), &[out, inp], 0.06);
        }
    }
    // norms near 1
    for (k, t) in w.iter_mut() {
        if k.ends_with("norm.weight") {
            *t = (t.clone() + 1.0).unwrap();
        }
    }
    w
}

fn is_linear(name: &str) -> bool {
    name.contains("_proj") || name.starts_with("lm_head")
}

/// The dense twin of `w`: every linear weight replaced by its quantized-then-dequantized values.
fn dense_twin(w: &HashMap<String, Tensor>, ty: GgmlDType) -> HashMap<String, Tensor> {
    w.iter()
        .map(|(k, t)| {
            let t = if is_linear(k) {
                QTensor::quantize(t, ty)
                    .unwrap()
                    .dequantize(&Device::Cpu)
                    .unwrap()
            } else {
                t.clone()
            };
            (k.clone(), t)
        })
        .collect()
}

fn write_model(dir: &Path, w: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": false, "hidden_act": "silu",
        "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(w, dir.join("model.safetensors")).unwrap();
}

fn train(dir: &Path, quantization: Quantization) -> (Box<dyn CausalLm>, VarMap, BuildReport) {
    train_with(dir, quantization, serde_json::json!({})).unwrap()
}

/// A trainable model with LoRA r 4 on every projection (`extra` adds config keys).
fn train_with(
    dir: &Path,
    quantization: Quantization,
    extra: serde_json::Value,
) -> Result<(Box<dyn CausalLm>, VarMap, BuildReport), lorakit_models::ModelError> {
    let mut json = serde_json::json!({
        "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"
    });
    for (k, v) in extra.as_object().unwrap() {
        json[k] = v.clone();
    }
    let config: LoraConfig = serde_json::from_value(json).unwrap();
    let varmap = VarMap::new();
    let (model, report) = BaseModel::open(dir)
        .unwrap()
        .with_quantization(quantization)
        .load_causal_lm(
            Adapters::Train {
                config,
                varmap: varmap.clone(),
                seed: 5,
                dropout_seed: StepSeed::default(),
            },
            DType::F32,
            &Device::Cpu,
        )?;
    // B random (the same draw on both sides): at B = 0 the A gradients vanish
    lorakit_ops::seeded::reseed(23);
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        if name.contains("lora_B") {
            let var = &data[name];
            let r = lorakit_ops::seeded::randn(0f32, 0.3, var.shape(), &Device::Cpu).unwrap();
            var.set(&r).unwrap();
        }
    }
    drop(data);
    Ok((model, varmap, report))
}

#[test]
fn a_quantized_base_computes_the_dequantized_model_for_every_kept_type() {
    let tmp = tempfile::tempdir().unwrap();
    let w = weights();
    let source = tmp.path().join("source");
    write_model(&source, &w);
    let ids = Tensor::new(
        &[[3u32, 17, 5, 9, 22, 4, 11, 8], [1, 2, 3, 4, 5, 6, 7, 8]],
        &Device::Cpu,
    )
    .unwrap();
    let positions = Tensor::new(&[0u32, 2, 3, 5, 6, 8, 11, 14], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[17u32, 9, 22, 11, 8, 3, 4, 7], &Device::Cpu).unwrap();
    for &ty in KEPT_TYPES {
        let dense_dir = tmp.path().join(format!("{ty:?}"));
        write_model(&dense_dir, &dense_twin(&w, ty));
        let (kept, kvars, report) = train(
            &source,
            Quantization {
                keep: true,
                quantize: Some(ty),
            },
        );
        let (dense, dvars, dense_report) = train(&dense_dir, Quantization::default());
        // all 14 projections and the head are held in blocks; the dense twin holds none
        assert_eq!(report.quantized.len(), 15, "{ty:?}");
        assert!(report.quantized.iter().all(|(_, t, _)| *t == ty));
        assert!(dense_report.quantized.is_empty());
        let held: usize = report.quantized.iter().map(|(_, _, b)| b).sum();
        let f32_bytes: usize = w
            .iter()
            .filter(|(k, _)| is_linear(k))
            .map(|(_, t)| 4 * t.elem_count())
            .sum();
        assert!(
            held * 3 < f32_bytes,
            "{ty:?}: {held} bytes held vs {f32_bytes} in f32"
        );

        let vars = |m: &VarMap| -> Vec<(String, Tensor)> {
            let d = m.data().lock().unwrap();
            let mut v: Vec<(String, Tensor)> = d
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let (kv, dv) = (vars(&kvars), vars(&dvars));
        assert_eq!(kv.len(), 28); // A and B of the 14 projections (all-linear leaves the head out)
                                  // the plain loss and its gradients
        let lk = kept
            .summed_loss(&ids, None, true, &positions, &labels)
            .unwrap();
        let ld = dense
            .summed_loss(&ids, None, true, &positions, &labels)
            .unwrap();
        let mut worst = max_rel_diff(&lk, &ld).unwrap();
        assert!(worst < 1e-5, "{ty:?} loss {lk} vs {ld}");
        let (gk, gd) = (lk.backward().unwrap(), ld.backward().unwrap());
        for ((name, a), (_, b)) in kv.iter().zip(&dv) {
            let r = max_rel_diff(gk.get(a).unwrap(), gd.get(b).unwrap()).unwrap();
            assert!(r < 1e-5, "{ty:?} d{name}: {r}");
            worst = worst.max(r);
        }
        eprintln!("{ty:?}: largest relative difference, loss and gradients: {worst:.1e}");
        // the checkpointed backward pass the trainer runs
        let ts = |v: &[(String, Tensor)]| v.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>();
        let (ck, gck) = kept
            .checkpointed_loss_and_grads(&ids, None, &positions, &labels, 0.5, &ts(&kv))
            .unwrap();
        let (cd, gcd) = dense
            .checkpointed_loss_and_grads(&ids, None, &positions, &labels, 0.5, &ts(&dv))
            .unwrap();
        assert!(((ck - cd) / cd).abs() < 1e-5, "{ty:?} {ck} vs {cd}");
        for (a, b) in gck.iter().zip(&gcd) {
            assert!(
                max_rel_diff(a.as_ref().unwrap(), b.as_ref().unwrap()).unwrap() < 1e-5,
                "{ty:?}"
            );
        }
        // generation: one token at a time through the cache
        let (mut c1, mut c2) = (kept.new_cache(), dense.new_cache());
        let one = ids.narrow(0, 0, 1).unwrap();
        let a = kept.forward_cached(&one, &mut c1).unwrap();
        let b = dense.forward_cached(&one, &mut c2).unwrap();
        assert!(max_rel_diff(&a, &b).unwrap() < 1e-5, "{ty:?}");
    }
}

/// The load-time quantization leaves rows that are not whole blocks dense, and `keep: false`
/// (a safetensors base has nothing stored quantized) changes nothing.
#[test]
fn rows_that_are_not_whole_blocks_stay_dense() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_model(&dir, &weights());
    // Q4_K blocks are 256 values: down_proj's 512 inputs fit, a 256-wide row fits too, so all
    // are held; with Q8_0 (32) likewise. A model with 48 inputs would keep that row dense:
    // the fixture llama_gqa (hidden 32, intermediate 48).
    let gqa =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft/llama_gqa/base");
    let (_, _, report) = train(
        &gqa,
        Quantization {
            keep: true,
            quantize: Some(GgmlDType::Q8_0),
        },
    );
    let names: Vec<&str> = report
        .quantized
        .iter()
        .map(|(n, _, _)| n.as_str())
        .collect();
    assert_eq!(names.len(), 2 * 6 + 1, "{names:?}"); // all but the two down_proj (48 inputs)
    assert!(names.iter().all(|n| !n.contains("down_proj")));
    let (_, _, plain) = train(
        &dir,
        Quantization {
            keep: false,
            quantize: None,
        },
    );
    assert!(plain.quantized.is_empty());
}

/// DoRA runs on a kept base (its weight norm dequantizes once) and equals DoRA on the dense twin;
/// an initialisation that rewrites the base weight (PiSSA) is refused by name.
#[test]
fn dora_runs_on_a_kept_base_and_pissa_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let w = weights();
    let source = tmp.path().join("source");
    write_model(&source, &w);
    let ty = GgmlDType::Q4K;
    let dense_dir = tmp.path().join("twin");
    write_model(&dense_dir, &dense_twin(&w, ty));
    let kept = Quantization {
        keep: true,
        quantize: Some(ty),
    };
    let dora = serde_json::json!({"use_dora": true});
    let (km, kv, report) = train_with(&source, kept, dora.clone()).unwrap();
    let (dm, dv, _) = train_with(&dense_dir, Quantization::default(), dora).unwrap();
    assert_eq!(report.quantized.len(), 15);
    let ids = Tensor::new(&[[3u32, 17, 5, 9, 22, 4]], &Device::Cpu).unwrap();
    let positions = Tensor::new(&[0u32, 1, 2, 3, 4], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[17u32, 5, 9, 22, 4], &Device::Cpu).unwrap();
    let lk = km
        .summed_loss(&ids, None, true, &positions, &labels)
        .unwrap();
    let ld = dm
        .summed_loss(&ids, None, true, &positions, &labels)
        .unwrap();
    assert!(max_rel_diff(&lk, &ld).unwrap() < 1e-5, "{lk} vs {ld}");
    let (gk, gd) = (lk.backward().unwrap(), ld.backward().unwrap());
    let (kd, dd) = (kv.data().lock().unwrap(), dv.data().lock().unwrap());
    let mut checked = 0;
    for (name, var) in kd.iter() {
        if let (Some(a), Some(b)) = (gk.get(var.as_tensor()), gd.get(dd[name].as_tensor())) {
            assert!(max_rel_diff(a, b).unwrap() < 1e-5, "d{name}");
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        14 * 3,
        "A, B and the magnitude of every projection"
    );
    drop((kd, dd));
    let err = train_with(
        &source,
        kept,
        serde_json::json!({"init_lora_weights": "pissa"}),
    )
    .err()
    .expect("PiSSA on a kept base is refused")
    .to_string();
    assert!(err.contains("model.quantized: dequantize"), "{err}");
}
