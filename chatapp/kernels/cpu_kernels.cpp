// CPU kernels for small-batch decoding (1..32 query rows).
//
// Two jobs:
//  * speed: decode is bound by reading weights, so each weight row is read
//    once and applied to every query row while it sits in L1; int8 weights
//    are widened to fp32 in registers (weight-only quantization keeps fp32
//    activations, which is what keeps the draft close to the target).
//  * batch invariance: each output element is reduced in an order that
//    depends only on the reduction length, never on how many rows are in the
//    batch. Verifying K+1 tokens therefore gives bit-identical logits to K+1
//    one-token steps, and greedy speculative decoding equals greedy standard
//    decoding exactly, not just up to rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Dot product of fp32 x with fp32 w, fixed reduction order.
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

// Dot product of fp32 x with int8 w (scale applied by the caller).
inline float dot_i8(const float* x, const int8_t* w, int64_t k) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (; i + 64 <= k; i += 64) {
    __m512i raw = _mm512_loadu_si512(reinterpret_cast<const void*>(w + i));
    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(raw)));
    __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(raw, 1)));
    __m512 w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(raw, 2)));
    __m512 w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(raw, 3)));
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), w0, a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), w1, a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), w2, a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), w3, a3);
  }
  for (; i + 16 <= k; i += 16) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i));
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)), a0);
  }
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
  for (; i < k; ++i) sum += x[i] * static_cast<float>(w[i]);
  return sum;
}

// Four rows of x against one w row: w is loaded once for all four. Each
// output follows exactly the accumulation order of dot_f32, so results are
// bit-identical to four separate dot_f32 calls.
inline void dot4_f32(const float* x, int64_t stride, const float* w, int64_t k, float* out, int64_t out_stride) {
#if defined(__AVX512F__)
  const float* x0 = x;
  const float* x1 = x + stride;
  const float* x2 = x + 2 * stride;
  const float* x3 = x + 3 * stride;
  __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m512 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
  __m512 a30 = a00, a31 = a00, a32 = a00, a33 = a00;
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    const __m512 w0 = _mm512_loadu_ps(w + i), w1 = _mm512_loadu_ps(w + i + 16);
    const __m512 w2 = _mm512_loadu_ps(w + i + 32), w3 = _mm512_loadu_ps(w + i + 48);
#define SPECCHAT_ROW(r)                                                       \
    a##r##0 = _mm512_fmadd_ps(_mm512_loadu_ps(x##r + i), w0, a##r##0);       \
    a##r##1 = _mm512_fmadd_ps(_mm512_loadu_ps(x##r + i + 16), w1, a##r##1);  \
    a##r##2 = _mm512_fmadd_ps(_mm512_loadu_ps(x##r + i + 32), w2, a##r##2);  \
    a##r##3 = _mm512_fmadd_ps(_mm512_loadu_ps(x##r + i + 48), w3, a##r##3);
    SPECCHAT_ROW(0) SPECCHAT_ROW(1) SPECCHAT_ROW(2) SPECCHAT_ROW(3)
#undef SPECCHAT_ROW
  }
  for (; i + 16 <= k; i += 16) {
    const __m512 w0 = _mm512_loadu_ps(w + i);
    a00 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + i), w0, a00);
    a10 = _mm512_fmadd_ps(_mm512_loadu_ps(x1 + i), w0, a10);
    a20 = _mm512_fmadd_ps(_mm512_loadu_ps(x2 + i), w0, a20);
    a30 = _mm512_fmadd_ps(_mm512_loadu_ps(x3 + i), w0, a30);
  }
  float sums[4] = {
      _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a00, a01), _mm512_add_ps(a02, a03))),
      _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a10, a11), _mm512_add_ps(a12, a13))),
      _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a20, a21), _mm512_add_ps(a22, a23))),
      _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a30, a31), _mm512_add_ps(a32, a33)))};
  for (int r = 0; r < 4; ++r) {
    for (int64_t t = i; t < k; ++t) sums[r] += x[r * stride + t] * w[t];
    out[r * out_stride] = sums[r];
  }
#else
  for (int r = 0; r < 4; ++r) out[r * out_stride] = dot_f32(x + r * stride, w, k);
#endif
}

// All m rows of x against one w row, four at a time.
inline void dot_rows_f32(const float* x, int64_t m, const float* w, int64_t k, float* out, int64_t out_stride) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) dot4_f32(x + r * k, k, w, k, out + r * out_stride, out_stride);
  for (; r < m; ++r) out[r * out_stride] = dot_f32(x + r * k, w, k);
}

void check_rows(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat,
              "x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weight ", k);
}

// Rows per parallel task: enough weight bytes per task to amortise the
// scheduling, few enough that both cores get work on the small matrices.
constexpr int64_t kGrain = 32;

}  // namespace

// ---- few-row linear ------------------------------------------------------

// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] (+ bias[n]); w is float32, or
// int8 with one scale per row.
void linear_into(const float* xp, int64_t m, const torch::Tensor& w, const torch::Tensor& scale,
                 const float* bias, float* yp) {
  const int64_t n = w.size(0), k = w.size(1);
  if (w.scalar_type() == torch::kFloat) {
    const float* wp = w.data_ptr<float>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) dot_rows_f32(xp, m, wp + j * k, k, yp + j, n);
    });
  } else {
    const int8_t* wp = w.data_ptr<int8_t>();
    const float* sp = scale.data_ptr<float>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> row(m > 1 ? k : 0);
      for (int64_t j = begin; j < end; ++j) {
        const int8_t* wr = wp + j * k;
        if (m == 1) {
          yp[j] = dot_i8(xp, wr, k) * sp[j];
          continue;
        }
        // Several rows: widen once, then the same fp32 dot (identical sums).
        for (int64_t c = 0; c < k; ++c) row[c] = static_cast<float>(wr[c]);
        dot_rows_f32(xp, m, row.data(), k, yp + j, n);
        for (int64_t r = 0; r < m; ++r) yp[r * n + j] *= sp[j];
      }
    });
  }
  if (bias != nullptr) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < n; ++j) yp[r * n + j] += bias[j];
  }
}

void check_weight(const torch::Tensor& w, const torch::Tensor& scale) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weight must be a contiguous 2-D tensor");
  TORCH_CHECK(w.scalar_type() == torch::kFloat || w.scalar_type() == torch::kChar, "weight must be float32 or int8");
  if (w.scalar_type() == torch::kChar) {
    TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == torch::kFloat && scale.numel() == w.size(0),
                "int8 weight needs a float32 scale per output row");
  }
}

torch::Tensor linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  check_weight(w, scale);
  check_rows(x, w.size(1));
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  linear_into(x.data_ptr<float>(), x.size(0), w, scale, nullptr, y.data_ptr<float>());
  return y;
}

// ---- attention --------------------------------------------------------------

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
  at::parallel_for(0, n * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(start + n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / heads, h = task % heads;
      const int64_t length = start + i + 1;  // keys 0..start+i
      const float* qr = qp + (i * heads + h) * d;
      const float* kh = kp + (h / group) * capacity * d;
      const float* vh = vp + (h / group) * capacity * d;
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
      float* orow = op + (i * heads + h) * d;
      for (int64_t c = 0; c < d; ++c) orow[c] = 0.f;
      for (int64_t j = 0; j < length; ++j) {
        const float p = scores[j];
        const float* vr = vh + j * d;
        for (int64_t c = 0; c < d; ++c) orow[c] += p * vr[c];
      }
      const float inv = 1.0f / total;
      for (int64_t c = 0; c < d; ++c) orow[c] *= inv;
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
void block_forward(torch::Tensor x, torch::Tensor attn_norm, torch::Tensor qkv_w, torch::Tensor qkv_s,
                   torch::Tensor qkv_b, torch::Tensor o_w, torch::Tensor o_s, torch::Tensor mlp_norm,
                   torch::Tensor gu_w, torch::Tensor gu_s, torch::Tensor down_w, torch::Tensor down_s,
                   torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor cos, torch::Tensor sin,
                   int64_t start, double eps, int64_t heads, int64_t kv_heads) {
  const int64_t n = x.size(0), hidden = x.size(1);
  check_rows(x, hidden);
  check_weight(qkv_w, qkv_s);
  check_weight(o_w, o_s);
  check_weight(gu_w, gu_s);
  check_weight(down_w, down_s);
  const int64_t d = k_cache.size(2), capacity = k_cache.size(1);
  const int64_t q_size = heads * d, kv_size = kv_heads * d, qkv_size = q_size + 2 * kv_size;
  const int64_t inter = gu_w.size(0) / 2;
  TORCH_CHECK(qkv_w.size(0) == qkv_size, "qkv weight has the wrong shape");
  TORCH_CHECK(start + n <= capacity, "forward past the cache capacity");
  float* xp = x.data_ptr<float>();

  std::vector<float> h(n * hidden), qkv(n * qkv_size), q(n * q_size), attn(n * q_size);
  std::vector<float> proj(n * hidden), gu(n * 2 * inter), act(n * inter);

  rms_norm_into(xp, n, hidden, attn_norm.data_ptr<float>(), static_cast<float>(eps), h.data());
  linear_into(h.data(), n, qkv_w, qkv_s, qkv_b.numel() ? qkv_b.data_ptr<float>() : nullptr, qkv.data());
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  rope_inplace(qkv.data(), n, heads, d, qkv_size, cp, sp, start);
  rope_inplace(qkv.data() + q_size, n, kv_heads, d, qkv_size, cp, sp, start);
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float* row = qkv.data() + i * qkv_size;
    std::copy(row, row + q_size, q.data() + i * q_size);
    for (int64_t g = 0; g < kv_heads; ++g) {
      std::copy(row + q_size + g * d, row + q_size + (g + 1) * d, kc + (g * capacity + start + i) * d);
      std::copy(row + q_size + kv_size + g * d, row + q_size + kv_size + (g + 1) * d,
                vc + (g * capacity + start + i) * d);
    }
  }
  attention_into(q.data(), n, heads, d, k_cache, v_cache, start, attn.data());
  linear_into(attn.data(), n, o_w, o_s, nullptr, proj.data());
  for (int64_t i = 0; i < n * hidden; ++i) xp[i] += proj[i];

  rms_norm_into(xp, n, hidden, mlp_norm.data_ptr<float>(), static_cast<float>(eps), h.data());
  linear_into(h.data(), n, gu_w, gu_s, nullptr, gu.data());
  for (int64_t r = 0; r < n; ++r) {
    const float* g = gu.data() + r * 2 * inter;
    const float* u = g + inter;
    for (int64_t c = 0; c < inter; ++c) act[r * inter + c] = g[c] / (1.0f + std::exp(-g[c])) * u[c];
  }
  linear_into(act.data(), n, down_w, down_s, nullptr, proj.data());
  for (int64_t i = 0; i < n * hidden; ++i) xp[i] += proj[i];
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, weight.numel());
  auto y = torch::empty_like(x);
  rms_norm_into(x.data_ptr<float>(), x.size(0), x.size(1), weight.data_ptr<float>(), static_cast<float>(eps),
                y.data_ptr<float>());
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "batch-invariant few-row linear, float32 or int8 weights");
  m.def("attention", &attention, "batch-invariant causal attention for few new queries");
  m.def("rms_norm", &rms_norm, "row-wise RMSNorm");
  m.def("block_forward", &block_forward, "one Llama block for few rows, in place");
}
