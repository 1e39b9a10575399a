//! Dense decompositions for initialisations that start from the base weight (PiSSA's SVD,
//! OLoRA's QR). candle has none; these are the textbook algorithms in f64 on the CPU, run once
//! per adapted module at the start of training:
//! - [`qr`]: Householder QR, with LAPACK's sign convention (`R[k][k] = −sign(x₀)·‖x‖`), so the
//!   factors are the ones `torch.linalg.qr` returns;
//! - [`symmetric_eigen`]: Householder tridiagonalisation, then implicit QR steps with
//!   Wilkinson shifts;
//! - [`top_singular`]: the leading `r` singular triplets, from the eigenvectors of the smaller
//!   Gram matrix (`W·Wᵀ` or `Wᵀ·W`, formed in f64 so the squared condition number costs the
//!   leading triplets nothing);
//! - [`randomized_svd`]: Halko–Martinsson–Tropp's range finder with `niter` power iterations,
//!   the method of `torch.svd_lowrank` (PEFT's `pissa_niter_N`), from a seeded Gaussian.
//!
//! Singular vectors are defined up to a sign per triplet; callers that compare them make the
//! largest-magnitude entry of each left vector positive ([`canonical_signs`]).
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// A row-major `rows × cols` f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn identity(n: usize) -> Self {
        let mut m = Mat::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// A 2-D tensor's values in f64.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        let data = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Ok(Mat { rows, cols, data })
    }

    /// As an f32 tensor on `device`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self.data.iter().map(|&x| x as f32).collect();
        Tensor::from_vec(v, (self.rows, self.cols), device)
    }

    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn transpose(&self) -> Mat {
        let mut t = Mat::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t.data[j * self.rows + i] = self.at(i, j);
            }
        }
        t
    }

    /// `self · other`, on candle's f64 matmul (all cores).
    pub fn matmul(&self, other: &Mat) -> Result<Mat> {
        let a = Tensor::from_slice(&self.data, (self.rows, self.cols), &Device::Cpu)?;
        let b = Tensor::from_slice(&other.data, (other.rows, other.cols), &Device::Cpu)?;
        let c = a.matmul(&b)?;
        Ok(Mat {
            rows: self.rows,
            cols: other.cols,
            data: c.flatten_all()?.to_vec1::<f64>()?,
        })
    }

    /// The first `n` columns.
    pub fn first_cols(&self, n: usize) -> Mat {
        let mut m = Mat::zeros(self.rows, n);
        for i in 0..self.rows {
            m.data[i * n..(i + 1) * n].copy_from_slice(&self.row(i)[..n]);
        }
        m
    }

    /// The first `n` rows.
    pub fn first_rows(&self, n: usize) -> Mat {
        Mat {
            rows: n,
            cols: self.cols,
            data: self.data[..n * self.cols].to_vec(),
        }
    }
}

/// Householder vector of `x`: `(v, beta, alpha)` with `(I − beta·v·vᵀ)·x = alpha·e₁`,
/// `alpha = −sign(x₀)·‖x‖`; `beta = 0` (the identity) when `x` is already `alpha·e₁`.
fn householder(x: &[f64]) -> (Vec<f64>, f64, f64) {
    let tail: f64 = x[1..].iter().map(|v| v * v).sum();
    if tail == 0.0 {
        return (vec![0.0; x.len()], 0.0, x[0]);
    }
    let norm = (x[0] * x[0] + tail).sqrt();
    let alpha = if x[0] >= 0.0 { -norm } else { norm };
    let mut v = x.to_vec();
    v[0] -= alpha;
    let vtv = v[0] * v[0] + tail;
    (v, 2.0 / vtv, alpha)
}

/// Thin QR of an `m × n` matrix: `Q` `m × k` with orthonormal columns and upper-triangular
/// `R` `k × n`, `k = min(m, n)`.
pub fn qr(a: &Mat) -> (Mat, Mat) {
    qr_leading(a, a.rows.min(a.cols))
}

/// The first `r` columns of Q and rows of R of [`qr`], from the first `r` Householder steps only
/// (reflector `j` leaves rows and columns before `j` alone, so later steps change neither).
pub fn qr_leading(a: &Mat, r: usize) -> (Mat, Mat) {
    let (m, n) = (a.rows, a.cols);
    let k = r.min(m.min(n));
    let mut rm = a.clone();
    let mut reflectors = Vec::with_capacity(k);
    for j in 0..k {
        let x: Vec<f64> = (j..m).map(|i| rm.at(i, j)).collect();
        let (v, beta, alpha) = householder(&x);
        if beta != 0.0 {
            reflect_rows(&mut rm.data, n, j, &v, beta, j);
        }
        rm.data[j * n + j] = alpha;
        for i in j + 1..m {
            rm.data[i * n + j] = 0.0;
        }
        reflectors.push((v, beta));
    }
    // Q[:, :k] = H₀·H₁·…·H_{k−1} applied to the first k columns of the identity, right to left
    let mut q = Mat::zeros(m, k);
    for i in 0..k {
        q.data[i * k + i] = 1.0;
    }
    for (j, (v, beta)) in reflectors.iter().enumerate().rev() {
        if *beta != 0.0 {
            reflect_rows(&mut q.data, k, j, v, *beta, 0);
        }
    }
    (q, rm.first_rows(k))
}

/// Applies `I − beta·v·vᵀ` to rows `first..first + v.len()` of a row-major matrix with `cols`
/// columns, from column `from` on: `w = vᵀ·M` then `M −= beta·v·w`, both row sweeps.
fn reflect_rows(data: &mut [f64], cols: usize, first: usize, v: &[f64], beta: f64, from: usize) {
    let mut w = vec![0.0; cols - from];
    for (i, vi) in v.iter().enumerate() {
        let row = &data[(first + i) * cols + from..(first + i + 1) * cols];
        for (w, x) in w.iter_mut().zip(row) {
            *w += vi * x;
        }
    }
    for (i, vi) in v.iter().enumerate() {
        let f = beta * vi;
        let row = &mut data[(first + i) * cols + from..(first + i + 1) * cols];
        for (x, w) in row.iter_mut().zip(&w) {
            *x -= f * w;
        }
    }
}

/// Householder reduction of a symmetric matrix to tridiagonal `T = Qᵀ·A·Q`, `Q = H₀·…·H_{n−3}`:
/// T's diagonal and sub-diagonal, and the reflectors `(v, beta)` (reflector `k` acts on rows
/// `k+1..n`).
struct Tridiagonal {
    d: Vec<f64>,
    e: Vec<f64>,
    reflectors: Vec<(Vec<f64>, f64)>,
}

fn tridiagonalize(a: &Mat) -> Tridiagonal {
    let n = a.rows;
    let mut t = a.clone();
    let mut p = vec![0.0; n];
    let mut reflectors = Vec::with_capacity(n);
    for k in 0..n.saturating_sub(2) {
        let x: Vec<f64> = (k + 1..n).map(|i| t.at(i, k)).collect();
        let (v, beta, alpha) = householder(&x);
        t.data[(k + 1) * n + k] = alpha;
        t.data[k * n + k + 1] = alpha;
        for i in k + 2..n {
            t.data[i * n + k] = 0.0;
            t.data[k * n + i] = 0.0;
        }
        if beta != 0.0 {
            // trailing block A₂₂ ← H·A₂₂·H as the rank-2 update A₂₂ − v·wᵀ − w·vᵀ
            let off = k + 1;
            let len = n - off;
            // rows in parallel (each row's arithmetic is the same whatever the thread count)
            let rows = &mut t.data[off * n..];
            p[..len]
                .par_iter_mut()
                .zip(rows.par_chunks(n))
                .for_each(|(p, row)| {
                    *p = beta * row[off..].iter().zip(&v).map(|(a, b)| a * b).sum::<f64>();
                });
            let half = 0.5 * beta * v.iter().zip(&p[..len]).map(|(a, b)| a * b).sum::<f64>();
            let w: Vec<f64> = (0..len).map(|i| p[i] - half * v[i]).collect();
            rows.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
                let (vi, wi) = (v[i], w[i]);
                for ((x, vj), wj) in row[off..].iter_mut().zip(&v).zip(&w) {
                    *x -= vi * wj + wi * vj;
                }
            });
        }
        reflectors.push((v, beta));
    }
    Tridiagonal {
        d: (0..n).map(|i| t.at(i, i)).collect(),
        e: (0..n.saturating_sub(1)).map(|i| t.at(i + 1, i)).collect(),
        reflectors,
    }
}

/// Eigenvalues (descending) and eigenvectors (the rows of the returned matrix, in the same
/// order) of a symmetric `n × n` matrix: all of them, by QR steps on T with the rotations
/// accumulated.
pub fn symmetric_eigen(a: &Mat) -> (Vec<f64>, Mat) {
    let n = a.rows;
    let Tridiagonal {
        mut d,
        mut e,
        reflectors,
    } = tridiagonalize(a);
    // vt = Qᵀ = H_{n−3}·…·H₀, whose rows end as the eigenvectors
    let mut vt = Mat::identity(n);
    for (k, (v, beta)) in reflectors.iter().enumerate() {
        if *beta != 0.0 {
            reflect_rows(&mut vt.data, n, k + 1, v, *beta, 0);
        }
    }
    tridiagonal_qr(&mut d, &mut e, Some(&mut vt));
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[j].total_cmp(&d[i]));
    let mut vectors = Mat::zeros(n, n);
    for (dst, &src) in order.iter().enumerate() {
        vectors.data[dst * n..(dst + 1) * n].copy_from_slice(vt.row(src));
    }
    (order.iter().map(|&i| d[i]).collect(), vectors)
}

/// The `r` largest eigenvalues (descending) of a symmetric matrix and their eigenvectors (rows):
/// T's eigenvalues by QR steps without vectors, each wanted vector by inverse iteration on T
/// (orthogonalised against the ones before, which separates close eigenvalues), then carried
/// back through the reflectors — O(n³) for the reduction only, where [`symmetric_eigen`] also
/// rotates n vectors.
pub fn top_eigen(a: &Mat, r: usize) -> (Vec<f64>, Mat) {
    let n = a.rows;
    let r = r.min(n);
    let tri = tridiagonalize(a);
    let (mut values, mut off) = (tri.d.clone(), tri.e.clone());
    tridiagonal_qr(&mut values, &mut off, None);
    values.sort_by(|x, y| y.total_cmp(x));
    values.truncate(r);
    let norm = tri.d.iter().map(|x| x.abs()).fold(0.0, f64::max)
        + 2.0 * tri.e.iter().map(|x| x.abs()).fold(0.0, f64::max);
    let mut vectors = Mat::zeros(r, n);
    let mut found: Vec<Vec<f64>> = Vec::with_capacity(r);
    for (j, &lambda) in values.iter().enumerate() {
        // start from a fixed, non-special vector
        let mut y: Vec<f64> = (0..n)
            .map(|i| 1.0 + ((i * 7 + j * 13) % 11) as f64 / 11.0)
            .collect();
        for _ in 0..3 {
            y = solve_shifted_tridiagonal(&tri.d, &tri.e, lambda, &y, norm);
            for prev in &found {
                let dot: f64 = prev.iter().zip(&y).map(|(a, b)| a * b).sum();
                y.iter_mut().zip(prev).for_each(|(x, p)| *x -= dot * p);
            }
            let len = y.iter().map(|x| x * x).sum::<f64>().sqrt();
            if len > 0.0 {
                y.iter_mut().for_each(|x| *x /= len);
            }
        }
        found.push(y.clone());
        // eigenvector of A: Q·y = H₀·(H₁·(…·(H_{n−3}·y)))
        for (k, (v, beta)) in tri.reflectors.iter().enumerate().rev() {
            if *beta != 0.0 {
                reflect_rows(&mut y, 1, k + 1, v, *beta, 0);
            }
        }
        vectors.data[j * n..(j + 1) * n].copy_from_slice(&y);
    }
    (values, vectors)
}

/// Solves `(T − λ·I)·x = b` for the symmetric tridiagonal T (diagonal `d`, off-diagonal `e`) by
/// Gaussian elimination with partial pivoting; a zero pivot (λ an exact eigenvalue) is replaced
/// by `ε·‖T‖`, as inverse iteration wants.
fn solve_shifted_tridiagonal(d: &[f64], e: &[f64], lambda: f64, b: &[f64], norm: f64) -> Vec<f64> {
    let n = d.len();
    let tiny = f64::EPSILON * norm.max(f64::MIN_POSITIVE);
    // rows of U: (diagonal, first and second super-diagonal)
    let mut u0 = vec![0.0; n];
    let mut u1 = vec![0.0; n];
    let mut u2 = vec![0.0; n];
    let mut x = b.to_vec();
    // the row being eliminated, carried forward: (its diagonal, its super-diagonal)
    let mut cur_d = d[0] - lambda;
    let mut cur_e = if n > 1 { e[0] } else { 0.0 };
    for i in 0..n {
        if i + 1 == n {
            u0[i] = if cur_d.abs() < tiny { tiny } else { cur_d };
            break;
        }
        // next row: (sub = e[i], diag = d[i+1] − λ, super = e[i+1])
        let (sub, nd, ns) = (
            e[i],
            d[i + 1] - lambda,
            if i + 2 < n { e[i + 1] } else { 0.0 },
        );
        if cur_d.abs() >= sub.abs() {
            let piv = if cur_d.abs() < tiny { tiny } else { cur_d };
            let f = sub / piv;
            u0[i] = piv;
            u1[i] = cur_e;
            u2[i] = 0.0;
            x[i + 1] -= f * x[i];
            cur_d = nd - f * cur_e;
            cur_e = ns;
        } else {
            // swap the rows: the next row becomes the pivot row
            let f = cur_d / sub;
            u0[i] = sub;
            u1[i] = nd;
            u2[i] = ns;
            x.swap(i, i + 1);
            x[i + 1] -= f * x[i];
            cur_d = cur_e - f * nd;
            cur_e = -f * ns;
        }
    }
    for i in (0..n).rev() {
        let mut s = x[i];
        if i + 1 < n {
            s -= u1[i] * x[i + 1];
        }
        if i + 2 < n {
            s -= u2[i] * x[i + 2];
        }
        x[i] = s / u0[i];
    }
    x
}

/// Diagonalises the symmetric tridiagonal matrix (diagonal `d`, off-diagonal `e`) in place by
/// implicit QR steps with Wilkinson shifts, rotating the rows of `vt` along when given.
fn tridiagonal_qr(d: &mut [f64], e: &mut [f64], mut vt: Option<&mut Mat>) {
    let n = d.len();
    let small = |e: f64, a: f64, b: f64| e.abs() <= f64::EPSILON * (a.abs() + b.abs());
    let mut m = n.saturating_sub(1);
    let mut iterations = 0;
    while m > 0 {
        if small(e[m - 1], d[m - 1], d[m]) {
            e[m - 1] = 0.0;
            m -= 1;
            continue;
        }
        iterations += 1;
        if iterations > 60 * n {
            break; // never seen; the values reached are still a close approximation
        }
        let mut l = m - 1;
        while l > 0 && !small(e[l - 1], d[l - 1], d[l]) {
            l -= 1;
        }
        if l > 0 {
            e[l - 1] = 0.0;
        }
        // Wilkinson shift: the eigenvalue of the trailing 2×2 block nearer d[m]
        let delta = (d[m - 1] - d[m]) / 2.0;
        let e2 = e[m - 1] * e[m - 1];
        let sign = if delta >= 0.0 { 1.0 } else { -1.0 };
        let mu = d[m] - e2 / (delta + sign * (delta * delta + e2).sqrt());
        let mut x = d[l] - mu;
        let mut z = e[l];
        for k in l..m {
            let r = x.hypot(z);
            let (c, s) = if r == 0.0 { (1.0, 0.0) } else { (x / r, z / r) };
            if k > l {
                e[k - 1] = r;
            }
            let (dk, dk1, ek) = (d[k], d[k + 1], e[k]);
            d[k] = c * c * dk + 2.0 * c * s * ek + s * s * dk1;
            d[k + 1] = s * s * dk - 2.0 * c * s * ek + c * c * dk1;
            e[k] = c * s * (dk1 - dk) + (c * c - s * s) * ek;
            if k + 1 < m {
                z = s * e[k + 1];
                e[k + 1] *= c;
                x = e[k];
            }
            if let Some(vt) = vt.as_deref_mut() {
                let cols = vt.cols;
                let (top, bottom) = vt.data.split_at_mut((k + 1) * cols);
                let row_k = &mut top[k * cols..];
                let row_k1 = &mut bottom[..cols];
                for (a, b) in row_k.iter_mut().zip(row_k1.iter_mut()) {
                    let (va, vb) = (*a, *b);
                    *a = c * va + s * vb;
                    *b = -s * va + c * vb;
                }
            }
        }
    }
}

/// The leading `r` singular triplets of `w` (`m × n`): `U` `m × r`, `σ` descending, `Vᵀ`
/// `r × n`, so that `U·diag(σ)·Vᵀ` is the best rank-`r` approximation of `w`.
pub fn top_singular(w: &Mat, r: usize) -> Result<(Mat, Vec<f64>, Mat)> {
    let (m, n) = (w.rows, w.cols);
    let r = r.min(m.min(n));
    let wt = w.transpose();
    if m <= n {
        // W·Wᵀ = U·Σ²·Uᵀ; Vᵀ = Σ⁻¹·Uᵀ·W
        let (values, ut) = top_eigen(&w.matmul(&wt)?, r);
        let sigma: Vec<f64> = values[..r].iter().map(|&l| l.max(0.0).sqrt()).collect();
        let mut vt = ut.matmul(w)?;
        scale_rows(&mut vt, &sigma);
        Ok((ut.transpose(), sigma, vt))
    } else {
        // Wᵀ·W = V·Σ²·Vᵀ; U = W·V·Σ⁻¹
        let (values, vt) = top_eigen(&wt.matmul(w)?, r);
        let sigma: Vec<f64> = values[..r].iter().map(|&l| l.max(0.0).sqrt()).collect();
        let mut ut = vt.matmul(&wt)?;
        scale_rows(&mut ut, &sigma);
        Ok((ut.transpose(), sigma, vt))
    }
}

/// Divides row `i` by `sigma[i]` (rows of a zero singular value stay as they are).
fn scale_rows(m: &mut Mat, sigma: &[f64]) {
    let cols = m.cols;
    for (i, s) in sigma.iter().enumerate() {
        if *s > 0.0 {
            m.data[i * cols..(i + 1) * cols]
                .iter_mut()
                .for_each(|x| *x /= s);
        }
    }
}

/// An approximate rank-`r` SVD as `torch.svd_lowrank(w, q=r, niter)` computes it: an orthonormal
/// basis `Q` of `w·Ω` (`Ω` Gaussian `n × r` from `seed`), refined by `niter` power iterations
/// (`Q ← qr(W·qr(Wᵀ·Q))`), then the exact SVD of the small `Qᵀ·W`.
pub fn randomized_svd(w: &Mat, r: usize, niter: usize, seed: u64) -> Result<(Mat, Vec<f64>, Mat)> {
    let (m, n) = (w.rows, w.cols);
    let r = r.min(m.min(n));
    let mut omega = Mat::zeros(n, r);
    let mut state = seed ^ 0x5851_f42d_4c95_7f2d;
    for x in omega.data.iter_mut() {
        *x = gaussian(&mut state);
    }
    let wt = w.transpose();
    let mut q = qr(&w.matmul(&omega)?).0;
    for _ in 0..niter {
        let z = qr(&wt.matmul(&q)?).0;
        q = qr(&w.matmul(&z)?).0;
    }
    let small = q.transpose().matmul(w)?; // r × n
    let (u_small, sigma, vt) = top_singular(&small, r)?;
    Ok((q.matmul(&u_small)?, sigma, vt))
}

/// One standard normal draw (SplitMix64 + Box–Muller).
fn gaussian(state: &mut u64) -> f64 {
    let mut next = || {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (((z ^ (z >> 31)) >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let (u1, u2) = (next(), next());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Flips the sign of column `j` of `u` and row `j` of `vt` together (which leaves `U·Σ·Vᵀ`
/// unchanged) so that the largest-magnitude entry of every column of `u` is positive.
pub fn canonical_signs(u: &mut Mat, vt: &mut Mat) {
    for j in 0..u.cols {
        let mut best = 0.0f64;
        for i in 0..u.rows {
            let x = u.at(i, j);
            if x.abs() > best.abs() {
                best = x;
            }
        }
        if best < 0.0 {
            for i in 0..u.rows {
                u.data[i * u.cols + j] *= -1.0;
            }
            vt.data[j * vt.cols..(j + 1) * vt.cols]
                .iter_mut()
                .for_each(|x| *x *= -1.0);
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // matrix entries read clearest by index
mod tests {
    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut state = seed;
        let mut m = Mat::zeros(rows, cols);
        for x in m.data.iter_mut() {
            *x = gaussian(&mut state);
        }
        m
    }

    fn max_diff(a: &Mat, b: &Mat) -> f64 {
        assert_eq!((a.rows, a.cols), (b.rows, b.cols));
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn orthonormal_rows(m: &Mat) -> f64 {
        let g = m.matmul(&m.transpose()).unwrap();
        max_diff(&g, &Mat::identity(m.rows))
    }

    #[test]
    fn qr_reconstructs_with_orthonormal_q_and_triangular_r() {
        for (m, n) in [(7, 4), (4, 7), (5, 5), (1, 3), (3, 1)] {
            let a = random(m, n, 11 + m as u64 * 7 + n as u64);
            let (q, r) = qr(&a);
            let k = m.min(n);
            assert_eq!((q.rows, q.cols, r.rows, r.cols), (m, k, k, n));
            assert!(max_diff(&q.matmul(&r).unwrap(), &a) < 1e-12);
            assert!(orthonormal_rows(&q.transpose()) < 1e-12);
            for i in 0..k {
                for j in 0..i.min(n) {
                    assert_eq!(r.at(i, j), 0.0);
                }
            }
        }
        // LAPACK's convention: R's diagonal has the sign opposite to the pivot column's head
        let a = Mat {
            rows: 2,
            cols: 2,
            data: vec![3.0, 1.0, 4.0, 2.0],
        };
        let (_, r) = qr(&a);
        assert!((r.at(0, 0) + 5.0).abs() < 1e-12, "{r:?}");
    }

    #[test]
    fn symmetric_eigen_diagonalises() {
        for n in [1, 2, 3, 10, 33] {
            let b = random(n, n + 3, n as u64);
            let a = b.matmul(&b.transpose()).unwrap();
            let (values, vecs) = symmetric_eigen(&a);
            assert!(values.windows(2).all(|w| w[0] >= w[1]));
            assert!(orthonormal_rows(&vecs) < 1e-10, "n={n}");
            // A·v = λ·v for every pair
            let av = a.matmul(&vecs.transpose()).unwrap();
            for (j, l) in values.iter().enumerate() {
                for i in 0..n {
                    let want = l * vecs.at(j, i);
                    assert!((av.at(i, j) - want).abs() < 1e-9 * (1.0 + l.abs()), "n={n}");
                }
            }
        }
        // repeated eigenvalues and an already diagonal matrix
        let mut a = Mat::identity(5);
        a.data[0] = 3.0;
        let (values, _) = symmetric_eigen(&a);
        assert_eq!(values, [3.0, 1.0, 1.0, 1.0, 1.0]);
    }

    /// The leading eigenpairs by inverse iteration equal the full solver's, also with a repeated
    /// eigenvalue among them; the leading QR factors equal the full QR's first ones exactly.
    #[test]
    fn top_eigen_and_leading_qr_equal_the_full_decompositions() {
        for n in [1, 2, 5, 40] {
            let b = random(n, n + 2, 100 + n as u64);
            let a = b.matmul(&b.transpose()).unwrap();
            let (all_values, all) = symmetric_eigen(&a);
            let r = n.min(6);
            let (values, mut top) = top_eigen(&a, r);
            for j in 0..r {
                assert!((values[j] - all_values[j]).abs() < 1e-9 * (1.0 + all_values[0]));
            }
            let mut first = all.first_rows(r).transpose();
            let mut topt = top.transpose();
            let (mut x, mut y) = (Mat::zeros(r, 1), Mat::zeros(r, 1));
            canonical_signs(&mut first, &mut x);
            canonical_signs(&mut topt, &mut y);
            assert!(max_diff(&first, &topt) < 1e-8, "n={n}");
            top = topt.transpose();
            assert!(orthonormal_rows(&top) < 1e-10);
        }
        // a repeated leading eigenvalue: any orthonormal basis of its space will do
        let (q, _) = qr(&random(8, 8, 9));
        let spectrum = [5.0, 5.0, 3.0, 1.0, 1.0, 0.5, 0.2, 0.1];
        let mut qs = q.clone();
        for i in 0..8 {
            for j in 0..8 {
                qs.data[i * 8 + j] *= spectrum[j];
            }
        }
        let a = qs.matmul(&q.transpose()).unwrap();
        let (values, top) = top_eigen(&a, 3);
        assert!((values[0] - 5.0).abs() < 1e-12 && (values[2] - 3.0).abs() < 1e-12);
        assert!(orthonormal_rows(&top) < 1e-10);
        let av = a.matmul(&top.transpose()).unwrap();
        for j in 0..3 {
            for i in 0..8 {
                assert!((av.at(i, j) - values[j] * top.at(j, i)).abs() < 1e-9);
            }
        }
        for (m, n) in [(9, 5), (5, 9)] {
            let a = random(m, n, 21);
            let (q, r) = qr(&a);
            let (q2, r2) = qr_leading(&a, 3);
            assert_eq!(q2, q.first_cols(3));
            assert_eq!(r2, r.first_rows(3));
        }
    }

    /// The leading triplets of a matrix with a known spectrum, both orientations.
    #[test]
    fn top_singular_recovers_a_known_spectrum() {
        for (m, n) in [(12, 20), (20, 12)] {
            let (u, _) = qr(&random(m, m.min(n), 3));
            let (v, _) = qr(&random(n, m.min(n), 4));
            let k = m.min(n);
            let sigma: Vec<f64> = (0..k).map(|i| 10.0 / (1.0 + i as f64)).collect();
            let mut us = u.clone();
            for i in 0..m {
                for j in 0..k {
                    us.data[i * k + j] *= sigma[j];
                }
            }
            let w = us.matmul(&v.transpose()).unwrap();
            let (mut ur, s, mut vtr) = top_singular(&w, 4).unwrap();
            for j in 0..4 {
                assert!((s[j] - sigma[j]).abs() < 1e-10, "{s:?}");
            }
            let (mut u4, mut v4t) = (u.first_cols(4), v.first_cols(4).transpose());
            canonical_signs(&mut ur, &mut vtr);
            canonical_signs(&mut u4, &mut v4t);
            assert!(max_diff(&ur, &u4) < 1e-9 && max_diff(&vtr, &v4t) < 1e-9);
        }
    }

    #[test]
    fn randomized_svd_finds_a_low_rank_matrix_exactly() {
        // rank 3: the range finder with r = 3 captures it whatever Ω is
        let w = random(15, 3, 5).matmul(&random(3, 9, 6)).unwrap();
        let (u, s, vt) = randomized_svd(&w, 3, 2, 42).unwrap();
        let (ue, se, _) = top_singular(&w, 3).unwrap();
        for j in 0..3 {
            assert!((s[j] - se[j]).abs() < 1e-9 * se[0]);
        }
        let mut us = u.clone();
        for i in 0..15 {
            for j in 0..3 {
                us.data[i * 3 + j] *= s[j];
            }
        }
        assert!(max_diff(&us.matmul(&vt).unwrap(), &w) < 1e-9);
        assert!(orthonormal_rows(&u.transpose()) < 1e-12);
        assert_eq!(ue.cols, 3);
        // and is a function of the seed
        assert_eq!(
            randomized_svd(&w, 3, 2, 42).unwrap().0,
            randomized_svd(&w, 3, 2, 42).unwrap().0
        );
    }
}
