//! Frozen-weight path vs candle's default for one LoRA layer, forward + backward.
//! candle's matmul backward computes and keeps a gradient for the frozen base weight
//! until backward ends (candle 0.11's `Op::Matmul` backward); lorakit's frozen op does not. Reports ms/step and the bytes the GradStore
//! holds after backward, as ratios measured in this same run. Numbers are reported, not asserted.
//!
//!   cargo bench --bench frozen_linear [-- DIM TOKENS RANK]
use candle_core::{backprop::GradStore, DType, Device, Module, Result, Tensor, Var};
use lorakit_adapter::{LoraLinear, LowRank};
use std::time::Instant;

fn grad_bytes(g: &GradStore) -> usize {
    g.get_ids()
        .filter_map(|id| g.get_id(*id))
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
}

/// candle's default path: the same math with plain candle ops on the base weight.
fn composed(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    let base = x.matmul(&w.t()?)?;
    base + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * s)?
}

fn time<F: FnMut() -> Result<GradStore>>(mut f: F, iters: usize) -> Result<(f64, usize)> {
    let g = f()?; // warm-up
    let bytes = grad_bytes(&g);
    drop(g);
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let g = f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        drop(g);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times[iters / 2], bytes))
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (dim, tokens, r) = (
        *args.first().unwrap_or(&1024),
        *args.get(1).unwrap_or(&512),
        *args.get(2).unwrap_or(&16),
    );
    let dev = Device::Cpu;
    // x stands for an activation downstream of other adapters, so it needs a gradient, as in
    // every layer but the first of a real model.
    let xv = Var::randn(0f32, 1., (tokens, dim), &dev)?;
    let x = xv.as_tensor().clone();
    let w = Tensor::randn(0f32, 0.02, (dim, dim), &dev)?;
    let a = Var::randn(0f32, 0.02, (r, dim), &dev)?;
    let b = Var::randn(0f32, 0.02, (dim, r), &dev)?;
    let layer = LoraLinear::new(
        w.clone(),
        None,
        Some(LowRank::new(
            a.as_tensor().clone(),
            b.as_tensor().clone(),
            2.0,
        )),
    );
    let check = (layer.forward(&x)? - composed(&x, &w, a.as_tensor(), b.as_tensor(), 2.0)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    let iters = 20;
    let (t_default, m_default) = time(
        || {
            composed(&x, &w, a.as_tensor(), b.as_tensor(), 2.0)?
                .sum_all()?
                .backward()
        },
        iters,
    )?;
    let (t_frozen, m_frozen) = time(|| layer.forward(&x)?.sum_all()?.backward(), iters)?;
    println!("one LoRA layer, dim {dim}, {tokens} tokens, r {r}, f32 on CPU, median of {iters} fwd+bwd steps");
    println!("  outputs agree to {check:.1e}");
    println!(
        "  candle default (W gradient kept): {t_default:8.2} ms/step, GradStore {:8.2} MB",
        m_default as f64 / 1e6
    );
    println!(
        "  lorakit frozen op:                {t_frozen:8.2} ms/step, GradStore {:8.2} MB",
        m_frozen as f64 / 1e6
    );
    println!(
        "  ratio frozen/default: time {:.2}x, gradient memory {:.2}x (saves {:.2} MB = one [{dim}, {dim}] f32 weight gradient)",
        t_frozen / t_default,
        m_frozen as f64 / m_default as f64,
        (m_default - m_frozen) as f64 / 1e6
    );
    Ok(())
}
