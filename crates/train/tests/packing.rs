//! Sample packing computes the unpacked model: on every causal architecture (Llama with grouped
//! kv heads, Mistral's sliding window, Qwen2's biases and tied head, a sharded Llama 3, Qwen3's
//! q/k norms, Phi-3's fused projections, Gemma 3's sliding and full layers, GPT-2's learned
//! positions), a data set's eval loss and a batch's gradients are those of one example per row,
//! with and without activation checkpointing; and no token sees another example of its row.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use lorakit_adapter::{Adapters, LoraConfig, StepSeed};
use lorakit_models::{BaseModel, CausalLm};
use lorakit_ops::compare::max_abs_diff;
use lorakit_train::data::{Dataset, Example};
use lorakit_train::eval::evaluate;
use lorakit_train::loss::Batch;
use lorakit_train::packing;
use lorakit_train::task_model::TaskModel;
use std::path::PathBuf;

const CASES: [&str; 8] = [
    "llama_gqa",
    "mistral_window",
    "qwen2_tied",
    "llama3_sharded",
    "qwen3_qk_norm",
    "phi3_fused",
    "gemma3_text",
    "gpt2_conv1d",
];

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/peft")
        .join(case)
        .join("base")
}

/// The fixture with LoRA on every linear layer, B random (at B = 0 a wrong A gradient would
/// vanish unnoticed), no dropout (its masks follow the batch layout).
fn trainable(case: &str) -> (Box<dyn CausalLm>, VarMap) {
    let config: LoraConfig = serde_json::from_value(serde_json::json!({
        "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"
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
                dropout_seed: StepSeed::default(),
            },
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    lorakit_ops::seeded::reseed(11);
    // in name order, so every run draws the same B (a HashMap's order differs per run)
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        if name.contains("lora_B") {
            let r = lorakit_ops::seeded::randn(0f32, 0.2, var.shape(), &Device::Cpu).unwrap();
            var.set(&r).unwrap();
        }
    }
    drop(data);
    (model, varmap)
}

/// Seeded examples of 3..=17 tokens (vocabulary 96), the first token and a few others unscored.
fn examples(n: usize, seed: u64) -> Vec<Example> {
    let mut state = seed;
    let mut next = move |m: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % m
    };
    (0..n)
        .map(|_| {
            let len = 3 + next(15) as usize;
            let ids: Vec<u32> = (0..len).map(|_| 1 + next(95) as u32).collect();
            let targets = (0..len).map(|t| t > 0 && next(5) != 0).collect();
            Example {
                ids,
                targets,
                label: None,
            }
        })
        .collect()
}

fn vars(varmap: &VarMap) -> Vec<Tensor> {
    let data = varmap.data().lock().unwrap();
    let mut named: Vec<_> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.iter().map(|(_, v)| v.as_tensor().clone()).collect()
}

/// `lorakit eval --packing`'s computation: the data set's mean loss is the unpacked one.
#[test]
fn packed_eval_loss_equals_unpacked_on_every_architecture() {
    for case in CASES {
        let (model, _) = trainable(case);
        let model = TaskModel::CausalLm(model);
        let ds = Dataset {
            examples: examples(23, 5),
            ..Default::default()
        };
        let dev = Device::Cpu;
        let plain = evaluate(&model, &ds, 0, 4, None, &dev).unwrap();
        let packed = evaluate(&model, &ds, 0, 2, Some(40), &dev).unwrap();
        assert_eq!(plain.tokens, packed.tokens, "{case}: scored tokens");
        let d = (plain.loss - packed.loss).abs();
        assert!(
            d <= 1e-5,
            "{case}: eval loss {} unpacked, {} packed",
            plain.loss,
            packed.loss
        );
    }
}

/// A packed batch's loss and adapter gradients are the unpacked batch's, and activation
/// checkpointing (layers recomputed in the backward pass) gives the same on packed rows.
#[test]
fn packed_gradients_equal_unpacked_with_and_without_checkpointing() {
    for case in CASES {
        let (model, varmap) = trainable(case);
        let model = TaskModel::CausalLm(model);
        let all = examples(9, 17);
        let refs: Vec<&Example> = all.iter().collect();
        let lengths: Vec<usize> = all.iter().map(|e| e.ids.len()).collect();
        let rows = packing::pack(&lengths, 40);
        assert!(rows.len() < all.len(), "{case}: nothing was packed");
        let rows: Vec<Vec<&Example>> = rows
            .iter()
            .map(|r| r.iter().map(|i| &all[*i]).collect())
            .collect();
        let dev = Device::Cpu;
        let plain = Batch::new(&refs, 0, &dev).unwrap();
        let packed = Batch::packed(&rows, 0, &dev).unwrap();
        assert_eq!(plain.targets, packed.targets);
        assert_eq!(plain.tokens, packed.tokens);
        let vars = vars(&varmap);
        let scale = 1.0 / plain.targets as f64;
        let (l0, g0) = model.loss_and_grads(&plain, scale, false, &vars).unwrap();
        for checkpointing in [false, true] {
            let (l1, g1) = model
                .loss_and_grads(&packed, scale, checkpointing, &vars)
                .unwrap();
            assert!(
                (l0 - l1).abs() <= 1e-5,
                "{case} (checkpointing {checkpointing}): loss {l0} vs {l1}"
            );
            for (a, b) in g0.iter().zip(&g1) {
                let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                let d = max_abs_diff(a, b).unwrap();
                // f32 sums in another order: relative to the gradient's size (Gemma's scaled
                // embeddings and (1 + w) norms make its gradients larger)
                let size = a
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    d <= 1e-4 * size.max(1.0),
                    "{case} (checkpointing {checkpointing}): gradient differs by {d} (max {size})"
                );
            }
        }
    }
}

/// Three examples in one row (the middle one longer than Mistral's window of 4): each one's
/// logits are those of the example alone, and changing the middle one's tokens leaves the
/// others' logits exactly where they were.
#[test]
fn a_token_never_sees_another_example() {
    for case in CASES {
        let (model, _) = trainable(case);
        let parts: [Vec<u32>; 3] = [vec![5, 9, 22], vec![4, 11, 8, 30, 2, 17, 60], vec![7, 7, 1]];
        let row = |parts: &[Vec<u32>; 3]| -> (Tensor, Tensor) {
            let mut ids: Vec<u32> = parts.concat();
            let mut mask: Vec<u32> = parts
                .iter()
                .enumerate()
                .flat_map(|(k, p)| vec![k as u32 + 1; p.len()])
                .collect();
            ids.extend([0, 0]);
            mask.extend([0, 0]);
            let n = ids.len();
            (
                Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap(),
                Tensor::from_vec(mask, (1, n), &Device::Cpu).unwrap(),
            )
        };
        let logits = |parts: &[Vec<u32>; 3]| -> Tensor {
            let (ids, mask) = row(parts);
            model
                .forward(&ids, Some(&mask), false)
                .unwrap()
                .squeeze(0)
                .unwrap()
        };
        let packed = logits(&parts);
        let mut offset = 0;
        for p in &parts {
            let ids = Tensor::new(p.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let alone = model
                .forward(&ids, None, false)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let d = max_abs_diff(&packed.narrow(0, offset, p.len()).unwrap(), &alone).unwrap();
            assert!(d < 1e-5, "{case}: example at {offset} differs by {d}");
            offset += p.len();
        }
        let mut changed = parts.clone();
        changed[1] = vec![90, 3, 3, 41, 12, 6, 50];
        let moved = logits(&changed);
        let rows = |t: &Tensor, at: usize, n: usize| -> Vec<Vec<f32>> {
            t.narrow(0, at, n).unwrap().to_vec2::<f32>().unwrap()
        };
        assert_eq!(
            rows(&packed, 0, 3),
            rows(&moved, 0, 3),
            "{case}: first moved"
        );
        assert_eq!(
            rows(&packed, 10, 3),
            rows(&moved, 10, 3),
            "{case}: third moved"
        );
        assert_ne!(rows(&packed, 3, 7), rows(&moved, 3, 7), "{case}: middle");
    }
}
