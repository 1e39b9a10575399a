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
