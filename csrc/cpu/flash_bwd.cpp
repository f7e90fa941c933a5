// Flash scan backward (fot::flash_scan_backward), FlashAttention-2 style: P is recomputed from the
// queries, the keys and the saved (merged) lse. Work items are (b*h, key split): an item walks its
// key blocks of kBwdKeys slots and, for each, every query row of its (b, h) in row blocks:
//   S = Q K^T and dP = dO V^T (micro-kernel on packed key / value panels),
//   P = exp(scale * S - lse) and dS = P * (dP - delta) (candidates only, in place),
//   dQ[rows] += dS K (per row tile, while dS is in L1), and after each row block
//   dK[block] += dS^T Q, dV[block] += P^T dO (the inner index is the row).
// A key block is owned by one item, which sums its dK / dV over all rows in row order; dQ is
// accumulated per item and, when a (b, h) has several key splits, the splits' partials are summed
// in split order afterwards. The plan depends on the shapes only: bit-identical results whatever
// the thread count.
#include "gemm.h"
#include "kernels.h"

namespace fot_cpu {
namespace {

constexpr int64_t kBwdKeys = 128;                   // key slots per block (multiple of NR)
constexpr int64_t kBwdTiles = 8;                    // row tiles of MR rows per row block
constexpr int64_t kBwdRows = kBwdTiles * MR;        // rows per row block
constexpr int64_t kBwdLd = kBwdKeys + 16;           // row stride of the P / dS blocks (off a power of two)
constexpr int64_t kBwdMinSlots = 1024;              // fewest key slots per memory split
alignas(64) constexpr float kOnes[MR] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

// Packs fp32 rows [0, N) of src ([N][D]) both as query tiles [cdiv(N, MR)][D][MR] (A operand of
// S / dP) and, when panels != nullptr, as column panels [Dp / NR][Npad][NR] (B operand of dK / dV).
// Dead rows are zeroed (a dead row has P = 0: nothing of it may reach a key's gradient).
void pack_rows_bwd(const float* src, const uint8_t* dead, int64_t N, int64_t Npad, int64_t D, int64_t Dp,
                   float* tiles, float* panels) {
  for (int64_t t = 0; t < Npad / MR; ++t) {
    float* o = tiles + t * D * MR;
    for (int64_t r = 0; r < MR; ++r) {
      const int64_t n = t * MR + r;
      const bool live = n < N && !dead[n];
      for (int64_t d = 0; d < D; ++d) o[d * MR + r] = live ? src[n * D + d] : 0.f;
    }
  }
  if (!panels) return;
  const int64_t panel = Npad * NR;
  for (int64_t n = 0; n < Npad; ++n) {
    const bool live = n < N && !dead[n];
    for (int64_t p = 0; p < Dp / NR; ++p) {
      float* o = panels + p * panel + n * NR;
      const int64_t nd = live ? std::max<int64_t>(0, std::min<int64_t>(NR, D - p * NR)) : 0;
      if (nd > 0) std::memcpy(o, src + n * D + p * NR, sizeof(float) * nd);
      if (nd < NR) std::memset(o + nd, 0, sizeof(float) * (NR - nd));
    }
  }
}

// One row: raw scores S[0:cntp] -> P, dP[0:cntp] -> dS (in place). Candidate j: validity bit,
// j <= lim_rel (causal), finite raw score and finite P = exp(scale * s - lse) (an overflowed P is
// dropped like a non-finite score); everything else, and columns [used, cntp), get P = dS = 0.
FOT_INLINE void grad_row(float* S, float* dP, int64_t cntp, int64_t used, const uint32_t* bits, int64_t lim_rel,
                         float scale, float lse, float delta, bool dead) {
  if (dead) used = 0;
#if FOT_AVX512
  const __m512 vscale = _mm512_set1_ps(scale), vlse = _mm512_set1_ps(lse), vdelta = _mm512_set1_ps(delta);
  int64_t c = 0;
  for (; c < used; c += 16) {
    __mmask16 cand = (__mmask16)(bits[c >> 5] >> (c & 31));
    const int64_t rem = lim_rel - c + 1;
    if (rem < 16) cand &= tail_mask16(std::max<int64_t>(rem, 0));
    const __m512 s = _mm512_loadu_ps(S + c);
    cand = finite16(cand, s);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_mul_ps(s, vscale), vlse));  // as the forward: no fma
    cand = finite16(cand, e);
    const __m512 p = _mm512_maskz_mov_ps(cand, e);
    const __m512 ds = _mm512_maskz_mul_ps(cand, p, _mm512_sub_ps(_mm512_loadu_ps(dP + c), vdelta));
    _mm512_storeu_ps(S + c, p);
    _mm512_storeu_ps(dP + c, ds);
  }
  for (; c < cntp; c += 16) {
    _mm512_storeu_ps(S + c, _mm512_setzero_ps());
    _mm512_storeu_ps(dP + c, _mm512_setzero_ps());
  }
#else
  for (int64_t c = 0; c < cntp; ++c) {
    bool ok = c < used && ((bits[c >> 5] >> (c & 31)) & 1u) && c <= lim_rel && std::isfinite(S[c]);
    float p = ok ? std::exp(S[c] * scale - lse) : 0.f;
    ok = ok && std::isfinite(p);
    S[c] = ok ? p : 0.f;
    dP[c] = ok ? p * (dP[c] - delta) : 0.f;
  }
#endif
}

// Writes rows [0, cnt) of an fp32 accumulator [cnt][Dp] times `scale` to the [*, D] rows of dst
// (row j at dst + j * D) in the gradient's dtype.
template <typename T>
void store_rows(const float* acc, int64_t cnt, int64_t D, int64_t Dp, float scale, T* dst) {
  for (int64_t j = 0; j < cnt; ++j)
    for (int64_t d = 0; d < D; ++d) dst[j * D + d] = static_cast<T>(acc[j * Dp + d] * scale);
}

void store_grad(at::Tensor& g, const float* acc, int64_t bh, int64_t m, int64_t cnt, int64_t D, int64_t Dp,
                float scale) {
  const int64_t M = g.size(2);
  dispatch_dtype(g.scalar_type(), [&](auto t) {
    using T = decltype(t);
    store_rows<T>(acc, cnt, D, Dp, scale, static_cast<T*>(g.data_ptr()) + (bh * M + m) * D);
  });
}

void zero_grad_rows(at::Tensor& g, int64_t bh, int64_t m0, int64_t m1, int64_t D) {
  if (m1 <= m0) return;
  const int64_t M = g.size(2);
  char* base = static_cast<char*>(g.data_ptr()) + (bh * M + m0) * D * (int64_t)g.element_size();
  std::memset(base, 0, (m1 - m0) * D * g.element_size());
}

}  // namespace

void flash_scan_backward_kernel(const at::Tensor& query, const MemView& kv, const MemView& vv,
                                const at::Tensor& d_out, const at::Tensor& lse, const at::Tensor& delta,
                                const Validity& val, float scale, int64_t causal_lq, at::Tensor& dq, at::Tensor* dk,
                                at::Tensor* dv) {
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  const int64_t M = val.M;
  const int64_t Dp = cdiv(std::max<int64_t>(D, 1), NR) * NR;
  const int64_t Npad = cdiv(N, MR) * MR;
  const int64_t BH = B * H;
  const bool need_dkv = dk != nullptr;
  // Plan: (b*h, key split); splits only when there are fewer (b, h) than kPlanItems.
  int64_t splits = 1;
  const int64_t want = cdiv(kPlanItems, std::max<int64_t>(BH, 1));
  if (want > 1) splits = std::max<int64_t>(1, std::min<int64_t>(want, M / kBwdMinSlots));
  const int64_t per_split = cdiv(std::max<int64_t>(cdiv(M, splits), 1), kBwdKeys) * kBwdKeys;
  splits = std::max<int64_t>(1, cdiv(M, per_split));
  const float* qp = query.data_ptr<float>();
  const float* gp = d_out.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const float* dlp = delta.data_ptr<float>();
  float* dqp = dq.data_ptr<float>();
  std::vector<float> part;  // [BH][splits][N][D] dQ partials (unscaled) when splits > 1
  if (splits > 1) part.resize(BH * splits * N * D);
  const int64_t C = kBwdKeys;
  at::parallel_for(0, BH * splits, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    Scratch qt_buf, gt_buf, qc_buf, gc_buf, dq_buf, kp_buf, vp_buf, kc_buf, dk_buf, dv_buf, s_buf, p_buf, b_buf;
    std::vector<int64_t> lim(N);
    std::vector<uint8_t> dead(N);
    float* Qt = qt_buf.get<float>(Npad * std::max<int64_t>(D, 1));
    float* Gt = gt_buf.get<float>(Npad * std::max<int64_t>(D, 1));
    float* Qc = need_dkv ? qc_buf.get<float>(Npad * Dp) : nullptr;
    float* Gc = need_dkv ? gc_buf.get<float>(Npad * Dp) : nullptr;
    float* dQ = dq_buf.get<float>(Npad * Dp);
    float* Kp = kp_buf.get<float>(C * std::max<int64_t>(D, 1));
    float* Vp = vp_buf.get<float>(C * std::max<int64_t>(D, 1));
    float* Kc = kc_buf.get<float>(C * Dp);
    float* dK = need_dkv ? dk_buf.get<float>(C * Dp) : nullptr;
    float* dV = need_dkv ? dv_buf.get<float>(C * Dp) : nullptr;
    float* Sb = s_buf.get<float>(kBwdRows * kBwdLd);
    float* dPb = p_buf.get<float>(kBwdRows * kBwdLd);
    uint32_t* bits = b_buf.get<uint32_t>(2 * (C / 32 + 2));
    uint32_t* vbits = bits + C / 32 + 2;  // value packing: a non-finite value is not a dropped slot
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / splits, split = it % splits;
      const int64_t b = bh / H, h = bh % H;
      const int64_t m0 = split * per_split, m_end = std::min(M, m0 + per_split);
      const int64_t m1 = std::min(m_end, val.effective_len(b));
      const float* q = qp + bh * N * D;
      const float* g = gp + bh * N * D;
      const float* l = lp + bh * N;
      const float* dl = dlp + bh * N;
      for (int64_t n = 0; n < N; ++n) {
        bool ok = std::isfinite(l[n]);
        for (int64_t d = 0; d < D && ok; ++d) ok = std::isfinite(q[n * D + d]);
        dead[n] = !ok;
        lim[n] = causal_lq > 0 ? n % causal_lq + M - causal_lq : std::numeric_limits<int64_t>::max() / 2;
      }
      pack_rows_bwd(q, dead.data(), N, Npad, D, Dp, Qt, Qc);
      pack_rows_bwd(g, dead.data(), N, Npad, D, Dp, Gt, Gc);
      std::fill(dQ, dQ + Npad * Dp, 0.f);
      for (int64_t mb = m0; mb < m1; mb += C) {
        const int64_t cnt = std::min(C, m1 - mb);
        const int64_t cntp = cdiv(cnt, NR) * NR;
        val.fill_bits(b, mb, cnt, bits);
        bool any = false;
        for (int64_t w = 0; w < cntp / 32; ++w) any |= bits[w] != 0;
        if (!any) {
          if (need_dkv) {
            zero_grad_rows(*dk, bh, mb, mb + cnt, D);
            zero_grad_rows(*dv, bh, mb, mb + cnt, D);
          }
          continue;
        }
        for (int64_t w = 0; w < cntp / 32; ++w) vbits[w] = ~0u;
        pack_panels(kv, b, h, mb, cnt, D, Kp, bits);  // clears the bits of keys with a non-finite element
        pack_panels(vv, b, h, mb, cnt, D, Vp, vbits);
        convert_rows(kv, b, h, mb, cnt, cntp, D, Dp, bits, Kc);  // dropped keys' rows zeroed
        if (need_dkv) {
          std::fill(dK, dK + cntp * Dp, 0.f);
          std::fill(dV, dV + cntp * Dp, 0.f);
        }
        for (int64_t rb = 0; rb < N; rb += kBwdRows) {
          const int64_t nb = std::min(kBwdRows, N - rb);
          int64_t lo = -1, hi = -1;  // live tiles of the block
          for (int64_t t = 0; t * MR < nb; ++t) {
            const int64_t r0 = rb + t * MR;
            const int R = (int)std::min<int64_t>(MR, N - r0);
            float* St = Sb + t * MR * kBwdLd;
            float* dPt = dPb + t * MR * kBwdLd;
            int64_t tl = std::numeric_limits<int64_t>::min();
            bool live = false;
            for (int r = 0; r < R; ++r) {
              tl = std::max(tl, lim[r0 + r]);
              live |= !dead[r0 + r];
            }
            const int64_t used = live ? std::min(cntp, cdiv(std::max<int64_t>(0, tl - mb + 1), NR) * NR) : 0;
            if (used <= 0) {
              for (int r = 0; r < R; ++r) {
                std::memset(St + r * kBwdLd, 0, sizeof(float) * cntp);
                std::memset(dPt + r * kBwdLd, 0, sizeof(float) * cntp);
              }
              continue;
            }
            if (lo < 0) lo = t;
            hi = t;
            dispatch_count<1, MR>(R, [&](auto rr) {
              constexpr int RR = decltype(rr)::value;
              const float* qt = Qt + (r0 / MR) * D * MR;
              const float* gt = Gt + (r0 / MR) * D * MR;
              for (int64_t p = 0; p < used / NR; ++p) {
                gemm_tile<RR, 1, MR>(D, qt, Kp + p * D * NR, NR, St + p * NR, kBwdLd, nullptr);
                gemm_tile<RR, 1, MR>(D, gt, Vp + p * D * NR, NR, dPt + p * NR, kBwdLd, nullptr);
              }
              for (int r = 0; r < RR; ++r)
                grad_row(St + r * kBwdLd, dPt + r * kBwdLd, cntp, used, bits, lim[r0 + r] - mb, scale, l[r0 + r],
                         dl[r0 + r], dead[r0 + r]);
              for (int64_t pd = 0; pd < Dp / NR; ++pd)
                gemm_tile<RR, kBwdLd, 1>(used, dPt, Kc + pd * cntp * NR, NR, dQ + r0 * Dp + pd * NR, Dp, kOnes);
            });
          }
          if (!need_dkv || lo < 0) continue;
          const int64_t k0 = lo * MR, k1 = std::min(nb, (hi + 1) * MR);  // rows of the live tiles
          for (int64_t j0 = 0; j0 < cnt; j0 += MR) {
            dispatch_count<1, MR>((int)std::min<int64_t>(MR, cnt - j0), [&](auto rr) {
              constexpr int RR = decltype(rr)::value;
              for (int64_t pd = 0; pd < Dp / NR; ++pd) {
                const int64_t off = pd * Npad * NR + (rb + k0) * NR;
                gemm_tile<RR, 1, kBwdLd>(k1 - k0, dPb + k0 * kBwdLd + j0, Qc + off, NR, dK + j0 * Dp + pd * NR, Dp,
                                         kOnes);
                gemm_tile<RR, 1, kBwdLd>(k1 - k0, Sb + k0 * kBwdLd + j0, Gc + off, NR, dV + j0 * Dp + pd * NR, Dp,
                                         kOnes);
              }
            });
          }
        }
        if (need_dkv) {
          store_grad(*dk, dK, bh, mb, cnt, D, Dp, scale);
          store_grad(*dv, dV, bh, mb, cnt, D, Dp, 1.f);
        }
      }
      if (need_dkv) {  // slots past the batch row's valid length
        zero_grad_rows(*dk, bh, std::max(m0, m1), m_end, D);
        zero_grad_rows(*dv, bh, std::max(m0, m1), m_end, D);
      }
      if (splits == 1) {
        for (int64_t n = 0; n < N; ++n)
          for (int64_t d = 0; d < D; ++d) dqp[(bh * N + n) * D + d] = dQ[n * Dp + d] * scale;
      } else {
        float* dst = part.data() + (bh * splits + split) * N * D;
        for (int64_t n = 0; n < N; ++n) std::memcpy(dst + n * D, dQ + n * Dp, sizeof(float) * D);
      }
    }
  });
  if (splits > 1) {
    at::parallel_for(0, BH * N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bh = row / N, n = row % N;
        float* o = dqp + row * D;
        std::fill(o, o + D, 0.f);
        for (int64_t s = 0; s < splits; ++s) {
          const float* src = part.data() + ((bh * splits + s) * N + n) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += src[d];
        }
        for (int64_t d = 0; d < D; ++d) o[d] *= scale;
      }
    });
  }
}

}  // namespace fot_cpu
