// Gather attention: softmax over the k selected slots of each row (a knn_scan's output), reading
// the selected value rows straight from the memory.
#include <atomic>

#include "kernels.h"
#include "simd.h"

namespace fot_cpu {
namespace {

// Rows [begin, end) of the flattened [B * H * N] rows; sets bad_index when an index is >= M.
template <typename T>
void gather_rows(const float* scores, const int64_t* indices, const MemView& vv, int64_t H, int64_t N, int64_t M,
                 int64_t k, int64_t D, float scale, float* op, float* lp, int64_t begin, int64_t end,
                 bool& bad_index) {
  std::vector<float> w(k), acc(D);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t bh = row / N;
    const int64_t b = bh / H, h = bh % H;
    const float* s = scores + row * k;
    const int64_t* ix = indices + row * k;
    float mx = kNegInf;
    for (int64_t j = 0; j < k; ++j) {
      const float x = s[j] * scale;
      const bool ok = ix[j] >= 0 && std::isfinite(s[j]);  // padding and non-finite scores are dropped
      if (ix[j] >= M) bad_index = true;
      w[j] = ok && ix[j] < M ? x : kNegInf;
      mx = std::max(mx, w[j]);
    }
    float* o = op + row * D;
    if (mx == kNegInf) {
      std::fill(o, o + D, 0.f);
      lp[row] = kNegInf;
      continue;
    }
    float l = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = 0; j < k; ++j) {
      if (w[j] == kNegInf) continue;
      const float p = std::exp(w[j] - mx);
      l += p;
      if (p != 0.f) axpy_row<T>(p, reinterpret_cast<const T*>(vv.row(b, h, ix[j])), acc.data(), D);
    }
    const float inv = 1.f / l;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
    lp[row] = mx + std::log(l);
  }
}

}  // namespace

bool gather_attention_kernel(const at::Tensor& scores, const at::Tensor& indices, const MemView& vv, int64_t M,
                             float scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = scores.size(0), H = scores.size(1), N = scores.size(2), k = scores.size(3);
  const int64_t D = out.size(3);
  const float* sp = scores.data_ptr<float>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, B * H * N, 8, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    bool local_bad = false;
    dispatch_dtype(vv.dtype, [&](auto t) {
      gather_rows<decltype(t)>(sp, ip, vv, H, N, M, k, D, scale, op, lp, begin, end, local_bad);
    });
    if (local_bad) bad = true;
  });
  return !bad.load();
}

}  // namespace fot_cpu
