//! `exp` and the row passes of softmax written so the compiler vectorizes them. libm's `expf`
//! is a scalar call, and a plain `fold`/`sum` over a row is one serial chain of dependent adds
//! (float addition is not reassociated for us): on the CPU the output head's softmax (one exp
//! per logit, 8·10⁶ per step for 256 tokens × 32k vocabulary) ran at a few ns per element.
//! Here the exp is branch-free arithmetic and the reductions keep `LANES` independent partial
//! results; on x86-64 the row passes run compiled for AVX-512, or AVX2 + FMA, when the CPU has
//! them (the build's baseline is SSE2).

/// Independent partial results per reduction (two 512-bit or four 256-bit registers of f32).
const LANES: usize = 32;

/// `eˣ` to about 2 ulp for `x ≤ 88.3` (clamped there, below f32::MAX); below `x ≈ −87.68` (results under
/// `2^−126.5`, the subnormal range) it is exactly 0, so a −∞ mask entry gives 0. Branch-free,
/// so loops over it vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for the |n| ≤ 128 reached here
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-88.0, 88.3);
    let t = x * LOG2_E + ROUND; // n + 1.5·2²³, exactly
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO; // |r| ≤ ln2 / 2
                                           // e^r by its Taylor series to r⁷/7! (relative error < 2·10⁻⁸ on |r| ≤ 0.347), Horner form
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2ⁿ from its exponent bits; n = −127 gives the bit pattern of 0. n as an integer is read
    // off t's low mantissa bits: a float→int cast (saturating in Rust) would not vectorize.
    let n_int = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let bits = ((n_int + 127).max(0) as u32) << 23;
    p * f32::from_bits(bits)
}

/// Defines `pub fn` whose body is also compiled for AVX-512 and for AVX2 + FMA, the widest the
/// CPU has picked at run time (the body is inlined into functions with those target features).
macro_rules! simd_fn {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has every feature `avx512` is compiled for (checked one
                    // by one: a virtual CPU may report any subset).
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

simd_fn! {
    /// The largest element of `row` (−∞ for an empty row; NaNs are skipped as `f32::max` does).
    pub fn max(row: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *a = a.max(*x);
            }
        }
        let tail = chunks.remainder().iter().copied();
        acc.into_iter().chain(tail).fold(f32::NEG_INFINITY, f32::max)
    }
}

simd_fn! {
    /// Writes `exp(row − shift)` over `row` and returns the sum of the results, accumulated in
    /// f32 lanes and combined in f64.
    pub fn exp_shifted_in_place(row: &mut [f32], shift: f32) -> f64 {
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
                *x = exp(*x - shift);
                *a += *x;
            }
        }
        let mut sum: f64 = acc.iter().map(|a| *a as f64).sum();
        for x in chunks.into_remainder() {
            *x = exp(*x - shift);
            sum += *x as f64;
        }
        sum
    }
}

/// Softmax of `row` in place; returns the row's max and `Σ exp(row − max)` (for a log-sum-exp).
pub fn softmax_in_place(row: &mut [f32]) -> (f32, f64) {
    let max = max(row);
    let sum = exp_shifted_in_place(row, max);
    scale(row, (1.0 / sum) as f32);
    (max, sum)
}

simd_fn! {
    /// `Σ exp(row − shift)` without writing anything.
    pub fn sum_exp_shifted(row: &[f32], shift: f32) -> f64 {
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *a += exp(*x - shift);
            }
        }
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|x| exp(*x - shift) as f64)
            .sum();
        acc.iter().map(|a| *a as f64).sum::<f64>() + tail
    }
}

simd_fn! {
    /// `row *= k`.
    pub fn scale(row: &mut [f32], k: f32) -> () {
        row.iter_mut().for_each(|x| *x *= k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error against f64's exp across the whole range softmax uses, in fine steps,
    /// plus the ends: overflow is not reached, underflow flushes to (near) zero.
    #[test]
    fn exp_matches_f64_exp_to_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "relative error {worst:e}"
        );
        for x in [0.0f32, -0.0, 1.0, -1.0, 1e-30, -1e-30] {
            let want = (x as f64).exp();
            assert!(((exp(x) as f64 - want) / want).abs() < 2.0 * f32::EPSILON as f64);
        }
        for x in [-88.0f32, -100.0, -1e6, f32::NEG_INFINITY] {
            assert_eq!(exp(x), 0.0, "exp({x})");
        }
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.3).is_finite() && exp(88.3) > 2.0e38 && exp(1e9).is_finite());
    }

    /// The lane-parallel passes equal the plain serial ones on rows of awkward lengths.
    #[test]
    fn row_passes_match_serial_versions() {
        for len in [0usize, 1, 31, 32, 33, 100, 1000, 32_001] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1013) as f32 - 500.0) * 0.037)
                .collect();
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&row), m, "len {len}");
            let want: f64 = row.iter().map(|x| ((*x - m) as f64).exp()).sum();
            let tol = 1e-6 * want.max(1.0);
            assert!((sum_exp_shifted(&row, m) - want).abs() < tol, "len {len}");
            let mut out = row.clone();
            assert!((exp_shifted_in_place(&mut out, m) - want).abs() < tol);
            for (o, x) in out.iter().zip(&row) {
                let w = ((*x - m) as f64).exp();
                assert!((*o as f64 - w).abs() <= 3e-7 * w.max(1e-30), "{x}");
            }
            let mut soft = row.clone();
            let (m2, sum) = softmax_in_place(&mut soft);
            assert_eq!(m2, m);
            assert!((sum - want).abs() < tol);
            for (p, x) in soft.iter().zip(&row) {
                let w = ((*x - m) as f64).exp() / want;
                assert!((*p as f64 - w).abs() <= 1e-6 * w.max(1e-30), "{x}");
            }
        }
    }
}
