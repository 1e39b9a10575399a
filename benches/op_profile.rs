//! Time of each op of a training step at the `1b` preset's shapes (batch 8 × 512 tokens,
//! hidden 2048, intermediate 5632, 32 query / 4 kv heads, LoRA r 16), forward and forward +
//! backward, so a step's time can be split by op where no profiler is at hand. One JSON line
//! per op: microseconds per call (median of the timed calls, device synchronised around each)
//! and the rate it implies. Numbers are reported, never asserted.
//!
//!   cargo bench --bench op_profile -- [--device cpu|cuda] [--dtype f32|bf16] [--reps N]
//!   (on the CPU use small reps: the shapes are a GPU's)
use candle_core::{DType, Device, Result, Tensor, Var};
use lorakit_ops::attention::{attention, AttnMask};
use lorakit_ops::frozen::frozen_matmul;
use lorakit_ops::fused;
use lorakit_ops::lora_any_device::lora_op;
use std::time::Instant;

/// Median microseconds of `reps` calls of `f` after two warm-up calls.
fn time(device: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    device.synchronize()?;
    let mut us: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f()?;
            device.synchronize()?;
            Ok(t.elapsed().as_secs_f64() * 1e6)
        })
        .collect::<Result<_>>()?;
    us.sort_by(|a, b| a.total_cmp(b));
    Ok(us[us.len() / 2])
}

/// Forward and backward of the op `f` of the variables `vars`. The loss is y's first value:
/// a full `sum(y · up)` costs more than most ops here (candle reduces it slowly), while the
/// backward pass runs the same kernels whatever the gradient's values.
fn fwd_bwd(vars: &[&Var], f: impl Fn() -> Result<Tensor>) -> Result<()> {
    let y = f()?;
    let grads = y.flatten_all()?.narrow(0, 0, 1)?.sum_all()?.backward()?;
    for v in vars {
        grads.get(v.as_tensor()).expect("gradient");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    lorakit_train::runtime::tune_process();
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let device = match flag("--device").as_deref() {
        Some("cuda") => lorakit_train::runtime::cuda_device(0)?,
        _ => Device::Cpu,
    };
    let dtype = match flag("--dtype").as_deref() {
        Some("bf16") => DType::BF16,
        _ => DType::F32,
    };
    let reps: usize = flag("--reps").and_then(|r| r.parse().ok()).unwrap_or(20);
    let (b, s, h, inter, heads, kv, r) = (8, 512, 2048, 5632, 32, 4, 16);
    let rows = b * s;
    let d = h / heads;
    let rand = |shape: &[usize], dt: DType| -> Result<Tensor> {
        (Tensor::randn(0f32, 1., shape, &device)? * 0.05)?.to_dtype(dt)
    };
    let var = |shape: &[usize], dt: DType| -> Result<Var> { Var::from_tensor(&rand(shape, dt)?) };
    let report = |name: &str, us: f64, work: Option<(f64, &str)>| {
        let rate = work.map(
            |(amount, unit)| serde_json::json!({ "per_s": amount / (us * 1e-6), "unit": unit }),
        );
        println!(
            "{}",
            serde_json::json!({"op": name, "us": us, "rate": rate,
                "device": if device.is_cuda() { "cuda" } else { "cpu" }, "dtype": format!("{dtype:?}")})
        );
    };
    let flops = |m: usize, n: usize, k: usize| 2.0 * (m * n * k) as f64;

    // launch overhead: an op on 16 values
    let tiny = rand(&[16], DType::F32)?;
    let us = time(&device, reps * 10, || (&tiny * 1.5).map(|_| ()))?;
    report("tiny_affine", us, None);
    // bandwidth: a big add
    let (p, q) = (rand(&[rows, inter], dtype)?, rand(&[rows, inter], dtype)?);
    let bytes = 3.0 * (rows * inter * dtype.size_in_bytes()) as f64;
    let us = time(&device, reps, || (&p + &q).map(|_| ()))?;
    report("add_rows_x_inter", us, Some((bytes, "bytes")));

    // the frozen projections, and square matmul as the card's reference
    let x = var(&[rows, h], dtype)?;
    let xi = var(&[rows, inter], dtype)?;
    let (wq, wg, wd) = (
        rand(&[h, h], dtype)?,
        rand(&[inter, h], dtype)?,
        rand(&[h, inter], dtype)?,
    );
    let sq = rand(&[4096, 4096], dtype)?;
    let us = time(&device, reps, || sq.matmul(&sq).map(|_| ()))?;
    report(
        "matmul_4096_cubed",
        us,
        Some((flops(4096, 4096, 4096), "flop")),
    );
    for (name, input, w, n, k) in [
        ("frozen_matmul_q", &x, &wq, h, h),
        ("frozen_matmul_gate", &x, &wg, inter, h),
        ("frozen_matmul_down", &xi, &wd, h, inter),
    ] {
        let us = time(&device, reps, || frozen_matmul(input, w, None).map(|_| ()))?;
        report(name, us, Some((flops(rows, n, k), "flop")));
    }

    // LoRA layers (A, B in f32 as in training)
    let (a, bm) = (var(&[r, h], DType::F32)?, var(&[inter, r], DType::F32)?);
    let wg = lorakit_ops::quantized::Frozen::Dense(wg.clone());
    let us = time(&device, reps, || {
        lora_op(x.as_tensor(), &wg, a.as_tensor(), bm.as_tensor(), 2.0, None).map(|_| ())
    })?;
    report("lora_gate_fwd", us, Some((flops(rows, inter, h), "flop")));
    let us = time(&device, reps, || {
        fwd_bwd(&[&x, &a, &bm], || {
            lora_op(x.as_tensor(), &wg, a.as_tensor(), bm.as_tensor(), 2.0, None)
        })
    })?;
    report(
        "lora_gate_fwd_bwd",
        us,
        Some((2.0 * flops(rows, inter, h), "flop")),
    );
    let ac = a.as_tensor().to_dtype(dtype)?;
    let us = time(&device, reps, || x.as_tensor().matmul(&ac.t()?).map(|_| ()))?;
    report("skinny_x_at", us, Some((flops(rows, r, h), "flop")));
    let bc = bm.as_tensor().to_dtype(dtype)?;
    let u = rand(&[rows, r], dtype)?;
    let us = time(&device, reps, || u.matmul(&bc.t()?).map(|_| ()))?;
    report("skinny_u_bt", us, Some((flops(rows, inter, r), "flop")));

    // attention core
    let qa = var(&[b, heads, s, d], dtype)?;
    let (ka, va) = (var(&[b, kv, s, d], dtype)?, var(&[b, kv, s, d], dtype)?);
    let mask = AttnMask::cached(0, None);
    let attn_flops = 2.0 * flops(b * heads * s, s, d);
    let us = time(&device, reps, || {
        attention(qa.as_tensor(), ka.as_tensor(), va.as_tensor(), &mask).map(|_| ())
    })?;
    report("attention_fwd", us, Some((attn_flops, "flop")));
    let us = time(&device, reps, || {
        fwd_bwd(&[&qa, &ka, &va], || {
            attention(qa.as_tensor(), ka.as_tensor(), va.as_tensor(), &mask)
        })
    })?;
    report("attention_fwd_bwd", us, Some((3.5 * attn_flops, "flop")));

    // element-wise ops
    let nw = rand(&[h], dtype)?;
    let us = time(&device, reps, || {
        fwd_bwd(&[&x], || {
            match fused::try_rms_norm(x.as_tensor(), &nw, 1e-5) {
                Some(y) => y,
                None => lorakit_ops::layers::rms_norm(x.as_tensor(), &nw, 1e-5),
            }
        })
    })?;
    report("rms_norm_fwd_bwd", us, None);
    let (g, u2) = (var(&[rows, inter], dtype)?, var(&[rows, inter], dtype)?);
    let us = time(&device, reps, || {
        fwd_bwd(&[&g, &u2], || fused::swiglu(g.as_tensor(), u2.as_tensor()))
    })?;
    report("swiglu_fwd_bwd", us, None);
    Ok(())
}
