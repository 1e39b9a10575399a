/* Element math of the fused kernels, shared by the CUDA kernels (fused.cu) and a C build that
 * the CPU tests call (row_math.c), so the formulas the GPU runs are checked in CI without a GPU.
 * Plain C99 + CUDA; every function is pure. */
#ifndef LORAKIT_ROW_MATH_H
#define LORAKIT_ROW_MATH_H

#ifdef __CUDACC__
#define LK_FN __host__ __device__ static inline
#else
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#define LK_FN static inline
#endif

/* 1 / sqrt(mean(x²) + eps) from the row's sum of squares */
LK_FN float lk_inv_rms(float sum_sq, int d, float eps) { return 1.0f / sqrtf(sum_sq / (float)d + eps); }

/* RMSNorm input gradient of one element: r·w·g − x·r³·mean(w∘g∘x) */
LK_FN float lk_rms_norm_grad(float x, float w, float g, float r, float mean_wgx) {
  return r * w * g - x * (mean_wgx * r * r * r);
}

LK_FN float lk_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* silu(gate)·up */
LK_FN float lk_swiglu(float gate, float up) { return gate * lk_sigmoid(gate) * up; }

LK_FN void lk_swiglu_grad(float gate, float up, float g, float* dgate, float* dup) {
  float s = lk_sigmoid(gate);
  *dgate = g * up * s * (1.0f + gate * (1.0f - s));
  *dup = g * gate * s;
}

/* rotation of the pair (a, b) = (x[j], x[j + d/2]) by the angle with cosine c and sine s */
LK_FN void lk_rotate(float a, float b, float c, float s, float* oa, float* ob) {
  *oa = a * c - b * s;
  *ob = b * c + a * s;
}

/* RoPE thread i of rows·(d/2): the row, the pair index j and the position t (rows are
 * [b, heads, s] flattened, so the position is row mod s) */
LK_FN void lk_rope_index(size_t i, int d, int s, size_t* row, int* j, int* t) {
  int half = d / 2;
  *row = i / (size_t)half;
  *j = (int)(i % (size_t)half);
  *t = (int)(*row % (size_t)s);
}

/* SplitMix64's output function */
LK_FN uint64_t lk_splitmix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/* 1 when element i of the dropout mask drawn from `seed` keeps its value (probability `keep`):
 * a counter-based draw, u = the top 24 bits of splitmix(seed + (i + 1)·golden) over 2^24, so
 * any element's decision is computed alone and the mask never needs storing. */
LK_FN int lk_dropout_keeps(uint64_t seed, uint64_t i, float keep) {
  uint64_t state = seed + (i + 1) * 0x9e3779b97f4a7c15ULL;
  float u = (float)(lk_splitmix(state) >> 40) / 16777216.0f;
  return u < keep;
}

#endif
