//! The CUDA kernels (kernels/fused.cu) against the CPU kernels: values and gradients of every
//! fused op (and of the recomputing attention, which runs the attention-probability kernels)
//! in f32 and bf16, and a whole model's loss and adapter gradients. Built only with
//! `--features cuda`; without a GPU each test says SKIPPED and passes. On the GPU machine (no
//! Rust there): build here with `cargo test --release --features cuda -p lorakit-models --test
//! cuda_kernels --no-run`, carry the printed binary, run it there.
#![cfg(feature = "cuda")]
use candle_core::{DType, Device, Result, Tensor, Var};
use lorakit_ops::attention::recompute::attention_recompute;
use lorakit_ops::compare::max_abs_diff;
use lorakit_ops::fused;

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("SKIPPED: no CUDA device ({e})");
            None
        }
    }
}

/// `f` on CPU f32 and on `dev` in `dtype` from the same inputs: outputs and the inputs'
/// gradients (under the same random upstream gradient) agree within `tol` (relative to 1).
fn same_on_gpu(
    dev: &Device,
    dtype: DType,
    inputs: &[Tensor],
    grads_for: usize,
    tol: f32,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    // float inputs become variables (gradients wanted); labels stay plain tensors
    let leaf = |t: Tensor| -> Result<Tensor> {
        if t.dtype().is_float() {
            Ok(Var::from_tensor(&t)?.as_tensor().clone())
        } else {
            Ok(t)
        }
    };
    let cpu: Vec<Tensor> = inputs
        .iter()
        .map(|t| leaf(t.clone()))
        .collect::<Result<_>>()?;
    let gpu: Vec<Tensor> = inputs
        .iter()
        .map(|t| {
            let t = if t.dtype() == DType::F32 {
                t.to_dtype(dtype)?
            } else {
                t.clone()
            };
            leaf(t.to_device(dev)?)
        })
        .collect::<Result<_>>()?;
    let a = f(&cpu)?;
    let b = f(&gpu)?;
    let b_cpu = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let d = max_abs_diff(&a, &b_cpu)?;
    assert!(d < tol, "{dtype:?}: values differ by {d}");
    let up = lorakit_ops::seeded::randn(0f32, 1., a.shape(), &Device::Cpu)?;
    let ga = (a * &up)?.sum_all()?.backward()?;
    let up_gpu = up.to_dtype(b.dtype())?.to_device(dev)?;
    let gb = (b * up_gpu)?.sum_all()?.backward()?;
    for (i, (vc, vg)) in cpu.iter().zip(&gpu).enumerate().take(grads_for) {
        let x = ga.get(vc).expect("cpu gradient");
        let y = gb
            .get(vg)
            .expect("gpu gradient")
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        let d = max_abs_diff(x, &y)?;
        assert!(d < tol * 4.0, "{dtype:?}: gradient {i} differs by {d}");
    }
    Ok(())
}

#[test]
fn fused_ops_on_cuda_match_the_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let cpu = Device::Cpu;
    let x = lorakit_ops::seeded::randn(0f32, 1., (2, 4, 6, 64), &cpu)?;
    let w = lorakit_ops::seeded::randn(1f32, 0.2, 64, &cpu)?;
    let cos = lorakit_ops::seeded::randn(0f32, 1., (6, 32), &cpu)?;
    let sin = lorakit_ops::seeded::randn(0f32, 1., (6, 32), &cpu)?;
    let logits = lorakit_ops::seeded::randn(0f32, 3., (7, 3001), &cpu)?;
    let labels = Tensor::new(&[0u32, 5, 3000, 17, 17, 42, 2999], &cpu)?;
    // attention: 4 query heads over 2 kv heads, causal, row 1 with a padded first key
    let (q, kv) = (
        x.clone(),
        lorakit_ops::seeded::randn(0f32, 1., (2, 2, 6, 64), &cpu)?,
    );
    let mut mask = vec![0f32; 2 * 6 * 6];
    for (i, m) in mask.iter_mut().enumerate() {
        let (r, qi, kj) = (i / 36, (i / 6) % 6, i % 6);
        if kj > qi || (r == 1 && kj == 0 && qi > 0) {
            *m = -1e9;
        }
    }
    let bias_cpu = Tensor::from_vec(mask, (2, 1, 6, 6), &cpu)?;
    let bias_gpu = bias_cpu.to_device(&dev)?;
    // LoRA dropout: the same counter-based mask on both devices, and as its own gradient
    let step = lorakit_adapter::StepSeed::default();
    step.set(1, 2, 3);
    let dropout = lorakit_ops::dropout::Dropout::new(0.2, "layers.0.q_proj", step);
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 6e-2)] {
        same_on_gpu(&dev, dtype, std::slice::from_ref(&x), 1, tol, |t| {
            dropout.apply(&t[0])
        })?;
        same_on_gpu(
            &dev,
            dtype,
            &[q.clone(), kv.clone(), kv.cos()?],
            3,
            tol,
            |t| {
                let bias = if t[0].device().is_cpu() {
                    &bias_cpu
                } else {
                    &bias_gpu
                };
                attention_recompute(&t[0], &t[1], &t[2], bias)
            },
        )?;
        same_on_gpu(&dev, dtype, &[x.clone(), w.clone()], 1, tol, |t| {
            fused::try_rms_norm(&t[0], &t[1], 1e-5).expect("fused rms_norm")
        })?;
        same_on_gpu(&dev, dtype, &[x.clone(), x.sin()?], 2, tol, |t| {
            fused::swiglu(&t[0], &t[1])
        })?;
        same_on_gpu(
            &dev,
            dtype,
            &[x.clone(), cos.clone(), sin.clone()],
            1,
            tol,
            |t| fused::try_rope(&t[0], &t[1], &t[2]).expect("fused rope"),
        )?;
    }
    // cross-entropy takes f32 logits
    same_on_gpu(
        &dev,
        DType::F32,
        &[logits.clone(), labels.clone()],
        1,
        1e-4,
        |t| fused::cross_entropy(&t[0], &t[1]),
    )?;
    let scale = lorakit_ops::seeded::randn(0f32, 1., 7, &cpu)?;
    let want = fused::cross_entropy_grad(&logits, &labels, &scale)?;
    let got = fused::cross_entropy_grad(
        &logits.to_device(&dev)?,
        &labels.to_device(&dev)?,
        &scale.to_device(&dev)?,
    )?
    .to_device(&cpu)?;
    assert!(max_abs_diff(&want, &got)? < 1e-5);
    Ok(())
}

/// A tiny GQA Llama with LoRA (dropout 0.1) on every linear layer, on CUDA in f32 and bf16 (the
/// fast paths there: fused kernels, the recomputing attention and LoRA ops, the dropout kernel),
/// against the CPU in f32: the counter-based dropout masks are the same on both devices.
#[test]
fn a_model_on_cuda_gives_the_cpu_loss_and_adapter_gradients() -> Result<()> {
    use candle_nn::VarMap;
    use lorakit_adapter::{Adapters, LoraConfig};
    use lorakit_models::BaseModel;
    let Some(dev) = gpu() else { return Ok(()) };
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/peft/llama_gqa/base");
    let run = |device: &Device, dtype: DType| -> Result<(f32, Vec<(String, Tensor)>)> {
        let config: LoraConfig = serde_json::from_value(serde_json::json!({
            "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.1
        }))
        .unwrap();
        let varmap = VarMap::new();
        let (model, _) = BaseModel::open(&dir)
            .unwrap()
            .load_causal_lm(
                Adapters::Train {
                    config,
                    varmap: varmap.clone(),
                    seed: 3,
                    dropout_seed: Default::default(),
                },
                dtype,
                device,
            )
            .unwrap();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.contains("lora_B") {
                let r = Tensor::ones(var.shape(), DType::F32, device)?.affine(0.01, 0.0)?;
                var.set(&r)?;
            }
        }
        let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], device)?;
        let pos = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 6], device)?;
        let lab = Tensor::new(&[1u32, 4, 1, 5, 9, 2, 6], device)?;
        let loss = model
            .summed_loss(&ids, None, true, &pos, &lab)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let grads = loss.backward()?;
        let vars = varmap.data().lock().unwrap();
        let mut g: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, v)| {
                let g = grads.get(v.as_tensor()).expect("gradient");
                let g = g
                    .to_dtype(DType::F32)
                    .and_then(|g| g.to_device(&Device::Cpu));
                (n.clone(), g.unwrap())
            })
            .collect();
        // each VarMap hashes its names its own way: compare by name
        g.sort_by(|a, b| a.0.cmp(&b.0));
        let loss = loss.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        Ok((loss.to_scalar::<f32>()?, g))
    };
    let (l_cpu, g_cpu) = run(&Device::Cpu, DType::F32)?;
    // f32: the same numbers up to summation order; bf16: within bf16's 8 bits
    for (dtype, loss_tol, grad_tol) in [(DType::F32, 1e-4, 1e-4), (DType::BF16, 1e-2, 5e-2)] {
        let (l_gpu, g_gpu) = run(&dev, dtype)?;
        assert!(
            (l_cpu - l_gpu).abs() < loss_tol * l_cpu.abs(),
            "{dtype:?}: loss {l_cpu} vs {l_gpu}"
        );
        assert_eq!(g_cpu.len(), g_gpu.len());
        for ((n, a), (m, b)) in g_cpu.iter().zip(&g_gpu) {
            assert_eq!(n, m);
            // relative to the gradient's size
            let size = a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            let err = (a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            println!("{dtype:?} {n}: relative error {}", err / size);
            assert!(err <= grad_tol * size, "{dtype:?} {n}: {err} of {size}");
        }
    }
    Ok(())
}

/// The fused AdamW kernel against the update written out in f64, over three steps with weight
/// decay; parameter and both moments are updated in place.
#[test]
fn fused_adamw_on_cuda_matches_the_update_rule() -> Result<()> {
    use lorakit_ops::{adamw_step, AdamWStep};
    let Some(dev) = gpu() else { return Ok(()) };
    let n = 1000;
    let p0: Vec<f32> = lorakit_ops::seeded::randn(0f32, 1., n, &Device::Cpu)?.to_vec1()?;
    let (p, m, v) = (
        Tensor::new(p0.as_slice(), &dev)?,
        Tensor::zeros(n, DType::F32, &dev)?,
        Tensor::zeros(n, DType::F32, &dev)?,
    );
    let (mut pr, mut mr, mut vr) = (
        p0.iter().map(|x| *x as f64).collect::<Vec<_>>(),
        vec![0f64; n],
        vec![0f64; n],
    );
    let (lr, b1, b2, eps, wd) = (1e-2, 0.9, 0.999, 1e-8, 0.1);
    let step_at = |t: i32| AdamWStep {
        lr,
        beta1: b1,
        beta2: b2,
        eps,
        weight_decay: wd,
        c1: 1.0 - f64::powi(b1, t),
        c2: 1.0 - f64::powi(b2, t),
    };
    for t in 1..=3 {
        let g: Vec<f32> = lorakit_ops::seeded::randn(0f32, 1., n, &Device::Cpu)?.to_vec1()?;
        let step = step_at(t);
        let (c1, c2) = (step.c1, step.c2);
        adamw_step(&p, &m, &v, &Tensor::new(g.as_slice(), &dev)?, &step).expect("fused")?;
        for i in 0..n {
            let gi = g[i] as f64;
            mr[i] = b1 * mr[i] + (1.0 - b1) * gi;
            vr[i] = b2 * vr[i] + (1.0 - b2) * gi * gi;
            pr[i] = pr[i] * (1.0 - lr * wd) - lr * (mr[i] / c1) / ((vr[i] / c2).sqrt() + eps);
        }
    }
    for (got, want) in [(&p, &pr), (&m, &mr), (&v, &vr)] {
        let got: Vec<f32> = got.to_vec1()?;
        let d = got
            .iter()
            .zip(want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(d < 1e-5, "{d}");
    }
    // not fused on the CPU
    let cpu = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
    let step = step_at(1);
    assert!(adamw_step(&cpu, &cpu.zeros_like()?, &cpu.zeros_like()?, &cpu, &step).is_none());
    Ok(())
}

/// The tensor-core attention (bf16, online softmax) against the composed attention in f32 on
/// the CPU from the same bf16-rounded inputs: 549 queries (a ragged last block of 37 rows, nine
/// key tiles), grouped kv heads, heads of 64 and 128, both head layouts, and every kind of rule —
/// causal, windows of 100 and 1, left padding, packed examples with a window, bidirectional with
/// padding, 45 cached keys with a window. Values and the q/k/v gradients, on the rows that see
/// at least one key (a row that sees none is 0 here, uniform in the composed version).
#[test]
fn flash_attention_on_cuda_matches_the_composed_attention() -> Result<()> {
    use lorakit_ops::attention::flash::{try_attention, Heads};
    use lorakit_ops::attention::AttnMask;
    let Some(dev) = gpu() else { return Ok(()) };
    let cpu = Device::Cpu;
    let n = 549;
    let ones = vec![vec![1u32; n]; 2];
    let mut padded = ones.clone();
    padded[1][..37].fill(0);
    let mut packed = ones.clone();
    packed[0][200..500].fill(2);
    packed[0][500..].fill(0);
    packed[1][..100].fill(0);
    packed[1][300..].fill(3);
    let mut tail = ones.clone();
    tail[1][499..].fill(0);
    let cases: Vec<(&str, AttnMask, usize)> = vec![
        ("causal", AttnMask::causal(&ones, None)?, 0),
        ("window 100", AttnMask::causal(&ones, Some(100))?, 0),
        ("window 1", AttnMask::causal(&ones, Some(1))?, 0),
        ("left padding", AttnMask::causal(&padded, None)?, 0),
        ("packed + window", AttnMask::causal(&packed, Some(100))?, 0),
        ("bidirectional", AttnMask::bidirectional(&tail)?, 0),
        ("cached + window", AttnMask::cached(45, Some(100)), 45),
    ];
    for (heads, kv, d) in [(8, 2, 64), (4, 4, 128)] {
        for (name, mask, past) in &cases {
            if d == 128 && !matches!(*name, "causal" | "packed + window") {
                continue;
            }
            for heads_last in [false, true] {
                let what = format!("{name}, {heads}/{kv} heads of {d}, heads_last {heads_last}");
                let (b, s, t) = (2, n - past, n);
                let bf = |x: Tensor| x.to_dtype(DType::BF16)?.to_dtype(DType::F32);
                let q = bf(lorakit_ops::seeded::randn(
                    0f32,
                    1.5,
                    (b, heads, s, d),
                    &cpu,
                )?)?;
                let k = bf(lorakit_ops::seeded::randn(
                    0.3f32,
                    1.5,
                    (b, kv, t, d),
                    &cpu,
                )?)?;
                let v = bf(lorakit_ops::seeded::randn(0f32, 1., (b, kv, t, d), &cpu)?)?;
                let bias = mask.to_bias(b, s, t, &cpu)?;
                let live = bias
                    .ge(-1.0e8)?
                    .to_dtype(DType::F32)?
                    .max(3)?
                    .broadcast_as((b, 1, s))?
                    .reshape((b, s, 1))?;
                // reference: f32 on the CPU, kv heads repeated, dense bias
                let (qc, kc, vc) = (
                    Var::from_tensor(&q)?,
                    Var::from_tensor(&k)?,
                    Var::from_tensor(&v)?,
                );
                let rep = |x: &Tensor| -> Result<Tensor> {
                    x.unsqueeze(2)?
                        .expand((b, kv, heads / kv, t, d))?
                        .reshape((b, heads, t, d))
                };
                let scores = (qc.matmul(&rep(kc.as_tensor())?.t()?)? / (d as f64).sqrt())?
                    .broadcast_add(&bias)?;
                // candle_nn's softmax_last_dim has no backward pass: the composed softmax does
                let want = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
                    .matmul(&rep(vc.as_tensor())?)?
                    .transpose(1, 2)?
                    .reshape((b, s, heads * d))?;
                // on the GPU in bf16, in the layout under test
                let lay = |x: &Tensor| -> Result<Tensor> {
                    let x = x.to_dtype(DType::BF16)?.to_device(&dev)?;
                    if heads_last {
                        let (b, n, len, d) = x.dims4()?;
                        x.transpose(1, 2)?.contiguous()?.reshape((b, len, n * d))
                    } else {
                        Ok(x)
                    }
                };
                let (qg, kg, vg) = (
                    Var::from_tensor(&lay(&q)?)?,
                    Var::from_tensor(&lay(&k)?)?,
                    Var::from_tensor(&lay(&v)?)?,
                );
                let layout = if heads_last {
                    Heads::Last { heads, kv }
                } else {
                    Heads::First
                };
                let got =
                    try_attention(qg.as_tensor(), kg.as_tensor(), vg.as_tensor(), mask, layout)
                        .expect("the tensor-core attention applies")?;
                assert_eq!(got.dims(), [b, s, heads * d], "{what}");
                let got_cpu = got.to_dtype(DType::F32)?.to_device(&cpu)?;
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                let diff =
                    max_abs_diff(&got_cpu.broadcast_mul(&live)?, &want.broadcast_mul(&live)?)?;
                assert!(
                    diff < 2e-2 * scale.max(1.0),
                    "{what}: values differ by {diff} (of {scale})"
                );
                let up = lorakit_ops::seeded::randn(0f32, 1., (b, s, heads * d), &cpu)?
                    .broadcast_mul(&live)?;
                let gw = (want * &up)?.sum_all()?.backward()?;
                let up_gpu = up.to_dtype(DType::BF16)?.to_device(&dev)?;
                let gg = (got * up_gpu)?.sum_all()?.backward()?;
                for (x, (c, g)) in ["q", "k", "v"]
                    .iter()
                    .zip([(&qc, &qg), (&kc, &kg), (&vc, &vg)])
                {
                    let a = gw.get(c.as_tensor()).expect("reference gradient");
                    let g = gg
                        .get(g.as_tensor())
                        .expect("gpu gradient")
                        .to_dtype(DType::F32)?
                        .to_device(&cpu)?;
                    let g = if heads_last {
                        let (b, len, width) = g.dims3()?;
                        let n = width / d;
                        g.reshape((b, len, n, d))?.transpose(1, 2)?.contiguous()?
                    } else {
                        g
                    };
                    let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
                    let diff = max_abs_diff(a, &g)?;
                    // a floor: with a window of 1 the q and k gradients are exactly 0 (p = 1)
                    assert!(
                        diff < 3e-2 * scale.max(0.05),
                        "{what}: d{x} differs by {diff} (of {scale})"
                    );
                }
            }
        }
    }
    Ok(())
}
