/* The kernels' element math as plain functions, serially over rows, for the CPU tests
 * (lorakit-models `fused.rs` and lorakit-adapter `dropout.rs`). Sums run in f32 like the GPU's. */
#include <stdint.h>
#include "row_math.h"

void lk_c_rms_norm(const float* x, const float* w, float* y, size_t rows, int d, float eps) {
  for (size_t r = 0; r < rows; r++) {
    const float* row = x + r * d;
    float ss = 0.0f;
    for (int j = 0; j < d; j++) ss += row[j] * row[j];
    float k = lk_inv_rms(ss, d, eps);
    for (int j = 0; j < d; j++) y[r * d + j] = row[j] * k * w[j];
  }
}

void lk_c_rms_norm_grad(const float* x, const float* w, const float* g, float* dx, size_t rows,
                        int d, float eps) {
  for (size_t r = 0; r < rows; r++) {
    size_t b = r * d;
    float ss = 0.0f, dot = 0.0f;
    for (int j = 0; j < d; j++) {
      ss += x[b + j] * x[b + j];
      dot += x[b + j] * g[b + j] * w[j];
    }
    float k = lk_inv_rms(ss, d, eps);
    for (int j = 0; j < d; j++) dx[b + j] = lk_rms_norm_grad(x[b + j], w[j], g[b + j], k, dot / d);
  }
}

void lk_c_swiglu(const float* gate, const float* up, float* out, size_t n) {
  for (size_t i = 0; i < n; i++) out[i] = lk_swiglu(gate[i], up[i]);
}

void lk_c_swiglu_grad(const float* gate, const float* up, const float* g, float* out, size_t n) {
  for (size_t i = 0; i < n; i++) lk_swiglu_grad(gate[i], up[i], g[i], &out[i], &out[n + i]);
}

void lk_c_rope(const float* x, const float* cos, const float* sin, float* out, size_t rows, int s,
               int d, float sign) {
  int half = d / 2;
  for (size_t i = 0; i < rows * (size_t)half; i++) {
    size_t row;
    int j, t;
    lk_rope_index(i, d, s, &row, &j, &t);
    size_t b = row * d;
    lk_rotate(x[b + j], x[b + j + half], cos[t * half + j], sign * sin[t * half + j], &out[b + j],
              &out[b + j + half]);
  }
}

int lk_c_dropout_keeps(uint64_t seed, uint64_t i, float keep) { return lk_dropout_keeps(seed, i, keep); }
