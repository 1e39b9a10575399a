//! Launches the kernels of `csrc/fused.cu` on candle's CUDA storage. build.rs compiles them into
//! one fatbin (sm_80 + sm_90 cubins) that is loaded once per device, so no kernel waits for a PTX
//! JIT. Every entry point takes contiguous inputs and returns a new buffer (AdamW: in place).
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};
use half::bf16;
use std::sync::{Arc, Mutex, OnceLock};

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fused.fatbin"));

/// Threads per block of the row kernels (`BLOCK` in fused.cu).
const BLOCK: u32 = 256;

/// The loaded fatbin, per device.
type Modules = Mutex<Vec<(DeviceId, Arc<CudaModule>)>>;

pub(crate) fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    static MODULES: OnceLock<Modules> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| candle_core::Error::Msg("fused kernels: poisoned module cache".into()))?;
    let module = match modules.iter().find(|(id, _)| *id == dev.id()) {
        Some((_, m)) => m.clone(),
        None => {
            let ctx = dev.cuda_stream().context().clone();
            let m = ctx.load_module(Ptx::from_binary(FATBIN.to_vec())).w()?;
            modules.push((dev.id(), m.clone()));
            m
        }
    };
    module.load_function(name).w()
}

pub(crate) fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

fn suffix(dtype: DType, what: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        d => candle_core::bail!("{what}: no CUDA kernel for {d:?}"),
    }
}

fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn flat_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The kernels' argument lists, by element type.
trait Element: CudaDType + DeviceRepr + Copy + 'static {}
impl Element for f32 {}
impl Element for bf16 {}

fn rms_norm_t<T: Element>(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    g: Option<(&CudaStorage, &Layout)>,
    eps: f32,
    name: &str,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let n = lx.shape().elem_count();
    let d = lx.shape().dims().last().copied().unwrap_or(1);
    let (xv, wv) = (view::<T>(x, lx, "x")?, view::<T>(w, lw, "weight")?);
    let out = unsafe { dev.alloc::<T>(n)? };
    let func = function(&dev, name)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&xv);
    b.arg(&wv);
    let gv = g.map(|(s, l)| view::<T>(s, l, "grad")).transpose()?;
    if let Some(gv) = &gv {
        b.arg(gv);
    }
    b.arg(&out);
    let d32 = d as i32;
    b.arg(&d32);
    b.arg(&eps);
    unsafe { b.launch(rows_config(n / d.max(1))) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// RMSNorm forward (`g` = None) or its input gradient.
pub fn rms_norm(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    g: Option<(&CudaStorage, &Layout)>,
    eps: f32,
) -> Result<CudaStorage> {
    let base = if g.is_some() {
        "rms_norm_grad"
    } else {
        "rms_norm"
    };
    let name = format!("{base}_{}", suffix(x.dtype(), base)?);
    match x.dtype() {
        DType::BF16 => rms_norm_t::<bf16>(x, lx, w, lw, g, eps, &name),
        _ => rms_norm_t::<f32>(x, lx, w, lw, g, eps, &name),
    }
}

/// Per-row cross-entropy of f32 logits `[n, v]` against u32 labels, or with `scale` `[n]` its
/// gradient `scale · (softmax − onehot)`.
pub fn cross_entropy(
    logits: &CudaStorage,
    ll: &Layout,
    labels: &CudaStorage,
    lb: &Layout,
    scale: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    let dev = logits.device().clone();
    let (n, v) = ll.shape().dims2()?;
    let xv = view::<f32>(logits, ll, "logits")?;
    let yv = view::<u32>(labels, lb, "labels")?;
    let out = unsafe { dev.alloc::<f32>(if scale.is_some() { n * v } else { n })? };
    let name = if scale.is_some() {
        "cross_entropy_grad_f32"
    } else {
        "cross_entropy_f32"
    };
    let func = function(&dev, name)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&xv);
    b.arg(&yv);
    let sv = scale.map(|(s, l)| view::<f32>(s, l, "scale")).transpose()?;
    if let Some(sv) = &sv {
        b.arg(sv);
    }
    b.arg(&out);
    let v32 = v as i32;
    b.arg(&v32);
    unsafe { b.launch(rows_config(n)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

fn swiglu_t<T: Element>(
    gate: &CudaStorage,
    lg: &Layout,
    up: &CudaStorage,
    lu: &Layout,
    g: Option<(&CudaStorage, &Layout)>,
    name: &str,
) -> Result<CudaStorage> {
    let dev = gate.device().clone();
    let n = lg.shape().elem_count();
    let (gv, uv) = (view::<T>(gate, lg, "gate")?, view::<T>(up, lu, "up")?);
    let out = unsafe { dev.alloc::<T>(if g.is_some() { 2 * n } else { n })? };
    let func = function(&dev, name)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&gv);
    b.arg(&uv);
    let dv = g.map(|(s, l)| view::<T>(s, l, "grad")).transpose()?;
    if let Some(dv) = &dv {
        b.arg(dv);
    }
    b.arg(&out);
    b.arg(&n);
    unsafe { b.launch(flat_config(n)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `silu(gate)·up`, or with `g` the stacked `[d gate, d up]`.
pub fn swiglu(
    gate: &CudaStorage,
    lg: &Layout,
    up: &CudaStorage,
    lu: &Layout,
    g: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    let base = if g.is_some() { "swiglu_grad" } else { "swiglu" };
    let name = format!("{base}_{}", suffix(gate.dtype(), base)?);
    match gate.dtype() {
        DType::BF16 => swiglu_t::<bf16>(gate, lg, up, lu, g, &name),
        _ => swiglu_t::<f32>(gate, lg, up, lu, g, &name),
    }
}

#[allow(clippy::too_many_arguments)]
fn rope_t<T: Element>(
    x: &CudaStorage,
    lx: &Layout,
    cos: &CudaStorage,
    lc: &Layout,
    sin: &CudaStorage,
    ls: &Layout,
    sign: f32,
    name: &str,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let (b_, h, s, d) = lx.shape().dims4()?;
    let rows = b_ * h * s;
    let xv = view::<T>(x, lx, "x")?;
    let (cv, sv) = (view::<T>(cos, lc, "cos")?, view::<T>(sin, ls, "sin")?);
    let out = unsafe { dev.alloc::<T>(rows * d)? };
    let func = function(&dev, name)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&xv);
    b.arg(&cv);
    b.arg(&sv);
    b.arg(&out);
    b.arg(&rows);
    let (s32, d32) = (s as i32, d as i32);
    b.arg(&s32);
    b.arg(&d32);
    b.arg(&sign);
    unsafe { b.launch(flat_config(rows * (d / 2))) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Rotary embedding of `[b, h, s, d]` with `[s, d/2]` tables; `inverse` rotates back.
pub fn rope(
    x: &CudaStorage,
    lx: &Layout,
    cos: &CudaStorage,
    lc: &Layout,
    sin: &CudaStorage,
    ls: &Layout,
    inverse: bool,
) -> Result<CudaStorage> {
    let name = format!("rope_{}", suffix(x.dtype(), "rope")?);
    let sign = if inverse { -1.0 } else { 1.0 };
    match x.dtype() {
        DType::BF16 => rope_t::<bf16>(x, lx, cos, lc, sin, ls, sign, &name),
        _ => rope_t::<f32>(x, lx, cos, lc, sin, ls, sign, &name),
    }
}

/// How attention score rows meet their bias rows (see `attn_probs` in fused.cu): scores
/// `[b, groups, rows_per_group, t]`, query position `row mod s`, f32 bias `[bias_b, 1, s, t]`.
pub struct AttnRows<'a> {
    pub bias: (&'a CudaStorage, &'a Layout),
    pub bias_b: usize,
    pub s: usize,
    /// Score rows per batch element.
    pub batch_rows: usize,
    pub scale: f32,
}

fn attention_probs_t<T: Element>(
    scores: &CudaStorage,
    ls: &Layout,
    dp: Option<(&CudaStorage, &Layout)>,
    rows_of: &AttnRows,
    (rows, t): (usize, usize),
    name: &str,
) -> Result<CudaStorage> {
    let dev = scores.device().clone();
    let sv = view::<T>(scores, ls, "scores")?;
    let bv = view::<f32>(rows_of.bias.0, rows_of.bias.1, "bias")?;
    let bias_b = rows_of.bias_b as i32;
    let out = unsafe { dev.alloc::<T>(rows * t)? };
    let func = function(&dev, name)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&sv);
    b.arg(&bv);
    let dv = dp.map(|(s, l)| view::<T>(s, l, "dp")).transpose()?;
    if let Some(dv) = &dv {
        b.arg(dv);
    }
    b.arg(&out);
    b.arg(&rows);
    let (t32, s32, batch32) = (t as i32, rows_of.s as i32, rows_of.batch_rows as i32);
    b.arg(&t32);
    b.arg(&s32);
    b.arg(&batch32);
    b.arg(&bias_b);
    b.arg(&rows_of.scale);
    // a warp per row
    let config = LaunchConfig {
        grid_dim: (rows.div_ceil(BLOCK as usize / 32).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(config) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Attention probabilities `softmax(scale·scores + bias)` of `rows` score rows of length `t`,
/// or with `dp` the scores' gradient; in the scores' dtype.
pub fn attention_probs(
    scores: &CudaStorage,
    ls: &Layout,
    dp: Option<(&CudaStorage, &Layout)>,
    rows_of: &AttnRows,
    rows: usize,
    t: usize,
) -> Result<CudaStorage> {
    let base = if dp.is_some() {
        "attn_probs_grad"
    } else {
        "attn_probs"
    };
    let name = format!("{base}_{}", suffix(scores.dtype(), base)?);
    match scores.dtype() {
        DType::BF16 => attention_probs_t::<bf16>(scores, ls, dp, rows_of, (rows, t), &name),
        _ => attention_probs_t::<f32>(scores, ls, dp, rows_of, (rows, t), &name),
    }
}

/// One AdamW step in place: `p`, `m` and `v` are overwritten (f32, contiguous, `n` each).
pub fn adamw(
    (p, lp): (&mut CudaStorage, &Layout),
    (m, lm): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    h: &crate::adamw::AdamWStep,
) -> Result<()> {
    let dev = m.device().clone();
    let n = lp.shape().elem_count();
    for l in [lm, lv, lg] {
        if l.shape().elem_count() != n {
            candle_core::bail!("adamw: moments and gradient must match the parameter");
        }
    }
    let (mv, vv) = (view::<f32>(m, lm, "m")?, view::<f32>(v, lv, "v")?);
    let gv = view::<f32>(g, lg, "grad")?;
    let (a, b) = lp
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("adamw: parameter must be contiguous".into()))?;
    let mut pv = p.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
    let func = function(&dev, "adamw_f32")?;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&func);
    // SAFETY (m, v): the kernel writes the moments through these views; nothing else reads or
    // writes them while the step runs (they belong to the optimizer and live on this stream).
    l.arg(&mut pv);
    l.arg(&mv);
    l.arg(&vv);
    l.arg(&gv);
    l.arg(&n);
    let f = |x: f64| x as f32;
    let decay = 1.0 - h.lr * h.weight_decay;
    let args = [h.lr, h.beta1, h.beta2, h.eps, decay, h.c1, h.c2].map(f);
    for x in &args {
        l.arg(x);
    }
    unsafe { l.launch(flat_config(n)) }.w()?;
    Ok(())
}

fn dropout_t<T: Element>(
    x: &CudaStorage,
    lx: &Layout,
    (seed, keep, scale): (u64, f32, f32),
    name: &str,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let n = lx.shape().elem_count();
    let xv = view::<T>(x, lx, "x")?;
    let out = unsafe { dev.alloc::<T>(n)? };
    let func = function(&dev, name)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&xv);
    b.arg(&out);
    b.arg(&n);
    b.arg(&seed);
    b.arg(&keep);
    b.arg(&scale);
    unsafe { b.launch(flat_config(n)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Inverted dropout of `x` with the mask drawn from `seed` (`row_math.h`'s counter-based draw,
/// the CPU's mask): kept values times `scale`, the rest 0.
pub fn dropout(
    x: &CudaStorage,
    lx: &Layout,
    seed: u64,
    keep: f32,
    scale: f32,
) -> Result<CudaStorage> {
    let name = format!("dropout_{}", suffix(x.dtype(), "dropout")?);
    match x.dtype() {
        DType::BF16 => dropout_t::<bf16>(x, lx, (seed, keep, scale), &name),
        _ => dropout_t::<f32>(x, lx, (seed, keep, scale), &name),
    }
}
