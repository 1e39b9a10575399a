//! Tiled attention on the CPU (f32), `softmax(q·kᵀ/√d + mask)·v`, as flash attention computes
//! it: queries in blocks of [`BQ`] rows meet keys in blocks of [`BK`]; each tile's scores live
//! in a small buffer only while the block is processed, and an online softmax (running row max
//! and sum, the partial output rescaled as the max grows) folds the tiles together. Only each
//! row's log-sum-exp is kept for the backward pass, which recomputes a tile's probabilities
//! from it. Tiles the mask hides are never computed (causal blocks above the diagonal, blocks
//! outside a sliding window, other packed examples, padding); grouped kv heads are read in
//! place and the inputs in the projections' layout (no transposes). The query heads that share
//! a kv head meet each key tile together, one stack of rows: the matrix kernel packs a key or
//! value tile once for all of them instead of once per head. Time and memory are then those
//! of the visible tiles: memory linear in the sequence length.
//! Checked against the composed candle attention (values and gradients) below.
use super::mask::{AttnMask, MaskRule, Tile};
use crate::cpu_gemm::{gemm_f32, Threads};
use crate::softmax_row::{exp_shifted_in_place, max, scale as scale_row};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Query rows per tile.
pub const BQ: usize = 128;
/// Key rows per tile.
pub const BK: usize = 256;
/// Most query rows stacked into one tile (heads sharing a kv head, [`BQ`] rows each).
const STACK_ROWS: usize = 256;

/// Attention of `q` `[b, heads, s, d]` over `k`, `v` `[b, kv_heads, t, d]`, returning
/// `[b, s, heads·d]`; differentiable in q, k and v. `None` when the kernel does not apply
/// (not CPU f32).
pub fn try_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
) -> Option<Result<Tensor>> {
    tiled(q, k, v, mask, None)
}

/// [`try_attention`] with q `[b, s, heads·d]` and k, v `[b, t, kv_heads·d]`: the projections'
/// outputs as they are, heads side by side.
pub fn try_attention_heads_last(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    heads: usize,
    kv_heads: usize,
) -> Option<Result<Tensor>> {
    tiled(q, k, v, mask, Some((heads, kv_heads)))
}

fn tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    heads_last: Option<(usize, usize)>,
) -> Option<Result<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let bias_ok = match mask {
        AttnMask::Bias(b) => cpu_f32(b),
        AttnMask::Rule(_) => true,
    };
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v) && bias_ok) {
        return None;
    }
    Some((|| {
        let mask = match mask {
            AttnMask::Bias(b) => AttnMask::Bias(b.contiguous()?),
            m => m.clone(),
        };
        let op = TiledAttention {
            mask,
            heads_last,
            lse: Mutex::new(None),
        };
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    })())
}

struct TiledAttention {
    mask: AttnMask,
    /// `Some((heads, kv_heads))`: inputs are `[b, s, heads·d]`, else `[b, heads, s, d]`.
    heads_last: Option<(usize, usize)>,
    /// Log-sum-exp of every score row, `[b, heads, s]` (+∞ for a row that sees nothing),
    /// written by the forward pass for the backward pass.
    lse: Mutex<Option<Vec<f32>>>,
}

/// Sizes of one call, and where each head lives in the inputs.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    kv: usize,
    s: usize,
    t: usize,
    d: usize,
    heads_last: bool,
}

impl Dims {
    fn of(
        lq: &Layout,
        lk: &Layout,
        lv: &Layout,
        heads_last: Option<(usize, usize)>,
    ) -> Result<Self> {
        let misfit = || {
            candle_core::Error::Msg(format!(
                "attention: q {:?}, k {:?} and v {:?} do not fit together",
                lq.shape(),
                lk.shape(),
                lv.shape()
            ))
        };
        let (b, heads, kv, s, t, d) = match heads_last {
            None => {
                let (b, heads, s, d) = lq.shape().dims4()?;
                let (bk, kv, t, dk) = lk.shape().dims4()?;
                if bk != b || dk != d {
                    return Err(misfit());
                }
                (b, heads, kv, s, t, d)
            }
            Some((heads, kv)) => {
                let (b, s, hd) = lq.shape().dims3()?;
                let (bk, t, kvd) = lk.shape().dims3()?;
                let d = hd / heads.max(1);
                if bk != b || heads == 0 || d * heads != hd || kvd != kv * d {
                    return Err(misfit());
                }
                (b, heads, kv, s, t, d)
            }
        };
        if lv.shape().dims() != lk.shape().dims() {
            return Err(misfit());
        }
        if kv == 0 || heads % kv != 0 {
            candle_core::bail!("attention: {heads} heads are not a multiple of {kv} kv heads");
        }
        Ok(Dims {
            b,
            heads,
            kv,
            s,
            t,
            d,
            heads_last: heads_last.is_some(),
        })
    }

    fn rep(&self) -> usize {
        self.heads / self.kv
    }

    /// Query heads stacked into one tile: the largest divisor of `rep` whose stack of [`BQ`]
    /// rows each fits [`STACK_ROWS`].
    fn stack(&self) -> usize {
        let rep = self.rep();
        (1..=rep)
            .rev()
            .find(|g| rep.is_multiple_of(*g) && g * BQ <= STACK_ROWS)
            .unwrap_or(1)
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// Offset of query head `hi` of batch row `bi` and the stride between its positions.
    fn q_at(&self, bi: usize, hi: usize) -> (usize, usize) {
        if self.heads_last {
            (
                bi * self.s * self.heads * self.d + hi * self.d,
                self.heads * self.d,
            )
        } else {
            ((bi * self.heads + hi) * self.s * self.d, self.d)
        }
    }

    /// Offset of kv head `kvi` of batch row `bi` and the stride between its positions.
    fn kv_at(&self, bi: usize, kvi: usize) -> (usize, usize) {
        if self.heads_last {
            (
                bi * self.t * self.kv * self.d + kvi * self.d,
                self.kv * self.d,
            )
        } else {
            ((bi * self.kv + kvi) * self.t * self.d, self.d)
        }
    }

    /// Offset of head `hi`, batch row `bi` in the `[b, s, heads·d]` output (rows `heads·d` apart).
    fn out_at(&self, bi: usize, hi: usize) -> usize {
        bi * self.s * self.heads * self.d + hi * self.d
    }

    fn q_blocks(&self) -> usize {
        self.s.div_ceil(BQ)
    }

    /// Copies query rows `i0..i1` of heads `h0..h0+g` of batch row `bi` from `src` (laid out
    /// as q when `of_q`, else as the output) into `dst`, `[g·rows, d]`, head after head.
    fn gather(
        &self,
        src: &[f32],
        of_q: bool,
        (bi, h0, g): (usize, usize, usize),
        (i0, i1): (usize, usize),
        dst: &mut Vec<f32>,
    ) {
        let d = self.d;
        dst.clear();
        for h in h0..h0 + g {
            let (at, rs) = if of_q {
                self.q_at(bi, h)
            } else {
                (self.out_at(bi, h), self.heads * d)
            };
            for i in i0..i1 {
                dst.extend_from_slice(&src[at + i * rs..at + i * rs + d]);
            }
        }
    }
}

/// The mask as the kernels read it: a rule, or the dense bias's data.
#[derive(Clone, Copy)]
enum MaskView<'a> {
    Rule(&'a MaskRule),
    /// Bias data `[bias_b, 1, s, t]`.
    Bias(&'a [f32], usize),
}

impl MaskView<'_> {
    fn key_range(&self, i0: usize, i1: usize, t: usize) -> (usize, usize) {
        match self {
            MaskView::Rule(r) => r.key_range(i0, i1, t),
            MaskView::Bias(..) => (0, t),
        }
    }

    fn query_range(&self, j0: usize, j1: usize, s: usize) -> (usize, usize) {
        match self {
            MaskView::Rule(r) => r.query_range(j0, j1, s),
            MaskView::Bias(..) => (0, s),
        }
    }

    fn tile(&self, bi: usize, i: (usize, usize), j: (usize, usize)) -> Tile {
        match self {
            MaskView::Rule(r) => r.tile(bi, i, j),
            MaskView::Bias(..) => Tile::Partial,
        }
    }

    /// Masks query `i`'s scores for keys `j0..`: −∞ where hidden, or the bias added.
    fn apply(&self, bi: usize, i: usize, j0: usize, (s, t): (usize, usize), row: &mut [f32]) {
        match self {
            MaskView::Rule(r) => r.hide(bi, i, j0, row),
            MaskView::Bias(bias, bias_b) => {
                let at = ((bi % bias_b) * s + i) * t + j0;
                let n = row.len();
                row.iter_mut()
                    .zip(&bias[at..at + n])
                    .for_each(|(x, c)| *x += c);
            }
        }
    }
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("attention: {what} must be a contiguous f32 tensor"),
    }
}

/// The contiguous f32 data of a tensor's CPU storage (from `Tensor::storage_and_layout`).
fn cpu_data<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(s) => f32s(s, l, what),
        _ => candle_core::bail!("attention: {what} must be on the CPU"),
    }
}

/// A raw pointer that rayon tasks may share; every task writes a disjoint part (or holds the
/// lock of the part it adds to).
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl TiledAttention {
    /// Runs `f` with the mask's view (the bias's storage borrowed for the call).
    fn with_mask<R>(&self, dm: &Dims, f: impl FnOnce(MaskView) -> Result<R>) -> Result<R> {
        self.mask.check(dm.b, dm.s, dm.t)?;
        match &self.mask {
            AttnMask::Rule(r) => f(MaskView::Rule(r)),
            AttnMask::Bias(b) => {
                let (st, l) = b.storage_and_layout();
                let data = cpu_data(&st, l, "bias")?;
                f(MaskView::Bias(data, b.dim(0)?))
            }
        }
    }

    fn poisoned() -> candle_core::Error {
        candle_core::Error::Msg("attention: poisoned".into())
    }
}

impl CustomOp3 for TiledAttention {
    fn name(&self) -> &'static str {
        "tiled-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = Dims::of(lq, lk, lv, self.heads_last)?;
        let (q, k, v) = (f32s(sq, lq, "q")?, f32s(sk, lk, "k")?, f32s(sv, lv, "v")?);
        let Dims { b, heads, s, d, .. } = dm;
        let mut out = vec![0f32; b * s * heads * d];
        let mut lse = vec![0f32; b * heads * s];
        let (dst, lse_dst) = (Out(out.as_mut_ptr()), Out(lse.as_mut_ptr()));
        let (nqb, g) = (dm.q_blocks(), dm.stack());
        let stacks = heads / g;
        self.with_mask(&dm, |mask| {
            (0..b * stacks * nqb).into_par_iter().for_each(|task| {
                let (bst, qb) = (task / nqb, task % nqb);
                let (bi, h0) = (bst / stacks, bst % stacks * g);
                let i0 = qb * BQ;
                let i1 = (i0 + BQ).min(s);
                let (o, l) = (dst, lse_dst);
                // SAFETY: this task alone writes rows i0..i1 of heads h0..h0+g of row bi in
                // `out` and `lse`; the reads stay inside the checked operands.
                unsafe {
                    forward_block(&dm, mask, (q, k, v), (bi, h0), (i0, i1), o.0, l.0);
                }
            });
            Ok(())
        })?;
        *self.lse.lock().map_err(|_| Self::poisoned())? = Some(lse);
        Ok((CpuStorage::F32(out), Shape::from((b, s, heads * d))))
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
            .map_err(|_| Self::poisoned())?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("attention: backward without a forward pass".into())
            })?;
        let (grad, res) = (grad.contiguous()?, res.contiguous()?);
        let dm = Dims::of(q.layout(), k.layout(), v.layout(), self.heads_last)?;
        let Dims {
            b,
            heads,
            s,
            d,
            kv,
            t,
            ..
        } = dm;
        let (q_shape, kv_shape, dev) = (q.shape().clone(), k.shape().clone(), q.device().clone());
        let guards = [q, k, v, &grad, &res].map(|t| t.storage_and_layout());
        let [q, k, v, g, o] = [("q", 0), ("k", 1), ("v", 2), ("grad", 3), ("output", 4)]
            .map(|(what, i)| cpu_data(&guards[i].0, guards[i].1, what));
        let (q, k, v, g, o) = (q?, k?, v?, g?, o?);
        // D = Σ_d dout ∘ out per row, [b, heads, s]
        let mut dsum = vec![0f32; b * heads * s];
        dsum.par_chunks_mut(s).enumerate().for_each(|(bh, row)| {
            let at = dm.out_at(bh / heads, bh % heads);
            for (i, x) in row.iter_mut().enumerate() {
                let r = at + i * heads * d;
                let dot: f64 = g[r..r + d]
                    .iter()
                    .zip(&o[r..r + d])
                    .map(|(a, b)| (a * b) as f64)
                    .sum();
                *x = dot as f32;
            }
        });
        let mut dq = vec![0f32; b * heads * s * d];
        let mut dk = vec![0f32; b * kv * t * d];
        let mut dv = vec![0f32; b * kv * t * d];
        let nqb = dm.q_blocks();
        let locks: Vec<Mutex<()>> = (0..b * heads * nqb).map(|_| Mutex::new(())).collect();
        let ptrs = (
            Out(dq.as_mut_ptr()),
            Out(dk.as_mut_ptr()),
            Out(dv.as_mut_ptr()),
        );
        let nkb = t.div_ceil(BK);
        self.with_mask(&dm, |mask| {
            (0..b * kv * nkb).into_par_iter().try_for_each(|task| {
                let (group, kb) = (task / nkb, task % nkb);
                let (bi, kvi) = (group / kv, group % kv);
                let j0 = kb * BK;
                let j1 = (j0 + BK).min(t);
                let ctx = BackwardCtx {
                    dm: &dm,
                    mask,
                    q,
                    k,
                    v,
                    g,
                    lse: &lse,
                    dsum: &dsum,
                    locks: &locks,
                };
                // SAFETY: this task alone writes rows j0..j1 of kv head kvi of row bi in dk
                // and dv; it adds to dq only under the lock of the query block it adds to.
                unsafe { ctx.key_block((bi, kvi), (j0, j1), ptrs) }
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dq, q_shape, &dev)?),
            Some(Tensor::from_vec(dk, kv_shape.clone(), &dev)?),
            Some(Tensor::from_vec(dv, kv_shape, &dev)?),
        ))
    }
}

/// `scale · q kᵀ` of one tile into `buf` (rows `BK` apart), masked unless the tile is whole:
/// a stack of `g` heads' queries `i0..i0+rows` of batch row `bi` (`[g·rows, d]` at `q`, head
/// after head) against keys `j0..j0+cols` (first at `k`, rows `k_rs` apart).
///
/// # Safety
/// `q` and `k` must be valid for `g·rows` and `cols` rows of `dm.d` values.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_scores(
    dm: &Dims,
    mask: MaskView,
    tile: Tile,
    q: *const f32,
    (k, k_rs): (*const f32, usize),
    (bi, i0, rows, g): (usize, usize, usize, usize),
    (j0, cols): (usize, usize),
    buf: &mut [f32],
) {
    gemm_f32(
        (g * rows, cols, dm.d),
        buf.as_mut_ptr(),
        BK,
        false,
        q,
        (dm.d, 1),
        k,
        (1, k_rs),
        dm.scale(),
        Threads::One,
    );
    if tile == Tile::Partial {
        for x in 0..g * rows {
            let row = &mut buf[x * BK..x * BK + cols];
            mask.apply(bi, i0 + x % rows, j0, (dm.s, dm.t), row);
        }
    }
}

/// Output rows `i0..i1` of the stack of heads from `h0` ([`Dims::stack`] of them) of batch row
/// `bi`, and their log-sum-exps.
///
/// # Safety
/// `out` and `lse` must be the `[b, s, heads·d]` and `[b, heads, s]` buffers of `dm`, with no
/// one else writing those rows meanwhile.
unsafe fn forward_block(
    dm: &Dims,
    mask: MaskView,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (bi, h0): (usize, usize),
    (i0, i1): (usize, usize),
    out: *mut f32,
    lse: *mut f32,
) {
    let Dims { s, t, d, heads, .. } = *dm;
    let (rows, g) = (i1 - i0, dm.stack());
    let n = g * rows;
    let mut qs = Vec::with_capacity(n * d);
    dm.gather(q, true, (bi, h0, g), (i0, i1), &mut qs);
    let (ko, kv_rs) = dm.kv_at(bi, h0 / dm.rep());
    let mut scores = vec![0f32; n * BK];
    let mut acc = vec![0f32; n * d];
    let mut m = vec![f32::NEG_INFINITY; n];
    let mut l = vec![0f64; n];
    let (lo, hi_k) = mask.key_range(i0, i1, t);
    let mut j0 = lo - lo % BK;
    while j0 < hi_k {
        // the tile ends at the block's last visible key: the diagonal tile of a causal mask
        // computes no columns past it
        let j1 = (j0 + BK).min(hi_k);
        let cols = j1 - j0;
        let tile = mask.tile(bi, (i0, i1), (j0, j1));
        if tile != Tile::Skip {
            let k_blk = (k[ko + j0 * kv_rs..].as_ptr(), kv_rs);
            let at = (bi, i0, rows, g);
            tile_scores(
                dm,
                mask,
                tile,
                qs.as_ptr(),
                k_blk,
                at,
                (j0, cols),
                &mut scores,
            );
            for x in 0..n {
                let row = &mut scores[x * BK..x * BK + cols];
                let m_new = max(row).max(m[x]);
                if m_new == f32::NEG_INFINITY {
                    // nothing visible yet: the row's probabilities are all 0 (`max` skips
                    // NaNs: a NaN score must still poison the row, as softmax's would)
                    if row.iter().any(|x| x.is_nan()) {
                        l[x] = f64::NAN;
                    }
                    row.fill(0.0);
                    continue;
                }
                let sum = exp_shifted_in_place(row, m_new);
                if m[x] != m_new {
                    let corr = crate::softmax_row::exp(m[x] - m_new);
                    l[x] *= corr as f64;
                    scale_row(&mut acc[x * d..(x + 1) * d], corr);
                    m[x] = m_new;
                }
                l[x] += sum;
            }
            // acc += p · v
            gemm_f32(
                (n, d, cols),
                acc.as_mut_ptr(),
                d,
                true,
                scores.as_ptr(),
                (BK, 1),
                v[ko + j0 * kv_rs..].as_ptr(),
                (kv_rs, 1),
                1.0,
                Threads::One,
            );
        }
        j0 = j1;
    }
    for x in 0..n {
        let (h, i) = (h0 + x / rows, i0 + x % rows);
        let dst = std::slice::from_raw_parts_mut(out.add(dm.out_at(bi, h) + i * heads * d), d);
        let src = &acc[x * d..(x + 1) * d];
        let lse_at = lse.add((bi * heads + h) * s + i);
        if l[x] != 0.0 {
            let inv = (1.0 / l[x]) as f32;
            dst.iter_mut().zip(src).for_each(|(o, a)| *o = a * inv);
            *lse_at = m[x] + (l[x].ln() as f32);
        } else {
            dst.fill(0.0);
            *lse_at = f32::INFINITY;
        }
    }
}

/// What every key block's backward task reads.
struct BackwardCtx<'a> {
    dm: &'a Dims,
    mask: MaskView<'a>,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    /// The output's gradient, `[b, s, heads·d]`.
    g: &'a [f32],
    lse: &'a [f32],
    dsum: &'a [f32],
    /// One per query block of each head: held while adding to its rows of dq.
    locks: &'a [Mutex<()>],
}

impl BackwardCtx<'_> {
    /// The gradients of keys `j0..j1` of kv head `kvi` (dk, dv: this task's alone), and their
    /// share of every query head's dq that sees them; the query heads of the group meet the
    /// key block in stacks of [`Dims::stack`].
    ///
    /// # Safety
    /// `dq`, `dk`, `dv` must be the gradient buffers of `dm`'s q, k and v layouts, with no one
    /// else writing rows j0..j1 of kv head kvi meanwhile, and dq written only under `locks`.
    unsafe fn key_block(
        &self,
        (bi, kvi): (usize, usize),
        (j0, j1): (usize, usize),
        (dq, dk, dv): (Out, Out, Out),
    ) -> Result<()> {
        let dm = self.dm;
        let Dims { s, d, heads, .. } = *dm;
        let g = dm.stack();
        let (ko, kv_rs) = dm.kv_at(bi, kvi);
        let k_blk = self.k[ko + j0 * kv_rs..].as_ptr();
        let v_blk = self.v[ko + j0 * kv_rs..].as_ptr();
        let (dk_blk, dv_blk) = (dk.0.add(ko + j0 * kv_rs), dv.0.add(ko + j0 * kv_rs));
        let mut p = vec![0f32; g * BQ * BK];
        let mut dp = vec![0f32; g * BQ * BK];
        let (mut qs, mut gs) = (Vec::new(), Vec::new());
        let mut dqs = vec![0f32; g * BQ * d];
        let (lo, hi) = self.mask.query_range(j0, j1, s);
        let nqb = dm.q_blocks();
        for h0 in (kvi * dm.rep()..(kvi + 1) * dm.rep()).step_by(g) {
            for qb in lo / BQ..hi.div_ceil(BQ) {
                let i0 = qb * BQ;
                let i1 = (i0 + BQ).min(s);
                let rows = i1 - i0;
                let n = g * rows;
                // no columns past the query block's last visible key
                let j1 = j1.min(self.mask.key_range(i0, i1, dm.t).1);
                if j1 <= j0 {
                    continue;
                }
                let cols = j1 - j0;
                let tile = self.mask.tile(bi, (i0, i1), (j0, j1));
                if tile == Tile::Skip {
                    continue;
                }
                dm.gather(self.q, true, (bi, h0, g), (i0, i1), &mut qs);
                dm.gather(self.g, false, (bi, h0, g), (i0, i1), &mut gs);
                // the stack's row x is query i0 + x % rows of head h0 + x / rows
                let row_of = |x: usize| (bi * heads + h0 + x / rows) * s + i0 + x % rows;
                // p = exp(scale · q kᵀ + mask − lse)
                let at = (bi, i0, rows, g);
                let ks = (k_blk, kv_rs);
                tile_scores(dm, self.mask, tile, qs.as_ptr(), ks, at, (j0, cols), &mut p);
                for x in 0..n {
                    let row = &mut p[x * BK..x * BK + cols];
                    exp_shifted_in_place(row, self.lse[row_of(x)]);
                }
                // dv += pᵀ · dout
                gemm_f32(
                    (cols, d, n),
                    dv_blk,
                    kv_rs,
                    true,
                    p.as_ptr(),
                    (1, BK),
                    gs.as_ptr(),
                    (d, 1),
                    1.0,
                    Threads::One,
                );
                // dp = dout · vᵀ
                gemm_f32(
                    (n, cols, d),
                    dp.as_mut_ptr(),
                    BK,
                    false,
                    gs.as_ptr(),
                    (d, 1),
                    v_blk,
                    (1, kv_rs),
                    1.0,
                    Threads::One,
                );
                // ds = p ∘ (dp − D), in p
                for x in 0..n {
                    let dr = self.dsum[row_of(x)];
                    let at = x * BK;
                    p[at..at + cols]
                        .iter_mut()
                        .zip(&dp[at..at + cols])
                        .for_each(|(x, g)| *x *= g - dr);
                }
                // dk += scale · dsᵀ · q
                gemm_f32(
                    (cols, d, n),
                    dk_blk,
                    kv_rs,
                    true,
                    p.as_ptr(),
                    (1, BK),
                    qs.as_ptr(),
                    (d, 1),
                    dm.scale(),
                    Threads::One,
                );
                // dq += scale · ds · k: the stack's share, then each head's rows under the
                // query block's lock
                gemm_f32(
                    (n, d, cols),
                    dqs.as_mut_ptr(),
                    d,
                    false,
                    p.as_ptr(),
                    (BK, 1),
                    k_blk,
                    (kv_rs, 1),
                    dm.scale(),
                    Threads::One,
                );
                for r in 0..g {
                    let h = h0 + r;
                    let (qo, q_rs) = dm.q_at(bi, h);
                    let _held = self.locks[(bi * heads + h) * nqb + qb]
                        .lock()
                        .map_err(|_| TiledAttention::poisoned())?;
                    for x in 0..rows {
                        let dst = std::slice::from_raw_parts_mut(dq.0.add(qo + (i0 + x) * q_rs), d);
                        let src = &dqs[(r * rows + x) * d..(r * rows + x + 1) * d];
                        dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::compare::max_abs_diff;
    use candle_core::{Device, Var, D};

    /// The composed attention: repeat kv heads, scale, dense bias, softmax; in f32 (inputs of
    /// other dtypes are cast), returned in q's dtype.
    pub(crate) fn composed(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, h, s, d) = q.dims4()?;
        let rep = h / k.dim(1)?;
        let f32 = |x: &Tensor| x.to_dtype(DType::F32);
        let expand = |x: &Tensor| -> Result<Tensor> {
            let (b, kv, t, d) = x.dims4()?;
            Tensor::cat(&vec![&f32(x)?; rep], 2)?.reshape((b, kv * rep, t, d))
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let scores =
            (f32(q)?.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?.broadcast_add(bias)?;
        let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
        p.matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h * d))?
            .to_dtype(q.dtype())
    }

    /// Values and the q/k/v gradients (under a random upstream gradient that is 0 on `dead`
    /// query rows, which see nothing: the composed softmax spreads them uniformly, the tiled
    /// kernel gives 0) agree to f32 tolerance.
    pub(crate) fn assert_same(
        got: Tensor,
        want: Tensor,
        vars: [&Var; 3],
        live: &Tensor,
    ) -> Result<()> {
        let (got, want) = (got.broadcast_mul(live)?, want.broadcast_mul(live)?);
        let diff = max_abs_diff(&got, &want)?;
        assert!(diff < 2e-5, "values differ by {diff}");
        let up = crate::seeded::randn(0f32, 1., got.shape(), got.device())?;
        let g1 = (got * &up)?.sum_all()?.backward()?;
        let g2 = (want * &up)?.sum_all()?.backward()?;
        for x in vars {
            let (a, b) = (g1.get(x.as_tensor()), g2.get(x.as_tensor()));
            let diff = max_abs_diff(a.unwrap(), b.unwrap())?;
            assert!(
                diff < 1e-4,
                "shape {:?}: gradient differs by {diff}",
                x.dims()
            );
        }
        Ok(())
    }

    /// `[b, s, 1]`: 1 on query rows that see some key, 0 on rows that see none.
    pub(crate) fn live_rows(bias: &Tensor, b: usize) -> Result<Tensor> {
        let (_, _, s, _) = bias.dims4()?;
        let seen = bias.ge(-1.0e8)?.to_dtype(DType::F32)?.max(D::Minus1)?;
        seen.broadcast_as((b, 1, s))?
            .reshape((b, s, 1))?
            .contiguous()
    }

    fn vars(dims: [(usize, usize, usize, usize); 2], heads_last: bool) -> Result<[Var; 3]> {
        let dev = Device::Cpu;
        let [(b, h, s, d), (_, kv, t, _)] = dims;
        let make = |n: usize, len: usize| -> Result<Var> {
            let shape = if heads_last {
                (b, len, n * d, 1)
            } else {
                (b, n, len, d)
            };
            let x = crate::seeded::randn(0f32, 1.5, shape, &dev)?;
            let x = if heads_last { x.squeeze(3)? } else { x };
            Var::from_tensor(&x)
        };
        Ok([make(h, s)?, make(kv, t)?, make(kv, t)?])
    }

    /// `[b, s, n·d]` → `[b, n, s, d]`.
    fn first(x: &Tensor, n: usize) -> Result<Tensor> {
        let (b, s, w) = x.dims3()?;
        x.reshape((b, s, n, w / n))?.transpose(1, 2)?.contiguous()
    }

    /// The tiled kernel under `mask` against the composed version under its dense `bias`, for
    /// inputs `[q, k, v]` heads-first or (`heads_last: Some((heads, kv_heads))`) heads-last.
    fn compare(
        mask: &AttnMask,
        bias: &Tensor,
        [q, k, v]: &[Var; 3],
        heads_last: Option<(usize, usize)>,
    ) -> Result<()> {
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let (got, (qf, kf, vf)) = match heads_last {
            Some((h, kv)) => (
                try_attention_heads_last(qt, kt, vt, mask, h, kv).unwrap()?,
                (first(qt, h)?, first(kt, kv)?, first(vt, kv)?),
            ),
            None => (
                try_attention(qt, kt, vt, mask).unwrap()?,
                (qt.clone(), kt.clone(), vt.clone()),
            ),
        };
        let want = composed(&qf, &kf, &vf, bias)?;
        assert_eq!(got.dims(), want.dims());
        let live = live_rows(bias, got.dim(0)?)?;
        assert_same(got, want, [q, k, v], &live)
    }

    /// Odd lengths that cut tiles raggedly, several tiles per row, grouped kv heads, both
    /// layouts; masks: causal, sliding windows, padding, packed examples, a cached prefix, no
    /// mask (bidirectional) and a dense bias. Values and gradients equal the composed version's.
    #[test]
    fn tiled_attention_matches_the_composed_version_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let s = 2 * BK + 37; // three key tiles and the last query tile ragged
        let packed: Vec<Vec<u32>> = vec![
            (0..s)
                .map(|i| {
                    if i < 90 {
                        1
                    } else if i < 250 {
                        2
                    } else if i < s - 11 {
                        3
                    } else {
                        0
                    }
                })
                .collect(),
            (0..s).map(|i| if i < s - 70 { 1 } else { 0 }).collect(),
        ];
        let padded: Vec<Vec<u32>> = vec![vec![1; s], (0..s).map(|i| (i < 150) as u32).collect()];
        let ones = vec![vec![1u32; s]; 2];
        let masks: Vec<(&str, AttnMask, usize)> = vec![
            ("causal", AttnMask::causal(&ones, None)?, 0),
            ("window 100", AttnMask::causal(&ones, Some(100))?, 0),
            ("window 1", AttnMask::causal(&ones, Some(1))?, 0),
            ("padding", AttnMask::causal(&padded, None)?, 0),
            (
                "packed + window 70",
                AttnMask::causal(&packed, Some(70))?,
                0,
            ),
            (
                "bidirectional padding",
                AttnMask::bidirectional(&padded)?,
                0,
            ),
            ("cached 45, window 200", AttnMask::cached(45, Some(200)), 45),
        ];
        for (name, mask, past) in masks {
            for (h, kv, d, heads_last) in [
                (4, 2, 16, true),
                (3, 1, 8, false),
                (2, 2, 32, true),
                (8, 1, 8, true),
            ] {
                let (b, q_len) = (2, s - past);
                let bias = mask.to_bias(b, q_len, s, &dev)?;
                // the rule, and the same mask as a dense bias through the same kernel
                for m in [&mask, &AttnMask::bias(bias.clone())] {
                    let xs = vars([(b, h, q_len, d), (b, kv, s, d)], heads_last)?;
                    compare(m, &bias, &xs, heads_last.then_some((h, kv)))
                        .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
                }
            }
        }
        Ok(())
    }

    /// A query row that sees nothing (a left-padded position) gives 0 and passes no gradient.
    #[test]
    fn rows_that_see_nothing_give_zero() -> Result<()> {
        let segs = vec![vec![0, 0, 1, 1, 1]];
        let mask = AttnMask::causal(&segs, None)?;
        let [q, k, v] = vars([(1, 2, 5, 4), (1, 2, 5, 4)], true)?;
        let out =
            try_attention_heads_last(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 2, 2)
                .unwrap()?;
        let rows = out.squeeze(0)?.to_vec2::<f32>()?;
        assert!(rows[0].iter().chain(&rows[1]).all(|x| *x == 0.0));
        assert!(rows[2].iter().any(|x| *x != 0.0));
        let g = out.sum_all()?.backward()?;
        let dq = g.get(q.as_tensor()).unwrap().squeeze(0)?.to_vec2::<f32>()?;
        assert!(dq[0].iter().all(|x| x.is_finite() && *x == 0.0));
        Ok(())
    }

    /// A NaN score makes its row NaN (as the composed softmax does), even where it is the
    /// only score a row has: bad numbers are never hidden.
    #[test]
    fn nan_scores_poison_their_rows() -> Result<()> {
        let mask = AttnMask::cached(0, None);
        let dev = Device::Cpu;
        let mut qv = vec![0.5f32; 3 * 4];
        qv[0] = f32::NAN; // row 0 sees one key, whose score is NaN
        let q = Tensor::from_vec(qv, (1, 3, 4), &dev)?;
        let k = Tensor::ones((1, 3, 4), DType::F32, &dev)?;
        let out = try_attention_heads_last(&q, &k, &k, &mask, 1, 1).unwrap()?;
        let rows = out.squeeze(0)?.to_vec2::<f32>()?;
        assert!(rows[0].iter().all(|x| x.is_nan()), "{rows:?}");
        assert!(rows[1].iter().all(|x| x.is_finite()), "{rows:?}");
        Ok(())
    }

    #[test]
    fn other_devices_and_dtypes_and_bad_shapes_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let mask = AttnMask::cached(0, None);
        let q = Tensor::zeros((1, 2, 3, 4), DType::F64, &dev)?;
        assert!(try_attention(&q, &q, &q, &mask).is_none());
        let q = Tensor::zeros((1, 3, 3, 4), DType::F32, &dev)?;
        let k = Tensor::zeros((1, 2, 3, 4), DType::F32, &dev)?;
        let e = try_attention(&q, &k, &k, &mask)
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a multiple"), "{e}");
        let bias = AttnMask::bias(Tensor::zeros((1, 1, 3, 4), DType::F32, &dev)?);
        let e = try_attention(&q, &q, &q, &bias)
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("bias"), "{e}");
        Ok(())
    }
}
