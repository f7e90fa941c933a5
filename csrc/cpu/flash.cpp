// Flash scan: per-row online softmax (max m, sum l, unnormalised out O in an fp32 scratch) over
// blocks of kFlashBlock slots; P @ V runs on the micro-kernel (gemm.h) against a converted value
// block whose invalid slots are zeroed, so that 0-weights never meet garbage.
// Row-count paths per work item: direct (direct.h), stream (stream.h), packed panels (gemm.h).
#include "kernels.h"
#include "paths.h"

namespace fot_cpu {
namespace {

constexpr int64_t kFlashBlock = 256;  // slots per key/value block
// Row stride of the score / probability block: padded off the power of two, so that the rows of a
// tile (read together by the P @ V broadcasts) spread over L1 sets and do not 4K-alias.
constexpr int64_t kSRow = kFlashBlock + 16;

// Scores of the first `cnt` slots of a block (validity bits as in knn, cleared for keys with a
// non-finite element) into S [nrows][ldS] (row-major, columns rounded up to 16 are written;
// skipped chunks leave stale values, which the validity masks of softmax_step exclude).
// Stm: [kFlashBlock + 16][W] scratch.
template <typename T, int NG>
void flash_stream_scores(const MemView& v, int64_t b, int64_t h, int64_t mb, int64_t cnt, uint32_t* bits,
                         int64_t D, const float* Qt, int64_t nrows, float* kbuf, float* Stm, float* S, int64_t ldS) {
  constexpr int KB = stream_kb<NG>();
  constexpr int W = NG * 16;
  const int64_t nch = cdiv(std::max<int64_t>(D, 1), 16);
  for (int64_t j0 = 0; j0 < cnt; j0 += KB) {
    const int64_t n = std::min<int64_t>(KB, cnt - j0);
    if (!chunk_bits(bits, j0, n)) continue;
    stream_convert<T, KB>(v, b, h, mb + j0, n, D, kbuf, bits, j0);
    stream_tile<NG, KB>(nch, Qt, kbuf, Stm + j0 * W);
  }
  for (int64_t j0 = 0; j0 < cnt; j0 += 16) {
    for (int g = 0; g < NG; ++g) {
      const int64_t nr = std::min<int64_t>(16, nrows - g * 16);
      if (nr <= 0) break;
#if FOT_AVX512
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(Stm + (j0 + i) * W + g * 16);
      transpose16(r);
      for (int64_t l = 0; l < nr; ++l) _mm512_storeu_ps(S + (g * 16 + l) * ldS + j0, r[l]);
#else
      for (int i = 0; i < 16; ++i)
        for (int64_t l = 0; l < nr; ++l) S[(g * 16 + l) * ldS + j0 + i] = Stm[(j0 + i) * W + g * 16 + l];
#endif
    }
  }
}

// One online-softmax step for one row over `cnt` raw scores S[0:cnt] (cnt multiple of 16 on the
// AVX-512 path; entries past the row's candidates must be excluded by the masks).
// Candidate j: validity bit, j <= lim_rel, finite raw score (so m stays finite or -inf). Writes
// P = exp(scale*s - m_new) (0 for non-candidates) in place, updates m, l and returns
// alpha = exp(m_old - m_new) (1 when m stays -inf).
FOT_INLINE float softmax_step(float* S, int64_t cnt, const uint32_t* bits, int64_t lim_rel, float scale, float& m,
                              float& l) {
#if FOT_AVX512
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 vninf = _mm512_set1_ps(kNegInf);
  __m512 vmax = vninf;
  __mmask16 cands[kFlashBlock / 16];
  for (int64_t c = 0; c < cnt; c += 16) {
    __mmask16 cand = (__mmask16)(bits[c >> 5] >> (c & 31));
    const int64_t rem = lim_rel - c + 1;
    if (rem < 16) cand &= tail_mask16(std::max<int64_t>(rem, 0));
    const __m512 s = _mm512_loadu_ps(S + c);
    cand = finite16(cand, s);
    cands[c >> 4] = cand;
    const __m512 x = _mm512_mul_ps(s, vscale);
    _mm512_storeu_ps(S + c, x);
    vmax = _mm512_mask_max_ps(vmax, cand, vmax, x);
  }
  const float bmax = _mm512_reduce_max_ps(vmax);
  const float m_new = std::max(m, bmax);
  if (m_new == kNegInf) {
    for (int64_t c = 0; c < cnt; c += 16) _mm512_storeu_ps(S + c, _mm512_setzero_ps());
    return 1.f;
  }
  const float alpha = m == kNegInf ? 0.f : std::exp(m - m_new);
  const __m512 vm = _mm512_set1_ps(m_new);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t c = 0; c < cnt; c += 16) {
    const __m512 x = _mm512_loadu_ps(S + c);
    const __m512 p = _mm512_maskz_mov_ps(cands[c >> 4], exp512(_mm512_sub_ps(x, vm)));
    _mm512_storeu_ps(S + c, p);
    vsum = _mm512_add_ps(vsum, p);
  }
  l = l * alpha + _mm512_reduce_add_ps(vsum);
  m = m_new;
  return alpha;
#else
  float bmax = kNegInf;
  for (int64_t c = 0; c < cnt; ++c) {
    const bool ok = ((bits[c >> 5] >> (c & 31)) & 1u) && c <= lim_rel;
    const float x = ok && std::isfinite(S[c]) ? S[c] * scale : kNegInf;
    S[c] = x;
    bmax = std::max(bmax, x);
  }
  const float m_new = std::max(m, bmax);
  if (m_new == kNegInf) {
    for (int64_t c = 0; c < cnt; ++c) S[c] = 0.f;
    return 1.f;
  }
  const float alpha = m == kNegInf ? 0.f : std::exp(m - m_new);
  float sum = 0.f;
  for (int64_t c = 0; c < cnt; ++c) {
    const float p = S[c] == kNegInf ? 0.f : std::exp(S[c] - m_new);
    S[c] = p;
    sum += p;
  }
  l = l * alpha + sum;
  m = m_new;
  return alpha;
#endif
}

// Final (out, lse) of a row from its online-softmax state: (0, -inf) for a row without candidates.
void finish_row(const float* O, float m, float l, int64_t D, float* out, float* lse) {
  if (m == kNegInf || !(l > 0.f)) {
    std::fill(out, out + D, 0.f);
    *lse = kNegInf;
    return;
  }
  const float inv = 1.f / l;
  for (int64_t d = 0; d < D; ++d) out[d] = O[d] * inv;
  *lse = m + std::log(l);
}

// Merges the partial states (O [Dp], m, l) of a row's memory splits by log-sum-exp.
void merge_split_states(const float* part_o, const float* part_m, const float* part_l, int64_t BH, int64_t splits,
                  int64_t N, int64_t D, int64_t Dp, float* op, float* lp) {
  at::parallel_for(0, BH * N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / N, n = row % N;
      float mx = kNegInf;
      for (int64_t s = 0; s < splits; ++s) mx = std::max(mx, part_m[(bh * splits + s) * N + n]);
      float* o = op + row * D;
      std::fill(o, o + D, 0.f);
      if (mx == kNegInf) {
        lp[row] = kNegInf;
        continue;
      }
      float l = 0.f;
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t off = (bh * splits + s) * N + n;
        if (part_m[off] == kNegInf) continue;
        const float w = std::exp(part_m[off] - mx);
        l += part_l[off] * w;
        const float* po = part_o + off * Dp;
        for (int64_t d = 0; d < D; ++d) o[d] += w * po[d];
      }
      finish_row(o, mx, l, D, o, lp + row);
    }
  });
}

}  // namespace

void flash_scan_kernel(const at::Tensor& query, const MemView& kv, const MemView& vv, const Validity& val,
                       float scale, int64_t causal_lq, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  const int64_t M = val.M;
  const int64_t Dp = cdiv(std::max<int64_t>(D, 1), NR) * NR;
  const int64_t BH = B * H;
  const Plan plan = make_plan(BH, N, M, 2 * MR, 4096);
  const float* qp = query.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  std::vector<float> part_o, part_m, part_l;
  if (plan.splits > 1) {
    part_o.resize(BH * plan.splits * N * Dp);
    part_m.resize(BH * plan.splits * N);
    part_l.resize(BH * plan.splits * N);
  }
  const int64_t C = kFlashBlock;
  at::parallel_for(0, plan.items(BH), 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    Scratch kbuf, vbuf, sbuf, obuf, bbuf, qbuf;
    float* kp = kbuf.get<float>(C * std::max<int64_t>(D, 1));
    float* vs = vbuf.get<float>(C * Dp);
    float* S = sbuf.get<float>(std::max<int64_t>(MR, kStreamMax) * kSRow);
    uint32_t* bits = bbuf.get<uint32_t>(C / 32 + 2);
    Scratch skb_buf, stm_buf;
    float* skb = skb_buf.get<float>(cdiv(std::max<int64_t>(D, 1), 16) * 16 * 16);
    float* Stm = stm_buf.get<float>((C + 16) * kStreamMax);
    std::vector<float> mrow, lrow, alpha(MR);
    std::vector<int64_t> lim;
    for (int64_t it = begin; it < end; ++it) {
      const WorkItem w = work_item(plan, it, H, N, val);
      const int64_t b = w.b, h = w.h, nrows = w.rows();
      float* O = obuf.get<float>(nrows * Dp);
      std::fill(O, O + nrows * Dp, 0.f);
      mrow.assign(nrows, kNegInf);
      lrow.assign(nrows, 0.f);
      lim.resize(nrows);
      int64_t lim_max = std::numeric_limits<int64_t>::max();
      if (causal_lq > 0) {
        lim_max = std::numeric_limits<int64_t>::min();
        for (int64_t r = 0; r < nrows; ++r) {
          lim[r] = (w.n0 + r) % causal_lq + M - causal_lq;
          lim_max = std::max(lim_max, lim[r]);
        }
      } else {
        for (int64_t r = 0; r < nrows; ++r) lim[r] = std::numeric_limits<int64_t>::max() / 2;
      }
      const QueryRows qr = pack_rows(qp + (w.bh * N + w.n0) * D, nrows, D, qbuf);
      const float* q = qr.q;
      const bool small = qr.path == Path::kDirect, stream = qr.path == Path::kStream;
      for (int64_t mb = w.m0; mb < w.m1 && mb <= lim_max; mb += C) {
        const int64_t cnt = std::min(C, w.m1 - mb);
        const int64_t cntp = cdiv(cnt, NR) * NR;
        val.fill_bits(b, mb, cnt, bits);
        bool any = false;
        for (int64_t p = 0; p < cntp / 32; ++p) any |= bits[p] != 0;
        if (!any) continue;
        // Keys first: their readers clear the validity bits of keys with a non-finite element, so
        // that the value rows of those slots are zeroed below (0-weight times inf is NaN).
        // Direct and stream paths: the scores of every row (the direct path has one row tile).
        const int64_t used_all =
            causal_lq > 0 ? std::min(cntp, cdiv(std::max<int64_t>(0, lim_max - mb + 1), NR) * NR) : cntp;
        if (stream) {
          dispatch<1, kStreamMax / 16>(kv.dtype, qr.NG, [&](auto t, auto ng) {
            flash_stream_scores<decltype(t), decltype(ng)::value>(kv, b, h, mb, std::min(cnt, used_all), bits, D, q,
                                                                  nrows, skb, Stm, S, kSRow);
          });
        } else if (small) {
          direct_scores((int)nrows, kv, b, h, mb, std::min(cnt, used_all), q, D, S, kSRow, bits);
        } else {
          pack_panels(kv, b, h, mb, cnt, D, kp, bits);
        }
        convert_rows(vv, b, h, mb, cnt, cntp, D, Dp, bits, vs);
        for (int64_t r0 = 0; r0 < nrows; r0 += MR) {
          const int R = (int)std::min<int64_t>(MR, nrows - r0);
          int64_t tl = std::numeric_limits<int64_t>::min();
          for (int r = 0; r < R; ++r) tl = std::max(tl, lim[r0 + r]);
          const int64_t used = std::min(cntp, cdiv(std::max<int64_t>(0, tl - mb + 1), NR) * NR);
          if (used <= 0) continue;
          float* const St = stream ? S + r0 * kSRow : S;
          if (!small && !stream) {  // direct and stream: the scores of all rows were computed above
            dispatch_count<1, MR>(R, [&](auto r) {
              for (int64_t p = 0; p < used / NR; ++p)
                gemm_tile<decltype(r)::value, 1, MR>(D, q + r0 * D, kp + p * D * NR, NR, S + p * NR, kSRow, nullptr);
            });
          }
          bool live = false;
          for (int r = 0; r < R; ++r) {
            alpha[r] = softmax_step(St + r * kSRow, used, bits, lim[r0 + r] - mb, scale, mrow[r0 + r], lrow[r0 + r]);
            live |= mrow[r0 + r] != kNegInf;
          }
          if (!live) continue;
          dispatch_count<1, MR>(R, [&](auto r) {
            for (int64_t j = 0; j < Dp; j += NR)
              gemm_tile<decltype(r)::value, kSRow, 1>(used, St, vs + j * cntp, NR, O + r0 * Dp + j, Dp,
                                                            alpha.data());
          });
        }
      }
      for (int64_t r = 0; r < nrows; ++r) {
        const int64_t n = w.n0 + r;
        if (plan.splits == 1) {
          finish_row(O + r * Dp, mrow[r], lrow[r], D, op + (w.bh * N + n) * D, lp + w.bh * N + n);
        } else {
          const int64_t off = (w.bh * plan.splits + w.split) * N + n;
          std::copy(O + r * Dp, O + (r + 1) * Dp, part_o.data() + off * Dp);
          part_m[off] = mrow[r];
          part_l[off] = lrow[r];
        }
      }
    }
  });
  if (plan.splits > 1) merge_split_states(part_o.data(), part_m.data(), part_l.data(), BH, plan.splits, N, D, Dp, op, lp);
}

}  // namespace fot_cpu
