// Few-rows path (decode, N <= kDirectMax rows per work item): scores straight from the memory
// rows, no packing. Each key row is converted once and dotted with the NQ query rows; 16 keys'
// partial-sum vectors are reduced together by a 16x16 transpose.
#pragma once

#include "simd.h"

namespace fot_cpu {

constexpr int kSmallN = 8;
constexpr int kDirectMax = kSmallN;  // direct path up to here (measured faster than the stream path)

// Copies rows [0, rows) of q ([rows][D]) into [rows][cdiv(D, 16) * 16] with zero padding.
inline void pad_queries(const float* q, int64_t rows, int64_t D, float* out) {
  const int64_t Dq = cdiv(D, 16) * 16;
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(q + r * D, q + (r + 1) * D, out + r * Dq);
    std::fill(out + r * Dq + D, out + (r + 1) * Dq, 0.f);
  }
}

// S[n][j] = <q[n], key[m0 + j]> for j < cnt (rounded up to 16; entries past cnt are 0).
// q: [NQ][Dq] fp32 with Dq = cdiv(D, 16) * 16 and zero padding (pad_queries). Clears bit j of
// the block's validity words when key j has a non-finite element.
template <typename T, int NQ>
void direct_scores_t(const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, const float* q, int64_t D,
                     float* S, int64_t ldS, uint32_t* bits) {
  const int64_t nch = cdiv(D, 16);
  const int64_t Dq = nch * 16;
#if FOT_AVX512
  const int64_t row_bytes = D * (int64_t)sizeof(T);
  alignas(64) float buf[NQ][16][16];
  for (int64_t j0 = 0; j0 < cnt; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, cnt - j0);
    for (int64_t jj = 0; jj < 16; ++jj) {
      __m512 acc[NQ];
#pragma GCC unroll 8
      for (int n = 0; n < NQ; ++n) acc[n] = _mm512_setzero_ps();
      if (jj < nj) {
        const int64_t j = j0 + jj;
        prefetch_row(v.row(b, h, m0 + j + 16), row_bytes);
        const T* row = reinterpret_cast<const T*>(v.row(b, h, m0 + j));
        __mmask16 bad = 0;
        for (int64_t c = 0; c < nch; ++c) {
          const __m512 kc = load16<T>(row + c * 16, tail_mask16(D - c * 16));
          bad |= nonfinite16(kc);
#pragma GCC unroll 8
          for (int n = 0; n < NQ; ++n) acc[n] = _mm512_fmadd_ps(_mm512_load_ps(q + n * Dq + c * 16), kc, acc[n]);
        }
        if (bad) clear_bit(bits, j);
      }
#pragma GCC unroll 8
      for (int n = 0; n < NQ; ++n) _mm512_store_ps(buf[n][jj], acc[n]);
    }
    for (int n = 0; n < NQ; ++n) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(buf[n][i]);
      transpose16(r);
      __m512 a0 = _mm512_add_ps(r[0], r[1]), a1 = _mm512_add_ps(r[2], r[3]);
      __m512 a2 = _mm512_add_ps(r[4], r[5]), a3 = _mm512_add_ps(r[6], r[7]);
      __m512 a4 = _mm512_add_ps(r[8], r[9]), a5 = _mm512_add_ps(r[10], r[11]);
      __m512 a6 = _mm512_add_ps(r[12], r[13]), a7 = _mm512_add_ps(r[14], r[15]);
      a0 = _mm512_add_ps(a0, a1);
      a2 = _mm512_add_ps(a2, a3);
      a4 = _mm512_add_ps(a4, a5);
      a6 = _mm512_add_ps(a6, a7);
      _mm512_storeu_ps(S + n * ldS + j0, _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a4, a6)));
    }
  }
#else
  for (int64_t j = 0; j < cdiv(cnt, 16) * 16; ++j) {
    const T* row = j < cnt ? reinterpret_cast<const T*>(v.row(b, h, m0 + j)) : nullptr;
    bool bad = false;
    for (int64_t d = 0; row && d < D; ++d) bad |= !std::isfinite(to_f32(row[d]));
    if (bad) clear_bit(bits, j);
    for (int n = 0; n < NQ; ++n) {
      float acc = 0.f;
      for (int64_t d = 0; row && d < D; ++d) acc += q[n * Dq + d] * to_f32(row[d]);
      S[n * ldS + j] = acc;
    }
  }
#endif
}

inline void direct_scores(int nq, const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, const float* q,
                          int64_t D, float* S, int64_t ldS, uint32_t* bits) {
  dispatch<1, kSmallN>(v.dtype, nq, [&](auto t, auto n) {
    direct_scores_t<decltype(t), decltype(n)::value>(v, b, h, m0, cnt, q, D, S, ldS, bits);
  });
}

}  // namespace fot_cpu
