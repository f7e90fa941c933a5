// kNN scan: the score tile is compared, still in registers, against every row's threshold (the
// k-th best score so far); the rare winners are appended to the row's reservoir (topk.h).
// Row-count paths per work item: direct (direct.h), stream (stream.h), packed panels (gemm.h).
#include "kernels.h"
#include "paths.h"
#include "topk.h"

namespace fot_cpu {
namespace {

constexpr int64_t kKnnBlock = 512;  // slots per key block

// Scores an R x 32 tile (packed queries Q [D][MR] against one packed panel [D][32]) and appends
// the candidates. Slot j of the panel has index slot0 + j; vbits marks valid slots.
template <int R>
FOT_INLINE void knn_tile(int64_t D, const float* Q, const float* P, uint32_t vbits, int32_t slot0, RowRes* rows,
                         int64_t k, CompactScratch& tmp) {
  const int64_t cap = reservoir_cap(k);
#if FOT_AVX512
  __m512 c0[R], c1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    c0[r] = _mm512_setzero_ps();
    c1[r] = _mm512_setzero_ps();
  }
  gemm_accumulate<R, 1, MR>(D, Q, P, NR, c0, c1);
  const __mmask16 v0 = (__mmask16)(vbits & 0xFFFFu), v1 = (__mmask16)(vbits >> 16);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    RowRes& rr = rows[r];
    const __m512 thr = _mm512_set1_ps(rr.thr);
    __mmask16 m0 = _mm512_mask_cmp_ps_mask(v0, c0[r], thr, _CMP_GT_OQ);
    __mmask16 m1 = _mm512_mask_cmp_ps_mask(v1, c1[r], thr, _CMP_GT_OQ);
    if (__builtin_expect((m0 | m1) != 0, 0)) {
      m0 = finite16(m0, c0[r]);  // +inf never qualifies (NaN and -inf fail the comparison)
      m1 = finite16(m1, c1[r]);
      if ((m0 | m1) && rr.cnt > cap - 32) {
        compact(rr, k, tmp, false);
        const __m512 t = _mm512_set1_ps(rr.thr);
        m0 = _mm512_mask_cmp_ps_mask(m0, c0[r], t, _CMP_GT_OQ);
        m1 = _mm512_mask_cmp_ps_mask(m1, c1[r], t, _CMP_GT_OQ);
      }
      const __m512i iota = _mm512_add_epi32(_mm512_set1_epi32(slot0), iota16());
      int32_t cnt = rr.cnt;
      _mm512_storeu_ps(rr.s + cnt, _mm512_maskz_compress_ps(m0, c0[r]));
      _mm512_storeu_si512(rr.i + cnt, _mm512_maskz_compress_epi32(m0, iota));
      cnt += __builtin_popcount((unsigned)m0);
      _mm512_storeu_ps(rr.s + cnt, _mm512_maskz_compress_ps(m1, c1[r]));
      _mm512_storeu_si512(rr.i + cnt, _mm512_maskz_compress_epi32(m1, _mm512_add_epi32(iota, _mm512_set1_epi32(16))));
      rr.cnt = cnt + __builtin_popcount((unsigned)m1);
    }
  }
#else
  alignas(64) float tile[R][NR];
  gemm_tile<R, 1, MR>(D, Q, P, NR, &tile[0][0], NR, nullptr);
  for (int r = 0; r < R; ++r) {
    RowRes& rr = rows[r];
    for (int j = 0; j < NR; ++j) {
      if (!((vbits >> j) & 1u)) continue;
      const float sc = tile[r][j];
      if (!(sc > rr.thr && sc < kPosInf)) continue;
      if (rr.cnt >= cap) {
        compact(rr, k, tmp, false);
        if (!(sc > rr.thr)) continue;
      }
      rr.s[rr.cnt] = sc;
      rr.i[rr.cnt] = slot0 + j;
      ++rr.cnt;
    }
  }
#endif
}

// Per-row thresholds (RowRes::thr) in lane layout for the stream path.
struct StreamThr {
  alignas(64) float thr[kStreamMax];
  uint16_t rowmask[kStreamMax / 16];  // rows that exist
  void init(int64_t nrows) {
    for (int r = 0; r < kStreamMax; ++r) thr[r] = kNegInf;
    for (int g = 0; g < kStreamMax / 16; ++g) {
      const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, nrows - g * 16));
      rowmask[g] = (uint16_t)(n == 16 ? 0xFFFFu : ((1u << n) - 1u));
    }
  }
  void update(int r, const RowRes& rr) { thr[r] = rr.thr; }
};

// Appends the candidates of a score tile St [KB][NG*16] (key i = slot slot0 + i, valid when bit i
// of kbits is set). Keys are visited in increasing slot order, as the threshold ties require.
template <int NG, int KB>
FOT_INLINE void stream_select(const float* St, uint32_t kbits, int32_t slot0, StreamThr& st, RowRes* rows, int64_t k,
                              CompactScratch& tmp) {
  constexpr int W = NG * 16;
  const int64_t cap = reservoir_cap(k);
  while (kbits) {
    const int i = __builtin_ctz(kbits);
    kbits &= kbits - 1;
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) {
      const float* s = St + i * W + g * 16;
#if FOT_AVX512
      uint32_t m = _mm512_mask_cmp_ps_mask(st.rowmask[g], _mm512_load_ps(s), _mm512_load_ps(st.thr + g * 16),
                                           _CMP_GT_OQ);
#else
      uint32_t m = 0;
      for (int l = 0; l < 16; ++l)
        if (((st.rowmask[g] >> l) & 1u) && s[l] > st.thr[g * 16 + l]) m |= 1u << l;
#endif
      while (__builtin_expect(m != 0, 0)) {
        const int l = __builtin_ctz(m);
        m &= m - 1;
        const int r = g * 16 + l;
        const float sc = s[l];
        if (sc == kPosInf) continue;  // NaN and -inf fail the comparison above
        RowRes& rr = rows[r];
        if (rr.cnt >= cap) {
          compact(rr, k, tmp, false);
          st.update(r, rr);
          if (!(sc > rr.thr)) continue;
        }
        rr.s[rr.cnt] = sc;
        rr.i[rr.cnt] = slot0 + i;
        ++rr.cnt;
      }
    }
  }
}

struct StreamBufs {
  float* kbuf;  // [nch][16][16]
  float* St;    // [16][64]
};

template <typename T, int NG>
void knn_stream_block(const MemView& v, int64_t b, int64_t h, int64_t mb, int64_t cnt, uint32_t* bits,
                      int64_t D, const float* Qt, StreamBufs bf, StreamThr& st, RowRes* rows, int64_t k,
                      CompactScratch& tmp) {
  constexpr int KB = stream_kb<NG>();
  const int64_t nch = cdiv(std::max<int64_t>(D, 1), 16);
  for (int64_t j0 = 0; j0 < cnt; j0 += KB) {
    const int64_t n = std::min<int64_t>(KB, cnt - j0);
    const uint32_t kb = chunk_bits(bits, j0, n);
    if (!kb) continue;
    stream_convert<T, KB>(v, b, h, mb + j0, n, D, bf.kbuf, bits, j0);
    stream_tile<NG, KB>(nch, Qt, bf.kbuf, bf.St);
    stream_select<NG, KB>(bf.St, kb, (int32_t)(mb + j0), st, rows, k, tmp);
  }
}

}  // namespace

void knn_scan_kernel(const at::Tensor& query, const MemView& kv, const Validity& val, int64_t k,
                     at::Tensor& scores, at::Tensor& indices) {
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  const int64_t M = val.M;
  const int64_t BH = B * H;
  const Plan plan = make_plan(BH, N, M, 2 * MR, 8192);
  const float* qp = query.data_ptr<float>();
  float* sp = scores.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  // Partial results when the memory is split: [BH, splits, N, k] plus counts [BH, splits, N].
  std::vector<float> part_s;
  std::vector<int64_t> part_i, part_c;
  if (plan.splits > 1) {
    part_s.resize(BH * plan.splits * N * k);
    part_i.resize(BH * plan.splits * N * k);
    part_c.resize(BH * plan.splits * N);
  }
  const int64_t cap = reservoir_cap(k);
  at::parallel_for(0, plan.items(BH), 1, [&](int64_t begin, int64_t end) {
    Scratch panel_buf, bits_buf, qbuf, rs_buf, ri_buf;
    float* panels = panel_buf.get<float>(kKnnBlock * std::max<int64_t>(std::max<int64_t>(D, kSmallN), 1));
    uint32_t* bits = bits_buf.get<uint32_t>(kKnnBlock / 32 + 2);
    Scratch kb_buf, st_buf;
    const StreamBufs sbf{kb_buf.get<float>(cdiv(std::max<int64_t>(D, 1), 16) * 16 * 16),
                         st_buf.get<float>(16 * kStreamMax)};
    StreamThr sthr;
    std::vector<RowRes> rows;
    CompactScratch tmp;
    for (int64_t it = begin; it < end; ++it) {
      const WorkItem w = work_item(plan, it, H, N, val);
      const int64_t b = w.b, h = w.h, nrows = w.rows();
      const int64_t stride = cap + 16;  // slack for full-vector compress stores
      float* rs = rs_buf.get<float>(nrows * stride);
      int32_t* ri = ri_buf.get<int32_t>(nrows * stride);
      rows.resize(nrows);
      for (int64_t r = 0; r < nrows; ++r) rows[r] = RowRes{rs + r * stride, ri + r * stride, 0, kNegInf};
      const QueryRows qr = pack_rows(qp + (w.bh * N + w.n0) * D, nrows, D, qbuf);
      const float* q = qr.q;
      if (qr.path == Path::kStream) sthr.init(nrows);
      for (int64_t mb = w.m0; mb < w.m1; mb += kKnnBlock) {
        const int64_t cnt = std::min(kKnnBlock, w.m1 - mb);
        const int64_t npan = cdiv(cnt, NR);
        val.fill_bits(b, mb, cnt, bits);
        if (qr.path == Path::kStream) {
          dispatch<1, kStreamMax / 16>(kv.dtype, qr.NG, [&](auto t, auto ng) {
            knn_stream_block<decltype(t), decltype(ng)::value>(kv, b, h, mb, cnt, bits, D, q, sbf, sthr, rows.data(),
                                                               k, tmp);
          });
          continue;
        }
        if (qr.path == Path::kDirect) {
          bool any = false;
          for (int64_t p = 0; p < npan; ++p) any |= bits[p] != 0;
          if (!any) continue;
          direct_scores((int)nrows, kv, b, h, mb, cnt, q, D, panels, kKnnBlock, bits);
          for (int64_t r = 0; r < nrows; ++r)
            select_from_scores(rows[r], panels + r * kKnnBlock, cnt, bits, (int32_t)mb, k, tmp);
          continue;
        }
        pack_panels(kv, b, h, mb, cnt, D, panels, bits);
        for (int64_t r0 = 0; r0 < nrows; r0 += MR) {
          dispatch_count<1, MR>((int)std::min<int64_t>(MR, nrows - r0), [&](auto R) {
            for (int64_t p = 0; p < npan; ++p) {
              if (!bits[p]) continue;
              knn_tile<decltype(R)::value>(D, q + r0 * D, panels + p * D * NR, bits[p], (int32_t)(mb + p * NR),
                                           rows.data() + r0, k, tmp);
            }
          });
        }
      }
      for (int64_t r = 0; r < nrows; ++r) {
        RowRes& rr = rows[r];
        compact(rr, k, tmp, /*sorted=*/plan.splits == 1);
        if (plan.splits == 1) {
          const int64_t row = w.bh * N + w.n0 + r;
          write_row(rr, k, sp + row * k, ip + row * k);
        } else {
          const int64_t off = (w.bh * plan.splits + w.split) * N + w.n0 + r;
          part_c[off] = rr.cnt;
          write_row(rr, k, part_s.data() + off * k, part_i.data() + off * k);
        }
      }
    }
  });
  if (plan.splits > 1) merge_splits(part_s.data(), part_i.data(), part_c.data(), BH, plan.splits, N, k, sp, ip);
}

}  // namespace fot_cpu
