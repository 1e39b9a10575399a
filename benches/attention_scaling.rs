//! The attention core alone as rows grow: one row of SEQ tokens at the `small` preset's heads
//! (8 query / 4 kv heads of 64, causal), forward and forward + backward, the tiled kernel
//! against the composed candle attention (scores materialised: `[heads, s, s]` buffers) where
//! it fits, and a square matrix product as the machine's reference rate — all in this one run.
//! Rates count the causal half of the score matrix (what a kernel that skips hidden tiles must
//! do: forward 2, backward 5 products of `s²/2 · d`). One JSON line per length; numbers are
//! reported, never asserted.
//!
//!   cargo bench --bench attention_scaling -- [--tiled-only] [--heads=H/KV] [SEQ ...]
//!
//! (default lengths 512 1024 2048 4096 8192; `--tiled-only` skips the composed attention, for
//! profiling the kernel alone; `--heads=9/3` takes another model's heads, e.g. SmolLM2-135M's)
use candle_core::{DType, Device, Result, Tensor, Var, D};
use lorakit_ops::attention::{attention_heads_last, AttnMask};
use std::time::Instant;

/// Median seconds of `reps` calls after one warm-up call.
fn time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut s: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f()?;
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
    let dev = Device::Cpu;
    let (heads, kv) = std::env::args()
        .find_map(|a| {
            let (h, kv) = a.strip_prefix("--heads=")?.split_once('/')?;
            Some((h.parse().ok()?, kv.parse().ok()?))
        })
        .unwrap_or((8, 4));
    let d = 64;
    let sq = Tensor::randn(0f32, 1., (2048, 2048), &dev)?;
    let matmul_s = time(3, || sq.matmul(&sq).map(|_| ()))?;
    let matmul_rate = 2.0 * 2048f64.powi(3) / matmul_s;
    let mask = AttnMask::cached(0, None);
    for s in lengths {
        let var = |n: usize| -> Result<Var> {
            Var::from_tensor(&(Tensor::randn(0f32, 1., (1, s, n * d), &dev)?))
        };
        let (q, k, v) = (var(heads)?, var(kv)?, var(kv)?);
        let up = Tensor::randn(0f32, 1., (1, s, heads * d), &dev)?;
        let causal = 2.0 * (heads * s * s / 2 * d) as f64;
        let reps = if s >= 4096 { 1 } else { 3 };
        let run = |f: &dyn Fn() -> Result<Tensor>| -> Result<(f64, f64)> {
            let fwd = time(reps, || f().map(|_| ()))?;
            let both = time(reps, || {
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
        // the composed version holds several [heads, s, s] f32 buffers: 8 GiB at 8192
        let composed_s = if s <= 4096 && !tiled_only {
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
                "seq": s, "heads": heads, "kv_heads": kv, "head_dim": d, "dtype": format!("{:?}", DType::F32),
                "tiled_fwd_ms": tf * 1e3, "tiled_fwd_bwd_ms": tb * 1e3,
                "tiled_fwd_gflops": 2.0 * causal / tf / 1e9, "tiled_fwd_bwd_gflops": 7.0 * causal / tb / 1e9,
                "composed_fwd_ms": composed_s.map(|c| c.0 * 1e3), "composed_fwd_bwd_ms": composed_s.map(|c| c.1 * 1e3),
                "matmul_2048_gflops": matmul_rate / 1e9,
                "tiled_fwd_bwd_of_matmul_rate": 7.0 * causal / tb / matmul_rate,
            })
        );
    }
    Ok(())
}
