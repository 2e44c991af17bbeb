// INT4 rows of the paged cache met on the CPU without unpacking them into tensors: the two products of
// kv/reference.py's attention (_scores, _weighted_values) as one loop each. A row is c s + lo (codes c in
// 0..15: dims 0 .. D/2 - 1 in the low nibbles, the rest in the high ones; (s, lo) fp16).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

void check(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& params,
           const torch::Tensor& slots) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "[B, H, N, *] fp32");
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes [S, H, D/2]");
  TORCH_CHECK(params.dim() == 3 && params.size(2) == 2 && params.scalar_type() == torch::kHalf &&
              params.is_contiguous(), "params [S, H, 2] fp16");
  TORCH_CHECK(slots.dim() == 2 && slots.scalar_type() == torch::kLong && slots.is_contiguous(), "slots [B, L]");
  TORCH_CHECK(codes.size(1) == x.size(1) && params.size(0) == codes.size(0) && slots.size(0) == x.size(0),
              "shapes disagree");
}

// One (request, KV head) pair per task; small steps stay on the calling thread (waking the pool costs more).
int64_t grain(int64_t per_pair) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(per_pair, 1)); }

inline void unpack(const uint8_t* c, int64_t d2, float* out) {
  for (int64_t i = 0; i < d2; ++i) {
    out[i] = static_cast<float>(c[i] & 0xF);
    out[i + d2] = static_cast<float>(c[i] >> 4);
  }
}

// Eight partial sums, so that the compiler keeps them in one vector register (a single running sum is a
// chain it may not reorder).
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float sum = 0.f;
  for (int j = 0; j < 8; ++j) sum += acc[j];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

// q [B, H, N, D] (already rotated and scaled) . rows at slots [B, L] -> scores [B, H, N, L]:
// s (q . c) + lo sum(q).
torch::Tensor int4_scores(const torch::Tensor& q, const torch::Tensor& codes, const torch::Tensor& params,
                          const torch::Tensor& slots) {
  check(q, codes, params, slots);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), L = slots.size(1), d2 = D / 2;
  TORCH_CHECK(codes.size(2) == d2, "codes hold D/2 bytes per row");
  auto out = torch::empty({B, H, N, L}, q.options());
  const float* qp = q.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* pp = params.data_ptr<at::Half>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, grain(L * N * D), [&](int64_t begin, int64_t end) {
    std::vector<float> row(D), qsum(N);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* qb = qp + bh * N * D;
      for (int64_t n = 0; n < N; ++n) {
        float acc = 0.f;
        for (int64_t i = 0; i < D; ++i) acc += qb[n * D + i];
        qsum[n] = acc;
      }
      for (int64_t l = 0; l < L; ++l) {
        const int64_t at = sp[b * L + l] * H + h;
        unpack(cp + at * d2, d2, row.data());
        const float s = static_cast<float>(pp[2 * at]), lo = static_cast<float>(pp[2 * at + 1]);
        for (int64_t n = 0; n < N; ++n) op[(bh * N + n) * L + l] = s * dot(qb + n * D, row.data(), D) + lo * qsum[n];
      }
    }
  });
  return out;
}

// probs [B, H, N, L] over the rows at slots [B, L] -> sum_l p (c s + lo) [B, H, N, D], in the stored space.
torch::Tensor int4_weighted(const torch::Tensor& probs, const torch::Tensor& codes, const torch::Tensor& params,
                            const torch::Tensor& slots) {
  check(probs, codes, params, slots);
  const int64_t B = probs.size(0), H = probs.size(1), N = probs.size(2), L = slots.size(1), d2 = codes.size(2);
  const int64_t D = 2 * d2;
  TORCH_CHECK(probs.size(3) == L, "probs [B, H, N, L]");
  auto out = torch::zeros({B, H, N, D}, probs.options());
  const float* pr = probs.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* pp = params.data_ptr<at::Half>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, grain(L * N * D), [&](int64_t begin, int64_t end) {
    std::vector<float> row(D), plo(N);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* pb = pr + bh * N * L;
      float* ob = op + bh * N * D;
      std::fill(plo.begin(), plo.end(), 0.f);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t at = sp[b * L + l] * H + h;
        unpack(cp + at * d2, d2, row.data());
        const float s = static_cast<float>(pp[2 * at]), lo = static_cast<float>(pp[2 * at + 1]);
        for (int64_t n = 0; n < N; ++n) {
          const float p = pb[n * L + l];
          if (p == 0.f) continue;  // masked positions and the rows read at bf16
          const float w = p * s;
          plo[n] += p * lo;
          for (int64_t i = 0; i < D; ++i) ob[n * D + i] += w * row[i];
        }
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < D; ++i) ob[n * D + i] += plo[n];
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_scores", &int4_scores, "s (q . c) + lo sum(q) over paged INT4 rows");
  m.def("int4_weighted", &int4_weighted, "sum_l p (c s + lo) over paged INT4 rows");
}
