// Gather attention backward (fot::gather_attention_backward): the kNN part's gradients over the
// forward's selection (indices [B, Hkv, N, k], -1 padding, never recomputed).
//
// Phase 1, parallel over rows: each row recomputes the scores of its selected slots from the key
// rows (a key with a non-finite element scores non-finite: dropped, never read further), then
// P = exp(scale * s - lse), dS = P * (dO . v - delta) and dq = scale * sum_j dS_j k_j; P and dS
// of every entry are kept ([B*Hkv*N, k]) for phase 2.
// Phase 2 (dk / dv wanted), deterministic scatter-add without atomics: per (b, h), the entries
// with P != 0 are bucketed by slot with a counting sort (CSR; rows, then j, ascending inside a
// slot); then, parallel over slots, each slot sums its entries in that fixed order,
// dk_s = scale * sum dS q_row and dv_s = sum P dO_row, in fp32, and writes its rows in the memory
// dtype (zeros for slots nothing selected). The same bits on every run and thread count.
// Extra memory: P and dS [B*Hkv*N*k] fp32, entry lists [B*Hkv*N*k] and slot offsets
// [B*Hkv*(M+1)] int64 (the offsets are 1/D of the gradient they index).
#include <atomic>

#include "kernels.h"
#include "simd.h"

namespace fot_cpu {
namespace {

template <typename TK, typename TV>
void grad_rows(const float* query, const int64_t* indices, const MemView& kv, const MemView& vv, const float* d_out,
               const float* lse, const float* delta, int64_t H, int64_t N, int64_t M, int64_t k, int64_t D,
               float scale, float* dq, float* P, float* dS, int64_t begin, int64_t end, bool& bad_index) {
  std::vector<float> acc(std::max<int64_t>(D, 1));
  for (int64_t row = begin; row < end; ++row) {
    const int64_t bh = row / N;
    const int64_t b = bh / H, h = bh % H;
    const float* q = query + row * D;
    const float* g = d_out + row * D;
    const int64_t* ix = indices + row * k;
    const float L = lse[row], dl = delta[row];
    bool dead = !std::isfinite(L);  // a row that dropped everything (or a bad lse): P = 0
    for (int64_t d = 0; d < D && !dead; ++d) dead = !std::isfinite(q[d]);
    std::fill(acc.begin(), acc.end(), 0.f);
#if FOT_AVX512
    // The selected rows are scattered over the memory: prefetch the key and value rows of the
    // first entries (later ones two entries ahead, below).
    for (int64_t j = 0; j < std::min<int64_t>(2, k); ++j)
      if (!dead && ix[j] >= 0 && ix[j] < M) {
        prefetch_row(kv.row(b, h, ix[j]), D * (int64_t)sizeof(TK));
        prefetch_row(vv.row(b, h, ix[j]), D * (int64_t)sizeof(TV));
      }
#endif
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = ix[j];
      if (s >= M) bad_index = true;
#if FOT_AVX512
      if (!dead && j + 2 < k && ix[j + 2] >= 0 && ix[j + 2] < M) {
        prefetch_row(kv.row(b, h, ix[j + 2]), D * (int64_t)sizeof(TK));
        prefetch_row(vv.row(b, h, ix[j + 2]), D * (int64_t)sizeof(TV));
      }
#endif
      float p = 0.f, ds = 0.f;
      if (!dead && s >= 0 && s < M) {
        const TK* kr = reinterpret_cast<const TK*>(kv.row(b, h, s));
        const float sc = dot_row<TK>(q, kr, D);
        const float e = std::isfinite(sc) ? std::exp(sc * scale - L) : 0.f;  // as the forward: no fma
        if (std::isfinite(e) && e != 0.f) {
          p = e;
          ds = p * (dot_row<TV>(g, reinterpret_cast<const TV*>(vv.row(b, h, s)), D) - dl);
          axpy_row<TK>(ds, kr, acc.data(), D);
        }
      }
      if (P) {
        P[row * k + j] = p;
        dS[row * k + j] = ds;
      }
    }
    for (int64_t d = 0; d < D; ++d) dq[row * D + d] = acc[d] * scale;
  }
}

// dst[0:D] = acc[0:D] * scale in the gradient's dtype.
template <typename T>
FOT_INLINE void store_row(const float* acc, float scale, int64_t D, T* dst) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[d] * scale);
}

}  // namespace

bool gather_attention_backward_kernel(const at::Tensor& query, const at::Tensor& indices, const MemView& kv,
                                      const MemView& vv, const at::Tensor& d_out, const at::Tensor& lse,
                                      const at::Tensor& delta, int64_t M, float scale, at::Tensor& dq,
                                      at::Tensor* dk, at::Tensor* dv) {
  const int64_t B = indices.size(0), H = indices.size(1), N = indices.size(2), k = indices.size(3);
  const int64_t D = query.size(3);
  const int64_t BH = B * H;
  const float* qp = query.data_ptr<float>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  const float* gp = d_out.data_ptr<float>();
  const bool need_dkv = dk != nullptr;
  std::vector<float> P, dS;
  if (need_dkv) {
    P.resize(BH * N * k);
    dS.resize(BH * N * k);
  }
  std::atomic<bool> bad{false};
  at::parallel_for(0, BH * N, 8, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    bool local_bad = false;
    dispatch_dtype(kv.dtype, [&](auto tk) {
      dispatch_dtype(vv.dtype, [&](auto tv) {
        grad_rows<decltype(tk), decltype(tv)>(qp, ip, kv, vv, gp, lse.data_ptr<float>(), delta.data_ptr<float>(), H, N,
                                              M, k, D, scale, dq.data_ptr<float>(), need_dkv ? P.data() : nullptr,
                                              need_dkv ? dS.data() : nullptr, begin, end, local_bad);
      });
    });
    if (local_bad) bad = true;
  });
  if (bad.load()) return false;
  if (!need_dkv || M == 0) return true;
  // Counting sort of each (b, h)'s entries by slot: off[bh][s] .. off[bh][s + 1] index ent.
  const int64_t per_bh = N * k;
  std::vector<int64_t> off(BH * (M + 1)), ent(BH * per_bh);
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      int64_t* o = off.data() + bh * (M + 1);
      const int64_t* ix = ip + bh * per_bh;
      const float* pp = P.data() + bh * per_bh;
      std::fill(o, o + M + 1, 0);
      for (int64_t e = 0; e < per_bh; ++e)
        if (pp[e] != 0.f) ++o[ix[e] + 1];
      for (int64_t s = 0; s < M; ++s) o[s + 1] += o[s];
      std::vector<int64_t> pos(o, o + M);
      int64_t* en = ent.data() + bh * per_bh;
      for (int64_t e = 0; e < per_bh; ++e)
        if (pp[e] != 0.f) en[pos[ix[e]]++] = e;
    }
  });
  at::parallel_for(0, BH * M, 64, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    std::vector<float> acc_k(std::max<int64_t>(D, 1)), acc_v(std::max<int64_t>(D, 1));
    dispatch_dtype(dk->scalar_type(), [&](auto tk) {
      dispatch_dtype(dv->scalar_type(), [&](auto tv) {
        using TK = decltype(tk);
        using TV = decltype(tv);
        TK* dkp = static_cast<TK*>(dk->data_ptr());
        TV* dvp = static_cast<TV*>(dv->data_ptr());
        for (int64_t slot = begin; slot < end; ++slot) {
          const int64_t bh = slot / M, s = slot % M;
          const int64_t* o = off.data() + bh * (M + 1);
          const int64_t* en = ent.data() + bh * per_bh;
          if (o[s] == o[s + 1]) {  // nothing selected this slot
            std::memset(dkp + slot * D, 0, sizeof(TK) * D);
            std::memset(dvp + slot * D, 0, sizeof(TV) * D);
            continue;
          }
          std::fill(acc_k.begin(), acc_k.end(), 0.f);
          std::fill(acc_v.begin(), acc_v.end(), 0.f);
          for (int64_t x = o[s]; x < o[s + 1]; ++x) {
            const int64_t e = bh * per_bh + en[x];
            const int64_t row = e / k;
            if (dS[e] != 0.f) axpy_row<float>(dS[e], qp + row * D, acc_k.data(), D);
            axpy_row<float>(P[e], gp + row * D, acc_v.data(), D);
          }
          store_row<TK>(acc_k.data(), scale, D, dkp + slot * D);
          store_row<TV>(acc_v.data(), 1.f, D, dvp + slot * D);
        }
      });
    });
  });
  return true;
}

}  // namespace fot_cpu
