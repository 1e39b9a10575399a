// Attention with an online softmax on the tensor cores (bf16 inputs, f32 accumulation), forward
// and backward, the CUDA counterpart of the tiled CPU kernel (attention/cpu.rs). Included by
// fused.cu; launched by attention/flash.rs.
//
// Forward: a block takes 64 query rows of one head (4 warps of 16 rows) and walks the key tiles
// of 64 its mask rule can show those rows; scores stay in registers (mma.sync m16n8k16, whose
// f32 accumulator layout is the next product's bf16 operand layout), the running row max and sum
// rescale the output as in FlashAttention-2. Only the log-sum-exp of each row (base 2) is kept.
// Backward: a block takes 64 keys and one query head (4 warps of 16 keys) and walks every query
// tile of that head that can see them, recomputing the probabilities from the log-sum-exp; dk
// and dv stay in registers until the block adds them (f32 atomics: the query heads of a group
// share their kv head) once at its end, dq is added to an f32 buffer tile by tile. The next tile
// is copied to shared memory (cp.async) while the current one is computed.
//
// The mask is the rule of attention/mask.rs (causal, window, cached keys, segment numbers);
// tiles it hides entirely are skipped, tiles it shows entirely are not masked element by element.
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): g = lane / 4, c = lane % 4;
//   A 16x16 row-major: reg0 (g, 2c..2c+1), reg1 (g+8, 2c..), reg2 (g, 2c+8..), reg3 (g+8, 2c+8..)
//   B 16x8 (k x n):    reg0 (k 2c..2c+1, n g), reg1 (k 2c+8..2c+9, n g)
//   C 16x8 f32:        c0,c1 (g, 2c..2c+1), c2,c3 (g+8, 2c..2c+1)
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

namespace flash {

typedef __nv_bfloat16 bf16;

constexpr int ROWS = 64;  // query rows of a forward block, keys of a backward block
constexpr int TILE = 64;  // keys of a forward tile, query rows of a backward tile
constexpr int WARPS = 4;
constexpr int PAD = 8;    // bf16 of padding per shared row: rows start 4 banks apart

// Which keys a query sees (attention/mask.rs `MaskRule::visible`): key j is visible to query i
// (key position p = past + i) when j <= p if causal, |p - j| < window if window > 0, and with
// segment numbers, key j is no padding (0) and in the query's example (a padding query sees
// every such key).
struct Mask {
  int causal, window, past, s, t;
  const uint32_t* seg;  // [b][t] or null
};

// Element strides of a [b, heads, rows, d] tensor in either layout ([b, h, s, d] or [b, s, h*d]).
struct Strides {
  long long b, h, r;
};

struct Params {
  const bf16 *q, *k, *v;
  Strides sq, sk;  // k and v share a layout
  int heads, rep;  // query heads, query heads per kv head
  float scale_log2;  // 1/sqrt(d) * log2(e): scores go to base 2
  Mask m;
};
static_assert(sizeof(Params) == 120, "attention/flash.rs passes Params by value");

__device__ __forceinline__ bool visible(const Mask& m, const uint32_t* seg, int i, int j) {
  if (i >= m.s || j >= m.t) return false;
  int p = m.past + i;
  if (m.causal && j > p) return false;
  if (m.window > 0 && abs(p - j) >= m.window) return false;
  if (seg) {
    uint32_t sq = seg[p], sk = seg[j];
    return sk != 0 && (sq == 0 || sq == sk);
  }
  return true;
}

// Keys [lo, hi) that queries [i0, i1) can see at most.
__device__ __forceinline__ int2 key_range(const Mask& m, int i0, int i1) {
  int p0 = m.past + i0, p1 = m.past + i1 - 1;
  int hi = m.causal ? min(p1 + 1, m.t) : m.t;
  int lo = m.window > 0 ? max(p0 + 1 - m.window, 0) : 0;
  return make_int2(min(lo, hi), hi);
}

// Queries [lo, hi) that can see keys [j0, j1) at all.
__device__ __forceinline__ int2 query_range(const Mask& m, int j0, int j1) {
  int lo = m.causal ? min(max(j0 - m.past, 0), m.s) : 0;
  int hi = m.window > 0 ? min(max(j1 - 1 + m.window - m.past, 0), m.s) : m.s;
  return make_int2(lo, max(hi, lo));
}

// Whether queries [i0, i1) x keys [j0, j1) need masking element by element (else all visible).
__device__ __forceinline__ bool needs_mask(const Mask& m, int i0, int i1, int j0, int j1) {
  if (m.seg || i1 > m.s || j1 > m.t) return true;
  int p0 = m.past + i0, p1 = m.past + i1 - 1;
  if (m.causal && j1 - 1 > p0) return true;
  if (m.window > 0 && (p1 - j0 >= m.window || j1 - 1 - p0 >= m.window)) return true;
  return false;
}

// Whether queries [i0, i1) x keys [j0, j1) are all hidden by the position rules.
__device__ __forceinline__ bool hidden(const Mask& m, int i0, int i1, int j0, int j1) {
  int p0 = m.past + i0, p1 = m.past + i1 - 1;
  if (i0 >= m.s || j0 >= m.t) return true;
  if (m.causal && j0 > p1) return true;
  if (m.window > 0 && (p0 - (j1 - 1) >= m.window || (!m.causal && j0 - p1 >= m.window)))
    return true;
  return false;
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_raw(bf16 lo, bf16 hi) {
  __nv_bfloat162 v;
  v.x = lo;
  v.y = hi;
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t ld32(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// d += a * b (16x8x16, bf16 in, f32 accumulate)
__device__ __forceinline__ void mma(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Starts copying rows [r0, r0 + n) of a [rows, d] head (row stride `stride`) into shared
// [n][D + PAD]; rows at or past `limit` become zeros. 16-byte asynchronous copies (d and the
// strides are multiples of 8); `commit` closes the group, `wait<N>` waits for all but N groups.
template <int D>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* src, long long stride, int r0,
                                          int n, int limit) {
  constexpr int CHUNKS = D / 8;
  for (int x = threadIdx.x; x < n * CHUNKS; x += WARPS * 32) {
    int r = x / CHUNKS, c = (x % CHUNKS) * 8;
    bool ok = r0 + r < limit;
    const bf16* from = ok ? src + (r0 + r) * stride + c : src;
    unsigned to = (unsigned)__cvta_generic_to_shared(dst + r * (D + PAD) + c);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(from),
                 "r"(ok ? 16 : 0));
  }
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices from shared memory (ldmatrix): lane l names row l % 8 of matrix l / 8;
// register i of lane (g, c) gets row g, columns 2c..2c+1 of matrix i (`.trans`: of its
// transpose, i.e. rows 2c..2c+1 of column g). Every lane of the warp takes part.
__device__ __forceinline__ void ldsm4(uint32_t* r, const bf16* row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldsm4_t(uint32_t* r, const bf16* row) {
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// A fragment of rows [r, r + 16) x columns [c0, c0 + 16) of a shared [.][ld] bf16 matrix:
// matrices (r, c0), (r + 8, c0), (r, c0 + 8), (r + 8, c0 + 8).
__device__ __forceinline__ void frag_a(uint32_t* a, const bf16* s, int ld, int r, int c0) {
  int l = threadIdx.x & 31;
  ldsm4(a, s + (r + (l & 7) + ((l >> 3) & 1) * 8) * ld + c0 + (l >> 4) * 8);
}

// B fragments (k x n = 16 x 8) of n-tiles n0 and n0 + 8 whose k runs along a shared row:
// element (k, n) = s[n0 + n][k0 + k]; b[0], b[1] for n0, b[2], b[3] for n0 + 8.
__device__ __forceinline__ void frag_b_rows(uint32_t* b, const bf16* s, int ld, int n0, int k0) {
  int l = threadIdx.x & 31, i = l >> 3;
  ldsm4(b, s + (n0 + (i >> 1) * 8 + (l & 7)) * ld + k0 + (i & 1) * 8);
}

// The same whose k runs down a shared column: element (k, n) = s[k0 + k][n0 + n].
__device__ __forceinline__ void frag_b_cols(uint32_t* b, const bf16* s, int ld, int k0, int n0) {
  int l = threadIdx.x & 31, i = l >> 3;
  ldsm4_t(b, s + (k0 + (i & 1) * 8 + (l & 7)) * ld + n0 + (i >> 1) * 8);
}

// A fragment of columns [16 kc, 16 kc + 16) of 16 rows held as f32 accumulators of 8-column
// tiles, rounded to bf16: an m16n8 accumulator pair is laid out as an m16k16 A operand.
__device__ __forceinline__ void frag_a_acc(uint32_t* a, const float (*acc)[4], int kc) {
  a[0] = pack(acc[2 * kc][0], acc[2 * kc][1]);
  a[1] = pack(acc[2 * kc][2], acc[2 * kc][3]);
  a[2] = pack(acc[2 * kc + 1][0], acc[2 * kc + 1][1]);
  a[3] = pack(acc[2 * kc + 1][2], acc[2 * kc + 1][3]);
}

// out [b, s, heads * D] (bf16), lse [b, heads, s] (f32, base 2; +inf for a row that sees no
// key). Grid (ceil(s / 64), heads, b), 128 threads, shared 2 stages * 2 * 64 * (D + 8) bf16.
template <int D>
__device__ void forward(const Params& p, bf16* out, float* lse) {
  constexpr int LD = D + PAD;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* kbuf = reinterpret_cast<bf16*>(smem);  // [2 stages][TILE][LD]
  bf16* vbuf = kbuf + 2 * TILE * LD;
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / p.rep;
  // the last query blocks see the most keys under a causal rule: they start first
  const int i0 = (gridDim.x - 1 - blockIdx.x) * ROWS, i1 = min(i0 + ROWS, p.m.s);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int w0 = i0 + 16 * warp;           // this warp's first row
  const int ra = w0 + g, rb = w0 + g + 8;  // this thread's rows
  const bf16* qh = p.q + b * p.sq.b + h * p.sq.h;
  const bf16* kh = p.k + b * p.sk.b + kvh * p.sk.h;
  const bf16* vh = p.v + b * p.sk.b + kvh * p.sk.h;
  const uint32_t* seg = p.m.seg ? p.m.seg + (size_t)b * p.m.t : nullptr;

  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kc = 0; kc < D / 16; kc++) {
    int col = kc * 16 + 2 * c;
    qf[kc][0] = ra < p.m.s ? ld32(qh + ra * p.sq.r + col) : 0;
    qf[kc][1] = rb < p.m.s ? ld32(qh + rb * p.sq.r + col) : 0;
    qf[kc][2] = ra < p.m.s ? ld32(qh + ra * p.sq.r + col + 8) : 0;
    qf[kc][3] = rb < p.m.s ? ld32(qh + rb * p.sq.r + col + 8) : 0;
  }
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float ma = -INFINITY, mb = -INFINITY, la = 0.f, lb = 0.f;

  const int2 keys = key_range(p.m, i0, i1);
  const int tiles = (keys.y - keys.x + TILE - 1) / TILE;
  auto stage = [&](int it) {
    const int j0 = keys.x + it * TILE, j1 = min(j0 + TILE, keys.y), at = (it & 1) * TILE * LD;
    load_rows<D>(kbuf + at, kh, p.sk.r, j0, TILE, j1);
    load_rows<D>(vbuf + at, vh, p.sk.r, j0, TILE, j1);
    commit();
  };
  if (tiles > 0) stage(0);
  for (int it = 0; it < tiles; it++) {
    const int j0 = keys.x + it * TILE, j1 = min(j0 + TILE, keys.y);
    const bf16* ks = kbuf + (it & 1) * TILE * LD;
    const bf16* vs = vbuf + (it & 1) * TILE * LD;
    if (it + 1 < tiles) {
      stage(it + 1);  // the buffer the previous tile used: every warp is past it
      wait<1>();
    } else {
      wait<0>();
    }
    __syncthreads();
    if (!hidden(p.m, w0, w0 + 16, j0, j1)) {
    // the tile's columns past j1 hold zero keys: the mask must see the whole tile
    const bool masked = needs_mask(p.m, w0, w0 + 16, j0, j0 + TILE);

    float sc[TILE / 8][4];
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; kc++) {
#pragma unroll
      for (int n = 0; n < TILE / 8; n += 2) {
        uint32_t bb[4];
        frag_b_rows(bb, ks, LD, n * 8, kc * 16);
        mma(sc[n], qf[kc], bb[0], bb[1]);
        mma(sc[n + 1], qf[kc], bb[2], bb[3]);
      }
    }
    float xa = -INFINITY, xb = -INFINITY;
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int row = e < 2 ? ra : rb, col = j0 + n * 8 + 2 * c + (e & 1);
        float x = sc[n][e] * p.scale_log2;
        if (masked && !visible(p.m, seg, row, col)) x = -INFINITY;
        sc[n][e] = x;
      }
      xa = fmaxf(xa, fmaxf(sc[n][0], sc[n][1]));
      xb = fmaxf(xb, fmaxf(sc[n][2], sc[n][3]));
    }
    xa = fmaxf(xa, __shfl_xor_sync(0xffffffff, xa, 1));
    xa = fmaxf(xa, __shfl_xor_sync(0xffffffff, xa, 2));
    xb = fmaxf(xb, __shfl_xor_sync(0xffffffff, xb, 1));
    xb = fmaxf(xb, __shfl_xor_sync(0xffffffff, xb, 2));
    const float na = fmaxf(ma, xa), nb = fmaxf(mb, xb);
    // a row that has seen no key yet keeps max -inf: subtract 0 instead (its p are all 0)
    const float ba = na == -INFINITY ? 0.f : na, bb = nb == -INFINITY ? 0.f : nb;
    const float ca = exp2f(ma - ba), cb = exp2f(mb - bb);
    ma = na;
    mb = nb;
    la *= ca;
    lb *= cb;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
      o[n][0] *= ca;
      o[n][1] *= ca;
      o[n][2] *= cb;
      o[n][3] *= cb;
    }
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) {
      sc[n][0] = exp2f(sc[n][0] - ba);
      sc[n][1] = exp2f(sc[n][1] - ba);
      sc[n][2] = exp2f(sc[n][2] - bb);
      sc[n][3] = exp2f(sc[n][3] - bb);
      la += sc[n][0] + sc[n][1];
      lb += sc[n][2] + sc[n][3];
    }
#pragma unroll
    for (int kc = 0; kc < TILE / 16; kc++) {
      uint32_t a[4];
      frag_a_acc(a, sc, kc);
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t bb[4];
        frag_b_cols(bb, vs, LD, kc * 16, n * 8);
        mma(o[n], a, bb[0], bb[1]);
        mma(o[n + 1], a, bb[2], bb[3]);
      }
    }
    }
    __syncthreads();  // the next stage overwrites this tile's buffer
  }
  la += __shfl_xor_sync(0xffffffff, la, 1);
  la += __shfl_xor_sync(0xffffffff, la, 2);
  lb += __shfl_xor_sync(0xffffffff, lb, 1);
  lb += __shfl_xor_sync(0xffffffff, lb, 2);
  const float ia = la > 0.f ? 1.f / la : 0.f, ib = lb > 0.f ? 1.f / lb : 0.f;
  const long long orow = (long long)p.heads * D;
  bf16* oa = out + ((long long)b * p.m.s + ra) * orow + h * D;
  bf16* ob = out + ((long long)b * p.m.s + rb) * orow + h * D;
#pragma unroll
  for (int n = 0; n < D / 8; n++) {
    int col = n * 8 + 2 * c;
    if (ra < p.m.s) *reinterpret_cast<uint32_t*>(oa + col) = pack(o[n][0] * ia, o[n][1] * ia);
    if (rb < p.m.s) *reinterpret_cast<uint32_t*>(ob + col) = pack(o[n][2] * ib, o[n][3] * ib);
  }
  if (c == 0) {
    float* lh = lse + ((long long)b * p.heads + h) * p.m.s;
    if (ra < p.m.s) lh[ra] = la > 0.f ? ma + log2f(la) : INFINITY;
    if (rb < p.m.s) lh[rb] = lb > 0.f ? mb + log2f(lb) : INFINITY;
  }
}

// delta [b, heads, s] = rowsum(dout * out) per head, both [b, s, heads * D]. A warp per row.
template <int D>
__device__ void delta(const bf16* dout, const bf16* out, float* dl, int rows, int heads, int s) {
  int r = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (r >= rows) return;
  // r runs over (b, i, h) in the [b, s, heads] order of the rows of dout
  const bf16* x = dout + (long long)r * D;
  const bf16* y = out + (long long)r * D;
  float acc = 0.f;
  for (int j = lane; j < D; j += 32) acc += __bfloat162float(x[j]) * __bfloat162float(y[j]);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
  if (lane == 0) {
    int h = r % heads, i = (r / heads) % s, b = r / heads / s;
    dl[((long long)b * heads + h) * s + i] = acc;
  }
}

// dq (f32, q's layout), dk and dv (f32, k's layout), all zeroed by the caller and added to.
// Grid (ceil(t / 64), heads, b), 128 threads, shared (2 + 2 stages * 2) * 64 * (D + 8) +
// 64 * 72 bf16 and 2 stages * 2 * 64 f32.
template <int D>
__device__ void backward(const Params& p, const bf16* dout, const float* lse, const float* dl,
                         float* dq, float* dk, float* dv) {
  constexpr int LD = D + PAD, LS = TILE + PAD;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* ks = reinterpret_cast<bf16*>(smem);
  bf16* vs = ks + ROWS * LD;
  bf16* qbuf = vs + ROWS * LD;        // [2 stages][TILE][LD]
  bf16* dobuf = qbuf + 2 * TILE * LD;  // [2 stages][TILE][LD]
  bf16* dss = dobuf + 2 * TILE * LD;   // [TILE queries][ROWS keys + PAD]: scale * dS
  float* lbuf = reinterpret_cast<float*>(dss + TILE * LS);  // [2 stages][TILE]
  float* dbuf = lbuf + 2 * TILE;                              // [2 stages][TILE]
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / p.rep;
  const int j0 = blockIdx.x * ROWS, j1 = min(j0 + ROWS, p.m.t);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int w0 = j0 + 16 * warp;           // this warp's first key
  const int ka = w0 + g, kb = w0 + g + 8;  // this thread's keys
  const float scale = p.scale_log2 * 0.69314718055994531f;  // 1/sqrt(d)
  const bf16* kh = p.k + b * p.sk.b + kvh * p.sk.h;
  const bf16* vh = p.v + b * p.sk.b + kvh * p.sk.h;
  const uint32_t* seg = p.m.seg ? p.m.seg + (size_t)b * p.m.t : nullptr;
  const long long orow = (long long)p.heads * D;
  const bf16* qh = p.q + b * p.sq.b + h * p.sq.h;
  const bf16* doh = dout + (long long)b * p.m.s * orow + h * D;
  const float* lh = lse + ((long long)b * p.heads + h) * p.m.s;
  const float* dh = dl + ((long long)b * p.heads + h) * p.m.s;
  float* dqh = dq + b * p.sq.b + h * p.sq.h;

  load_rows<D>(ks, kh, p.sk.r, j0, ROWS, j1);
  load_rows<D>(vs, vh, p.sk.r, j0, ROWS, j1);
  float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; n++) {
#pragma unroll
    for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.f;
  }
  const int2 qr = query_range(p.m, j0, j1);
  const int tiles = (qr.y - qr.x + TILE - 1) / TILE;
  auto stage = [&](int it) {
    const int i0 = qr.x + it * TILE, i1 = min(i0 + TILE, qr.y), at = it & 1;
    load_rows<D>(qbuf + at * TILE * LD, qh, p.sq.r, i0, TILE, i1);
    load_rows<D>(dobuf + at * TILE * LD, doh, orow, i0, TILE, i1);
    for (int x = threadIdx.x; x < TILE; x += WARPS * 32) {
      lbuf[at * TILE + x] = i0 + x < i1 ? lh[i0 + x] : INFINITY;
      dbuf[at * TILE + x] = i0 + x < i1 ? dh[i0 + x] : 0.f;
    }
    commit();  // with the first stage, the keys and values too
  };
  if (tiles > 0) stage(0);
  for (int it = 0; it < tiles; it++) {
    const int i0 = qr.x + it * TILE, i1 = min(i0 + TILE, qr.y);
    const bf16* qs = qbuf + (it & 1) * TILE * LD;
    const bf16* dos = dobuf + (it & 1) * TILE * LD;
    const float* lses = lbuf + (it & 1) * TILE;
    const float* dls = dbuf + (it & 1) * TILE;
    if (it + 1 < tiles) {
      stage(it + 1);  // the buffers tile it - 1 used: every warp is past them
      wait<1>();
    } else {
      wait<0>();
    }
    __syncthreads();  // this stage has landed; every warp is done with the previous dS
    const bool skip = hidden(p.m, i0, i1, w0, w0 + 16) || w0 >= j1;
    if (!skip) {
      const bool masked = needs_mask(p.m, i0, i1, w0, w0 + 16);
      // S^T and dP^T: 16 keys x 64 queries
      float st[TILE / 8][4], dpt[TILE / 8][4];
#pragma unroll
      for (int n = 0; n < TILE / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) st[n][e] = dpt[n][e] = 0.f;
      }
#pragma unroll
      for (int kc = 0; kc < D / 16; kc++) {
        uint32_t ak[4], av[4];
        frag_a(ak, ks, LD, 16 * warp, kc * 16);
        frag_a(av, vs, LD, 16 * warp, kc * 16);
#pragma unroll
        for (int n = 0; n < TILE / 8; n += 2) {
          uint32_t bb[4];
          frag_b_rows(bb, qs, LD, n * 8, kc * 16);
          mma(st[n], ak, bb[0], bb[1]);
          mma(st[n + 1], ak, bb[2], bb[3]);
          frag_b_rows(bb, dos, LD, n * 8, kc * 16);
          mma(dpt[n], av, bb[0], bb[1]);
          mma(dpt[n + 1], av, bb[2], bb[3]);
        }
      }
      // P^T = exp2(x - lse), dS^T = P^T (dP^T - delta)
#pragma unroll
      for (int n = 0; n < TILE / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          int qi = n * 8 + 2 * c + (e & 1), key = e < 2 ? ka : kb;
          float pr = exp2f(st[n][e] * p.scale_log2 - lses[qi]);
          if (masked && !visible(p.m, seg, i0 + qi, key)) pr = 0.f;
          st[n][e] = pr;
          dpt[n][e] = pr * (dpt[n][e] - dls[qi]);
        }
      }
      // dV += P^T dO, dK += dS^T Q (k = the 64 queries)
#pragma unroll
      for (int kc = 0; kc < TILE / 16; kc++) {
        uint32_t ap[4], as[4];
        frag_a_acc(ap, st, kc);
        frag_a_acc(as, dpt, kc);
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {
          uint32_t bb[4];
          frag_b_cols(bb, dos, LD, kc * 16, n * 8);
          mma(dva[n], ap, bb[0], bb[1]);
          mma(dva[n + 1], ap, bb[2], bb[3]);
          frag_b_cols(bb, qs, LD, kc * 16, n * 8);
          mma(dka[n], as, bb[0], bb[1]);
          mma(dka[n + 1], as, bb[2], bb[3]);
        }
      }
      // dS (query-major) for dQ, times the softmax scale
#pragma unroll
      for (int n = 0; n < TILE / 8; n++) {
        int qi = n * 8 + 2 * c;
        int kr = 16 * warp + g;
        dss[qi * LS + kr] = __float2bfloat16(dpt[n][0] * scale);
        dss[(qi + 1) * LS + kr] = __float2bfloat16(dpt[n][1] * scale);
        dss[qi * LS + kr + 8] = __float2bfloat16(dpt[n][2] * scale);
        dss[(qi + 1) * LS + kr + 8] = __float2bfloat16(dpt[n][3] * scale);
      }
    } else {
      // keys this warp holds are hidden from the tile: their dS is 0
      for (int x = lane; x < TILE * 16; x += 32)
        dss[(x / 16) * LS + 16 * warp + x % 16] = __float2bfloat16(0.f);
    }
    __syncthreads();
    // dQ of this warp's 16 queries: dS [16 x 64 keys] K [64 keys x D]
    const int q0 = 16 * warp;
    if (i0 + q0 < i1) {
      uint32_t af[ROWS / 16][4];
#pragma unroll
      for (int kc = 0; kc < ROWS / 16; kc++) frag_a(af[kc], dss, LS, q0, kc * 16);
      const int qa = i0 + q0 + g, qb = qa + 8;
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kc = 0; kc < ROWS / 16; kc++) {
          uint32_t bb[4];
          frag_b_cols(bb, ks, LD, kc * 16, n * 8);
          mma(acc[0], af[kc], bb[0], bb[1]);
          mma(acc[1], af[kc], bb[2], bb[3]);
        }
#pragma unroll
        for (int half = 0; half < 2; half++) {
          int col = (n + half) * 8 + 2 * c;
          if (qa < i1) {
            atomicAdd(dqh + qa * p.sq.r + col, acc[half][0]);
            atomicAdd(dqh + qa * p.sq.r + col + 1, acc[half][1]);
          }
          if (qb < i1) {
            atomicAdd(dqh + qb * p.sq.r + col, acc[half][2]);
            atomicAdd(dqh + qb * p.sq.r + col + 1, acc[half][3]);
          }
        }
      }
    }
  }
  if (tiles == 0) wait<0>();  // the keys' copies, never waited for
  float* dkh = dk + b * p.sk.b + kvh * p.sk.h;
  float* dvh = dv + b * p.sk.b + kvh * p.sk.h;
#pragma unroll
  for (int n = 0; n < D / 8; n++) {
    int col = n * 8 + 2 * c;
    if (ka < j1) {
      atomicAdd(dkh + ka * p.sk.r + col, dka[n][0] * scale);
      atomicAdd(dkh + ka * p.sk.r + col + 1, dka[n][1] * scale);
      atomicAdd(dvh + ka * p.sk.r + col, dva[n][0]);
      atomicAdd(dvh + ka * p.sk.r + col + 1, dva[n][1]);
    }
    if (kb < j1) {
      atomicAdd(dkh + kb * p.sk.r + col, dka[n][2] * scale);
      atomicAdd(dkh + kb * p.sk.r + col + 1, dka[n][3] * scale);
      atomicAdd(dvh + kb * p.sk.r + col, dva[n][2]);
      atomicAdd(dvh + kb * p.sk.r + col + 1, dva[n][3]);
    }
  }
}

}  // namespace flash

// f32 → bf16, n elements.
extern "C" __global__ void flash_f32_to_bf16(const float* x, __nv_bfloat16* y, size_t n) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16(x[i]);
}

#define FLASH_KERNELS(D, FWD_BLOCKS, BWD_BLOCKS)                                                                   \
  extern "C" __global__ void __launch_bounds__(128, FWD_BLOCKS) flash_fwd_##D(                           \
      flash::Params p, __nv_bfloat16* out, float* lse) {                                     \
    flash::forward<D>(p, out, lse);                                                          \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(128) flash_delta_##D(                         \
      const __nv_bfloat16* dout, const __nv_bfloat16* out, float* dl, int rows, int heads,   \
      int s) {                                                                               \
    flash::delta<D>(dout, out, dl, rows, heads, s);                                          \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(128, BWD_BLOCKS) flash_bwd_##D(                           \
      flash::Params p, const __nv_bfloat16* dout, const float* lse, const float* dl,         \
      float* dq, float* dk, float* dv) {                                                     \
    flash::backward<D>(p, dout, lse, dl, dq, dk, dv);                                        \
  }

// blocks per SM the register budget is cut for (forward, backward): at 64, 4 and 3 (128 and 168
// registers, a few bytes spilled in the backward pass); at 128, 1 and 1 (no spills)
FLASH_KERNELS(64, 4, 3)
FLASH_KERNELS(128, 1, 1)
