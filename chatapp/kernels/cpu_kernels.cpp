// CPU kernels for decoding: linears, attention and one fused transformer block.
//
// Two jobs:
//  * speed: decode is bound by reading weights. Weights are packed in panels
//    of 64 output columns, [K][64] each, streamed once per call; every weight
//    vector loaded is applied to several activation rows held in registers.
//    int8 weights meet int16 activations quantized per row in an integer dot
//    product (see the packed linear section).
//  * batch invariance: every output is one fma chain over k = 0..K-1 in
//    order, whatever the number of rows. Verifying K+1 tokens therefore gives
//    bit-identical logits to K+1 one-token steps, and greedy speculative
//    decoding equals greedy standard decoding exactly, not up to rounding.
//
// One source, three instruction sets, chosen by the compiler flags the loader
// (chatapp/kernels/__init__.py) builds each variant with: AVX-512 (16 lanes,
// 32 registers; VNNI for the int8 dot product where present), AVX2 + FMA (8
// lanes, 16 registers; AVX-VNNI where present) and a portable path in GCC
// vector extensions (4 lanes: SSE2 on x86-64, NEON on Arm). Only the simd
// layer and the tile shapes differ; every variant keeps the invariance above.
// ATen and the Python bindings only: <torch/extension.h> would add the whole
// C++ frontend (autograd, nn, optim) and a third to every variant's build time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/python.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SPECCHAT_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define SPECCHAT_AVX2 1
#include <immintrin.h>
#endif

// The loader passes the variant's name bare (-DSPECCHAT_VARIANT=avx2): quotes
// would not survive the shell that ninja runs the compiler in.
#define SPECCHAT_STRING(name) #name
#define SPECCHAT_NAME(name) SPECCHAT_STRING(name)
#ifndef SPECCHAT_VARIANT
#define SPECCHAT_VARIANT unnamed
#endif

namespace {

constexpr int64_t kPanel = 64;  // output columns per packed panel

// ---- simd layer ---------------------------------------------------------------
//
// vf: one register of W floats; vi: W int32 lanes, each holding one output
// column's sum of int8 weight pairs times int16 input pairs. fmadd(a, b, c)
// is a * b + c, fused (one rounding) where the CPU has FMA.
namespace simd {

#if defined(SPECCHAT_AVX512)
constexpr int W = 16;
constexpr bool kVectorExp = true;
using vf = __m512;
using vi = __m512i;
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf min(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf abs(vf v) { return _mm512_abs_ps(v); }
inline float reduce_add(vf v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(vf v) { return _mm512_reduce_max_ps(v); }

// exp(x) (Cephes expf: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial in
// r, times 2^n); within 2 ulp of expf over the clamped range.
inline vf exp(vf x) {
  x = _mm512_min_ps(set1(88.3762626647949f), _mm512_max_ps(set1(-88.3762626647949f), x));
  const vf n = _mm512_roundscale_ps(mul(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(p, mul(r, r), add(r, set1(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// W output columns' int8 weight pairs (2 W bytes), sign-extended to int16.
inline vi load_pairs(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vi zero_i() { return _mm512_setzero_si512(); }
inline vi set1_i(int32_t x) { return _mm512_set1_epi32(x); }
inline void store_i(int32_t* p, vi v) { _mm512_storeu_si512(reinterpret_cast<void*>(p), v); }
inline vi load_i(const int32_t* p) { return _mm512_loadu_si512(reinterpret_cast<const void*>(p)); }
// acc + x.lo * w.lo + x.hi * w.hi per lane, exact in int32.
inline vi dot_pairs(vi acc, vi x, vi w) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, x, w);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w));
#endif
}

// Rounds v (already within +-32767) to the nearest int16, ties to even.
inline void store_int16(int16_t* q, vf v) {
  const __m512i r = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm512_cvtepi32_epi16(r));
}

#elif defined(SPECCHAT_AVX2)
constexpr int W = 8;
constexpr bool kVectorExp = true;
using vf = __m256;
using vi = __m256i;
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf zero() { return _mm256_setzero_ps(); }
inline vf set1(float x) { return _mm256_set1_ps(x); }
inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf min(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf abs(vf v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
inline float reduce_add(vf v) {  // a fixed tree: halves, then pairs
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_max(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// exp(x) as the AVX-512 version; 2^n is applied as two factors 2^(n/2), so
// each has a normal exponent although n reaches +-128 at the clamps.
inline vf exp(vf x) {
  x = _mm256_min_ps(set1(88.3762626647949f), _mm256_max_ps(set1(-88.3762626647949f), x));
  const vf n = _mm256_round_ps(mul(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = _mm256_fnmadd_ps(n, set1(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(p, mul(r, r), add(r, set1(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const vf s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const vf s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  return mul(mul(p, s1), s2);
}

inline vi load_pairs(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline vi zero_i() { return _mm256_setzero_si256(); }
inline vi set1_i(int32_t x) { return _mm256_set1_epi32(x); }
inline void store_i(int32_t* p, vi v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline vi load_i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vi dot_pairs(vi acc, vi x, vi w) {
#if defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, x, w);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w));
#endif
}

// Rounds 2 W floats (already within +-32767) to int16, ties to even (the
// default rounding mode of cvtps). packs interleaves 128-bit halves; the
// permute puts them back in order.
inline void store_int16_pair(int16_t* q, vf a, vf b) {
  const __m256i packed = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permute4x64_epi64(packed, 0xD8));
}

#else
// Portable: GCC/Clang vector extensions, lowered to SSE2 on x86-64, NEON on
// Arm, scalar code elsewhere. No fused multiply-add (-ffp-contract=off keeps
// a * b + c two roundings), which changes nothing about the invariance: every
// output is still one chain over k, whatever the row count.
constexpr int W = 4;
constexpr bool kVectorExp = false;
typedef float vf __attribute__((vector_size(16)));
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf zero() { return vf{0.f, 0.f, 0.f, 0.f}; }
inline vf set1(float x) { return vf{x, x, x, x}; }
inline vf fmadd(vf a, vf b, vf c) { return a * b + c; }
inline vf add(vf a, vf b) { return a + b; }
inline vf mul(vf a, vf b) { return a * b; }
inline vf div(vf a, vf b) { return a / b; }
inline vf max(vf a, vf b) { return vf{std::max(a[0], b[0]), std::max(a[1], b[1]), std::max(a[2], b[2]), std::max(a[3], b[3])}; }
inline vf min(vf a, vf b) { return vf{std::min(a[0], b[0]), std::min(a[1], b[1]), std::min(a[2], b[2]), std::min(a[3], b[3])}; }
inline vf abs(vf v) { return vf{std::fabs(v[0]), std::fabs(v[1]), std::fabs(v[2]), std::fabs(v[3])}; }
inline float reduce_add(vf v) { return (v[0] + v[1]) + (v[2] + v[3]); }
inline float reduce_max(vf v) { return std::max(std::max(v[0], v[1]), std::max(v[2], v[3])); }
inline vf exp(vf v) { return vf{std::exp(v[0]), std::exp(v[1]), std::exp(v[2]), std::exp(v[3])}; }
#endif

}  // namespace simd

// How rows meet a panel. The weights are streamed in chunks of kChunk input
// steps ([kChunk][64] floats: 16 KB, in L1 while every row uses it), so each
// weight is read from memory once whatever the row count, and memory streams
// the whole time. Within a chunk, rows go through tiles of up to k*Rows rows
// times *_tile_columns(rows) output columns: the more rows, the narrower the
// tile, so the accumulators, the weight vectors and a broadcast input fit the
// registers (32 with AVX-512, 16 with AVX2 and SSE2/NEON). A tile continues
// its sums from the previous chunk: storing and reloading a float is exact,
// so every output is still one chain over k in order.
constexpr int64_t kChunk = 64;  // input steps (float) or input pairs (int8) per chunk
// Tiles prefetch (into L2) the weights they will need kAheadLines cache lines
// later in their own columns: the hardware prefetcher stops at 4 KB pages and
// runs too few lines ahead to keep memory streaming while a tile of several
// rows computes (measured: 4 rows cost 1.46x one row without, ~1.0x with;
// verify of 9 rows 1.7x -> 1.2x). Counted in lines, not steps, so a narrow
// tile (one line per step) still has as much in flight as a wide one.
constexpr int kAheadLines = 128;

template <int LINES_PER_STEP, typename T>
inline void prefetch_ahead(const T* w, int64_t step_bytes) {
  const char* at = reinterpret_cast<const char*>(w) + (kAheadLines / LINES_PER_STEP) * step_bytes;
#pragma GCC unroll 4
  for (int l = 0; l < LINES_PER_STEP; ++l) __builtin_prefetch(at + 64 * l, 0, 2);
}
#if defined(SPECCHAT_AVX512)
// 12 x 32 tiles for more rows measured ~15% slower. A single fp32 row takes
// the whole panel width in one pass, as the AVX2 build does: two 32-column
// passes (tried under load 7, where they looked faster) read half of each
// step's four lines at a time and measured 22.6 ms a step against 20.6 ms on
// a quiet machine, interleaved in one process.
constexpr int kFloatRows = 4, kInt8Rows = 4;
constexpr int float_tile_columns(int) { return 64; }
constexpr int int8_tile_columns(int) { return 64; }
#elif defined(SPECCHAT_AVX2)
constexpr int kFloatRows = 6, kInt8Rows = 4;
constexpr int float_tile_columns(int rows) { return rows == 1 ? 64 : rows <= 3 ? 32 : 16; }
constexpr int int8_tile_columns(int rows) { return rows == 1 ? 64 : rows == 2 ? 32 : 16; }
#else
constexpr int kFloatRows = 6, kInt8Rows = 4;
constexpr int float_tile_columns(int rows) { return rows == 1 ? 32 : rows <= 3 ? 16 : 8; }
constexpr int int8_tile_columns(int rows) { return rows == 1 ? 32 : 16; }
#endif

// Per-thread scratch that only grows: a decode step would otherwise allocate
// and zero a dozen buffers per block (malloc showed up at ~2% of a draft step).
// Every buffer has its own slot, so growing one never moves another in use.
enum Slot { kScores, kNormed, kQkv, kQuery, kAttn, kProj, kGateUp, kAct, kRowScale, kPairs, kSums, kSlots };

template <typename T>
T* scratch(Slot slot, int64_t count) {
  thread_local std::vector<T> buffers[kSlots];
  std::vector<T>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// Dot product with a fixed reduction order (attention scores, norms).
inline float dot_f32(const float* x, const float* w, int64_t k) {
  using namespace simd;
  int64_t i = 0;
  vf a0 = zero(), a1 = zero(), a2 = zero(), a3 = zero();
  for (; i + 4 * W <= k; i += 4 * W) {
    a0 = fmadd(load(x + i), load(w + i), a0);
    a1 = fmadd(load(x + i + W), load(w + i + W), a1);
    a2 = fmadd(load(x + i + 2 * W), load(w + i + 2 * W), a2);
    a3 = fmadd(load(x + i + 3 * W), load(w + i + 3 * W), a3);
  }
  for (; i + W <= k; i += W) a0 = fmadd(load(x + i), load(w + i), a0);
  float sum = reduce_add(add(add(a0, a1), add(a2, a3)));
  for (; i < k; ++i) sum += x[i] * w[i];
  return sum;
}

// ROWS activation rows (stride xs) times COLS columns of one chunk of a float
// [k][64] panel (w: the chunk's first step, steps of them) -> the same columns
// of out[ROWS][64], continuing its sums unless `first`. Each weight vector is
// loaded once and applied to every row.
template <int ROWS, int COLS>
inline void float_tile(const float* x, int64_t xs, int64_t steps, const float* w, float* out, bool first) {
  using namespace simd;
  constexpr int V = COLS / W;
  vf acc[ROWS][V];
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) acc[r][j] = first ? zero() : load(out + r * kPanel + W * j);
  }
  for (int64_t i = 0; i < steps; ++i, w += kPanel) {
    prefetch_ahead<(COLS * 4 + 63) / 64>(w, kPanel * 4);
    vf wv[V];
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) wv[j] = load(w + W * j);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const vf xb = set1(x[r * xs + i]);
#pragma GCC unroll 16
      for (int j = 0; j < V; ++j) acc[r][j] = fmadd(xb, wv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) store(out + r * kPanel + W * j, acc[r][j]);
  }
}

// ROWS rows of int16 input pairs (stride xs, two int16 per int32) times COLS
// columns of one chunk of an int8 [kp][64][2] panel -> exact int32 sums in
// the same columns of out[ROWS][64]. The layout is the operand layout of
// vpdpwssd / vpmaddwd: each 32-bit lane multiplies one column's two weights by
// two inputs and adds both products to its int32 accumulator.
#if defined(SPECCHAT_AVX512) || defined(SPECCHAT_AVX2)
template <int ROWS, int COLS>
inline void int8_tile(const int32_t* xq, int64_t xs, int64_t steps, const int8_t* w, int32_t* out, bool first) {
  using namespace simd;
  constexpr int V = COLS / W;
  vi acc[ROWS][V];
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) {
      acc[r][j] = first ? zero_i() : load_i(out + r * kPanel + W * j);
    }
  }
  for (int64_t i = 0; i < steps; ++i, w += 2 * kPanel) {
    prefetch_ahead<(COLS * 2 + 63) / 64>(w, kPanel * 2);
    vi xb[ROWS];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) xb[r] = set1_i(xq[r * xs + i]);
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) {
      const vi wv = load_pairs(w + 2 * W * j);  // one weight vector at a time: registers stay free
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) acc[r][j] = dot_pairs(acc[r][j], xb[r], wv);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) store_i(out + r * kPanel + W * j, acc[r][j]);
  }
}
#else
template <int ROWS, int COLS>
inline void int8_tile(const int32_t* xq, int64_t xs, int64_t steps, const int8_t* w, int32_t* out, bool first) {
  int32_t acc[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < COLS; ++c) acc[r][c] = first ? 0 : out[r * kPanel + c];
  }
  for (int64_t i = 0; i < steps; ++i, w += 2 * kPanel) {
    for (int r = 0; r < ROWS; ++r) {
      int16_t pair[2];  // as quantize_row wrote them: two int16 in one int32 slot
      std::memcpy(pair, xq + r * xs + i, sizeof pair);
      for (int c = 0; c < COLS; ++c) acc[r][c] += pair[0] * w[2 * c] + pair[1] * w[2 * c + 1];
    }
  }
  for (int r = 0; r < ROWS; ++r) std::copy(acc[r], acc[r] + COLS, out + r * kPanel);
}
#endif

// Columns c0..c0+width-1 (a whole or a half panel) of ROWS rows for one
// chunk (w and out at column 0), in tiles as wide as the registers allow.
template <int ROWS>
inline void float_rows(const float* x, int64_t xs, int64_t steps, const float* w, float* out, int64_t c0,
                       int64_t width, bool first) {
  constexpr int cols = std::min<int>(float_tile_columns(ROWS), kPanel);
  if constexpr (cols > kPanel / 2) {
    if (width < cols) return float_tile<ROWS, kPanel / 2>(x, xs, steps, w + c0, out + c0, first);
  }
  for (int64_t c = c0; c < c0 + width; c += cols) float_tile<ROWS, cols>(x, xs, steps, w + c, out + c, first);
}

template <int ROWS>
inline void int8_rows(const int32_t* xq, int64_t xs, int64_t steps, const int8_t* w, int32_t* out, int64_t c0,
                      int64_t width, bool first) {
  constexpr int cols = std::min<int>(int8_tile_columns(ROWS), kPanel);
  if constexpr (cols > kPanel / 2) {
    if (width < cols) return int8_tile<ROWS, kPanel / 2>(xq, xs, steps, w + 2 * c0, out + c0, first);
  }
  for (int64_t c = c0; c < c0 + width; c += cols) int8_tile<ROWS, cols>(xq, xs, steps, w + 2 * c, out + c, first);
}

// rows (1..ROWS) rows through the tiles compiled for exactly that many rows.
template <int ROWS>
inline void float_block(const float* x, int64_t rows, int64_t xs, int64_t steps, const float* w, float* out,
                        int64_t c0, int64_t width, bool first) {
  if constexpr (ROWS > 1) {
    if (rows < ROWS) return float_block<ROWS - 1>(x, rows, xs, steps, w, out, c0, width, first);
  }
  float_rows<ROWS>(x, xs, steps, w, out, c0, width, first);
}

template <int ROWS>
inline void int8_block(const int32_t* xq, int64_t rows, int64_t xs, int64_t steps, const int8_t* w, int32_t* out,
                       int64_t c0, int64_t width, bool first) {
  if constexpr (ROWS > 1) {
    if (rows < ROWS) return int8_block<ROWS - 1>(xq, rows, xs, steps, w, out, c0, width, first);
  }
  int8_rows<ROWS>(xq, xs, steps, w, out, c0, width, first);
}

void check_rows(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weight ", k);
}

}  // namespace

// ---- packed linear ----------------------------------------------------------
//
// float32 weights [n][k] are packed as [ceil(n/64)][k][64] panels, int8 weights
// as [ceil(n/64)][k/2][64][2] (input pairs interleaved for the integer dot
// product); both zero-padded to whole panels.
//
// int8 weights multiply int16 activations: each row is quantized with its own
// scale, fine enough that the error is far below the weights' own int8 error
// (relative step ~3e-5 of the row's largest value), and coarse enough that the
// int32 sums cannot overflow. Integer sums are exact, so the result does not
// depend on the order of the additions: still batch-invariant.

at::Tensor pack_weight(at::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "weight must be 2-D");
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t panels = (n + kPanel - 1) / kPanel;
  auto padded = at::zeros({panels * kPanel, k}, w.options());
  padded.narrow(0, 0, n).copy_(w);
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(k % 2 == 0, "int8 weights need an even number of inputs, got ", k);
    return padded.view({panels, kPanel, k / 2, 2}).permute({0, 2, 1, 3}).contiguous();
  }
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

namespace {

struct Weight {
  const at::Tensor& packed;  // float32 [panels][k][64] or int8 [panels][k/2][64][2]
  const at::Tensor& scale;   // [n] float32 for int8, else empty
  int64_t n;                    // real output count

  bool int8() const { return packed.scalar_type() == at::kChar; }
  int64_t panels() const { return packed.size(0); }
  int64_t k() const { return int8() ? packed.size(1) * 2 : packed.size(1); }
};

// Writes rows r0..r0+rows-1, columns c0..c0+width-1, of one panel's outputs
// (out[r][c]) into y; col0 is the panel's first output.
template <typename T>
inline void store_panel(const T* out, int64_t rows, int64_t r0, int64_t col0, int64_t c0, int64_t width, int64_t n,
                        const float* row_scale, const float* scale, const float* bias, float* yp) {
  const int64_t cols = std::min(c0 + width, n - col0);
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = yp + (r0 + r) * n + col0;
    for (int64_t c = c0; c < cols; ++c) {
      float v = static_cast<float>(out[r * kPanel + c]);
      if (row_scale != nullptr) v *= row_scale[r0 + r];
      if (scale != nullptr) v *= scale[col0 + c];
      if (bias != nullptr) v += bias[col0 + c];
      yr[c] = v;
    }
  }
}

// ---- threads ------------------------------------------------------------------
//
// A parallel loop whose end waits for work, not for threads. OpenMP's join
// waits until every thread of the team has arrived, so when another process
// holds a core, a helper that has not even been scheduled yet stalls the whole
// step for a scheduler time slice, at each of the ~150 loops of a decode step
// (measured here at load average 6: a 2-thread draft step took a median of
// 1.4 s against 31 ms on one thread). Here each thread claims units from its
// own contiguous range (so each streams its own part of the weights, as with a
// static split), then from the others' ranges; the calling thread waits only
// for units a helper has claimed, so a helper that is asleep or descheduled
// simply takes no part and the caller does its range too.
class Team {
 public:
  static constexpr int kMaxThreads = 64;

  static Team& instance() {
    static Team* team = new Team;  // never destroyed: helpers run until the process ends
    return *team;
  }

  // body(begin, end) for consecutive units covering [0, units) once, claimed
  // `grab` at a time (fewer at a range's end), on this thread and up to
  // threads - 1 helpers. One loop at a time (a second caller waits).
  template <typename Body>
  void run(int64_t units, int threads, int64_t grab, const Body& body) {
    threads = std::min<int>({threads, kMaxThreads, static_cast<int>(std::max<int64_t>(1, units / grab))});
    if (threads <= 1) {
      if (units > 0) body(0, units);
      return;
    }
    std::lock_guard<std::mutex> one_loop(loop_);
    hire(threads - 1);
    const uint64_t epoch = ++epoch_counter_;
    for (int r = 0; r < kMaxThreads; ++r) next_[r].store(tag(epoch, kUnitMask), std::memory_order_relaxed);
    fn_.store([](const void* context, int64_t begin, int64_t end) { (*static_cast<const Body*>(context))(begin, end); },
              std::memory_order_relaxed);
    context_.store(&body, std::memory_order_relaxed);
    grab_.store(grab, std::memory_order_relaxed);
    ranges_.store(threads, std::memory_order_relaxed);
    for (int r = 0; r < threads; ++r) {
      const int64_t begin = units * r / threads / grab * grab;  // ranges start on whole grabs
      // Release: a late helper that sees the new end also sees the closed counters above.
      end_[r].store(r + 1 < threads ? units * (r + 1) / threads / grab * grab : units, std::memory_order_release);
      next_[r].store(tag(epoch, begin), std::memory_order_relaxed);
    }
    done_.store(0, std::memory_order_relaxed);
    epoch_.store(epoch, std::memory_order_release);  // publishes everything above
    if (sleeping_.load(std::memory_order_seq_cst) > 0) epoch_.notify_all();
    const int64_t mine = work(epoch, 0);
    for (int64_t spins = 0; done_.load(std::memory_order_acquire) + mine < units; ++spins) {
      if (spins < kSpins) {
        pause();
      } else {
        std::this_thread::yield();  // a helper was descheduled mid-claim
      }
    }
  }

 private:
  static constexpr int kUnitBits = 32;
  static constexpr uint64_t kUnitMask = (uint64_t{1} << kUnitBits) - 1;
  static constexpr int64_t kSpins = 1 << 11;  // ~50 us of pause, then a helper sleeps (frees the core)

  static uint64_t tag(uint64_t epoch, int64_t unit) { return (epoch << kUnitBits) | static_cast<uint64_t>(unit); }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  // Claims and runs units of `epoch`, from range `slot` on, until none is
  // left; returns how many it ran. A claim is a compare-and-swap on a counter
  // tagged with its epoch, so a helper that slept through a loop can never
  // claim a unit of the next one with the old body.
  int64_t work(uint64_t epoch, int slot) {
    const int ranges = ranges_.load(std::memory_order_relaxed);
    const int64_t grab = grab_.load(std::memory_order_relaxed);
    int64_t count = 0;
    for (int i = 0; i < ranges; ++i) {
      const int r = (slot + i) % ranges;
      const int64_t end = end_[r].load(std::memory_order_acquire);
      uint64_t s = next_[r].load(std::memory_order_acquire);
      while ((s >> kUnitBits) == epoch && static_cast<int64_t>(s & kUnitMask) < end) {
        const int64_t begin = static_cast<int64_t>(s & kUnitMask);
        const int64_t stop = std::min(begin + grab, end);
        if (next_[r].compare_exchange_weak(s, tag(epoch, stop), std::memory_order_acq_rel,
                                            std::memory_order_acquire)) {
          fn_.load(std::memory_order_relaxed)(context_.load(std::memory_order_relaxed), begin, stop);
          count += stop - begin;
          s = next_[r].load(std::memory_order_acquire);
        }
      }
    }
    return count;
  }

  void hire(int helpers) {
    while (static_cast<int>(threads_.size()) < helpers) {
      const int index = static_cast<int>(threads_.size());
      // The epoch before the loop about to start, so a new helper takes part in it.
      const uint64_t before = epoch_.load(std::memory_order_relaxed);
      threads_.emplace_back([this, index, before] { serve(index, before); });
      threads_.back().detach();
    }
    active_.store(helpers, std::memory_order_relaxed);
  }

  void serve(int index, uint64_t seen) {
    for (;;) {
      uint64_t epoch = epoch_.load(std::memory_order_acquire);
      for (int64_t spins = 0; epoch == seen; epoch = epoch_.load(std::memory_order_acquire)) {
        if (++spins < kSpins) {
          pause();
        } else {
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          epoch_.wait(seen, std::memory_order_acquire);  // returns at once if a loop started meanwhile
          sleeping_.fetch_sub(1, std::memory_order_seq_cst);
          spins = 0;
        }
      }
      seen = epoch;
      if (index < active_.load(std::memory_order_relaxed)) {
        const int64_t ran = work(epoch, index + 1);
        if (ran > 0) done_.fetch_add(ran, std::memory_order_release);
      }
    }
  }

  std::mutex loop_;
  std::vector<std::thread> threads_;
  uint64_t epoch_counter_ = 0;  // written under loop_
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> active_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<int> ranges_{0};
  std::atomic<int64_t> grab_{1};
  std::atomic<uint64_t> next_[kMaxThreads] = {};
  std::atomic<int64_t> end_[kMaxThreads] = {};
  std::atomic<void (*)(const void*, int64_t, int64_t)> fn_{nullptr};
  std::atomic<const void*> context_{nullptr};
  std::atomic<int64_t> done_{0};
};

// Runs every half-panel unit of a weight's panels on the team (torch's
// thread setting): run(panel, c0, width) computes columns c0..c0+width-1 of
// one panel, whole panels where a claim covers both halves, so two threads
// share a layer of 9 panels (576 outputs) 4.5/4.5 instead of 5/4. The column
// split cannot change a result: each output is still one chain over its inputs.
template <typename Run>
void for_each_panel_part(int64_t panels, const Run& run) {
  Team::instance().run(2 * panels, at::get_num_threads(), 2, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end;) {
      const bool whole = u % 2 == 0 && u + 1 < end;
      run(u / 2, whole ? 0 : (u % 2) * (kPanel / 2), whole ? kPanel : kPanel / 2);
      u += whole ? 2 : 1;
    }
  });
}

// Every panel part, chunk by chunk; within a chunk, rows `rows` at a time:
// chunk(panel, r0, count, step0, steps, sums, c0, width, first) continues the
// sums sums[count][64] (columns c0..c0+width-1) over steps step0.., and the
// finished sums go to y with the optional per-row scale, per-column scale
// and bias.
template <typename Acc, typename Chunk>
void panel_linear(int64_t m, int64_t rows, int64_t steps, const Weight& w, const float* row_scale,
                  const float* scale, const float* bias, float* yp, const Chunk& chunk) {
  for_each_panel_part(w.panels(), [&](int64_t p, int64_t c0, int64_t width) {
    Acc* sums = scratch<Acc>(kSums, m * kPanel);
    for (int64_t s0 = 0; s0 < steps; s0 += kChunk) {
      const int64_t count = std::min(kChunk, steps - s0);
      for (int64_t r0 = 0; r0 < m; r0 += rows) {
        chunk(p, r0, std::min(rows, m - r0), s0, count, sums + r0 * kPanel, c0, width, s0 == 0);
      }
    }
    store_panel(sums, m, 0, p * kPanel, c0, width, w.n, row_scale, scale, bias, yp);
  });
}

void float_linear(const float* xp, int64_t m, const Weight& w, const float* bias, float* yp) {
  const int64_t k = w.k();
  const float* wp = w.packed.data_ptr<float>();
  panel_linear<float>(m, kFloatRows, k, w, nullptr, nullptr, bias, yp,
                      [&](int64_t p, int64_t r0, int64_t count, int64_t s0, int64_t steps, float* sums, int64_t c0,
                          int64_t width, bool first) {
                        float_block<kFloatRows>(xp + r0 * k + s0, count, k, steps, wp + (p * k + s0) * kPanel, sums,
                                                c0, width, first);
                      });
}

// x row -> int16 pairs and the row's scale, x ~= xq * scale. The scale keeps
// |xq| <= 32767 and 127 * sum|xq| < 2^31, the largest int32 sum possible
// against int8 weights.
void quantize_row(const float* x, int64_t k, int32_t* pairs, float* scale) {
  using namespace simd;
  int64_t i = 0;
  vf vmax = zero(), vsum = zero();
  for (; i + W <= k; i += W) {
    const vf v = abs(load(x + i));
    vmax = max(vmax, v);
    vsum = add(vsum, v);
  }
  float amax = reduce_max(vmax), l1 = reduce_add(vsum);
  for (; i < k; ++i) {
    amax = std::max(amax, std::fabs(x[i]));
    l1 += std::fabs(x[i]);
  }
  const float budget = 0.99f * (2147483647.0f / 127.0f - static_cast<float>(k));  // rounding adds <= k/2
  float s = std::max(amax / 32767.0f, l1 / budget);
  if (!(s > 0.f) || !std::isfinite(s)) s = 1.0f;  // all zeros (or garbage in: let it show downstream)
  const float inv = 1.0f / s;
  int16_t* q = reinterpret_cast<int16_t*>(pairs);
  i = 0;
#if defined(SPECCHAT_AVX512) || defined(SPECCHAT_AVX2)
  const vf vinv = set1(inv), lo = set1(-32767.0f), hi = set1(32767.0f);
  auto scaled = [&](int64_t at) { return min(hi, max(lo, mul(load(x + at), vinv))); };
#if defined(SPECCHAT_AVX512)
  for (; i + W <= k; i += W) store_int16(q + i, scaled(i));
#else
  for (; i + 2 * W <= k; i += 2 * W) store_int16_pair(q + i, scaled(i), scaled(i + W));
#endif
#endif
  for (; i < k; ++i) {  // round-to-nearest-even, as the vector path
    q[i] = static_cast<int16_t>(std::nearbyint(std::min(32767.0f, std::max(-32767.0f, x[i] * inv))));
  }
  *scale = s;
}

void int8_linear(const float* xp, int64_t m, const Weight& w, const float* bias, float* yp) {
  const int64_t k = w.k(), kp = k / 2;
  int32_t* xq = scratch<int32_t>(kPairs, m * kp);
  float* xs = scratch<float>(kRowScale, m);
  for (int64_t r = 0; r < m; ++r) quantize_row(xp + r * k, k, xq + r * kp, xs + r);
  const int8_t* wp = w.packed.data_ptr<int8_t>();
  panel_linear<int32_t>(m, kInt8Rows, kp, w, xs, w.scale.data_ptr<float>(), bias, yp,
                        [&](int64_t p, int64_t r0, int64_t count, int64_t s0, int64_t steps, int32_t* sums,
                            int64_t c0, int64_t width, bool first) {
                          int8_block<kInt8Rows>(xq + r0 * kp + s0, count, kp, steps, wp + (p * kp + s0) * 2 * kPanel,
                                                sums, c0, width, first);
                        });
}

void linear_into(const float* xp, int64_t m, const Weight& w, const float* bias, float* yp) {
  if (w.int8()) {
    int8_linear(xp, m, w, bias, yp);
  } else {
    float_linear(xp, m, w, bias, yp);
  }
}

void check_weight(const at::Tensor& w, const at::Tensor& scale, int64_t n) {
  TORCH_CHECK(w.is_contiguous() && ((w.scalar_type() == at::kFloat && w.dim() == 3 && w.size(2) == kPanel) ||
                                    (w.scalar_type() == at::kChar && w.dim() == 4 && w.size(2) == kPanel &&
                                     w.size(3) == 2)),
              "weight must be float32 or int8, packed by pack_weight");
  TORCH_CHECK(w.size(0) * kPanel >= n && n > (w.size(0) - 1) * kPanel, "output count does not match the packing");
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == n,
                "int8 weight needs a float32 scale per output");
  }
}

}  // namespace

at::Tensor linear(at::Tensor x, at::Tensor packed, at::Tensor scale, int64_t n) {
  check_weight(packed, scale, n);
  const Weight w{packed, scale, n};
  check_rows(x, w.k());
  auto y = at::empty({x.size(0), n}, x.options());
  linear_into(x.data_ptr<float>(), x.size(0), w, nullptr, y.data_ptr<float>());
  return y;
}

// ---- attention --------------------------------------------------------------

// Softmax-weighted sum of values for one query head over keys 0..length-1.
// Scores are one dot product each; every step depends only on this query and
// the cached keys/values, never on the other rows of the call (batch
// invariance). D > 0: the head width known at compile time, so the query and
// the output stay in registers (D = 64 and 128 cover the usual models).
template <int D>
void attend_one(const float* qr, const float* kh, const float* vh, int64_t d, int64_t length, float scale,
                float* scores, float* orow) {
  if constexpr (D > 0) {
    using namespace simd;
    constexpr int V = D / W;
    vf q[V];
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) q[v] = load(qr + W * v);
    float best = -INFINITY;
    for (int64_t j = 0; j < length; ++j) {
      const float* kr = kh + j * D;
      vf acc = mul(q[0], load(kr));
#pragma GCC unroll 16
      for (int v = 1; v < V; ++v) acc = fmadd(q[v], load(kr + W * v), acc);
      scores[j] = reduce_add(acc) * scale;
      best = std::max(best, scores[j]);
    }
    float total = 0.f;
    for (int64_t j = 0; j < length; ++j) {
      scores[j] = std::exp(scores[j] - best);
      total += scores[j];
    }
    vf out[V];
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) out[v] = zero();
    for (int64_t j = 0; j < length; ++j) {
      const vf p = set1(scores[j]);
      const float* vr = vh + j * D;
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) out[v] = fmadd(p, load(vr + W * v), out[v]);
    }
    const vf inv = set1(1.0f / total);
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) store(orow + W * v, mul(out[v], inv));
    return;
  }
  float best = -INFINITY;
  for (int64_t j = 0; j < length; ++j) {
    scores[j] = dot_f32(qr, kh + j * d, d) * scale;
    best = std::max(best, scores[j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j < length; ++j) {
    scores[j] = std::exp(scores[j] - best);
    total += scores[j];
  }
  for (int64_t c = 0; c < d; ++c) orow[c] = 0.f;
  for (int64_t j = 0; j < length; ++j) {
    const float p = scores[j];
    const float* vr = vh + j * d;
    for (int64_t c = 0; c < d; ++c) orow[c] += p * vr[c];
  }
  const float inv = 1.0f / total;
  for (int64_t c = 0; c < d; ++c) orow[c] *= inv;
}

// Causal attention of n new queries (absolute positions start..start+n-1)
// against a KV cache whose first start+n positions are filled.
// q: [n, heads, d]; caches: [kv_heads, capacity, d]; out: [n, heads, d].
void attention_into(const float* qp, int64_t n, int64_t heads, int64_t d, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, int64_t start, float* op) {
  const int64_t kv_heads = k_cache.size(0), capacity = k_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(start + n <= capacity, "attention past the cache capacity");
  const int64_t group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  auto attend = d == 64 ? attend_one<64> : d == 128 ? attend_one<128> : attend_one<0>;
  // Tasks in claims of at least ~64k multiply-adds: a one-token step over a
  // short context then runs on this thread alone, since handing work over
  // costs more than the work.
  const int64_t tasks = n * heads;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / ((start + n) * d));
  Team::instance().run(tasks, at::get_num_threads(), grain, [&](int64_t begin, int64_t end) {
    float* scores = scratch<float>(kScores, start + n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / heads, h = task % heads;
      const int64_t offset = (h / group) * capacity * d;
      attend(qp + (i * heads + h) * d, kp + offset, vp + offset, d, start + i + 1, scale, scores,
             op + (i * heads + h) * d);
    }
  });
}

at::Tensor attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, int64_t start) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == at::kFloat, "q must be [n, heads, d] float32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto out = at::empty_like(q);
  attention_into(q.data_ptr<float>(), q.size(0), q.size(1), q.size(2), k_cache, v_cache, start, out.data_ptr<float>());
  return out;
}

// ---- activation ------------------------------------------------------------

// act = silu(gate) * up, row by row; gu rows are [gate | up]. Column c always
// takes the same path (vector or scalar tail), whatever the row count.
void silu_mul(const float* gu, int64_t n, int64_t inter, float* act) {
  for (int64_t r = 0; r < n; ++r) {
    const float* g = gu + r * 2 * inter;
    const float* u = g + inter;
    float* a = act + r * inter;
    int64_t c = 0;
    if constexpr (simd::kVectorExp) {
      using namespace simd;
      const vf one = set1(1.0f), minus = set1(-1.0f);
      for (; c + W <= inter; c += W) {
        const vf gv = load(g + c);
        const vf sig = div(gv, add(one, exp(mul(minus, gv))));
        store(a + c, mul(sig, load(u + c)));
      }
    }
    for (; c < inter; ++c) a[c] = g[c] / (1.0f + std::exp(-g[c])) * u[c];
  }
}

// ---- one transformer block ------------------------------------------------

void rms_norm_into(const float* x, int64_t m, int64_t k, const float* weight, float eps, float* y) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    const float mean = dot_f32(xr, xr, k) / static_cast<float>(k);
    const float inv = 1.0f / std::sqrt(mean + eps);
    for (int64_t c = 0; c < k; ++c) y[r * k + c] = weight[c] * (xr[c] * inv);
  }
}

// Rotate n rows of `heads` vectors of width d in place; row i has position start+i.
void rope_inplace(float* x, int64_t n, int64_t heads, int64_t d, int64_t stride, const float* cos,
                  const float* sin, int64_t start) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < n; ++i) {
    const float* c = cos + (start + i) * d;
    const float* s = sin + (start + i) * d;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + i * stride + h * d;
      for (int64_t t = 0; t < half; ++t) {
        const float a = v[t], b = v[t + half];
        v[t] = a * c[t] - b * s[t];
        v[t + half] = b * c[t + half] + a * s[t + half];
      }
    }
  }
}

// x: [n, hidden] float32, updated in place. Weights float32 or int8 (+ scale).
// Empty tensors stand for "no bias"/"no scale".
void block_forward(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& qkv_w,
                   const at::Tensor& qkv_s, const at::Tensor& qkv_b, const at::Tensor& o_w,
                   const at::Tensor& o_s, const at::Tensor& mlp_norm, const at::Tensor& gu_w,
                   const at::Tensor& gu_s, const at::Tensor& down_w, const at::Tensor& down_s,
                   const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cos,
                   const at::Tensor& sin, int64_t start, double eps, int64_t heads, int64_t kv_heads,
                   int64_t inter) {
  const int64_t n = x.size(0), hidden = x.size(1);
  check_rows(x, hidden);
  const int64_t d = k_cache.size(2), capacity = k_cache.size(1);
  const int64_t q_size = heads * d, kv_size = kv_heads * d, qkv_size = q_size + 2 * kv_size;
  check_weight(qkv_w, qkv_s, qkv_size);
  check_weight(o_w, o_s, hidden);
  check_weight(gu_w, gu_s, 2 * inter);
  check_weight(down_w, down_s, hidden);
  const Weight qkv_lin{qkv_w, qkv_s, qkv_size}, o_lin{o_w, o_s, hidden};
  const Weight gu_lin{gu_w, gu_s, 2 * inter}, down_lin{down_w, down_s, hidden};
  TORCH_CHECK(qkv_lin.k() == hidden && o_lin.k() == q_size && gu_lin.k() == hidden && down_lin.k() == inter,
              "block weights do not match the hidden size");
  TORCH_CHECK(start + n <= capacity, "forward past the cache capacity");
  float* xp = x.data_ptr<float>();

  float* h = scratch<float>(kNormed, n * hidden);
  float* qkv = scratch<float>(kQkv, n * qkv_size);
  float* q = scratch<float>(kQuery, n * q_size);
  float* attn = scratch<float>(kAttn, n * q_size);
  float* proj = scratch<float>(kProj, n * hidden);
  float* gu = scratch<float>(kGateUp, n * 2 * inter);
  float* act = scratch<float>(kAct, n * inter);

  rms_norm_into(xp, n, hidden, attn_norm.data_ptr<float>(), static_cast<float>(eps), h);
  linear_into(h, n, qkv_lin, qkv_b.numel() ? qkv_b.data_ptr<float>() : nullptr,
              qkv);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  rope_inplace(qkv, n, heads, d, qkv_size, cp, sp, start);
  rope_inplace(qkv + q_size, n, kv_heads, d, qkv_size, cp, sp, start);
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float* row = qkv + i * qkv_size;
    std::copy(row, row + q_size, q + i * q_size);
    for (int64_t g = 0; g < kv_heads; ++g) {
      std::copy(row + q_size + g * d, row + q_size + (g + 1) * d, kc + (g * capacity + start + i) * d);
      std::copy(row + q_size + kv_size + g * d, row + q_size + kv_size + (g + 1) * d,
                vc + (g * capacity + start + i) * d);
    }
  }
  attention_into(q, n, heads, d, k_cache, v_cache, start, attn);
  linear_into(attn, n, o_lin, nullptr, proj);
  for (int64_t i = 0; i < n * hidden; ++i) xp[i] += proj[i];

  rms_norm_into(xp, n, hidden, mlp_norm.data_ptr<float>(), static_cast<float>(eps), h);
  linear_into(h, n, gu_lin, nullptr, gu);
  silu_mul(gu, n, inter, act);
  linear_into(act, n, down_lin, nullptr, proj);
  for (int64_t i = 0; i < n * hidden; ++i) xp[i] += proj[i];
}

// All of a model's blocks, in one call per forward: the weights are handed
// over once, at load, instead of 21 arguments per block per step through
// Python (a tenth of a draft step went to that loop and its conversions).
class Blocks {
 public:
  static constexpr size_t kPerLayer = 11;  // attn_norm, qkv w/s/b, o w/s, mlp_norm, gate_up w/s, down w/s

  Blocks(std::vector<at::Tensor> weights, int64_t heads, int64_t kv_heads, int64_t inter, double eps)
      : weights_(std::move(weights)), heads_(heads), kv_heads_(kv_heads), inter_(inter), eps_(eps) {
    TORCH_CHECK(!weights_.empty() && weights_.size() % kPerLayer == 0, "Blocks takes ", kPerLayer,
                " tensors per layer, got ", weights_.size());
  }

  int64_t layers() const { return static_cast<int64_t>(weights_.size() / kPerLayer); }

  // x: [n, hidden], updated in place; one key and one value cache per layer.
  void forward(const at::Tensor& x, const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
               const at::Tensor& cos, const at::Tensor& sin, int64_t start) const {
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == layers() && static_cast<int64_t>(values.size()) == layers(),
                "one key and one value cache per layer");
    for (int64_t i = 0; i < layers(); ++i) {
      const at::Tensor* w = weights_.data() + i * kPerLayer;
      block_forward(x, w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], w[10], keys[i], values[i], cos,
                    sin, start, eps_, heads_, kv_heads_, inter_);
    }
  }

 private:
  std::vector<at::Tensor> weights_;
  int64_t heads_, kv_heads_, inter_;
  double eps_;
};

at::Tensor silu_mul_rows(at::Tensor gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.scalar_type() == at::kFloat && gu.size(1) % 2 == 0,
              "gu must be a contiguous [n, 2 * inter] float32 tensor");
  auto act = at::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  silu_mul(gu.data_ptr<float>(), gu.size(0), gu.size(1) / 2, act.data_ptr<float>());
  return act;
}

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  check_rows(x, weight.numel());
  auto y = at::empty_like(x);
  rms_norm_into(x.data_ptr<float>(), x.size(0), x.size(1), weight.data_ptr<float>(), static_cast<float>(eps),
                y.data_ptr<float>());
  return y;
}

// How many threads a loop of the kernels actually runs on: one unit per
// thread, each waiting (up to 2 s, for a loaded machine) until every thread
// has claimed one.
int64_t parallel_threads() {
  const int threads = at::get_num_threads();
  std::mutex seen_lock;
  std::vector<std::thread::id> seen;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  Team::instance().run(threads, threads, 1, [&](int64_t, int64_t) {
    {
      std::lock_guard<std::mutex> hold(seen_lock);
      seen.push_back(std::this_thread::get_id());
    }
    for (;;) {
      {
        std::lock_guard<std::mutex> hold(seen_lock);
        if (static_cast<int>(seen.size()) >= threads) return;
      }
      if (std::chrono::steady_clock::now() > deadline) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
  std::sort(seen.begin(), seen.end());
  return std::unique(seen.begin(), seen.end()) - seen.begin();
}

// The variant name the loader built this module as (avx512, avxvnni, avx2, portable).
std::string variant() { return SPECCHAT_NAME(SPECCHAT_VARIANT); }

// The instruction set this build's hot loops actually use, from the compiler's own macros.
std::string isa() {
#if defined(SPECCHAT_AVX512) && defined(__AVX512VNNI__)
  return "avx512+vnni";
#elif defined(SPECCHAT_AVX512)
  return "avx512";
#elif defined(SPECCHAT_AVX2) && defined(__AVXVNNI__)
  return "avx2+fma+avxvnni";
#elif defined(SPECCHAT_AVX2)
  return "avx2+fma";
#else
  return "portable";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("variant", &variant, "the variant name this module was built as");
  m.def("isa", &isa, "the instruction set its hot loops use");
  m.def("parallel_threads", &parallel_threads, "threads a parallel_for in these kernels runs on");
  m.def("pack_weight", &pack_weight, "pack a [n][k] weight into [n/64][k][64] panels");
  m.def("linear", &linear, "batch-invariant linear on a packed float32 or int8 weight");
  m.def("attention", &attention, "batch-invariant causal attention for few new queries");
  m.def("rms_norm", &rms_norm, "row-wise RMSNorm");
  m.def("silu_mul", &silu_mul_rows, "silu(gate) * up for rows of [gate | up]");
  pybind11::class_<Blocks>(m, "Blocks", pybind11::module_local())
      .def(pybind11::init<std::vector<at::Tensor>, int64_t, int64_t, int64_t, double>())
      .def("forward", &Blocks::forward, "all blocks for few rows, x in place")
      .def_property_readonly("layers", &Blocks::layers);
}
