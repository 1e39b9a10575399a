//! The one door to the `gemm` crate's f32 kernel for lorakit's own CPU ops (the LoRA output op,
//! the attention core, the chunked output head): operands given by their first element and
//! (row, column) strides, so transposed or interleaved operands need no copy.
use gemm::Parallelism;

/// Threads for one product.
#[derive(Clone, Copy, Debug)]
pub enum Threads {
    /// The rayon pool: a single large product.
    All,
    /// The calling thread: the caller already runs many products in parallel.
    One,
}

/// `dst (m×n) = [dst +] beta · lhs (m×k) · rhs (k×n)`; `dst` rows are `dst_rs` apart, its
/// columns adjacent; `accumulate` adds to what `dst` holds.
///
/// # Safety
/// Each pointer must be valid for every element its dims and strides reach, and `dst` must not
/// overlap `lhs` or `rhs` or be written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    threads: Threads,
) {
    let parallelism = match threads {
        Threads::All if rayon::current_num_threads() > 1 => {
            Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => Parallelism::None,
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        parallelism,
    )
}

/// An f32 matrix read through (row, column) strides from `data`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_> {
    /// Whether every element of a `rows × cols` matrix lies inside `data`.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1)
                .checked_mul(self.rs)
                .zip((cols - 1).checked_mul(self.cs))
                .and_then(|(a, b)| a.checked_add(b))
                .is_some_and(|last| last < self.data.len())
    }
}

/// Bounds-checked [`gemm_f32`]: `dst (m×n, contiguous) = [dst +] beta · lhs (m×k) · rhs (k×n)`.
pub fn product_into(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: Strided,
    rhs: Strided,
    beta: f32,
    threads: Threads,
) -> candle_core::Result<()> {
    if dst.len() != m * n || !lhs.holds(m, k) || !rhs.holds(k, n) {
        candle_core::bail!(
            "matmul: operands of {} / {} / {} values do not hold {m}×{k} · {k}×{n}",
            lhs.data.len(),
            rhs.data.len(),
            dst.len()
        );
    }
    if m * n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    // SAFETY: dst is m×n contiguous and exclusively borrowed; lhs and rhs hold every element
    // their strides reach (checked above) and cannot overlap dst (a &mut borrow).
    unsafe {
        strided_gemm(
            dst.as_mut_ptr(),
            (m, n, k),
            accumulate,
            lhs,
            rhs,
            beta,
            threads,
        )
    };
    Ok(())
}

/// A new `m×n` matrix `beta · lhs · rhs`, bounds-checked as [`product_into`]; the buffer is not
/// zero-filled first (the kernel writes every element).
pub fn product(
    (m, n, k): (usize, usize, usize),
    lhs: Strided,
    rhs: Strided,
    beta: f32,
    threads: Threads,
) -> candle_core::Result<Vec<f32>> {
    if k == 0 || m * n == 0 {
        let mut v = vec![0.0; m * n];
        product_into(&mut v, (m, n, k), false, lhs, rhs, beta, threads)?;
        return Ok(v);
    }
    if !lhs.holds(m, k) || !rhs.holds(k, n) {
        candle_core::bail!(
            "matmul: operands of {} / {} values do not hold {m}×{k} · {k}×{n}",
            lhs.data.len(),
            rhs.data.len()
        );
    }
    let mut v: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: as in product_into, with dst the new buffer's m·n reserved elements; the kernel
    // does not read dst when not accumulating and writes all m·n of them, so set_len after it
    // exposes only written values.
    unsafe {
        strided_gemm(v.as_mut_ptr(), (m, n, k), false, lhs, rhs, beta, threads);
        v.set_len(m * n);
    }
    Ok(v)
}

/// [`gemm_f32`] with [`Strided`] operands and a contiguous `m×n` destination.
///
/// # Safety
/// As [`gemm_f32`]: `dst` valid for `m·n` writes (and reads when accumulating), the operands
/// holding every element their strides reach, no overlap.
unsafe fn strided_gemm(
    dst: *mut f32,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: Strided,
    rhs: Strided,
    beta: f32,
    threads: Threads,
) {
    gemm_f32(
        (m, n, k),
        dst,
        n,
        accumulate,
        lhs.data.as_ptr(),
        (lhs.rs, lhs.cs),
        rhs.data.as_ptr(),
        (rhs.rs, rhs.cs),
        beta,
        threads,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, l: Strided, r: Strided, beta: f32) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| {
                        l.data[i * l.rs + p * l.cs] as f64 * r.data[p * r.rs + j * r.cs] as f64
                    })
                    .sum();
                out[i * n + j] = beta * s as f32;
            }
        }
        out
    }

    /// Products through strides (plain and transposed operands) equal the naive sum; `k = 0`
    /// gives zeros; operands too short for their dims are errors, not reads out of bounds.
    #[test]
    fn checked_products_match_the_naive_sum_and_refuse_short_operands() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        for (l, r) in [
            (
                Strided {
                    data: &a,
                    rs: k,
                    cs: 1,
                },
                Strided {
                    data: &b,
                    rs: n,
                    cs: 1,
                },
            ),
            (
                Strided {
                    data: &a,
                    rs: 1,
                    cs: m,
                },
                Strided {
                    data: &b,
                    rs: 1,
                    cs: k,
                },
            ),
        ] {
            let want = naive(m, n, k, l, r, 0.5);
            let got = product((m, n, k), l, r, 0.5, Threads::All).unwrap();
            let mut acc = vec![1f32; m * n];
            product_into(&mut acc, (m, n, k), true, l, r, 0.5, Threads::One).unwrap();
            for ((g, w), a) in got.iter().zip(&want).zip(&acc) {
                assert!((g - w).abs() < 1e-5 && (a - 1.0 - w).abs() < 1e-5);
            }
        }
        let ok = Strided {
            data: &b,
            rs: n,
            cs: 1,
        };
        let empty = Strided {
            data: &[],
            rs: 0,
            cs: 1,
        };
        assert_eq!(
            product((2, n, 0), empty, ok, 1.0, Threads::All).unwrap(),
            vec![0.0; 2 * n]
        );
        let short = Strided {
            data: &a[..m * k - 1],
            rs: k,
            cs: 1,
        };
        assert!(product((m, n, k), short, ok, 1.0, Threads::All).is_err());
        let mut dst = vec![0f32; m * n];
        assert!(product_into(&mut dst, (m, n, k), false, short, ok, 1.0, Threads::All).is_err());
        let lhs = Strided {
            data: &a,
            rs: k,
            cs: 1,
        };
        assert!(product_into(&mut dst[1..], (m, n, k), false, lhs, ok, 1.0, Threads::All).is_err());
    }
}
