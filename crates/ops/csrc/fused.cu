// CUDA kernels of lorakit's fused ops (lorakit-models `fused.rs`, `attention_probs.rs` and
// lorakit-adapter `dropout.rs` have the CPU versions and the math). Compiled by build.rs with
// nvcc into one fatbin holding sm_80 and sm_90 cubins, so the first step does not wait for a PTX
// JIT. Row kernels take one block per row (attention probabilities: a warp per row); sums are
// taken in f32 (the CPU versions sum in f64). bf16 tensors are computed in f32 and
// rounded once per output, like the composed candle versions. The tensor-core attention
// (flash_attention.cuh) is included at the end, into the same fatbin.
#include <cuda_bf16.h>
#include <stdint.h>

#include "row_math.h"

#define BLOCK 256

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// Sum of `v` over the block (blockDim.x == BLOCK); every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float partial[BLOCK / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float t = lane < BLOCK / 32 ? partial[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffff, t, o);
  return t;
}

__device__ float block_max(float v) {
  __shared__ float partial[BLOCK / 32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float t = lane < BLOCK / 32 ? partial[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffff, t, o));
  return t;
}

// y = bf16?(x · r) · w, r = 1 / sqrt(mean(x²) + eps): normalised in f32, rounded to T, then
// scaled by the frozen weight (Hugging Face's order of roundings).
template <typename T>
__device__ void rms_norm(const T* x, const T* w, T* y, int d, float eps) {
  const T* row = x + (size_t)blockIdx.x * d;
  T* out = y + (size_t)blockIdx.x * d;
  float ss = 0.f;
  for (int j = threadIdx.x; j < d; j += BLOCK) {
    float a = to_f(row[j]);
    ss += a * a;
  }
  float r = lk_inv_rms(block_sum(ss), d, eps);
  for (int j = threadIdx.x; j < d; j += BLOCK) {
    float normed = to_f(from_f<T>(to_f(row[j]) * r));
    out[j] = from_f<T>(normed * to_f(w[j]));
  }
}

// dx = r·(w∘g) − x·r³·mean(w∘g∘x)
template <typename T>
__device__ void rms_norm_grad(const T* x, const T* w, const T* g, T* dx, int d, float eps) {
  size_t base = (size_t)blockIdx.x * d;
  float ss = 0.f, dot = 0.f;
  for (int j = threadIdx.x; j < d; j += BLOCK) {
    float a = to_f(x[base + j]);
    ss += a * a;
    dot += a * to_f(g[base + j]) * to_f(w[j]);
  }
  ss = block_sum(ss);
  dot = block_sum(dot);
  float r = lk_inv_rms(ss, d, eps);
  for (int j = threadIdx.x; j < d; j += BLOCK) {
    dx[base + j] = from_f<T>(
        lk_rms_norm_grad(to_f(x[base + j]), to_f(w[j]), to_f(g[base + j]), r, dot / d));
  }
}

// (max, Σ exp(x − max)) of one row, every thread of the block gets both.
__device__ float2 row_max_sumexp(const float* row, int d) {
  float m = -INFINITY;
  for (int j = threadIdx.x; j < d; j += BLOCK) m = fmaxf(m, row[j]);
  m = block_max(m);
  float s = 0.f;
  for (int j = threadIdx.x; j < d; j += BLOCK) s += expf(row[j] - m);
  return make_float2(m, block_sum(s));
}

// Sum and max over one warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// Attention scores → probabilities. Score rows are short (t keys) and many (b·heads·s), so one
// warp takes a row (BLOCK / 32 rows per block) and reduces with shuffles alone: a block per
// row left most of each block idle in __syncthreads. Row r of [b, groups, rows, t] reads
// x_j = scale·scores[r, j] + bias[(r / batch_rows) mod bias_b, r mod s, j]; p = softmax(x).
struct AttnRow {
  size_t r;  // the row, or rows when this warp has none
  int lane;
  const float* bias;
};

__device__ __forceinline__ AttnRow attn_row(const float* bias, size_t rows, int s, int t,
                                            int batch_rows, int bias_b) {
  AttnRow a;
  a.r = (size_t)blockIdx.x * (BLOCK / 32) + threadIdx.x / 32;
  a.lane = threadIdx.x & 31;
  a.bias = a.r < rows ? bias + ((a.r / batch_rows) % bias_b * (size_t)s + a.r % s) * t : bias;
  if (a.r >= rows) a.r = rows;
  return a;
}

// (max, Σ exp(x − max)) of the row, every lane gets both.
template <typename T>
__device__ float2 attn_row_stats(const T* row, const float* brow, int t, float scale, int lane) {
  float m = -INFINITY;
  for (int j = lane; j < t; j += 32) m = fmaxf(m, scale * to_f(row[j]) + brow[j]);
  m = warp_max(m);
  float sum = 0.f;
  for (int j = lane; j < t; j += 32) sum += expf(scale * to_f(row[j]) + brow[j] - m);
  return make_float2(m, warp_sum(sum));
}

template <typename T>
__device__ void attn_probs(const T* scores, const float* bias, T* probs, size_t rows, int t,
                           int s, int batch_rows, int bias_b, float scale) {
  AttnRow a = attn_row(bias, rows, s, t, batch_rows, bias_b);
  if (a.r >= rows) return;  // the whole warp: shuffles stay full
  const T* row = scores + a.r * t;
  float2 ms = attn_row_stats(row, a.bias, t, scale, a.lane);
  float inv = 1.f / ms.y;
  for (int j = a.lane; j < t; j += 32) {
    probs[a.r * t + j] = from_f<T>(expf(scale * to_f(row[j]) + a.bias[j] - ms.x) * inv);
  }
}

// ds = scale · p ∘ (dp − Σ p∘dp), p recomputed from the scores.
template <typename T>
__device__ void attn_probs_grad(const T* scores, const float* bias, const T* dp, T* ds,
                                size_t rows, int t, int s, int batch_rows, int bias_b,
                                float scale) {
  AttnRow a = attn_row(bias, rows, s, t, batch_rows, bias_b);
  if (a.r >= rows) return;
  const T* row = scores + a.r * t;
  const T* g = dp + a.r * t;
  float2 ms = attn_row_stats(row, a.bias, t, scale, a.lane);
  float inv = 1.f / ms.y;
  float dot = 0.f;
  for (int j = a.lane; j < t; j += 32) {
    dot += expf(scale * to_f(row[j]) + a.bias[j] - ms.x) * inv * to_f(g[j]);
  }
  dot = warp_sum(dot);
  for (int j = a.lane; j < t; j += 32) {
    float p = expf(scale * to_f(row[j]) + a.bias[j] - ms.x) * inv;
    ds[a.r * t + j] = from_f<T>(scale * p * (to_f(g[j]) - dot));
  }
}

// loss = logsumexp(row) − row[label]; one block per row of f32 logits.
__device__ void cross_entropy(const float* logits, const uint32_t* labels, float* loss, int v) {
  size_t base = (size_t)blockIdx.x * v;
  float2 ms = row_max_sumexp(logits + base, v);
  if (threadIdx.x == 0) {
    uint32_t y = labels[blockIdx.x];
    loss[blockIdx.x] = y < (uint32_t)v ? logf(ms.y) + ms.x - logits[base + y] : NAN;
  }
}

// out = scale[row] · (softmax(row) − onehot(label))
__device__ void cross_entropy_grad(const float* logits, const uint32_t* labels, const float* scale,
                                   float* out, int v) {
  size_t base = (size_t)blockIdx.x * v;
  float2 ms = row_max_sumexp(logits + base, v);
  float k = scale[blockIdx.x] / ms.y;
  uint32_t y = labels[blockIdx.x];
  for (int j = threadIdx.x; j < v; j += BLOCK) {
    out[base + j] = expf(logits[base + j] - ms.x) * k - (j == (int)y ? scale[blockIdx.x] : 0.f);
  }
}

template <typename T>
__device__ void swiglu(const T* gate, const T* up, T* out, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = from_f<T>(lk_swiglu(to_f(gate[i]), to_f(up[i])));
}

// out[0..n] = d gate, out[n..2n] = d up
template <typename T>
__device__ void swiglu_grad(const T* gate, const T* up, const T* g, T* out, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    float dg, du;
    lk_swiglu_grad(to_f(gate[i]), to_f(up[i]), to_f(g[i]), &dg, &du);
    out[i] = from_f<T>(dg);
    out[n + i] = from_f<T>(du);
  }
}

// x [rows = b·h·s, d], tables [s, d/2]; one thread per (row, j < d/2). sign −1 rotates back
// (the backward pass).
template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* out, size_t rows, int s, int d,
                     float sign) {
  int half = d / 2;
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * half) return;
  size_t row = i / half;
  int j = i % half;
  int t = row % s;
  size_t base = row * d;
  float a, b;
  lk_rotate(to_f(x[base + j]), to_f(x[base + j + half]), to_f(cos[t * half + j]),
            sign * to_f(sin[t * half + j]), &a, &b);
  out[base + j] = from_f<T>(a);
  out[base + j + half] = from_f<T>(b);
}

#define TYPED(NAME, T, SUFFIX, PARAMS, ARGS) \
  extern "C" __global__ void NAME##_##SUFFIX PARAMS { NAME<T> ARGS; }

#define FLOAT_AND_BF16(NAME, PARAMS_F, PARAMS_B, ARGS) \
  TYPED(NAME, float, f32, PARAMS_F, ARGS)              \
  TYPED(NAME, __nv_bfloat16, bf16, PARAMS_B, ARGS)

FLOAT_AND_BF16(rms_norm,
               (const float* x, const float* w, float* y, int d, float eps),
               (const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, int d,
                float eps),
               (x, w, y, d, eps))
FLOAT_AND_BF16(rms_norm_grad,
               (const float* x, const float* w, const float* g, float* dx, int d, float eps),
               (const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* g,
                __nv_bfloat16* dx, int d, float eps),
               (x, w, g, dx, d, eps))
FLOAT_AND_BF16(swiglu, (const float* gate, const float* up, float* out, size_t n),
               (const __nv_bfloat16* gate, const __nv_bfloat16* up, __nv_bfloat16* out, size_t n),
               (gate, up, out, n))
FLOAT_AND_BF16(swiglu_grad,
               (const float* gate, const float* up, const float* g, float* out, size_t n),
               (const __nv_bfloat16* gate, const __nv_bfloat16* up, const __nv_bfloat16* g,
                __nv_bfloat16* out, size_t n),
               (gate, up, g, out, n))
FLOAT_AND_BF16(rope,
               (const float* x, const float* cos, const float* sin, float* out, size_t rows, int s,
                int d, float sign),
               (const __nv_bfloat16* x, const __nv_bfloat16* cos, const __nv_bfloat16* sin,
                __nv_bfloat16* out, size_t rows, int s, int d, float sign),
               (x, cos, sin, out, rows, s, d, sign))

extern "C" __global__ void cross_entropy_f32(const float* logits, const uint32_t* labels,
                                             float* loss, int v) {
  cross_entropy(logits, labels, loss, v);
}
extern "C" __global__ void cross_entropy_grad_f32(const float* logits, const uint32_t* labels,
                                                  const float* scale, float* out, int v) {
  cross_entropy_grad(logits, labels, scale, out, v);
}
FLOAT_AND_BF16(attn_probs,
               (const float* scores, const float* bias, float* probs, size_t rows, int t, int s,
                int batch_rows, int bias_b, float scale),
               (const __nv_bfloat16* scores, const float* bias, __nv_bfloat16* probs,
                size_t rows, int t, int s, int batch_rows, int bias_b, float scale),
               (scores, bias, probs, rows, t, s, batch_rows, bias_b, scale))
FLOAT_AND_BF16(attn_probs_grad,
               (const float* scores, const float* bias, const float* dp, float* ds, size_t rows,
                int t, int s, int batch_rows, int bias_b, float scale),
               (const __nv_bfloat16* scores, const float* bias, const __nv_bfloat16* dp,
                __nv_bfloat16* ds, size_t rows, int t, int s, int batch_rows, int bias_b,
                float scale),
               (scores, bias, dp, ds, rows, t, s, batch_rows, bias_b, scale))

// One AdamW step of an f32 parameter, element-wise, in place for p, m and v (PyTorch's order:
// moments, decay, then the bias-corrected update). c1, c2 = 1 − β^t.
extern "C" __global__ void adamw_f32(float* p, float* m, float* v, const float* g, size_t n,
                                     float lr, float b1, float b2, float eps, float decay,
                                     float c1, float c2) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gi = g[i];
  float mi = b1 * m[i] + (1.f - b1) * gi;
  float vi = b2 * v[i] + (1.f - b2) * gi * gi;
  m[i] = mi;
  v[i] = vi;
  p[i] = p[i] * decay - lr * ((mi / c1) / (sqrtf(vi / c2) + eps));
}

// Inverted dropout, y = x · scale where the mask keeps element i (row_math.h's counter-based
// draw: the same mask as the CPU's), else 0. The backward pass runs it on the gradient.
template <typename T>
__device__ void dropout(const T* x, T* y, size_t n, uint64_t seed, float keep, float scale) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = from_f<T>(lk_dropout_keeps(seed, i, keep) ? to_f(x[i]) * scale : 0.f);
}
FLOAT_AND_BF16(dropout,
               (const float* x, float* y, size_t n, uint64_t seed, float keep, float scale),
               (const __nv_bfloat16* x, __nv_bfloat16* y, size_t n, uint64_t seed, float keep,
                float scale),
               (x, y, n, seed, keep, scale))

#include "flash_attention.cuh"
