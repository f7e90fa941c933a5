// SIMD helpers: element conversion to fp32, masked loads, the 16x16 transpose and a vector exp.
// Every helper has an AVX-512 form; the portable build uses the scalar to_f32 only.
#pragma once

#include "common.h"

namespace fot_cpu {

template <typename T>
FOT_INLINE float to_f32(T x) { return static_cast<float>(x); }

#if FOT_AVX512
// Lanes [0, n) set, n in [0, 16].
FOT_INLINE __mmask16 tail_mask16(int64_t n) { return (__mmask16)(n >= 16 ? 0xFFFFu : ((1u << n) - 1u)); }

// Lanes of x holding NaN or +-inf.
FOT_INLINE __mmask16 nonfinite16(__m512 x) {
#if defined(__AVX512DQ__)
  return _mm512_fpclass_ps_mask(x, 0x99);  // QNaN | +inf | -inf | SNaN
#else
  return _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(kPosInf), _CMP_NLT_UQ);
#endif
}

// Lanes of m whose x is finite.
FOT_INLINE __mmask16 finite16(__mmask16 m, __m512 x) { return m & ~nonfinite16(x); }

FOT_INLINE __m512i iota16() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

// Prefetches one memory row of `bytes` bytes into L1 (prefetches never fault: a row past the end
// of a block, or of the tensor, is harmless).
FOT_INLINE void prefetch_row(const char* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

// Loads 16 (masked) elements starting at p and converts them to fp32 (masked lanes are 0).
template <typename T>
FOT_INLINE __m512 load16(const T* p, __mmask16 m);
template <>
FOT_INLINE __m512 load16<float>(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
template <>
FOT_INLINE __m512 load16<c10::BFloat16>(const c10::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <>
FOT_INLINE __m512 load16<c10::Half>(const c10::Half* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_cvtph_ps(h);
}

FOT_INLINE void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// exp(x) for x <= 0: Cephes-style range reduction + degree-5 polynomial, scalef for 2^n. The
// clamp keeps the reduction exact for huge negative x (and maps NaN to exp(-104), which flushes).
FOT_INLINE __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// acc[0:D] += w * v[0:D]
template <typename T>
FOT_INLINE void axpy_row(float w, const T* v, float* acc, int64_t D) {
#if FOT_AVX512
  const __m512 vw = _mm512_set1_ps(w);
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    const __mmask16 dm = tail_mask16(D - d0);
    const __m512 a = _mm512_maskz_loadu_ps(dm, acc + d0);
    _mm512_mask_storeu_ps(acc + d0, dm, _mm512_fmadd_ps(vw, load16<T>(v + d0, dm), a));
  }
#else
  for (int64_t d = 0; d < D; ++d) acc[d] += w * to_f32(v[d]);
#endif
}

// sum_d a[d] * b[d] (fp32 a, b converted), in a fixed order.
template <typename T>
FOT_INLINE float dot_row(const float* a, const T* b, int64_t D) {
#if FOT_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    const __mmask16 dm = tail_mask16(D - d0);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(dm, a + d0), load16<T>(b + d0, dm), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += a[d] * to_f32(b[d]);
  return s;
#endif
}

// While in scope: denormal results flush to zero and denormal inputs read as zero (MXCSR FTZ and
// DAZ), as in oneDNN / MKL; the caller's mode is restored. Softmax weights far below the row max
// would otherwise be denormal, and on Intel cores every FMA that produces or reads a denormal
// takes a microcode assist (about a hundred cycles); AMD cores handle them at full speed. Each
// thread of a parallel region sets its own (MXCSR is per thread).
struct FlushDenormals {
#if defined(__SSE__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
#endif
};

}  // namespace fot_cpu
