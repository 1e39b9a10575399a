//! A whole LoRA layer as one op on the CPU (f32): `y = x·Wᵀ + u·Bᵀ` with
//! `u = s·dropout(x)·Aᵀ` (rank r). Every product goes straight to the matmul kernel: the
//! low-rank product is accumulated into the base product's buffer (no `[rows, out]` delta
//! buffer, no add pass), and the backward pass is one node that writes dx, dA and dB in their
//! final layouts, `dx = g·W + (s·g·B)·A` accumulated into one buffer. Composed from candle ops the
//! layer is six nodes, and candle's backward pays a zero-filled buffer and an add for every
//! input of every node. W is frozen: captured, never differentiated.
use crate::cpu_gemm::{product, product_into, Strided, Threads};
use crate::dropout::DropoutMask;
use crate::quantized::Frozen;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// `x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ` for `x` `[.., in]`, `w` `[out, in]`, `a` `[r, in]`, `b`
/// `[out, r]`, differentiable in x, A and B. `wt`, a contiguous `[in, out]` copy of `wᵀ` if the
/// caller keeps one, is what the forward product reads (the kernel repacks a transposed operand
/// on every call); a quantized W is dequantized a chunk at a time in both passes
/// ([`crate::quantized`]). `None` when the op does not apply (not all CPU f32, or a dense W not
/// contiguous): use the generic op.
pub fn try_lora_matmul(
    x: &Tensor,
    w: &Frozen,
    wt: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    dropout: Option<DropoutMask>,
) -> Option<Result<Tensor>> {
    let w_fits = match w {
        Frozen::Dense(w) => fits(&[w]) && w.is_contiguous(),
        Frozen::Quant(q) => q.device().is_cpu(),
    };
    if !fits(&[x, a, b]) || !wt.is_none_or(|t| fits(&[t])) || !w_fits {
        return None;
    }
    Some((|| {
        let (x, a, b) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
        let sizes = Sizes::of(&x, w, wt, &a, &b)?;
        let u = low_rank(&x, &a, scaling as f32, dropout.as_ref(), sizes)?;
        x.apply_op3(
            &a,
            &b,
            LoraMatmul {
                w: w.clone(),
                wt: wt.cloned(),
                scaling: scaling as f32,
                dropout,
                u,
            },
        )
    })())
}

/// Whether the op runs on these operands: all f32 on the CPU.
pub fn fits(operands: &[&Tensor]) -> bool {
    operands
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Rows of x (leading dims folded), W's `[out, in]` and the rank.
#[derive(Clone, Copy)]
struct Sizes {
    rows: usize,
    out: usize,
    inner: usize,
    r: usize,
}

impl Sizes {
    fn of(x: &Tensor, w: &Frozen, wt: Option<&Tensor>, a: &Tensor, b: &Tensor) -> Result<Sizes> {
        let (out, inner) = w.dims2()?;
        let (r, a_in) = a.dims2()?;
        let k = x.dims().last().copied().unwrap_or(0);
        let wt_fits = wt.is_none_or(|t| t.dims() == [inner, out] && t.is_contiguous());
        if k != inner || a_in != inner || b.dims() != [out, r] || !wt_fits {
            candle_core::bail!(
                "lora matmul: x {:?}, A {:?}, B {:?} and Wᵀ {:?} do not fit W {:?}",
                x.shape(),
                a.shape(),
                b.shape(),
                wt.map(|t| t.shape()),
                w.dims2()?
            );
        }
        Ok(Sizes {
            rows: x.elem_count() / inner.max(1),
            out,
            inner,
            r,
        })
    }
}

/// The f32 values of a contiguous CPU tensor's storage.
fn values<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("lora matmul: expected a contiguous f32 CPU tensor"),
    }
}

/// `dropout(x)` as a tensor (the layer's input when nothing is dropped).
fn dropped(x: &Tensor, dropout: Option<&DropoutMask>) -> Result<Tensor> {
    match dropout {
        Some(mask) => mask.apply(&x.detach(), false),
        None => Ok(x.detach()),
    }
}

/// `u = s·dropout(x)·Aᵀ`, `[rows, r]`.
fn low_rank(
    x: &Tensor,
    a: &Tensor,
    s: f32,
    dropout: Option<&DropoutMask>,
    Sizes { rows, inner, r, .. }: Sizes,
) -> Result<Vec<f32>> {
    let xl = dropped(x, dropout)?;
    let (xs, xl) = xl.storage_and_layout();
    let (as_, al) = a.storage_and_layout();
    let (xv, av) = (values(&xs, xl)?, values(&as_, al)?);
    // x rows×inner times Aᵀ (A r×inner read transposed)
    product(
        (rows, r, inner),
        Strided {
            data: xv,
            rs: inner,
            cs: 1,
        },
        Strided {
            data: av,
            rs: 1,
            cs: inner,
        },
        s,
        Threads::All,
    )
}

struct LoraMatmul {
    w: Frozen,
    /// `wᵀ` stored contiguous (`[in, out]`), when the caller keeps one.
    wt: Option<Tensor>,
    scaling: f32,
    dropout: Option<DropoutMask>,
    /// `s·dropout(x)·Aᵀ`, `[rows, r]`, kept for the backward pass.
    u: Vec<f32>,
}

impl CustomOp3 for LoraMatmul {
    fn name(&self) -> &'static str {
        "lora-matmul"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        _sa: &CpuStorage,
        _la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inner) = self.w.dims2()?;
        let r = lb.dims()[1];
        let rows = lx.shape().elem_count() / inner.max(1);
        let (x, b) = match (sx, sb, lx.contiguous_offsets(), lb.contiguous_offsets()) {
            (CpuStorage::F32(x), CpuStorage::F32(b), Some((x0, x1)), Some((b0, b1))) => {
                (&x[x0..x1], &b[b0..b1])
            }
            _ => candle_core::bail!("lora matmul: x and B must be contiguous f32"),
        };
        if self.u.len() != rows * r || b.len() != out * r {
            candle_core::bail!("lora matmul: operands changed size since u was computed");
        }
        let mut y = match &self.w {
            Frozen::Quant(q) => q.product_cpu(x, rows)?,
            Frozen::Dense(w) => self.dense_product(w, x, (rows, out, inner))?,
        };
        // y += u·Bᵀ (B out×r read transposed)
        let u = Strided {
            data: &self.u,
            rs: r,
            cs: 1,
        };
        let bt = Strided {
            data: b,
            rs: 1,
            cs: r,
        };
        product_into(&mut y, (rows, out, r), true, u, bt, 1.0, Threads::All)?;
        let mut dims = lx.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inner) = self.w.dims2()?;
        let r = a.dim(0)?;
        let rows = x.elem_count() / inner.max(1);
        let s = self.scaling;
        let g = grad.contiguous()?;
        let xl = dropped(x, self.dropout.as_ref())?;
        let (gs, gl) = g.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (xs, xll) = xl.storage_and_layout();
        let (dx, da, db) = self.grads(
            Sizes {
                rows,
                out,
                inner,
                r,
            },
            s,
            [&gs, &as_, &bs, &xs],
            [gl, al, bl, xll],
        )?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(da, (r, inner), dev)?),
            Some(Tensor::from_vec(db, (out, r), dev)?),
        ))
    }
}

impl LoraMatmul {
    /// `x·Wᵀ` for a dense W, reading `wt` when kept.
    fn dense_product(
        &self,
        w: &Tensor,
        x: &[f32],
        (rows, out, inner): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let (ws, wl) = match &self.wt {
            Some(wt) => wt.storage_and_layout(),
            None => w.storage_and_layout(),
        };
        let (Storage::Cpu(CpuStorage::F32(wv)), Some((w0, w1))) = (&*ws, wl.contiguous_offsets())
        else {
            candle_core::bail!("lora matmul: W must be a contiguous f32 CPU tensor");
        };
        let data = &wv[w0..w1];
        // as the right operand (k = input feature, n = output feature): Wᵀ's rows, or W read
        // transposed
        let w = match self.wt {
            Some(_) => Strided {
                data,
                rs: out,
                cs: 1,
            },
            None => Strided {
                data,
                rs: 1,
                cs: inner,
            },
        };
        let x = Strided {
            data: x,
            rs: inner,
            cs: 1,
        };
        product((rows, out, inner), x, w, 1.0, Threads::All)
    }

    /// `(dx, dA, dB)` from the output gradient `g` `[rows, out]`:
    /// `du = s·g·B`, `dB = gᵀ·u`, `dA = duᵀ·dropout(x)`, `dx = g·W + dropout'(du·A)`.
    /// The storages (and layouts) are those of g, A, B and `dropout(x)`.
    fn grads(
        &self,
        Sizes {
            rows,
            out,
            inner,
            r,
        }: Sizes,
        s: f32,
        storages: [&Storage; 4],
        layouts: [&Layout; 4],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let [g, a, b, xl] = [0, 1, 2, 3].map(|i| values(storages[i], layouts[i]));
        let (g, a, b, xl) = (g?, a?, b?, xl?);
        let u = &self.u;
        let want = [rows * out, r * inner, out * r, rows * inner];
        if [g.len(), a.len(), b.len(), xl.len()] != want || u.len() != rows * r {
            candle_core::bail!("lora matmul: the output gradient does not fit the layer");
        }
        let m = |data, rs, cs| Strided { data, rs, cs };
        let t = Threads::All;
        // du = s·g·B: g rows×out, B out×r
        let du = product((rows, r, out), m(g, out, 1), m(b, r, 1), s, t)?;
        // dB = gᵀ·u: g read transposed (out×rows), u rows×r
        let db = product((out, r, rows), m(g, 1, out), m(u, r, 1), 1.0, t)?;
        // dA = duᵀ·dropout(x): du read transposed (r×rows), x rows×inner
        let da = product((r, inner, rows), m(&du, 1, r), m(xl, inner, 1), 1.0, t)?;
        // dx = g·W (W out×inner) + the low-rank part du·A (A r×inner), through the same
        // dropout mask when there is one
        let mut dx = match &self.w {
            Frozen::Dense(w) => {
                let (ws, wl) = w.storage_and_layout();
                let wv = values(&ws, wl)?;
                if wv.len() != out * inner {
                    candle_core::bail!("lora matmul: W does not fit the layer");
                }
                let wv = Strided {
                    data: wv,
                    rs: inner,
                    cs: 1,
                };
                product((rows, inner, out), m(g, out, 1), wv, 1.0, t)?
            }
            Frozen::Quant(q) => {
                let mut dx = vec![0f32; rows * inner];
                q.grad_cpu(g, rows, &mut dx, false)?;
                dx
            }
        };
        let (du_, a_) = (m(&du, r, 1), m(a, inner, 1));
        match &self.dropout {
            None => product_into(&mut dx, (rows, inner, r), true, du_, a_, 1.0, t)?,
            Some(mask) => {
                let low = product((rows, inner, r), du_, a_, 1.0, t)?;
                let low = Tensor::from_vec(low, (rows, inner), &candle_core::Device::Cpu)?;
                let low = mask.apply(&low, false)?;
                let (ls, ll) = low.storage_and_layout();
                let low = values(&ls, ll)?;
                dx.par_iter_mut()
                    .zip(low.par_iter())
                    .for_each(|(d, l)| *d += l);
            }
        }
        Ok((dx, da, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::max_abs_diff;
    use crate::dropout::{Dropout, StepSeed};
    use candle_core::{Device, Var};

    /// The op against the composed layer (candle ops), values and the gradients of x, A and B,
    /// with the transposed weight copy and without, and with LoRA dropout (the composed side
    /// through `Dropout::apply`, the same mask).
    #[test]
    fn fused_lora_matmul_matches_the_composed_layer_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, inner, out, r, s) = (10, 24, 18, 4, 0.75);
        let x = crate::seeded::var_randn(0f32, 1., (2, rows / 2, inner), &dev)?;
        let w = crate::seeded::randn(0f32, 1., (out, inner), &dev)?;
        let wt = w.t()?.contiguous()?;
        let a = crate::seeded::var_randn(0f32, 1., (r, inner), &dev)?;
        let b = crate::seeded::var_randn(0f32, 1., (out, r), &dev)?;
        let seed = StepSeed::default();
        seed.set(7, 3, 0);
        let drop = Dropout::new(0.3, "layers.0.q_proj", seed);
        let up = crate::seeded::randn(0f32, 1., (2, rows / 2, out), &dev)?;
        for (wt, dropout) in [(None, None), (Some(&wt), None), (Some(&wt), Some(&drop))] {
            let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
            let mask = dropout.and_then(|d| d.draw());
            let fused =
                try_lora_matmul(xt, &Frozen::Dense(w.clone()), wt, at, bt, s, mask).unwrap()?;
            let xl = match dropout {
                Some(d) => d.apply(xt)?,
                None => xt.clone(),
            };
            let base = xt.broadcast_matmul(&w.t()?)?;
            let delta = (xl.broadcast_matmul(&at.t()?)?.broadcast_matmul(&bt.t()?)? * s)?;
            let want = (base + delta)?;
            assert_eq!(fused.dims(), [2, rows / 2, out]);
            assert!(max_abs_diff(&fused, &want)? < 1e-4);
            let g1 = (fused * &up)?.sum_all()?.backward()?;
            let g2 = (want * &up)?.sum_all()?.backward()?;
            for v in [&x, &a, &b] {
                let (d1, d2) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                let d = max_abs_diff(d1, d2)?;
                assert!(
                    d < 1e-4,
                    "{:?} (dropout {}): {d}",
                    v.dims(),
                    dropout.is_some()
                );
                // the gradients carry no graph (one that did leaked every step's activations
                // through the optimizer's moments)
                assert!(!d1.track_op());
            }
            assert!(g1.get(&w).is_none());
        }
        // the dropout mask matters: without it the low-rank part differs
        let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
        let with = try_lora_matmul(xt, &Frozen::Dense(w.clone()), None, at, bt, s, drop.draw())
            .unwrap()?;
        let without =
            try_lora_matmul(xt, &Frozen::Dense(w.clone()), None, at, bt, s, None).unwrap()?;
        assert!(max_abs_diff(&with, &without)? > 1e-3);
        Ok(())
    }

    #[test]
    fn misfit_operands_are_errors_and_other_dtypes_are_not_fused() -> Result<()> {
        let dev = Device::Cpu;
        let x = crate::seeded::randn(0f32, 1., (3, 8), &dev)?;
        let w = crate::seeded::randn(0f32, 1., (5, 8), &dev)?;
        let a = crate::seeded::randn(0f32, 1., (2, 8), &dev)?;
        let b = crate::seeded::randn(0f32, 1., (5, 2), &dev)?;
        let bad_b = crate::seeded::randn(0f32, 1., (4, 2), &dev)?;
        let err =
            try_lora_matmul(&x, &Frozen::Dense(w.clone()), None, &a, &bad_b, 1.0, None).unwrap();
        assert!(err.unwrap_err().to_string().contains("do not fit W"));
        // a transposed copy of the wrong shape (W itself, not Wᵀ)
        let err =
            try_lora_matmul(&x, &Frozen::Dense(w.clone()), Some(&w), &a, &b, 1.0, None).unwrap();
        assert!(err.unwrap_err().to_string().contains("do not fit W"));
        let x64 = x.to_dtype(DType::F64)?;
        assert!(
            try_lora_matmul(&x64, &Frozen::Dense(w.clone()), None, &a, &b, 1.0, None).is_none()
        );
        // a strided W is left to the generic op
        let w_strided = crate::seeded::randn(0f32, 1., (8, 5), &dev)?.t()?;
        assert!(try_lora_matmul(&x, &Frozen::Dense(w_strided), None, &a, &b, 1.0, None).is_none());
        // no rows: an empty output, and empty gradients that still have their shapes
        let empty = Var::zeros((0, 8), DType::F32, &dev)?;
        let y = try_lora_matmul(
            empty.as_tensor(),
            &Frozen::Dense(w.clone()),
            None,
            &a,
            &b,
            1.0,
            None,
        )
        .unwrap()?;
        assert_eq!(y.dims(), [0, 5]);
        Ok(())
    }
}
