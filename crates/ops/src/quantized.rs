//! Frozen weights kept in GGML blocks (QLoRA on a GGUF base): a [`QuantMatrix`] holds a
//! quantized `[out, in]` matrix in candle's `QTensor` and every product with it dequantizes just
//! in time — on the CPU a chunk of rows at a time (at most [`CHUNK_ELEMENTS`] f32 values, in
//! parallel) straight into the matmul kernel's operand, on other devices the whole matrix for the
//! one product — and drops the f32 values again. The backward pass gives the input gradient
//! `g·W` the same way and no weight gradient.
//!
//! Why dequantize rather than candle's quantized matmul: candle's kernels quantize the
//! activations to 8 bits (llama.cpp's vec-dot), so the result would differ from the dequantized
//! model by the activation rounding, and they are vector kernels, slower than the f32 matrix
//! kernel once a product has more than a few rows. Dequantizing a chunk costs `out·in`
//! operations against the product's `rows·out·in`: at the hundreds of rows of a training step
//! it is a few percent of the step, and the values are exactly the dequantized model's.
//!
//! [`Frozen`] is what a layer holds: a dense tensor or a quantized matrix.
use crate::cpu_gemm::{gemm_f32, Threads};
use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Arc;

/// f32 values dequantized at once for one product (16 MiB).
pub const CHUNK_ELEMENTS: usize = 1 << 22;

/// The GGML types a weight may be kept in (block-quantized; F32/F16/BF16 tensors are dense).
pub const KEPT_TYPES: &[GgmlDType] = &[
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// A frozen `[out, in]` matrix in GGML blocks (each row its own blocks).
#[derive(Clone)]
pub struct QuantMatrix {
    q: Arc<QTensor>,
    out: usize,
    inner: usize,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantMatrix([{}, {}], {:?})",
            self.out,
            self.inner,
            self.q.dtype()
        )
    }
}

impl QuantMatrix {
    /// A 2-D `QTensor` of a block-quantized type ([`KEPT_TYPES`]).
    pub fn new(q: QTensor) -> Result<Self> {
        let (out, inner) = q.shape().dims2()?;
        if !KEPT_TYPES.contains(&q.dtype()) {
            candle_core::bail!("{:?} is not a block-quantized GGML type", q.dtype());
        }
        Ok(QuantMatrix {
            q: Arc::new(q),
            out,
            inner,
        })
    }

    /// `w` `[out, in]` quantized to `dtype` (on `w`'s device; CUDA quantizes on the CPU and
    /// uploads the blocks).
    pub fn quantize(w: &Tensor, dtype: GgmlDType) -> Result<Self> {
        let (_, inner) = w.dims2()?;
        if !inner.is_multiple_of(dtype.block_size()) {
            candle_core::bail!(
                "{inner} input features are not whole {:?} blocks of {}",
                dtype,
                dtype.block_size()
            );
        }
        let q = match w.device() {
            Device::Cpu => QTensor::quantize(w, dtype)?,
            dev => QTensor::quantize_onto(&w.to_device(&Device::Cpu)?, dtype, dev)?,
        };
        Self::new(q)
    }

    /// The quantized matrix on `device` (the blocks copied as they are).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        if self.q.device().same_device(device) {
            return Ok(self.clone());
        }
        let storage = QStorage::from_data(self.q.data()?, device, self.q.dtype())?;
        Self::new(QTensor::new(storage, (self.out, self.inner))?)
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inner)
    }

    pub fn ggml_dtype(&self) -> GgmlDType {
        self.q.dtype()
    }

    pub fn device(&self) -> Device {
        self.q.device()
    }

    /// Bytes the blocks take.
    pub fn size_in_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    fn row_bytes(&self) -> usize {
        self.inner / self.q.dtype().block_size() * self.q.dtype().type_size()
    }

    /// The rows in `order` (row `i` of the result is row `order[i]`): the blocks moved, not
    /// re-quantized.
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self> {
        if order.len() != self.out || order.iter().any(|&i| i >= self.out) {
            candle_core::bail!("row order of {} for {} rows", order.len(), self.out);
        }
        let data = self.q.data()?;
        let rb = self.row_bytes();
        let mut bytes = Vec::with_capacity(data.len());
        for &i in order {
            bytes.extend_from_slice(&data[i * rb..(i + 1) * rb]);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &self.q.device(), self.q.dtype())?;
        Self::new(QTensor::new(storage, (self.out, self.inner))?)
    }

    /// The whole matrix dequantized, `[out, in]` in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let w = match self.q.device() {
            Device::Cpu => {
                let mut v = vec![0f32; self.out * self.inner];
                self.dequantize_rows_into(0, &mut v)?;
                Tensor::from_vec(v, (self.out, self.inner), &Device::Cpu)?
            }
            dev => self.q.dequantize(&dev)?,
        };
        w.to_dtype(dtype)
    }

    /// Rows `ids` (any shape of integer ids) as an embedding lookup: `[ids.., in]` in `dtype`.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        self.q.embedding(ids)?.to_dtype(dtype)
    }

    /// Rows `first..` of a CPU matrix dequantized into `out` (a whole number of rows), on all
    /// cores.
    fn dequantize_rows_into(&self, first: usize, out: &mut [f32]) -> Result<()> {
        let inner = self.inner.max(1);
        let rows = out.len() / inner;
        if !out.len().is_multiple_of(inner) || first + rows > self.out {
            candle_core::bail!("rows {first}..{} of {}", first + rows, self.out);
        }
        let data = self.q.data()?;
        let rb = self.row_bytes();
        let dtype = self.q.dtype();
        let per_task = (1 << 16) / inner + 1;
        out.par_chunks_mut(per_task * inner)
            .enumerate()
            .try_for_each(|(t, chunk)| {
                let r0 = first + t * per_task;
                let n = chunk.len() / inner;
                let blocks = dtype.from_data(Cow::Borrowed(&data[r0 * rb..(r0 + n) * rb]));
                match blocks.dequantize(chunk.len())? {
                    CpuStorage::F32(v) => chunk.copy_from_slice(&v),
                    _ => candle_core::bail!("dequantize gave no f32 values"),
                }
                Ok(())
            })
    }

    /// Rows of `[out, in]` per chunk on the CPU.
    fn chunk_rows(&self) -> usize {
        (CHUNK_ELEMENTS / self.inner.max(1)).clamp(1, self.out.max(1))
    }

    /// `y = x·Wᵀ` for `x` `[rows, in]` (contiguous f32), `y` `[rows, out]`; CPU.
    fn matmul_t_cpu(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        let (out, inner) = (self.out, self.inner);
        if x.len() != rows * inner || y.len() != rows * out {
            candle_core::bail!("quantized matmul: operands do not fit [{out}, {inner}]");
        }
        if rows == 0 || out == 0 {
            return Ok(());
        }
        self.for_each_chunk(usize::MAX, |o0, w| {
            let n = w.len() / inner.max(1);
            // SAFETY: y is rows×out, columns o0..o0+n written with row stride out; x is
            // rows×inner; w is n×inner read transposed (inner×n).
            unsafe {
                gemm_f32(
                    (rows, n, inner),
                    y[o0..].as_mut_ptr(),
                    out,
                    false,
                    x.as_ptr(),
                    (inner, 1),
                    w.as_ptr(),
                    (1, inner),
                    1.0,
                    Threads::All,
                );
            }
            Ok(())
        })
    }

    /// `dx [+]= g·W` for `g` `[rows, out]` (contiguous f32), `dx` `[rows, in]`; CPU.
    pub(crate) fn grad_cpu(
        &self,
        g: &[f32],
        rows: usize,
        dx: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        let (out, inner) = (self.out, self.inner);
        if g.len() != rows * out || dx.len() != rows * inner {
            candle_core::bail!("quantized matmul: gradient does not fit [{out}, {inner}]");
        }
        if !accumulate {
            dx.fill(0.0);
        }
        if rows == 0 || inner == 0 {
            return Ok(());
        }
        self.for_each_chunk(usize::MAX, |o0, w| {
            let n = w.len() / inner;
            // SAFETY: dx is rows×inner contiguous; g's columns o0..o0+n (row stride out);
            // w is n×inner.
            unsafe {
                gemm_f32(
                    (rows, inner, n),
                    dx.as_mut_ptr(),
                    inner,
                    true,
                    g[o0..].as_ptr(),
                    (out, 1),
                    w.as_ptr(),
                    (inner, 1),
                    1.0,
                    Threads::All,
                );
            }
            Ok(())
        })
    }

    /// `y = x·Wᵀ` as a new `[rows, out]` buffer; CPU f32.
    pub(crate) fn product_cpu(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut y = vec![0f32; rows * self.out];
        self.matmul_t_cpu(x, rows, &mut y)?;
        Ok(y)
    }

    /// Calls `f` with row chunks `(first, [n, in] f32 values)` of a CPU matrix, at most
    /// `max_rows` rows (and [`CHUNK_ELEMENTS`] values) at a time.
    pub(crate) fn for_each_chunk(
        &self,
        max_rows: usize,
        mut f: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let step = self.chunk_rows().min(max_rows.max(1));
        let mut buf = vec![0f32; step * self.inner];
        for o0 in (0..self.out).step_by(step) {
            let n = step.min(self.out - o0);
            let w = &mut buf[..n * self.inner];
            self.dequantize_rows_into(o0, w)?;
            f(o0, w)?;
        }
        Ok(())
    }
}

/// A frozen weight as a layer holds it.
#[derive(Clone, Debug)]
pub enum Frozen {
    Dense(Tensor),
    Quant(QuantMatrix),
}

impl From<Tensor> for Frozen {
    fn from(t: Tensor) -> Self {
        Frozen::Dense(t)
    }
}

impl From<QuantMatrix> for Frozen {
    fn from(q: QuantMatrix) -> Self {
        Frozen::Quant(q)
    }
}

impl Frozen {
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Frozen::Dense(t) => t.dims2(),
            Frozen::Quant(q) => Ok(q.dims()),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Frozen::Dense(t) => t.device().clone(),
            Frozen::Quant(q) => q.device(),
        }
    }

    /// The dense tensor, when the weight is one.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Frozen::Dense(t) => Some(t),
            Frozen::Quant(_) => None,
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, Frozen::Quant(_))
    }

    /// The weight as a dense tensor in `dtype` (a quantized one dequantized: a new buffer).
    pub fn dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Frozen::Dense(t) => t.to_dtype(dtype),
            Frozen::Quant(q) => q.dequantize(dtype),
        }
    }

    /// Rows `ids` of a table `[vocab, hidden]` (an embedding lookup), `[ids.., hidden]` in
    /// `dtype`.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
            Frozen::Dense(t) => {
                let hidden = t.dim(1)?;
                let mut dims = ids.dims().to_vec();
                dims.push(hidden);
                t.index_select(&ids.flatten_all()?, 0)?
                    .reshape(dims)?
                    .to_dtype(dtype)
            }
            Frozen::Quant(q) => q.rows(ids, dtype),
        }
    }

    /// `x·Wᵀ` with no gradient for W (`wt`: a dense weight's transposed CPU copy, if kept).
    pub fn matmul_t(&self, x: &Tensor, wt: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) => crate::frozen::frozen_matmul(x, w, wt),
            Frozen::Quant(q) => quant_matmul(x, q),
        }
    }
}

/// `x·Wᵀ` for `x` `[.., in]` and a quantized `W` `[out, in]`, in x's dtype; differentiable in x
/// (`g·W`, dequantized again in the backward pass), no gradient for W.
pub fn quant_matmul(x: &Tensor, q: &QuantMatrix) -> Result<Tensor> {
    x.contiguous()?.apply_op1(QuantMatmul { q: q.clone() })
}

struct QuantMatmul {
    q: QuantMatrix,
}

impl QuantMatmul {
    /// Rows of x and the output shape.
    fn plan(&self, l: &Layout) -> Result<(usize, Shape)> {
        let (out, inner) = self.q.dims();
        let dims = l.shape().dims();
        if dims.last() != Some(&inner) || !l.is_contiguous() {
            candle_core::bail!(
                "quantized linear: input {:?} (contiguous: {}) does not fit [{out}, {inner}]",
                l.shape(),
                l.is_contiguous()
            );
        }
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = out;
        }
        Ok((l.shape().elem_count() / inner.max(1), Shape::from(out_dims)))
    }

    /// Any backend: the whole weight dequantized for this product.
    fn dense_fwd<S: BackendStorage>(
        &self,
        s: &S,
        l: &Layout,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (rows, shape) = self.plan(l)?;
        let (out, inner) = self.q.dims();
        let w = self.q.dequantize(s.dtype())?;
        let (ws, wl) = w.storage_and_layout();
        let ws = pick(&ws).ok_or_else(|| {
            candle_core::Error::Msg(
                "quantized linear: weight and input on different devices".into(),
            )
        })?;
        let x2 = Layout::contiguous_with_offset((rows, inner), l.start_offset());
        let wt = Layout::new(
            Shape::from((inner, out)),
            vec![wl.stride()[1], wl.stride()[0]],
            wl.start_offset(),
        );
        Ok((s.matmul(ws, (1, rows, out, inner), &x2, &wt)?, shape))
    }
}

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if let (CpuStorage::F32(x), Some((a, b))) = (s, l.contiguous_offsets()) {
            let (rows, shape) = self.plan(l)?;
            let y = self.q.product_cpu(&x[a..b], rows)?;
            return Ok((CpuStorage::F32(y), shape));
        }
        self.dense_fwd(s, l, |st| match st {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.dense_fwd(s, l, |st| match st {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (out, inner) = self.q.dims();
        let rows = grad.elem_count() / out.max(1);
        let g = grad.contiguous()?;
        if g.device().is_cpu() && g.dtype() == DType::F32 {
            let (gs, gl) = g.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(gv)), Some((a, b))) = (&*gs, gl.contiguous_offsets())
            else {
                candle_core::bail!("quantized linear: gradient is not contiguous f32");
            };
            let mut dx = vec![0f32; rows * inner];
            self.q.grad_cpu(&gv[a..b], rows, &mut dx, false)?;
            return Ok(Some(
                Tensor::from_vec(dx, x.shape(), x.device())?.to_dtype(x.dtype())?,
            ));
        }
        let w = self.q.dequantize(g.dtype())?;
        let dx = g.reshape((rows, out))?.matmul(&w)?.reshape(x.shape())?;
        Ok(Some(dx.to_dtype(x.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::max_abs_diff;

    /// For every kept type: the products equal those with the dequantized matrix (values and
    /// input gradient), the lookup equals its rows, a row permutation moves rows exactly.
    #[test]
    fn products_equal_the_dequantized_matrix_for_every_type() -> Result<()> {
        let dev = Device::Cpu;
        // 256 input features: whole blocks for the K-quants too
        let w = crate::seeded::randn(0f32, 0.5, (40, 256), &dev)?;
        let x = crate::seeded::var_randn(0f32, 1., (3, 5, 256), &dev)?;
        let up = crate::seeded::randn(0f32, 1., (3, 5, 40), &dev)?;
        for &ty in KEPT_TYPES {
            let q = QuantMatrix::quantize(&w, ty)?;
            let dense = q.dequantize(DType::F32)?;
            // the dequantized values are candle's own
            let reference = QTensor::quantize(&w, ty)?.dequantize(&dev)?;
            assert_eq!(max_abs_diff(&dense, &reference)?, 0.0, "{ty:?}");
            let got = quant_matmul(x.as_tensor(), &q)?;
            let want = x.as_tensor().broadcast_matmul(&dense.t()?)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(max_abs_diff(&got, &want)? <= 1e-5 * scale, "{ty:?}");
            let g1 = (got * &up)?.sum_all()?.backward()?;
            let g2 = (want * &up)?.sum_all()?.backward()?;
            let (d1, d2) = (
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            assert!(max_abs_diff(d1, d2)? <= 1e-5 * scale, "{ty:?}");
            // lookups
            let ids = Tensor::new(&[[3u32, 0], [39, 3]], &dev)?;
            let rows = Frozen::Quant(q.clone()).rows(&ids, DType::F32)?;
            let want_rows = Frozen::Dense(dense.clone()).rows(&ids, DType::F32)?;
            assert_eq!(rows.dims(), [2, 2, 256]);
            assert_eq!(max_abs_diff(&rows, &want_rows)?, 0.0, "{ty:?}");
            // a permutation of the blocks is a permutation of the dequantized rows
            let order: Vec<usize> = (0..40).rev().collect();
            let p = q.permute_rows(&order)?.dequantize(DType::F32)?;
            let idx = Tensor::new(order.iter().map(|&i| i as u32).collect::<Vec<_>>(), &dev)?;
            assert_eq!(max_abs_diff(&p, &dense.index_select(&idx, 0)?)?, 0.0);
        }
        Ok(())
    }

    /// Chunking: a matrix larger than one chunk gives the same product and gradient as one
    /// dense product; no rows and strided inputs are handled.
    #[test]
    fn chunked_products_cover_every_row() -> Result<()> {
        let dev = Device::Cpu;
        let rows_per_chunk = CHUNK_ELEMENTS / 32;
        let out = rows_per_chunk * 2 + 7; // three chunks, the last ragged
        let w = crate::seeded::randn(0f32, 0.5, (out, 32), &dev)?;
        let q = QuantMatrix::quantize(&w, GgmlDType::Q8_0)?;
        let dense = q.dequantize(DType::F32)?;
        let x = crate::seeded::randn(0f32, 1., (2, 32), &dev)?;
        let got = quant_matmul(&x, &q)?;
        let want = x.matmul(&dense.t()?)?;
        assert!(max_abs_diff(&got, &want)? < 1e-4);
        let g = crate::seeded::randn(0f32, 1., (2, out), &dev)?;
        let mut dx = vec![0f32; 64];
        let gv = g.flatten_all()?.to_vec1::<f32>()?;
        q.grad_cpu(&gv, 2, &mut dx, false)?;
        let want_dx = g.matmul(&dense)?.flatten_all()?.to_vec1::<f32>()?;
        let worst = dx
            .iter()
            .zip(&want_dx)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-2, "{worst}");
        let empty = Tensor::zeros((0, 32), DType::F32, &dev)?;
        assert_eq!(quant_matmul(&empty, &q)?.dims(), [0, out]);
        let strided = crate::seeded::randn(0f32, 1., (32, 3), &dev)?.t()?;
        let got = quant_matmul(&strided, &q)?;
        let want = strided.matmul(&dense.t()?)?;
        assert!(max_abs_diff(&got, &want)? < 1e-4);
        Ok(())
    }

    /// The LoRA layer ops (the fused CPU op and the any-device op) on a quantized W equal the
    /// same ops on its dequantized values: output and the gradients of x, A and B.
    #[test]
    fn lora_ops_on_a_quantized_weight_equal_the_dequantized_layer() -> Result<()> {
        let dev = Device::Cpu;
        let w = crate::seeded::randn(0f32, 0.5, (24, 64), &dev)?;
        let x = crate::seeded::var_randn(0f32, 1., (2, 3, 64), &dev)?;
        let a = crate::seeded::var_randn(0f32, 0.3, (4, 64), &dev)?;
        let b = crate::seeded::var_randn(0f32, 0.3, (24, 4), &dev)?;
        let up = crate::seeded::randn(0f32, 1., (2, 3, 24), &dev)?;
        for ty in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QuantMatrix::quantize(&w, ty)?;
            let dense = Frozen::Dense(q.dequantize(DType::F32)?);
            let quant = Frozen::Quant(q);
            let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
            type Op<'a> = &'a dyn Fn(&Frozen) -> Result<Tensor>;
            let fused: Op =
                &|w| crate::lora_cpu::try_lora_matmul(xt, w, None, at, bt, 0.7, None).unwrap();
            let any: Op = &|w| crate::lora_any_device::lora_op(xt, w, at, bt, 0.7, None);
            for op in [fused, any] {
                let (yq, yd) = (op(&quant)?, op(&dense)?);
                assert!(max_abs_diff(&yq, &yd)? < 1e-5, "{ty:?}");
                let gq = (yq * &up)?.sum_all()?.backward()?;
                let gd = (yd * &up)?.sum_all()?.backward()?;
                for v in [&x, &a, &b] {
                    let d = max_abs_diff(
                        gq.get(v.as_tensor()).unwrap(),
                        gd.get(v.as_tensor()).unwrap(),
                    )?;
                    assert!(d < 1e-4, "{ty:?} {:?}: {d}", v.dims());
                }
            }
        }
        Ok(())
    }

    #[test]
    fn misfits_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let w = crate::seeded::randn(0f32, 0.5, (4, 64), &dev)?;
        let q = QuantMatrix::quantize(&w, GgmlDType::Q4_0)?;
        let x = Tensor::zeros((2, 63), DType::F32, &dev)?;
        let err = quant_matmul(&x, &q).unwrap_err().to_string();
        assert!(err.contains("does not fit [4, 64]"), "{err}");
        let err = QuantMatrix::quantize(&Tensor::zeros((4, 48), DType::F32, &dev)?, GgmlDType::Q4K)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not whole"), "{err}");
        assert!(q.permute_rows(&[0, 1, 2]).is_err());
        assert!(QuantMatrix::new(QTensor::quantize(&w, GgmlDType::F16)?).is_err());
        Ok(())
    }
}
