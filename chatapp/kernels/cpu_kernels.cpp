// CPU kernels for decoding: linears, attention and one fused transformer block.
//
// Two jobs:
//  * speed: decode is bound by reading weights. Weights are packed in panels
//    of 64 output columns, [K][64] each, streamed once per call; every weight
//    vector loaded is applied to up to four activation rows held in
//    registers. int8 weights meet int16 activations quantized per row in an
//    integer dot product (see the packed linear section).
//  * batch invariance: every output is one fma chain over k = 0..K-1 in
//    order, whatever the number of rows. Verifying K+1 tokens therefore gives
//    bit-identical logits to K+1 one-token steps, and greedy speculative
//    decoding equals greedy standard decoding exactly, not up to rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 64;  // output columns per packed panel

// Per-thread scratch that only grows: a decode step would otherwise allocate
// and zero a dozen buffers per block (malloc showed up at ~2% of a draft step).
// Every buffer has its own slot, so growing one never moves another in use.
enum Slot { kScores, kNormed, kQkv, kQuery, kAttn, kProj, kGateUp, kAct, kRowScale, kPairs, kSlots };

template <typename T>
T* scratch(Slot slot, int64_t count) {
  thread_local std::vector<T> buffers[kSlots];
  std::vector<T>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// Dot product with a fixed reduction order (attention scores, norms).
inline float dot_f32(const float* x, const float* w, int64_t k) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (; i + 64 <= k; i += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(w + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(w + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), _mm512_loadu_ps(w + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), _mm512_loadu_ps(w + i + 48), a3);
  }
  for (; i + 16 <= k; i += 16) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(w + i), a0);
  }
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
  for (; i < k; ++i) sum += x[i] * w[i];
  return sum;
}

#if defined(__AVX512F__)
// ROWS activation rows (stride k) times columns c0..c0+16*VECS-1 of one float
// [k][64] panel -> the same columns of out[ROWS][64]. VECS is 4 (the whole
// panel) or 2 (one half; see for_each_panel_part).
template <int ROWS, int VECS>
inline void panel_rows(const float* x, int64_t k, const float* panel, float* out, int64_t c0) {
  __m512 acc[ROWS][VECS];
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < VECS; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < k; ++i) {
    __m512 w[VECS];
#pragma GCC unroll 4
    for (int j = 0; j < VECS; ++j) w[j] = _mm512_loadu_ps(panel + i * kPanel + c0 + 16 * j);
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * k + i]);
#pragma GCC unroll 4
      for (int j = 0; j < VECS; ++j) acc[r][j] = _mm512_fmadd_ps(xb, w[j], acc[r][j]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < VECS; ++j) _mm512_storeu_ps(out + r * kPanel + c0 + 16 * j, acc[r][j]);
  }
}

// ROWS rows of int16 input pairs (stride kp, two int16 per int32) times
// columns c0..c0+16*VECS-1 of one int8 [kp][64][2] panel -> exact int32 sums in
// the same columns of out[ROWS][64]. The layout is the operand layout of
// vpdpwssd: each 32-bit lane multiplies one column's two weights by two inputs
// and adds both products to its int32 accumulator.
template <int ROWS, int VECS>
inline void panel_rows_int8(const int32_t* xq, int64_t kp, const int8_t* panel, int32_t* out, int64_t c0) {
  __m512i acc[ROWS][VECS];
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < VECS; ++j) acc[r][j] = _mm512_setzero_si512();
  }
  for (int64_t i = 0; i < kp; ++i) {
    const int8_t* row = panel + i * 2 * kPanel + 2 * c0;
    __m512i w[VECS];
#pragma GCC unroll 4
    for (int j = 0; j < VECS; ++j) {
      w[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * j)));
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const __m512i xb = _mm512_set1_epi32(xq[r * kp + i]);
#pragma GCC unroll 4
      for (int j = 0; j < VECS; ++j) {
#if defined(__AVX512VNNI__)
        acc[r][j] = _mm512_dpwssd_epi32(acc[r][j], xb, w[j]);
#else
        acc[r][j] = _mm512_add_epi32(acc[r][j], _mm512_madd_epi16(xb, w[j]));
#endif
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < VECS; ++j) {
      _mm512_storeu_si512(reinterpret_cast<void*>(out + r * kPanel + c0 + 16 * j), acc[r][j]);
    }
  }
}
#else
template <int ROWS, int VECS>
inline void panel_rows(const float* x, int64_t k, const float* panel, float* out, int64_t c0) {
  for (int r = 0; r < ROWS; ++r) {
    for (int64_t c = c0; c < c0 + 16 * VECS; ++c) {
      float acc = 0.f;
      for (int64_t i = 0; i < k; ++i) acc = std::fma(x[r * k + i], panel[i * kPanel + c], acc);
      out[r * kPanel + c] = acc;
    }
  }
}

template <int ROWS, int VECS>
inline void panel_rows_int8(const int32_t* xq, int64_t kp, const int8_t* panel, int32_t* out, int64_t c0) {
  for (int r = 0; r < ROWS; ++r) {
    for (int64_t c = c0; c < c0 + 16 * VECS; ++c) {
      int32_t acc = 0;
      for (int64_t i = 0; i < kp; ++i) {
        const int32_t pair = xq[r * kp + i];
        const int16_t lo = static_cast<int16_t>(pair & 0xffff), hi = static_cast<int16_t>(pair >> 16);
        acc += lo * panel[(i * kPanel + c) * 2] + hi * panel[(i * kPanel + c) * 2 + 1];
      }
      out[r * kPanel + c] = acc;
    }
  }
}
#endif

void check_rows(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat,
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

torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "weight must be 2-D");
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t panels = (n + kPanel - 1) / kPanel;
  auto padded = torch::zeros({panels * kPanel, k}, w.options());
  padded.narrow(0, 0, n).copy_(w);
  if (w.scalar_type() == torch::kChar) {
    TORCH_CHECK(k % 2 == 0, "int8 weights need an even number of inputs, got ", k);
    return padded.view({panels, kPanel, k / 2, 2}).permute({0, 2, 1, 3}).contiguous();
  }
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

namespace {

struct Weight {
  const torch::Tensor& packed;  // float32 [panels][k][64] or int8 [panels][k/2][64][2]
  const torch::Tensor& scale;   // [n] float32 for int8, else empty
  int64_t n;                    // real output count

  bool int8() const { return packed.scalar_type() == torch::kChar; }
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

// Splits a weight's panels over the threads in half-panel units, so two
// threads share a layer of 9 panels (576 outputs) 4.5/4.5 instead of 5/4.
// run(panel, c0, width) computes columns c0..c0+width-1 of one panel: whole
// panels where a thread holds both halves. The column split cannot change a
// result: each output is still one chain over its inputs.
//
// Each thread first streams its own contiguous share of three quarters of the
// units; the last quarter goes a panel at a time to whichever thread is free,
// since on a shared machine one core is often slower than the other (perf
// showed each thread waiting 6-12% of a draft step at the joins).
template <typename Run>
void for_each_panel_part(int64_t panels, const Run& run) {
  const int64_t units = 2 * panels;
  auto run_units = [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end;) {
      const bool whole = u % 2 == 0 && u + 1 < end;
      run(u / 2, whole ? 0 : (u % 2) * (kPanel / 2), whole ? kPanel : kPanel / 2);
      u += whole ? 2 : 1;
    }
  };
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), units));
  if (threads <= 1 || at::in_parallel_region()) {
    run_units(0, units);
    return;
  }
  const int64_t own = units * 3 / 4 / threads / 2 * 2;  // whole panels: the shared tail starts on one
  std::atomic<int64_t> next{own * threads};
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num();
    run_units(t * own, (t + 1) * own);
    for (int64_t u = next.fetch_add(2); u < units; u = next.fetch_add(2)) run_units(u, std::min(u + 2, units));
  }
}

template <int VECS>
inline void float_rows(const float* x, int64_t rows, int64_t k, const float* panel, float* out, int64_t c0) {
  switch (rows) {
    case 4: panel_rows<4, VECS>(x, k, panel, out, c0); break;
    case 3: panel_rows<3, VECS>(x, k, panel, out, c0); break;
    case 2: panel_rows<2, VECS>(x, k, panel, out, c0); break;
    default: panel_rows<1, VECS>(x, k, panel, out, c0); break;
  }
}

template <int VECS>
inline void int8_rows(const int32_t* xq, int64_t rows, int64_t kp, const int8_t* panel, int32_t* out, int64_t c0) {
  switch (rows) {
    case 4: panel_rows_int8<4, VECS>(xq, kp, panel, out, c0); break;
    case 3: panel_rows_int8<3, VECS>(xq, kp, panel, out, c0); break;
    case 2: panel_rows_int8<2, VECS>(xq, kp, panel, out, c0); break;
    default: panel_rows_int8<1, VECS>(xq, kp, panel, out, c0); break;
  }
}

// Every panel part, rows four at a time, so each weight vector loaded serves
// up to four rows: rows(panel, r0, count, vecs, out, c0) fills out[count][64]
// (columns c0..c0+16*vecs-1), which then goes to y with the optional
// per-row scale, per-column scale and bias. (Five to eight rows in one pass,
// 32 columns at a time or with more accumulators, measured no cheaper.)
template <typename Acc, typename Rows>
void panel_linear(int64_t m, const Weight& w, const float* row_scale, const float* scale, const float* bias,
                  float* yp, const Rows& rows) {
  for_each_panel_part(w.panels(), [&](int64_t p, int64_t c0, int64_t width) {
    Acc out[4 * kPanel];
    for (int64_t r0 = 0; r0 < m; r0 += 4) {
      const int64_t count = std::min<int64_t>(4, m - r0);
      rows(p, r0, count, width == kPanel ? 4 : 2, out, c0);
      store_panel(out, count, r0, p * kPanel, c0, width, w.n, row_scale, scale, bias, yp);
    }
  });
}

void float_linear(const float* xp, int64_t m, const Weight& w, const float* bias, float* yp) {
  const int64_t k = w.k();
  const float* wp = w.packed.data_ptr<float>();
  panel_linear<float>(m, w, nullptr, nullptr, bias, yp,
                      [&](int64_t p, int64_t r0, int64_t count, int vecs, float* out, int64_t c0) {
                        const float* panel = wp + p * k * kPanel;
                        if (vecs == 4) {
                          float_rows<4>(xp + r0 * k, count, k, panel, out, c0);
                        } else {
                          float_rows<2>(xp + r0 * k, count, k, panel, out, c0);
                        }
                      });
}

// x row -> int16 pairs and the row's scale, x ~= xq * scale. The scale keeps
// |xq| <= 32767 and 127 * sum|xq| < 2^31, the largest int32 sum possible
// against int8 weights.
void quantize_row(const float* x, int64_t k, int32_t* pairs, float* scale) {
  float amax = 0.f, l1 = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_setzero_ps(), vsum = _mm512_setzero_ps();
  for (; i + 16 <= k; i += 16) {
    const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(x + i));
    vmax = _mm512_max_ps(vmax, v);
    vsum = _mm512_add_ps(vsum, v);
  }
  amax = _mm512_reduce_max_ps(vmax);
  l1 = _mm512_reduce_add_ps(vsum);
#endif
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
#if defined(__AVX512F__)
  const __m512 lo = _mm512_set1_ps(-32767.0f), hi = _mm512_set1_ps(32767.0f), vinv = _mm512_set1_ps(inv);
  for (; i + 16 <= k; i += 16) {
    const __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv)));
    const __m512i r = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm512_cvtepi32_epi16(r));
  }
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
  panel_linear<int32_t>(m, w, xs, w.scale.data_ptr<float>(), bias, yp,
                        [&](int64_t p, int64_t r0, int64_t count, int vecs, int32_t* out, int64_t c0) {
                          const int8_t* panel = wp + p * k * kPanel;
                          if (vecs == 4) {
                            int8_rows<4>(xq + r0 * kp, count, kp, panel, out, c0);
                          } else {
                            int8_rows<2>(xq + r0 * kp, count, kp, panel, out, c0);
                          }
                        });
}

void linear_into(const float* xp, int64_t m, const Weight& w, const float* bias, float* yp) {
  if (w.int8()) {
    int8_linear(xp, m, w, bias, yp);
  } else {
    float_linear(xp, m, w, bias, yp);
  }
}

void check_weight(const torch::Tensor& w, const torch::Tensor& scale, int64_t n) {
  TORCH_CHECK(w.is_contiguous() && ((w.scalar_type() == torch::kFloat && w.dim() == 3 && w.size(2) == kPanel) ||
                                    (w.scalar_type() == torch::kChar && w.dim() == 4 && w.size(2) == kPanel &&
                                     w.size(3) == 2)),
              "weight must be float32 or int8, packed by pack_weight");
  TORCH_CHECK(w.size(0) * kPanel >= n && n > (w.size(0) - 1) * kPanel, "output count does not match the packing");
  if (w.scalar_type() == torch::kChar) {
    TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == torch::kFloat && scale.numel() == n,
                "int8 weight needs a float32 scale per output");
  }
}

}  // namespace

torch::Tensor linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, int64_t n) {
  check_weight(packed, scale, n);
  const Weight w{packed, scale, n};
  check_rows(x, w.k());
  auto y = torch::empty({x.size(0), n}, x.options());
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
#if defined(__AVX512F__)
  if constexpr (D > 0) {
    constexpr int V = D / 16;
    __m512 q[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) q[v] = _mm512_loadu_ps(qr + 16 * v);
    float best = -INFINITY;
    for (int64_t j = 0; j < length; ++j) {
      const float* kr = kh + j * D;
      __m512 acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(kr));
#pragma GCC unroll 8
      for (int v = 1; v < V; ++v) acc = _mm512_fmadd_ps(q[v], _mm512_loadu_ps(kr + 16 * v), acc);
      scores[j] = _mm512_reduce_add_ps(acc) * scale;
      best = std::max(best, scores[j]);
    }
    float total = 0.f;
    for (int64_t j = 0; j < length; ++j) {
      scores[j] = std::exp(scores[j] - best);
      total += scores[j];
    }
    __m512 out[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) out[v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < length; ++j) {
      const __m512 p = _mm512_set1_ps(scores[j]);
      const float* vr = vh + j * D;
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) out[v] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * v), out[v]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / total);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(orow + 16 * v, _mm512_mul_ps(out[v], inv));
    return;
  }
#endif
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
void attention_into(const float* qp, int64_t n, int64_t heads, int64_t d, const torch::Tensor& k_cache,
                    const torch::Tensor& v_cache, int64_t start, float* op) {
  const int64_t kv_heads = k_cache.size(0), capacity = k_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(start + n <= capacity, "attention past the cache capacity");
  const int64_t group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  auto attend = d == 64 ? attend_one<64> : d == 128 ? attend_one<128> : attend_one<0>;
  at::parallel_for(0, n * heads, 1, [&](int64_t begin, int64_t end) {
    float* scores = scratch<float>(kScores, start + n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / heads, h = task % heads;
      const int64_t offset = (h / group) * capacity * d;
      attend(qp + (i * heads + h) * d, kp + offset, vp + offset, d, start + i + 1, scale, scores,
             op + (i * heads + h) * d);
    }
  });
}

torch::Tensor attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, int64_t start) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == torch::kFloat, "q must be [n, heads, d] float32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto out = torch::empty_like(q);
  attention_into(q.data_ptr<float>(), q.size(0), q.size(1), q.size(2), k_cache, v_cache, start, out.data_ptr<float>());
  return out;
}

// ---- activation ------------------------------------------------------------

#if defined(__AVX512F__)
// exp(x) for 16 floats (Cephes expf: x = n ln2 + r, |r| <= ln2/2, a degree-6
// polynomial in r, times 2^n); within 2 ulp of expf over the clamped range.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), _mm512_max_ps(_mm512_set1_ps(-88.3762626647949f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// act = silu(gate) * up, row by row; gu rows are [gate | up]. Column c always
// takes the same path (vector or scalar tail), whatever the row count.
void silu_mul(const float* gu, int64_t n, int64_t inter, float* act) {
  for (int64_t r = 0; r < n; ++r) {
    const float* g = gu + r * 2 * inter;
    const float* u = g + inter;
    float* a = act + r * inter;
    int64_t c = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; c + 16 <= inter; c += 16) {
      const __m512 gv = _mm512_loadu_ps(g + c);
      const __m512 sig = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
      _mm512_storeu_ps(a + c, _mm512_mul_ps(sig, _mm512_loadu_ps(u + c)));
    }
#endif
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
void block_forward(const torch::Tensor& x, const torch::Tensor& attn_norm, const torch::Tensor& qkv_w,
                   const torch::Tensor& qkv_s, const torch::Tensor& qkv_b, const torch::Tensor& o_w,
                   const torch::Tensor& o_s, const torch::Tensor& mlp_norm, const torch::Tensor& gu_w,
                   const torch::Tensor& gu_s, const torch::Tensor& down_w, const torch::Tensor& down_s,
                   const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& cos,
                   const torch::Tensor& sin, int64_t start, double eps, int64_t heads, int64_t kv_heads,
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

  Blocks(std::vector<torch::Tensor> weights, int64_t heads, int64_t kv_heads, int64_t inter, double eps)
      : weights_(std::move(weights)), heads_(heads), kv_heads_(kv_heads), inter_(inter), eps_(eps) {
    TORCH_CHECK(!weights_.empty() && weights_.size() % kPerLayer == 0, "Blocks takes ", kPerLayer,
                " tensors per layer, got ", weights_.size());
  }

  int64_t layers() const { return static_cast<int64_t>(weights_.size() / kPerLayer); }

  // x: [n, hidden], updated in place; one key and one value cache per layer.
  void forward(const torch::Tensor& x, const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
               const torch::Tensor& cos, const torch::Tensor& sin, int64_t start) const {
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == layers() && static_cast<int64_t>(values.size()) == layers(),
                "one key and one value cache per layer");
    for (int64_t i = 0; i < layers(); ++i) {
      const torch::Tensor* w = weights_.data() + i * kPerLayer;
      block_forward(x, w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], w[10], keys[i], values[i], cos,
                    sin, start, eps_, heads_, kv_heads_, inter_);
    }
  }

 private:
  std::vector<torch::Tensor> weights_;
  int64_t heads_, kv_heads_, inter_;
  double eps_;
};

torch::Tensor silu_mul_rows(torch::Tensor gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.scalar_type() == torch::kFloat && gu.size(1) % 2 == 0,
              "gu must be a contiguous [n, 2 * inter] float32 tensor");
  auto act = torch::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  silu_mul(gu.data_ptr<float>(), gu.size(0), gu.size(1) / 2, act.data_ptr<float>());
  return act;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, weight.numel());
  auto y = torch::empty_like(x);
  rms_norm_into(x.data_ptr<float>(), x.size(0), x.size(1), weight.data_ptr<float>(), static_cast<float>(eps),
                y.data_ptr<float>());
  return y;
}

// How many threads one parallel_for actually runs on. at::parallel_for is a
// header template: built without OpenMP it silently runs serially.
int64_t parallel_threads() {
  std::atomic<int64_t> widest{1};
  at::parallel_for(0, 4 * at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int64_t mine = at::get_thread_num() + 1;
    int64_t seen = widest.load();
    while (mine > seen && !widest.compare_exchange_weak(seen, mine)) {
    }
  });
  return widest.load();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_threads", &parallel_threads, "threads a parallel_for in these kernels runs on");
  m.def("pack_weight", &pack_weight, "pack a [n][k] weight into [n/64][k][64] panels");
  m.def("linear", &linear, "batch-invariant linear on a packed float32 or int8 weight");
  m.def("attention", &attention, "batch-invariant causal attention for few new queries");
  m.def("rms_norm", &rms_norm, "row-wise RMSNorm");
  m.def("silu_mul", &silu_mul_rows, "silu(gate) * up for rows of [gate | up]");
  pybind11::class_<Blocks>(m, "Blocks", pybind11::module_local())
      .def(pybind11::init<std::vector<torch::Tensor>, int64_t, int64_t, int64_t, double>())
      .def("forward", &Blocks::forward, "all blocks for few rows, x in place")
      .def_property_readonly("layers", &Blocks::layers);
}
