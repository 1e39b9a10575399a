//! The element math of the CUDA kernels (`csrc/row_math.h`) as plain C functions over host
//! buffers (`csrc/row_math.c`, built by build.rs), for CPU tests that compare them with the
//! Rust CPU kernels. Callers pass valid pointers to buffers of the stated sizes.
extern "C" {
    /// RMSNorm of `rows` rows of `d`.
    pub fn lk_c_rms_norm(x: *const f32, w: *const f32, y: *mut f32, rows: usize, d: i32, eps: f32);
    /// RMSNorm's input gradient.
    pub fn lk_c_rms_norm_grad(
        x: *const f32,
        w: *const f32,
        g: *const f32,
        dx: *mut f32,
        rows: usize,
        d: i32,
        eps: f32,
    );
    /// `silu(gate)·up` over `n` values.
    pub fn lk_c_swiglu(gate: *const f32, up: *const f32, out: *mut f32, n: usize);
    /// `[d gate, d up]` stacked, `2n` values.
    pub fn lk_c_swiglu_grad(
        gate: *const f32,
        up: *const f32,
        g: *const f32,
        out: *mut f32,
        n: usize,
    );
    /// Rotary embedding of `rows` rows of `d` (position `row mod s`); sign −1 rotates back.
    pub fn lk_c_rope(
        x: *const f32,
        cos: *const f32,
        sin: *const f32,
        out: *mut f32,
        rows: usize,
        s: i32,
        d: i32,
        sign: f32,
    );
    /// 1 when element `i` of the dropout mask drawn from `seed` keeps its value.
    pub fn lk_c_dropout_keeps(seed: u64, i: u64, keep: f32) -> i32;
}
