// Stream path (kDirectMax < rows <= kStreamMax per work item): packing the key block would cost
// about as much as the arithmetic, so the queries are packed transposed instead, Qt [Dq][W] with
// W = NG*16 (rows in lanes, 1-4 zmm per d, zero padded), and chunks of KB key rows are only
// converted to fp32 (no transpose) into an L1 buffer [nch][KB][16]. The kernel broadcasts key
// elements against the query vectors: acc[i][g] (lanes = 16 rows) = <q[g*16 + lane], key[i]>.
// The [KB][W] score tile has rows in lanes: knn compares it directly against a vector of row
// thresholds; flash transposes it 16x16 into its row-major score block.
#pragma once

#include "simd.h"

namespace fot_cpu {

constexpr int kStreamMax = 64;

// Keys per register tile for NG row groups: KB * NG accumulators + NG query vectors <= 32 zmm
// (KB <= 16: the tile's validity bits and the key buffer [nch][KB][16] are sized for it; NG=1 with
// 8 or 16 keys measured alike, 24 spills).
template <int NG>
constexpr int stream_kb() { return NG == 1 ? 16 : NG == 2 ? 12 : NG == 3 ? 8 : 6; }

// rows [0, rows) of q ([rows][D]) -> Qt [Dq][NG*16], zero padded.
inline void pack_queries_t(const float* q, int64_t rows, int64_t D, int NG, float* out) {
  const int64_t Dq = cdiv(std::max<int64_t>(D, 1), 16) * 16;
  const int64_t W = NG * 16;
  std::fill(out, out + Dq * W, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) out[d * W + r] = q[r * D + d];
}

// Slots [m, m + KB) (only the first cnt are read; the rest are zero) -> buf [nch][KB][16]. Slot
// m + i is bit j0 + i of the block's validity words, cleared when the key has a non-finite element.
template <typename T, int KB>
FOT_INLINE void stream_convert(const MemView& v, int64_t b, int64_t h, int64_t m, int64_t cnt, int64_t D,
                               float* buf, uint32_t* bits, int64_t j0) {
  const int64_t nch = cdiv(std::max<int64_t>(D, 1), 16);
#if FOT_AVX512
  const int64_t row_bytes = D * (int64_t)sizeof(T);
  for (int i = 0; i < KB; ++i) {
    if (i < cnt) {
      prefetch_row(v.row(b, h, m + i + 3 * KB), row_bytes);
      const T* row = reinterpret_cast<const T*>(v.row(b, h, m + i));
      __mmask16 bad = 0;
      for (int64_t c = 0; c < nch; ++c) {
        const __m512 x = load16<T>(row + c * 16, tail_mask16(D - c * 16));
        bad |= nonfinite16(x);
        _mm512_store_ps(buf + (c * KB + i) * 16, x);
      }
      if (bad) clear_bit(bits, j0 + i);
    } else {
      for (int64_t c = 0; c < nch; ++c) _mm512_store_ps(buf + (c * KB + i) * 16, _mm512_setzero_ps());
    }
  }
#else
  for (int i = 0; i < KB; ++i) {
    const T* row = i < cnt ? reinterpret_cast<const T*>(v.row(b, h, m + i)) : nullptr;
    bool bad = false;
    for (int64_t d = 0; d < nch * 16; ++d) {
      const float x = (row && d < D) ? to_f32(row[d]) : 0.f;
      bad |= !std::isfinite(x);
      buf[((d >> 4) * KB + i) * 16 + (d & 15)] = x;
    }
    if (bad) clear_bit(bits, j0 + i);
  }
#endif
}

// St [KB][NG*16] = scores of the KB converted keys against the packed query tile.
template <int NG, int KB>
FOT_INLINE void stream_tile(int64_t nch, const float* Qt, const float* buf, float* St) {
  constexpr int W = NG * 16;
#if FOT_AVX512
  __m512 acc[KB][NG];
#pragma GCC unroll 16
  for (int i = 0; i < KB; ++i)
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) acc[i][g] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nch; ++c) {
    const float* qc = Qt + c * 16 * W;
    const float* bc = buf + c * KB * 16;
#pragma GCC unroll 16
    for (int dd = 0; dd < 16; ++dd) {
      __m512 q[NG];
#pragma GCC unroll 4
      for (int g = 0; g < NG; ++g) q[g] = _mm512_load_ps(qc + dd * W + g * 16);
#pragma GCC unroll 16
      for (int i = 0; i < KB; ++i) {
        const __m512 a = _mm512_set1_ps(bc[i * 16 + dd]);
#pragma GCC unroll 4
        for (int g = 0; g < NG; ++g) acc[i][g] = _mm512_fmadd_ps(a, q[g], acc[i][g]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < KB; ++i)
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) _mm512_store_ps(St + i * W + g * 16, acc[i][g]);
#else
  for (int i = 0; i < KB; ++i)
    for (int l = 0; l < W; ++l) {
      float s = 0.f;
      for (int64_t d = 0; d < nch * 16; ++d) s += Qt[d * W + l] * buf[((d >> 4) * KB + i) * 16 + (d & 15)];
      St[i * W + l] = s;
    }
#endif
}

// Chunk bits [j0, j0 + n) of a block's validity words (bits has one readable word past the end).
FOT_INLINE uint32_t chunk_bits(const uint32_t* bits, int64_t j0, int64_t n) {
  const uint64_t w = (uint64_t)bits[j0 >> 5] | ((uint64_t)bits[(j0 >> 5) + 1] << 32);
  return (uint32_t)(w >> (j0 & 31)) & (uint32_t)((1ull << n) - 1ull);
}

}  // namespace fot_cpu
