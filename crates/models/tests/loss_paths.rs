//! The memory-saving training paths give the loss and gradients of the plain one: the chunked
//! output head against full logits + cross-entropy, activation checkpointing (layers
//! recomputed in the backward pass, LoRA dropout on) against one ordinary backward pass, and the
//! device-generic ops the GPU runs (LoRA layer op, recomputing attention) against the CPU's.
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use lorakit_adapter::{Adapters, LoraConfig, StepSeed};
use lorakit_models::{BaseModel, CausalLm};
use lorakit_ops::compare::max_abs_diff;
use std::path::PathBuf;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/peft")
        .join(case)
        .join("base")
}

/// A model with adapters on `targets` whose B matrices are random (at B = 0 the A gradients
/// vanish and a wrong A gradient would go unnoticed).
fn trainable(
    case: &str,
    targets: &[&str],
    dropout: f32,
    seed: &StepSeed,
) -> (Box<dyn CausalLm>, VarMap) {
    trainable_in(DType::F32, case, targets, dropout, seed)
}

fn trainable_in(
    dtype: DType,
    case: &str,
    targets: &[&str],
    dropout: f32,
    seed: &StepSeed,
) -> (Box<dyn CausalLm>, VarMap) {
    let config: LoraConfig = serde_json::from_value(serde_json::json!({
        "r": 4, "lora_alpha": 8, "lora_dropout": dropout, "target_modules": targets
    }))
    .unwrap();
    let varmap = VarMap::new();
    let (model, _) = BaseModel::open(&fixture(case))
        .unwrap()
        .load_causal_lm(
            Adapters::Train {
                config,
                varmap: varmap.clone(),
                seed: 3,
                dropout_seed: seed.clone(),
            },
            dtype,
            &Device::Cpu,
        )
        .unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.contains("lora_B") {
            let r = Tensor::randn(0f32, 0.2, var.shape(), &Device::Cpu).unwrap();
            var.set(&r.to_dtype(var.dtype()).unwrap()).unwrap();
        }
    }
    (model, varmap)
}

/// Two padded rows; every non-pad position but the last predicts the next token.
fn batch() -> (Tensor, Tensor, Tensor, Tensor) {
    let rows = [[3u32, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 0, 0]];
    let lens = [8usize, 6];
    let ids = Tensor::new(&rows, &Device::Cpu).unwrap();
    let mask: Vec<u8> = (0..2)
        .flat_map(|b| (0..8).map(move |t| (t < lens[b]) as u8))
        .collect();
    let (mut pos, mut lab) = (vec![], vec![]);
    for b in 0..2 {
        for t in 0..lens[b] - 1 {
            pos.push((b * 8 + t) as u32);
            lab.push(rows[b][t + 1]);
        }
    }
    let n = pos.len();
    (
        ids,
        Tensor::from_vec(mask, (2, 8), &Device::Cpu).unwrap(),
        Tensor::from_vec(pos, n, &Device::Cpu).unwrap(),
        Tensor::from_vec(lab, n, &Device::Cpu).unwrap(),
    )
}

/// The adapter tensors, in the VarMap's order.
fn var_tensors(varmap: &VarMap) -> Vec<(String, Tensor)> {
    let vars = varmap.data().lock().unwrap();
    assert!(!vars.is_empty());
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

fn largest_grad_difference(vars: &[(String, Tensor)], a: &GradStore, b: &[Option<Tensor>]) -> f32 {
    vars.iter()
        .zip(b)
        .map(|((name, v), gb)| {
            let ga = a.get(v).unwrap_or_else(|| panic!("{name}: no gradient"));
            let gb = gb.as_ref().unwrap_or_else(|| panic!("{name}: no gradient"));
            max_abs_diff(ga, gb).unwrap()
        })
        .fold(0f32, f32::max)
}

#[test]
fn chunked_output_head_gives_the_full_logits_loss_and_gradients() {
    let seed = StepSeed::default();
    let (model, varmap) = trainable("llama_gqa", &["q_proj", "v_proj", "down_proj"], 0.0, &seed);
    let (ids, mask, pos, lab) = batch();
    let full = {
        let logits = model.logits_at(&ids, Some(&mask), true, &pos).unwrap();
        lorakit_ops::fused::cross_entropy(&logits, &lab)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let chunked = model
        .summed_loss(&ids, Some(&mask), true, &pos, &lab)
        .unwrap();
    let (a, b) = (
        full.to_scalar::<f32>().unwrap(),
        chunked.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() < 1e-4 * a.abs(), "{a} vs {b}");
    let vars = var_tensors(&varmap);
    let store = chunked.backward().unwrap();
    let chunked_grads: Vec<_> = vars.iter().map(|(_, v)| store.get(v).cloned()).collect();
    let d = largest_grad_difference(&vars, &full.backward().unwrap(), &chunked_grads);
    assert!(d < 1e-5, "gradients differ by {d}");
}

#[test]
fn checkpointed_backward_gives_the_same_loss_and_gradients_with_dropout_on() {
    for (case, targets) in [
        ("llama_gqa", vec!["q_proj", "k_proj", "o_proj", "up_proj"]),
        // an adapter on the (tied) output head takes the unchunked head path
        ("qwen2_tied", vec!["v_proj", "gate_proj", "lm_head"]),
    ] {
        let seed = StepSeed::default();
        let (model, varmap) = trainable(case, &targets, 0.2, &seed);
        let (ids, mask, pos, lab) = batch();
        seed.set(1, 7, 0);
        let plain = (model
            .summed_loss(&ids, Some(&mask), true, &pos, &lab)
            .unwrap()
            * 0.1)
            .unwrap();
        let plain_grads = plain.backward().unwrap();
        let vars = var_tensors(&varmap);
        let tensors: Vec<Tensor> = vars.iter().map(|(_, t)| t.clone()).collect();
        seed.set(1, 7, 0);
        let (value, grads) = model
            .checkpointed_loss_and_grads(&ids, Some(&mask), &pos, &lab, 0.1, &tensors)
            .unwrap();
        let want = plain.to_scalar::<f32>().unwrap();
        assert!(
            (value - want).abs() < 1e-5 * want.abs(),
            "{case}: {value} vs {want}"
        );
        let d = largest_grad_difference(&vars, &plain_grads, &grads);
        assert!(d < 1e-5, "{case}: gradients differ by {d}");
        // a different dropout draw changes the gradients: the comparison above is not vacuous
        seed.set(1, 8, 0);
        let (_, other) = model
            .checkpointed_loss_and_grads(&ids, Some(&mask), &pos, &lab, 0.1, &tensors)
            .unwrap();
        assert!(largest_grad_difference(&vars, &plain_grads, &other) > 1e-4);
    }
}

/// The ops a GPU runs are device-generic and run on the CPU for dtypes other than f32: here in
/// f64 against the CPU's f32 kernels, with padding and LoRA dropout (the counter-based masks are
/// the same in both), so CI checks the GPU path's arithmetic.
#[test]
fn device_generic_ops_give_the_cpu_ops_loss_and_gradients() {
    let targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let seed = StepSeed::default();
    let (cpu, cpu_vars) = trainable("llama_gqa", &targets, 0.2, &seed);
    let (generic, generic_vars) = trainable_in(DType::F64, "llama_gqa", &targets, 0.2, &seed);
    // the same adapter weights in both
    let a = cpu_vars.data().lock().unwrap();
    for (name, var) in generic_vars.data().lock().unwrap().iter() {
        var.set(&a[name].as_tensor().to_dtype(var.dtype()).unwrap())
            .unwrap();
    }
    drop(a);
    let (ids, mask, pos, lab) = batch();
    let run = |model: &dyn CausalLm, varmap: &VarMap| {
        seed.set(1, 7, 0);
        let loss = model
            .summed_loss(&ids, Some(&mask), true, &pos, &lab)
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut g: Vec<(String, Tensor)> = var_tensors(varmap)
            .into_iter()
            .map(|(n, v)| (n, grads.get(&v).unwrap().to_dtype(DType::F64).unwrap()))
            .collect();
        g.sort_by(|x, y| x.0.cmp(&y.0));
        (
            loss.to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            g,
        )
    };
    let (l1, g1) = run(&*cpu, &cpu_vars);
    let (l2, g2) = run(&*generic, &generic_vars);
    assert!((l1 - l2).abs() < 1e-5 * l1.abs(), "{l1} vs {l2}");
    assert_eq!(g1.len(), 2 * 2 * targets.len());
    for ((n, a), (m, b)) in g1.iter().zip(&g2) {
        assert_eq!(n, m);
        let size = a.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        let err = (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap();
        let (size, err) = (
            size.to_scalar::<f64>().unwrap(),
            err.to_scalar::<f64>().unwrap(),
        );
        assert!(err <= 1e-4 * size, "{n}: {err} of {size}");
    }
    // the dropout draw matters: another step's masks change the gradients
    seed.set(1, 8, 0);
    let other = generic
        .summed_loss(&ids, Some(&mask), true, &pos, &lab)
        .unwrap();
    assert!(
        (other
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            - l2)
            .abs()
            > 1e-6
    );
}
