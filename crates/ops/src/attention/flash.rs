//! Attention on an NVIDIA GPU's tensor cores with an online softmax (`csrc/flash_attention.cuh`):
//! bf16 q, k and v with heads of 64 or 128 under a mask rule. The forward pass keeps only each
//! query row's log-sum-exp; the backward pass recomputes the probabilities tile by tile. No
//! `seq × seq` matrix exists in either, and the tiles the rule hides are skipped. Anything else
//! (f32 on the GPU, a dense bias, other head sizes) goes to
//! [`super::recompute::attention_blocks`]; so does every call when `LORAKIT_ATTENTION=blocks` is
//! set (to compare the two on one card).
use super::mask::{AttnMask, MaskRule};
use crate::cuda::{function, view};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor,
};
use half::bf16;
use std::sync::{Mutex, OnceLock};

/// Rows of a block in the kernels (query rows forward, keys backward) and its threads.
const ROWS: usize = 64;
const THREADS: u32 = 128;
/// Dynamic shared memory a kernel may use without asking for more.
const DEFAULT_SHARED: u32 = 48 * 1024;

/// How q, k and v hold their heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heads {
    /// `[b, heads, s, d]` (and k, v `[b, kv_heads, t, d]`).
    First,
    /// `[b, s, heads·d]` (and k, v `[b, t, kv_heads·d]`).
    Last { heads: usize, kv: usize },
}

/// Sizes of one call.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    heads: usize,
    kv: usize,
    s: usize,
    t: usize,
    d: usize,
    layout: Heads,
}

impl Geometry {
    /// `None` when the shapes do not fit together (the fallback path says why).
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, layout: Heads) -> Option<Self> {
        if k.dims() != v.dims() {
            return None;
        }
        let g = match layout {
            Heads::First => {
                let (b, heads, s, d) = q.dims4().ok()?;
                let (bk, kv, t, dk) = k.dims4().ok()?;
                (bk == b && dk == d).then_some(Geometry {
                    b,
                    heads,
                    kv,
                    s,
                    t,
                    d,
                    layout,
                })?
            }
            Heads::Last { heads, kv } => {
                let (b, s, width) = q.dims3().ok()?;
                let (bk, t, kwidth) = k.dims3().ok()?;
                let d = width / heads.max(1);
                (bk == b && d * heads == width && kwidth == kv * d).then_some(Geometry {
                    b,
                    heads,
                    kv,
                    s,
                    t,
                    d,
                    layout,
                })?
            }
        };
        (g.kv > 0 && g.heads % g.kv == 0 && g.s > 0 && g.t > 0).then_some(g)
    }

    /// Element strides (batch, head, row) of `n` heads over `rows` rows.
    fn strides(&self, n: usize, rows: usize) -> Strides {
        let d = self.d as i64;
        let (n, rows) = (n as i64, rows as i64);
        match self.layout {
            Heads::First => Strides {
                b: n * rows * d,
                h: rows * d,
                r: d,
            },
            Heads::Last { .. } => Strides {
                b: rows * n * d,
                h: d,
                r: n * d,
            },
        }
    }

    fn q_elems(&self) -> usize {
        self.b * self.heads * self.s * self.d
    }

    fn k_elems(&self) -> usize {
        self.b * self.kv * self.t * self.d
    }
}

/// `flash::Strides` of the kernels.
#[repr(C)]
#[derive(Clone, Copy)]
struct Strides {
    b: i64,
    h: i64,
    r: i64,
}

/// `flash::Mask` of the kernels.
#[repr(C)]
#[derive(Clone, Copy)]
struct MaskArgs {
    causal: i32,
    window: i32,
    past: i32,
    s: i32,
    t: i32,
    seg: u64,
}

/// `flash::Params` of the kernels (passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
struct Params {
    q: u64,
    k: u64,
    v: u64,
    sq: Strides,
    sk: Strides,
    heads: i32,
    rep: i32,
    scale_log2: f32,
    m: MaskArgs,
}

// SAFETY: plain old data of the layout the kernels declare (checked by size here and there).
unsafe impl DeviceRepr for Params {}
const _: () = assert!(std::mem::size_of::<Params>() == 120);

/// Whether `LORAKIT_ATTENTION=blocks` sends every call to the blocked path.
fn blocks_forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("LORAKIT_ATTENTION").is_ok_and(|v| v == "blocks"))
}

/// The tensor-core attention of `q` over `k`, `v` under `mask`, returning `[b, s, heads·d]`,
/// differentiable in q, k and v; `None` when it does not apply (not CUDA, not bf16, a dense
/// bias, heads other than 64 or 128 wide, shapes that do not fit).
pub fn try_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    layout: Heads,
) -> Option<Result<Tensor>> {
    if !matches!(q.device(), Device::Cuda(_)) || blocks_forced() {
        return None;
    }
    if [q, k, v].iter().any(|t| t.dtype() != DType::BF16) {
        return None;
    }
    let AttnMask::Rule(rule) = mask else {
        return None;
    };
    let g = Geometry::of(q, k, v, layout)?;
    let fits_i32 = [g.b * g.heads * g.s, g.b * g.t, g.s, g.t]
        .iter()
        .all(|n| *n < i32::MAX as usize);
    if !matches!(g.d, 64 | 128)
        || rule.window == Some(0)
        || !fits_i32
        || mask.check(g.b, g.s, g.t).is_err()
    {
        return None;
    }
    Some(run(q, k, v, rule, g))
}

fn run(q: &Tensor, k: &Tensor, v: &Tensor, rule: &MaskRule, g: Geometry) -> Result<Tensor> {
    // the kernels copy 16 bytes at a time: each tensor starts on a multiple of 8 elements
    let ready = |t: &Tensor| -> Result<Tensor> {
        let t = t.contiguous()?;
        if t.layout().start_offset() % 8 == 0 {
            Ok(t)
        } else {
            t.copy()
        }
    };
    let (q, k, v) = (ready(q)?, ready(k)?, ready(v)?);
    let seg = match rule.segment_ids() {
        Some(ids) => Some(Tensor::from_slice(ids, ids.len(), q.device())?),
        None => None,
    };
    q.apply_op3(
        &k,
        &v,
        Flash {
            call: Call {
                rule: rule.clone(),
                seg,
                g,
            },
            lse: Mutex::new(None),
        },
    )
}

/// What both passes of one call need.
#[derive(Clone)]
struct Call {
    rule: MaskRule,
    /// Segment numbers `[b·t]` u32 on the device, when the rule has any.
    seg: Option<Tensor>,
    g: Geometry,
}

/// The forward op; keeps the rows' log-sum-exp for its backward pass.
struct Flash {
    call: Call,
    lse: Mutex<Option<CudaSlice<f32>>>,
}

/// Shared memory of the kernels for heads of `d`: the forward pass double-buffers key and value
/// tiles; the backward pass holds its keys and values and double-buffers query and output-
/// gradient tiles with their rows' log-sum-exp and delta, plus one tile of dS.
fn forward_shared(d: usize) -> u32 {
    (2 * 2 * ROWS * (d + 8) * 2) as u32
}

fn backward_shared(d: usize) -> u32 {
    (((2 + 2 * 2) * ROWS * (d + 8) + ROWS * (ROWS + 8)) * 2 + 2 * 2 * ROWS * 4) as u32
}

/// The kernel `name`, allowed `shared` bytes of dynamic shared memory.
fn kernel(dev: &candle_core::CudaDevice, name: &str, shared: u32) -> Result<CudaFunction> {
    let func = function(dev, name)?;
    if shared > DEFAULT_SHARED {
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .w()?;
    }
    Ok(func)
}

/// Device pointer of a u32 tensor on the GPU, with the guard that keeps it readable.
fn seg_ptr(seg: &Option<Tensor>, f: impl FnOnce(u64) -> Result<()>) -> Result<()> {
    let Some(t) = seg else { return f(0) };
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(s) = &*st else {
        candle_core::bail!("attention: segment numbers are not on the GPU")
    };
    let view = view::<u32>(s, l, "segment numbers")?;
    let stream = s.device().cuda_stream();
    let (p, _sync) = view.device_ptr(&stream);
    f(p)
}

impl Call {
    fn params(&self, (q, k, v): (u64, u64, u64), seg: u64) -> Params {
        let g = &self.g;
        Params {
            q,
            k,
            v,
            sq: g.strides(g.heads, g.s),
            sk: g.strides(g.kv, g.t),
            heads: g.heads as i32,
            rep: (g.heads / g.kv) as i32,
            scale_log2: std::f32::consts::LOG2_E / (g.d as f32).sqrt(),
            m: MaskArgs {
                causal: self.rule.causal as i32,
                window: self.rule.window.unwrap_or(0).min(i32::MAX as usize) as i32,
                past: self.rule.past as i32,
                s: g.s as i32,
                t: g.t as i32,
                seg,
            },
        }
    }
}

fn unsupported<T>(what: &str) -> Result<T> {
    candle_core::bail!("{what}: the tensor-core attention runs on CUDA only")
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        unsupported("attention")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        lq: &Layout,
        ks: &CudaStorage,
        lk: &Layout,
        vs: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = self.call.g;
        let dev = qs.device().clone();
        let stream = dev.cuda_stream();
        let (qv, kv, vv) = qkv((qs, lq), (ks, lk), (vs, lv))?;
        let mut out = unsafe { dev.alloc::<bf16>(g.q_elems())? };
        let mut lse = unsafe { dev.alloc::<f32>(g.b * g.heads * g.s)? };
        seg_ptr(&self.call.seg, |seg| {
            let (qp, _a) = qv.device_ptr(&stream);
            let (kp, _b) = kv.device_ptr(&stream);
            let (vp, _c) = vv.device_ptr(&stream);
            let params = self.call.params((qp, kp, vp), seg);
            let shared = forward_shared(g.d);
            let func = kernel(&dev, &format!("flash_fwd_{}", g.d), shared)?;
            let mut b = stream.launch_builder(&func);
            b.arg(&params);
            b.arg(&mut out);
            b.arg(&mut lse);
            let config = LaunchConfig {
                grid_dim: (g.s.div_ceil(ROWS) as u32, g.heads as u32, g.b as u32),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: shared,
            };
            unsafe { b.launch(config) }.w()?;
            Ok(())
        })?;
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))? = Some(lse);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((g.b, g.s, g.heads * g.d)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attention: backward ran twice".into()))?;
        let op = FlashGrad {
            call: self.call.clone(),
            lse,
            out: res.detach().contiguous()?,
            dout: grad.detach().contiguous()?,
        };
        let all = q.detach().apply_op3_no_bwd(&k.detach(), &v.detach(), &op)?;
        let (nq, nk) = (self.call.g.q_elems(), self.call.g.k_elems());
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape(k.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward op: dq, dk and dv flattened one after the other, in q's and k's layouts.
struct FlashGrad {
    call: Call,
    lse: CudaSlice<f32>,
    /// The forward output and its gradient, `[b, s, heads·d]`.
    out: Tensor,
    dout: Tensor,
}

/// The bf16 views of one call's q, k and v.
fn qkv<'a>(
    (qs, lq): (&'a CudaStorage, &Layout),
    (ks, lk): (&'a CudaStorage, &Layout),
    (vs, lv): (&'a CudaStorage, &Layout),
) -> Result<(CudaView<'a, bf16>, CudaView<'a, bf16>, CudaView<'a, bf16>)> {
    Ok((
        view::<bf16>(qs, lq, "q")?,
        view::<bf16>(ks, lk, "k")?,
        view::<bf16>(vs, lv, "v")?,
    ))
}

fn cuda_of<'a>(st: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match st {
        Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("attention: {what} is not on the GPU"),
    }
}

impl CustomOp3 for FlashGrad {
    fn name(&self) -> &'static str {
        "flash-attention-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        unsupported("attention gradient")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        lq: &Layout,
        ks: &CudaStorage,
        lk: &Layout,
        vs: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = self.call.g;
        let dev = qs.device().clone();
        let stream = dev.cuda_stream();
        let (qv, kv, vv) = qkv((qs, lq), (ks, lk), (vs, lv))?;
        let (os, lo) = self.out.storage_and_layout();
        let (gs, lg) = self.dout.storage_and_layout();
        let ov = view::<bf16>(cuda_of(&os, "output")?, lo, "output")?;
        let gv = view::<bf16>(cuda_of(&gs, "output gradient")?, lg, "output gradient")?;
        let (nq, nk) = (g.q_elems(), g.k_elems());

        // delta = rowsum(dout ∘ out) per query row and head
        let rows = g.b * g.s * g.heads;
        let mut delta = unsafe { dev.alloc::<f32>(rows)? };
        {
            let func = function(&dev, &format!("flash_delta_{}", g.d))?;
            let mut b = stream.launch_builder(&func);
            b.arg(&gv);
            b.arg(&ov);
            b.arg(&mut delta);
            let (rows32, heads32, s32) = (rows as i32, g.heads as i32, g.s as i32);
            b.arg(&rows32);
            b.arg(&heads32);
            b.arg(&s32);
            let config = LaunchConfig {
                grid_dim: (rows.div_ceil(THREADS as usize / 32) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(config) }.w()?;
        }

        // dq, then dk and dv, added to in f32; one conversion to bf16 at the end
        let mut grads = dev.alloc_zeros::<f32>(nq + 2 * nk)?;
        let mut all = unsafe { dev.alloc::<bf16>(nq + 2 * nk)? };
        {
            let (base, _grads) = grads.device_ptr_mut(&stream);
            let (dk, dv) = (base + 4 * nq as u64, base + 4 * (nq + nk) as u64);
            seg_ptr(&self.call.seg, |seg| {
                let (qp, _a) = qv.device_ptr(&stream);
                let (kp, _b) = kv.device_ptr(&stream);
                let (vp, _c) = vv.device_ptr(&stream);
                let params = self.call.params((qp, kp, vp), seg);
                let shared = backward_shared(g.d);
                let func = kernel(&dev, &format!("flash_bwd_{}", g.d), shared)?;
                let mut b = stream.launch_builder(&func);
                b.arg(&params);
                b.arg(&gv);
                b.arg(&self.lse);
                b.arg(&delta);
                b.arg(&base);
                b.arg(&dk);
                b.arg(&dv);
                let config = LaunchConfig {
                    grid_dim: (g.t.div_ceil(ROWS) as u32, g.heads as u32, g.b as u32),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: shared,
                };
                unsafe { b.launch(config) }.w()?;
                Ok(())
            })?;
        }
        let n = nq + 2 * nk;
        let func = function(&dev, "flash_f32_to_bf16")?;
        let mut b = stream.launch_builder(&func);
        b.arg(&grads);
        b.arg(&mut all);
        b.arg(&n);
        let config = LaunchConfig {
            grid_dim: (n.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(all, dev),
            Shape::from(nq + 2 * nk),
        ))
    }
}
