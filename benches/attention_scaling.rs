//! The attention core alone as rows grow: one row of SEQ tokens at the `small` preset's heads
//! (8 query / 4 kv heads of 64, causal), forward and forward + backward, the tiled kernel
//! against the composed candle attention (scores materialised: `[heads, s, s]` buffers) where
//! it fits, and a square matrix product as the machine's reference rate — all in this one run.
//! Rates count the causal half of the score matrix (what a kernel that skips hidden tiles must
//! do: forward 2, backward 5 products of `s²/2 · d`). One JSON line per length; numbers are
//! reported, never asserted.
//!
//!   cargo bench --bench attention_scaling -- [--tiled-only] [--heads=H/KV] [--head-dim=D]
//!       [--device cuda] [SEQ ...]
//!
//! (default lengths 512 1024 2048 4096 8192; `--tiled-only` skips the composed attention, for
//! profiling the kernel alone; `--heads=9/3` takes another model's heads, e.g. SmolLM2-135M's.)
//! With `--device cuda` (a `--features cuda` build) everything is bf16 on the GPU: the
//! tensor-core kernel against the blocked attention that recomputes its probabilities
//! (`attention_blocks`, scores of a block of queries materialised), and a 4096³ matmul.
use candle_core::{DType, Device, Result, Tensor, Var, D};
use lorakit_ops::attention::recompute::attention_blocks;
use lorakit_ops::attention::{attention_heads_last, split_heads, AttnMask};
use std::time::Instant;

/// Median seconds of `reps` calls after one warm-up call (the GPU synchronised after each).
fn time(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut s: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f()?;
            dev.synchronize()?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    s.sort_by(|a, b| a.total_cmp(b));
    Ok(s[s.len() / 2])
}

/// The composed attention of heads-last inputs: kv heads repeated, scores, dense causal mask,
/// softmax, product.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, kv: usize) -> Result<Tensor> {
    let (b, s, hd) = q.dims3()?;
    let d = hd / heads;
    let split = |x: &Tensor, n: usize| x.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous();
    let rep = |x: Tensor| -> Result<Tensor> {
        let x = x.unsqueeze(2)?.expand((b, kv, heads / kv, s, d))?;
        x.reshape((b, heads, s, d))
    };
    let (q, k, v) = (split(q, heads)?, rep(split(k, kv)?)?, rep(split(v, kv)?)?);
    let mask = AttnMask::cached(0, None).to_bias(1, s, s, q.device())?;
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
    let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
    p.matmul(&v)?.transpose(1, 2)?.reshape((b, s, hd))
}

fn main() -> anyhow::Result<()> {
    lorakit_train::runtime::tune_process();
    let tiled_only = std::env::args().any(|a| a == "--tiled-only");
    let lengths: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let lengths = if lengths.is_empty() {
        vec![512, 1024, 2048, 4096, 8192]
    } else {
        lengths
    };
    let arg = |name: &str| -> Option<String> {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .or_else(|| {
                let prefix = format!("{name}=");
                args.iter()
                    .find_map(|a| a.strip_prefix(&prefix).map(String::from))
            })
    };
    let gpu = arg("--device").is_some_and(|d| d.starts_with("cuda"));
    let (dev, dtype) = if gpu {
        (Device::new_cuda(0)?, DType::BF16)
    } else {
        (Device::Cpu, DType::F32)
    };
    let (heads, kv) = std::env::args()
        .find_map(|a| {
            let (h, kv) = a.strip_prefix("--heads=")?.split_once('/')?;
            Some((h.parse().ok()?, kv.parse().ok()?))
        })
        .unwrap_or((8, 4));
    let d: usize = arg("--head-dim").and_then(|d| d.parse().ok()).unwrap_or(64);
    let n = if gpu { 4096 } else { 2048 };
    let sq = Tensor::randn(0f32, 1., (n, n), &dev)?.to_dtype(dtype)?;
    let matmul_s = time(&dev, 3, || sq.matmul(&sq).map(|_| ()))?;
    let matmul_rate = 2.0 * (n as f64).powi(3) / matmul_s;
    let mask = AttnMask::cached(0, None);
    for s in lengths {
        let var = |n: usize| -> Result<Var> {
            Var::from_tensor(&(Tensor::randn(0f32, 1., (1, s, n * d), &dev)?.to_dtype(dtype)?))
        };
        let (q, k, v) = (var(heads)?, var(kv)?, var(kv)?);
        let up = Tensor::randn(0f32, 1., (1, s, heads * d), &dev)?.to_dtype(dtype)?;
        let causal = 2.0 * (heads * s * s / 2 * d) as f64;
        let reps = if gpu {
            5
        } else if s >= 4096 {
            1
        } else {
            3
        };
        let run = |f: &dyn Fn() -> Result<Tensor>| -> Result<(f64, f64)> {
            let fwd = time(&dev, reps, || f().map(|_| ()))?;
            let both = time(&dev, reps, || {
                let g = (f()? * &up)?.sum_all()?.backward()?;
                g.get(k.as_tensor())
                    .map(|_| ())
                    .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for k at {s}")))
            })?;
            Ok((fwd, both))
        };
        let tiled = || {
            attention_heads_last(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &mask,
                heads,
                kv,
            )
        };
        let (tf, tb) = run(&tiled)?;
        // on the GPU the other path is the blocked one, checked against the tensor-core kernel
        let blocks = || {
            let (q, k, v) = split_heads(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, kv)?;
            attention_blocks(&q, &k, &v, &mask)
        };
        let blocks_s = if gpu && !tiled_only {
            let check = (tiled()?.to_dtype(DType::F32)? - blocks()?.to_dtype(DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(D::Minus1)?
                .to_scalar::<f32>()?;
            assert!(
                check < 5e-2,
                "tensor-core and blocked attention differ by {check}"
            );
            Some(run(&blocks)?)
        } else {
            None
        };
        // the composed version holds several [heads, s, s] f32 buffers: 8 GiB at 8192
        let composed_s = if s <= 4096 && !tiled_only && !gpu {
            let c = || composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, kv);
            let check = (tiled()? - c()?)?
                .abs()?
                .flatten_all()?
                .max(D::Minus1)?
                .to_scalar::<f32>()?;
            assert!(check < 1e-4, "tiled and composed differ by {check}");
            Some(run(&c)?)
        } else {
            None
        };
        println!(
            "{}",
            serde_json::json!({
                "seq": s, "heads": heads, "kv_heads": kv, "head_dim": d, "dtype": format!("{dtype:?}"), "device": if gpu { "cuda" } else { "cpu" },
                "tiled_fwd_ms": tf * 1e3, "tiled_fwd_bwd_ms": tb * 1e3,
                "tiled_fwd_gflops": 2.0 * causal / tf / 1e9, "tiled_fwd_bwd_gflops": 7.0 * causal / tb / 1e9,
                "composed_fwd_ms": composed_s.map(|c| c.0 * 1e3), "composed_fwd_bwd_ms": composed_s.map(|c| c.1 * 1e3),
                "blocks_fwd_ms": blocks_s.map(|c| c.0 * 1e3), "blocks_fwd_bwd_ms": blocks_s.map(|c| c.1 * 1e3),
                "matmul_size": n, "matmul_gflops": matmul_rate / 1e9,
                "tiled_fwd_bwd_of_matmul_rate": 7.0 * causal / tb / matmul_rate,
            })
        );
    }
    Ok(())
}
