// Reservoir compaction (vectorised quickselect), candidate selection from a row of scores and the
// merge of memory splits; see topk.h.
#include "topk.h"

#include <functional>

namespace fot_cpu {
namespace {

FOT_INLINE bool better_entry(const Entry& a, const Entry& b) { return worse(b.s, b.i, a.s, a.i); }

// k-th largest (1 <= k <= n) of x[0:n] (no NaN), by quickselect (AVX-512: compress partitions).
float kth_largest(const float* x, int64_t n, int64_t k, CompactScratch& cs) {
  cs.a.resize(n + 16);
  cs.b.resize(n + 16);
  cs.c.resize(n + 16);
  float* a = cs.a.data();
  float* g = cs.b.data();
  float* l = cs.c.data();
  std::copy(x, x + n, a);
  while (n > 16) {
    const float x0 = a[0], x1 = a[n / 2], x2 = a[n - 1];
    const float p = std::max(std::min(x0, x1), std::min(std::max(x0, x1), x2));
    int64_t ng = 0, nl = 0;
#if FOT_AVX512
    const __m512 vp = _mm512_set1_ps(p);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 tail = tail_mask16(n - j);
      const __m512 v = _mm512_maskz_loadu_ps(tail, a + j);
      const __mmask16 mg = _mm512_mask_cmp_ps_mask(tail, v, vp, _CMP_GT_OQ);
      const __mmask16 ml = _mm512_mask_cmp_ps_mask(tail, v, vp, _CMP_LT_OQ);
      _mm512_storeu_ps(g + ng, _mm512_maskz_compress_ps(mg, v));
      _mm512_storeu_ps(l + nl, _mm512_maskz_compress_ps(ml, v));
      ng += __builtin_popcount((unsigned)mg);
      nl += __builtin_popcount((unsigned)ml);
    }
#else
    for (int64_t j = 0; j < n; ++j) {
      if (a[j] > p) g[ng++] = a[j];
      else if (a[j] < p) l[nl++] = a[j];
    }
#endif
    const int64_t ne = n - ng - nl;
    if (k <= ng) {
      std::swap(a, g);
      n = ng;
    } else if (k <= ng + ne) {
      return p;
    } else {
      k -= ng + ne;
      std::swap(a, l);
      n = nl;
    }
  }
  std::sort(a, a + n, std::greater<float>());
  return a[k - 1];
}

}  // namespace

void compact(RowRes& rr, int64_t k, CompactScratch& cs, bool sorted) {
  const int64_t n = rr.cnt;
  if (sorted || n <= k) {
    std::vector<Entry>& tmp = cs.entries;
    tmp.resize(n);
    for (int64_t j = 0; j < n; ++j) tmp[j] = Entry{rr.s[j], rr.i[j]};
    const int64_t kk = std::min<int64_t>(k, n);
    std::partial_sort(tmp.begin(), tmp.begin() + kk, tmp.end(), better_entry);
    for (int64_t j = 0; j < kk; ++j) {
      rr.s[j] = tmp[j].s;
      rr.i[j] = tmp[j].i;
    }
    rr.cnt = (int32_t)kk;
    if (kk == k) rr.thr = tmp[kk - 1].s;
    return;
  }
  // k-th best score t by quickselect on the scores alone; keep everything above t and the
  // lowest-index entries equal to t.
  const float t = kth_largest(rr.s, n, k, cs);
  std::vector<int32_t>& ties = cs.ties;
  ties.clear();
  int64_t w = 0;
#if FOT_AVX512
  const __m512 vt = _mm512_set1_ps(t);
  for (int64_t j = 0; j < n; j += 16) {  // in place: w <= j, row buffers have 16 floats of slack
    const __mmask16 tail = tail_mask16(n - j);
    const __m512 x = _mm512_maskz_loadu_ps(tail, rr.s + j);
    const __m512i ix = _mm512_maskz_loadu_epi32(tail, rr.i + j);
    const __mmask16 mg = _mm512_mask_cmp_ps_mask(tail, x, vt, _CMP_GT_OQ);
    __mmask16 me = _mm512_mask_cmp_ps_mask(tail, x, vt, _CMP_EQ_OQ);
    _mm512_storeu_ps(rr.s + w, _mm512_maskz_compress_ps(mg, x));
    _mm512_storeu_si512(rr.i + w, _mm512_maskz_compress_epi32(mg, ix));
    w += __builtin_popcount((unsigned)mg);
    if (me) {
      alignas(64) int32_t ib[16];
      _mm512_store_si512(ib, ix);
      while (me) {
        ties.push_back(ib[__builtin_ctz((unsigned)me)]);
        me &= me - 1;
      }
    }
  }
#else
  for (int64_t j = 0; j < n; ++j) {
    const float x = rr.s[j];
    if (x > t) {
      rr.s[w] = x;
      rr.i[w] = rr.i[j];
      ++w;
    } else if (x == t) {
      ties.push_back(rr.i[j]);
    }
  }
#endif
  const int64_t need = k - w;
  if (need < (int64_t)ties.size()) std::partial_sort(ties.begin(), ties.begin() + need, ties.end());
  for (int64_t j = 0; j < need; ++j) {
    rr.s[w + j] = t;
    rr.i[w + j] = ties[j];
  }
  rr.cnt = (int32_t)k;
  rr.thr = t;
}

void select_from_scores(RowRes& rr, const float* S, int64_t cnt, const uint32_t* bits, int32_t slot0, int64_t k,
                        CompactScratch& tmp) {
  const int64_t cap = reservoir_cap(k);
#if FOT_AVX512
  for (int64_t j0 = 0; j0 < cnt; j0 += 16) {
    const __mmask16 vm = (__mmask16)(bits[j0 >> 5] >> (j0 & 31));
    if (!vm) continue;
    const __m512 x = _mm512_loadu_ps(S + j0);
    __mmask16 m = _mm512_mask_cmp_ps_mask(vm, x, _mm512_set1_ps(rr.thr), _CMP_GT_OQ);
    if (__builtin_expect(m != 0, 0)) {
      m = finite16(m, x);  // +inf never qualifies (NaN and -inf fail the comparison)
      if (m && rr.cnt > cap - 32) {
        compact(rr, k, tmp, false);
        m = _mm512_mask_cmp_ps_mask(m, x, _mm512_set1_ps(rr.thr), _CMP_GT_OQ);
      }
      const __m512i iota = _mm512_add_epi32(_mm512_set1_epi32(slot0 + (int32_t)j0), iota16());
      _mm512_storeu_ps(rr.s + rr.cnt, _mm512_maskz_compress_ps(m, x));
      _mm512_storeu_si512(rr.i + rr.cnt, _mm512_maskz_compress_epi32(m, iota));
      rr.cnt += __builtin_popcount((unsigned)m);
    }
  }
#else
  for (int64_t j = 0; j < cnt; ++j) {
    if (!((bits[j >> 5] >> (j & 31)) & 1u)) continue;
    const float sc = S[j];
    if (!(sc > rr.thr && sc < kPosInf)) continue;
    if (rr.cnt >= cap) {
      compact(rr, k, tmp, false);
      if (!(sc > rr.thr)) continue;
    }
    rr.s[rr.cnt] = sc;
    rr.i[rr.cnt] = slot0 + (int32_t)j;
    ++rr.cnt;
  }
#endif
}

void write_row(const RowRes& rr, int64_t k, float* scores, int64_t* indices) {
  for (int64_t j = 0; j < k; ++j) {
    scores[j] = j < rr.cnt ? rr.s[j] : kNegInf;
    indices[j] = j < rr.cnt ? (int64_t)rr.i[j] : -1;
  }
}

void merge_splits(const float* part_s, const int64_t* part_i, const int64_t* part_c, int64_t BH, int64_t splits,
                  int64_t N, int64_t k, float* scores, int64_t* indices) {
  at::parallel_for(0, BH * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, int64_t>> e;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / N, n = row % N;
      e.clear();
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t off = (bh * splits + s) * N + n;
        for (int64_t j = 0; j < part_c[off]; ++j) e.emplace_back(part_s[off * k + j], part_i[off * k + j]);
      }
      // keep the best k of the union, sorted
      const size_t kk = std::min<size_t>(k, e.size());
      auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& c) {
        return worse(c.first, c.second, a.first, a.second);
      };
      std::partial_sort(e.begin(), e.begin() + kk, e.end(), better);
      float* so = scores + row * k;
      int64_t* io = indices + row * k;
      for (int64_t j = 0; j < k; ++j) {
        so[j] = (size_t)j < kk ? e[j].first : kNegInf;
        io[j] = (size_t)j < kk ? e[j].second : -1;
      }
    }
  });
}

}  // namespace fot_cpu
