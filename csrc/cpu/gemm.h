// The register-blocked fp32 micro-kernel and the packing that feeds it: key blocks converted to
// fp32 panels [D][NR] (the BLIS "B panel"), value blocks converted to rows [cnt][Dp], query tiles
// packed d-major [D][MR].
#pragma once

#include "simd.h"

namespace fot_cpu {

// Packs slots [m0, m0 + cnt) of (b, h) into panels [cdiv(cnt,32)][D][32] (fp32); slots past cnt
// in the last panel are zero. Clears the validity bit (bits: the block's words, slot j = bit j) of
// every key with a non-finite element.
template <typename T>
void pack_panels_t(const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, int64_t D, float* out,
                   uint32_t* bits) {
  const int64_t npan = cdiv(cnt, NR);
#if FOT_AVX512
  const int64_t row_bytes = D * (int64_t)sizeof(T);
#endif
  for (int64_t p = 0; p < npan; ++p) {
    float* panel = out + p * D * NR;
#if FOT_AVX512
    // The transposing reads below walk 16 rows at once, which the hardware prefetchers follow
    // poorly from DRAM (decode: N small, packing is the whole cost): prefetch two panels ahead.
    for (int64_t j = (p + 2) * NR; j < (p + 3) * NR; ++j) prefetch_row(v.row(b, h, m0 + j), row_bytes);
#endif
    for (int half = 0; half < 2; ++half) {
      const int64_t s0 = p * NR + half * 16;
      const int64_t ns = std::max<int64_t>(0, std::min<int64_t>(16, cnt - s0));
#if FOT_AVX512
      const T* rows[16];
      for (int j = 0; j < 16; ++j)
        rows[j] = reinterpret_cast<const T*>(v.row(b, h, m0 + s0 + std::min<int64_t>(j, std::max<int64_t>(ns - 1, 0))));
      __mmask16 bad = 0;  // lanes = slots
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        const int64_t nd = std::min<int64_t>(16, D - d0);
        const __mmask16 dm = tail_mask16(nd);
        __m512 r[16];
        for (int j = 0; j < 16; ++j) r[j] = j < ns ? load16<T>(rows[j] + d0, dm) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t i = 0; i < nd; ++i) {
          bad |= nonfinite16(r[i]);
          _mm512_storeu_ps(panel + (d0 + i) * NR + half * 16, r[i]);
        }
      }
      bits[p] &= ~((uint32_t)bad << (half * 16));
#else
      for (int j = 0; j < 16; ++j) {
        if (j < ns) {
          const T* row = reinterpret_cast<const T*>(v.row(b, h, m0 + s0 + j));
          bool bad = false;
          for (int64_t d = 0; d < D; ++d) {
            panel[d * NR + half * 16 + j] = to_f32(row[d]);
            bad |= !std::isfinite(to_f32(row[d]));
          }
          if (bad) clear_bit(bits, s0 + j);
        } else {
          for (int64_t d = 0; d < D; ++d) panel[d * NR + half * 16 + j] = 0.f;
        }
      }
#endif
    }
  }
}

inline void pack_panels(const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, int64_t D, float* out,
                        uint32_t* bits) {
  dispatch_dtype(v.dtype, [&](auto t) { pack_panels_t<decltype(t)>(v, b, h, m0, cnt, D, out, bits); });
}

// Converts slots [m0, m0 + cnt) into column panels [Dp / NR][cnt_pad][NR] fp32 (the B operand of
// P @ V: each panel's rows are contiguous, 128 bytes apart); rows whose validity bit is 0, rows
// past cnt and columns past D are zero (so that 0-weights never meet garbage values).
template <typename T>
void convert_rows_t(const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, int64_t cnt_pad,
                    int64_t D, int64_t Dp, const uint32_t* bits, float* out) {
  const int64_t panel = cnt_pad * NR;
  for (int64_t j = 0; j < cnt_pad; ++j) {
    float* o = out + j * NR;
    const bool valid = j < cnt && ((bits[j >> 5] >> (j & 31)) & 1u);
    if (!valid) {
      for (int64_t d0 = 0; d0 < Dp; d0 += NR) std::memset(o + (d0 / NR) * panel, 0, sizeof(float) * NR);
      continue;
    }
    const T* row = reinterpret_cast<const T*>(v.row(b, h, m0 + j));
#if FOT_AVX512
    prefetch_row(v.row(b, h, m0 + j + 24), D * (int64_t)sizeof(T));
    for (int64_t d0 = 0; d0 < Dp; d0 += 16)
      _mm512_storeu_ps(o + (d0 / NR) * panel + d0 % NR, load16<T>(row + d0, tail_mask16(std::max<int64_t>(0, D - d0))));
#else
    for (int64_t d = 0; d < Dp; ++d) o[(d / NR) * panel + d % NR] = d < D ? to_f32(row[d]) : 0.f;
#endif
  }
}

inline void convert_rows(const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, int64_t cnt_pad, int64_t D,
                         int64_t Dp, const uint32_t* bits, float* out) {
  dispatch_dtype(v.dtype, [&](auto t) { convert_rows_t<decltype(t)>(v, b, h, m0, cnt, cnt_pad, D, Dp, bits, out); });
}

// Packs query rows [0, rows) of q (row-major [rows][D]) into tiles [cdiv(rows, MR)][D][MR]
// (rows past the end are zero).
inline void pack_queries(const float* q, int64_t rows, int64_t D, float* out) {
  const int64_t tiles = cdiv(rows, MR);
  for (int64_t t = 0; t < tiles; ++t) {
    float* o = out + t * D * MR;
    for (int64_t r = 0; r < MR; ++r) {
      const int64_t n = t * MR + r;
      if (n < rows) {
        const float* src = q + n * D;
        for (int64_t d = 0; d < D; ++d) o[d * MR + r] = src[d];
      } else {
        for (int64_t d = 0; d < D; ++d) o[d * MR + r] = 0.f;
      }
    }
  }
}

#if FOT_AVX512
// c0[r], c1[r] += sum_k A(r, k) * B[k][0:32] for r < R, with A(r, k) = A[r * AR + k * AK]
// (compile-time strides, so one base register serves all rows). B: k-major rows of 32 floats.
template <int R, int AR, int AK>
FOT_INLINE void gemm_accumulate(int64_t K, const float* A, const float* B, int64_t ldb, __m512* c0, __m512* c1) {
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(B + k * ldb);
    const __m512 b1 = _mm512_loadu_ps(B + k * ldb + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * AR + k * AK]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
}
#endif

// Micro-kernel: C[r][0:32] = (rowscale ? C[r][0:32] * rowscale[r] : 0) + sum_k A(r, k) * B[k][0:32]
// for r < R, A(r, k) = A[r * AR + k * AK] (packed query tiles [D][MR]: AR=1, AK=MR; probability
// tiles [MR][ld]: AR=ld, AK=1). B: k-major rows of 32 floats (ldb); C row-major (ldc).
template <int R, int AR, int AK>
FOT_INLINE void gemm_tile(int64_t K, const float* A, const float* B, int64_t ldb, float* C, int64_t ldc,
                          const float* rowscale) {
#if FOT_AVX512
  __m512 c0[R], c1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (rowscale) {
      const __m512 s = _mm512_set1_ps(rowscale[r]);
      c0[r] = _mm512_mul_ps(_mm512_loadu_ps(C + r * ldc), s);
      c1[r] = _mm512_mul_ps(_mm512_loadu_ps(C + r * ldc + 16), s);
    } else {
      c0[r] = _mm512_setzero_ps();
      c1[r] = _mm512_setzero_ps();
    }
  }
  gemm_accumulate<R, AR, AK>(K, A, B, ldb, c0, c1);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(C + r * ldc, c0[r]);
    _mm512_storeu_ps(C + r * ldc + 16, c1[r]);
  }
#else
  float acc[R][NR];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = rowscale ? C[r * ldc + j] * rowscale[r] : 0.f;
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r) {
      const float a = A[r * AR + k * AK];
      for (int j = 0; j < NR; ++j) acc[r][j] += a * B[k * ldb + j];
    }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) C[r * ldc + j] = acc[r][j];
#endif
}

}  // namespace fot_cpu
