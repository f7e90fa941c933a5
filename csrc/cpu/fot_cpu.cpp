// fot_cpu: CPU production kernels for fot-kernels, registered as torch custom ops.
//
//   fot_cpu::knn_scan(query, mem_keys, mem_lengths?, mem_mask?, k) -> (scores, indices)
//   fot_cpu::flash_scan(query, keys, values, mem_lengths?, mem_mask?, scale, causal_lq) -> (out, lse)
//   fot_cpu::gather_attention(scores, indices, values, scale) -> (out, lse)
//
// Layout: query [B, Hkv, N, D] float32 contiguous (N = G * Lq stacked query heads); memory
// [B, Hkv, M, D] in float32 / bfloat16 / float16 with stride(-1) == 1 and otherwise any strides.
//
// Scheme:
//   * A block of key slots is converted to fp32 and packed into panels of NR=32 slots stored
//     d-major ([D][32]), the BLIS "B panel"; queries are packed d-major per MR=14-row tile. A
//     register-blocked micro-kernel computes an R x 32 tile of scores (R <= 14 rows, 2*R zmm
//     accumulators), broadcasting query elements.
//   * knn_scan compares the tile, still in registers, against every row's threshold (the k-th
//     best score so far); the rare winners are appended to a per-row reservoir with SIMD compress.
//     When a reservoir holds 2k+32 entries it is compacted to the exact top-k (vectorised
//     quickselect), which raises the threshold. Slots arrive in increasing index order, so the
//     strict comparison implements "lower index wins" on ties.
//   * flash_scan keeps per-row online-softmax state (max m, sum l, unnormalised out O in an fp32
//     scratch) and runs P @ V with the same micro-kernel on a converted value block
//     (invalid slots zeroed so that 0-weights never meet garbage).
//   * Few rows (N <= 8 per work item, decode): no packing, keys are dotted straight from the memory
//     rows (software prefetch), which keeps the scan memory-bandwidth bound.
//   * 9..64 rows per work item ("stream" path): packing the key block would cost about as much as
//     the arithmetic, so the queries are packed transposed instead (rows in lanes, 1-4 zmm per d)
//     and chunks of 6-16 key rows are only converted to fp32 (no transpose) into an L1 buffer; the
//     kernel broadcasts key elements against the query vectors (scores land with rows in lanes).
//     knn compares each key's row-vector of scores against a vector of row thresholds (same
//     reservoir/compaction as below); flash transposes the scores 16x16 into its row-major block.
//   * Work items are (b*h, row chunk, memory split); memory splits are merged exactly afterwards
//     (top-k lists by the (score desc, index asc) order, attention partials by log-sum-exp).
// Without AVX-512 (portable build) the same structure runs with scalar/auto-vectorised kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <array>
#include <utility>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FOT_AVX512 1
#include <immintrin.h>
#else
#define FOT_AVX512 0
#endif

#if defined(__GNUC__)
#define FOT_INLINE inline __attribute__((always_inline))
#else
#define FOT_INLINE inline
#endif

#define CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dims, got shape ", (x).sizes())
#define CHECK_SHAPE(x, ...)                                                                   \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())
#define CHECK_LAST_CONTIGUOUS(x) TORCH_CHECK((x).stride(-1) == 1, #x " must have stride(-1) == 1, got strides ", (x).strides())
#define CHECK_MEM_DTYPE(x)                                                                          \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||              \
                  (x).scalar_type() == at::kHalf,                                                   \
              #x " must be float32, bfloat16 or float16, got ", (x).scalar_type())

namespace fot_cpu {
namespace {

constexpr int NR = 32;  // key slots per packed panel (two zmm)
constexpr int MR = 14;  // query rows per micro tile (2*MR accumulators + 2 panel registers)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------
// Aligned per-thread scratch.
struct Scratch {
  std::vector<char> raw;
  template <typename T>
  T* get(size_t count) {
    size_t bytes = count * sizeof(T) + 64;
    if (raw.size() < bytes) raw.resize(bytes);
    uintptr_t p = reinterpret_cast<uintptr_t>(raw.data());
    return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));
  }
};

// ------------------------------------------------------------------------------------------
// Memory view: element (b, h, m, d) of a [B, H, M, D] tensor with stride(-1) == 1.
struct MemView {
  const char* base;
  at::ScalarType dtype;
  int64_t esize, sb, sh, sm;  // strides in elements
  const char* row(int64_t b, int64_t h, int64_t m) const {
    return base + (b * sb + h * sh + m * sm) * esize;
  }
};

MemView make_view(const at::Tensor& t) {
  return MemView{static_cast<const char*>(t.data_ptr()), t.scalar_type(), (int64_t)t.element_size(),
                 t.stride(0), t.stride(1), t.stride(2)};
}

// Slot validity: m < lengths[b] and mask[b, m].
struct Validity {
  const int64_t* lengths = nullptr;
  const bool* mask = nullptr;
  int64_t mask_sb = 0, mask_sm = 0;
  int64_t M = 0;
  int64_t effective_len(int64_t b) const {
    if (!lengths) return M;
    return std::min<int64_t>(M, std::max<int64_t>(0, lengths[b]));
  }
  // 32-bit validity words for slots [m0, m0 + cnt) (bits beyond cnt are zero); m < len assumed.
  void fill_bits(int64_t b, int64_t m0, int64_t cnt, uint32_t* bits) const {
    int64_t words = cdiv(cnt, 32);
    for (int64_t w = 0; w < words; ++w) {
      int64_t n = std::min<int64_t>(32, cnt - w * 32);
      uint32_t v = n == 32 ? 0xFFFFFFFFu : ((1u << n) - 1u);
      if (mask) {
        const bool* mp = mask + b * mask_sb + (m0 + w * 32) * mask_sm;
        uint32_t mv = 0;
        for (int64_t j = 0; j < n; ++j) mv |= (uint32_t)(mp[j * mask_sm] ? 1u : 0u) << j;
        v &= mv;
      }
      bits[w] = v;
    }
  }
};

// ------------------------------------------------------------------------------------------
// Conversion of one memory row segment to fp32.
template <typename T>
FOT_INLINE float to_f32(T x) { return static_cast<float>(x); }

#if FOT_AVX512
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
#endif

// Packs slots [m0, m0 + cnt) of (b, h) into panels [cdiv(cnt,32)][D][32] (fp32); slots past cnt
// in the last panel are zero.
template <typename T>
void pack_panels_t(const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, int64_t D, float* out) {
  const int64_t npan = cdiv(cnt, NR);
  const int64_t row_bytes = D * (int64_t)sizeof(T);
  for (int64_t p = 0; p < npan; ++p) {
    float* panel = out + p * D * NR;
#if FOT_AVX512
    // The transposing reads below walk 16 rows at once, which the hardware prefetchers follow
    // poorly from DRAM (decode: N small, packing is the whole cost): prefetch two panels ahead.
    {
      const int64_t pf0 = (p + 2) * NR, pf1 = pf0 + NR;  // may run past the block: harmless
      for (int64_t j = pf0; j < pf1; ++j) {
        const char* rp = v.row(b, h, m0 + j);
        for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(rp + off, _MM_HINT_T0);
      }
    }
#endif
    for (int half = 0; half < 2; ++half) {
      const int64_t s0 = p * NR + half * 16;
      const int64_t ns = std::max<int64_t>(0, std::min<int64_t>(16, cnt - s0));
#if FOT_AVX512
      const T* rows[16];
      for (int j = 0; j < 16; ++j)
        rows[j] = reinterpret_cast<const T*>(v.row(b, h, m0 + s0 + std::min<int64_t>(j, std::max<int64_t>(ns - 1, 0))));
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        const int64_t nd = std::min<int64_t>(16, D - d0);
        const __mmask16 dm = (__mmask16)((nd == 16) ? 0xFFFF : ((1u << nd) - 1u));
        __m512 r[16];
        for (int j = 0; j < 16; ++j) r[j] = j < ns ? load16<T>(rows[j] + d0, dm) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t i = 0; i < nd; ++i) _mm512_storeu_ps(panel + (d0 + i) * NR + half * 16, r[i]);
      }
#else
      for (int j = 0; j < 16; ++j) {
        if (j < ns) {
          const T* row = reinterpret_cast<const T*>(v.row(b, h, m0 + s0 + j));
          for (int64_t d = 0; d < D; ++d) panel[d * NR + half * 16 + j] = to_f32(row[d]);
        } else {
          for (int64_t d = 0; d < D; ++d) panel[d * NR + half * 16 + j] = 0.f;
        }
      }
#endif
    }
  }
}

void pack_panels(const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, int64_t D, float* out) {
  switch (v.dtype) {
    case at::kFloat: return pack_panels_t<float>(v, b, h, m0, cnt, D, out);
    case at::kBFloat16: return pack_panels_t<c10::BFloat16>(v, b, h, m0, cnt, D, out);
    case at::kHalf: return pack_panels_t<c10::Half>(v, b, h, m0, cnt, D, out);
    default: TORCH_CHECK(false, "unsupported memory dtype ", v.dtype);
  }
}

// Converts slots [m0, m0 + cnt) into rows [cnt_pad][Dp] fp32; rows whose validity bit is 0, rows
// past cnt and columns past D are zero (so that 0-weights never meet garbage values).
template <typename T>
void convert_rows_t(const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, int64_t cnt_pad,
                    int64_t D, int64_t Dp, const uint32_t* bits, float* out) {
  for (int64_t j = 0; j < cnt_pad; ++j) {
    float* o = out + j * Dp;
    const bool valid = j < cnt && ((bits[j >> 5] >> (j & 31)) & 1u);
    if (!valid) {
      std::memset(o, 0, sizeof(float) * Dp);
      continue;
    }
    const T* row = reinterpret_cast<const T*>(v.row(b, h, m0 + j));
#if FOT_AVX512
    {  // prefetch instructions never fault: running past the block (or the tensor) is harmless
      const char* rp = v.row(b, h, m0 + j + 24);
      for (int64_t off = 0; off < D * (int64_t)sizeof(T); off += 64) _mm_prefetch(rp + off, _MM_HINT_T0);
    }
    for (int64_t d0 = 0; d0 < Dp; d0 += 16) {
      const int64_t nd = std::max<int64_t>(0, std::min<int64_t>(16, D - d0));
      const __mmask16 dm = (__mmask16)((nd == 16) ? 0xFFFF : ((1u << nd) - 1u));
      _mm512_storeu_ps(o + d0, load16<T>(row + d0, dm));
    }
#else
    for (int64_t d = 0; d < D; ++d) o[d] = to_f32(row[d]);
    for (int64_t d = D; d < Dp; ++d) o[d] = 0.f;
#endif
  }
}

void convert_rows(const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, int64_t cnt_pad, int64_t D,
                  int64_t Dp, const uint32_t* bits, float* out) {
  switch (v.dtype) {
    case at::kFloat: return convert_rows_t<float>(v, b, h, m0, cnt, cnt_pad, D, Dp, bits, out);
    case at::kBFloat16: return convert_rows_t<c10::BFloat16>(v, b, h, m0, cnt, cnt_pad, D, Dp, bits, out);
    case at::kHalf: return convert_rows_t<c10::Half>(v, b, h, m0, cnt, cnt_pad, D, Dp, bits, out);
    default: TORCH_CHECK(false, "unsupported memory dtype ", v.dtype);
  }
}

// ------------------------------------------------------------------------------------------
// Micro-kernel: C[r][0:32] = (rowscale ? C[r][0:32] * rowscale[r] : 0) + sum_k A(r, k) * B[k][0:32]
// for r < R, with A(r, k) = A[r * AR + k * AK] (compile-time strides, so one base register serves
// all rows: packed query tiles [D][MR] use AR=1, AK=MR; probability tiles [MR][kFlashBlock] use
// AR=kFlashBlock, AK=1). B: k-major rows of 32 floats (ldb); C row-major (ldc).
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

using GemmFn = void (*)(int64_t, const float*, const float*, int64_t, float*, int64_t, const float*);

template <int R, int AR, int AK>
void gemm_tile_fn(int64_t K, const float* A, const float* B, int64_t ldb, float* C, int64_t ldc,
                  const float* rowscale) {
  gemm_tile<R, AR, AK>(K, A, B, ldb, C, ldc, rowscale);
}

template <int AR, int AK, int... Rs>
constexpr std::array<GemmFn, MR + 1> make_gemm_table(std::integer_sequence<int, Rs...>) {
  return {nullptr, &gemm_tile_fn<Rs + 1, AR, AK>...};
}

constexpr int64_t kKnnBlock = 512;    // slots per packed key block (knn)
constexpr int64_t kFlashBlock = 256;  // slots per key/value block (flash)

// A = packed query tile [D][MR]: A(r, d) = A[r + d * MR].
const std::array<GemmFn, MR + 1> kGemmQ = make_gemm_table<1, MR>(std::make_integer_sequence<int, MR>{});
// A = probability tile [MR][kFlashBlock]: A(r, c) = A[r * kFlashBlock + c].
const std::array<GemmFn, MR + 1> kGemmP = make_gemm_table<kFlashBlock, 1>(std::make_integer_sequence<int, MR>{});

// Packs query rows [0, rows) of q (row-major [rows][D]) into tiles [cdiv(rows, MR)][D][MR]
// (rows past the end are zero).
void pack_queries(const float* q, int64_t rows, int64_t D, float* out) {
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

// ------------------------------------------------------------------------------------------
// Small-N path (decode): scores straight from the memory rows, no packing. Each key row is
// converted once and dotted with the NQ query rows; 16 keys' partial-sum vectors are reduced
// together by a 16x16 transpose. S[n][j] = <q[n], key[m0 + j]> for j < cnt (rounded up to 16;
// entries past cnt are 0). q: [NQ][Dq] fp32 with Dq = cdiv(D, 16) * 16 and zero padding.
constexpr int kSmallN = 8;

template <typename T, int NQ>
void direct_scores_t(const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, const float* q, int64_t D,
                     float* S, int64_t ldS) {
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
        {  // prefetching past the block (or the tensor) is harmless: prefetches never fault
          const char* rp = v.row(b, h, m0 + j + 16);
          for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(rp + off, _MM_HINT_T0);
        }
        const T* row = reinterpret_cast<const T*>(v.row(b, h, m0 + j));
        for (int64_t c = 0; c < nch; ++c) {
          const int64_t nd = std::min<int64_t>(16, D - c * 16);
          const __mmask16 dm = (__mmask16)((nd == 16) ? 0xFFFF : ((1u << nd) - 1u));
          const __m512 kc = load16<T>(row + c * 16, dm);
#pragma GCC unroll 8
          for (int n = 0; n < NQ; ++n) acc[n] = _mm512_fmadd_ps(_mm512_load_ps(q + n * Dq + c * 16), kc, acc[n]);
        }
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
  for (int64_t j0 = 0; j0 < cdiv(cnt, 16) * 16; ++j0) {
    for (int n = 0; n < NQ; ++n) {
      float acc = 0.f;
      if (j0 < cnt) {
        const T* row = reinterpret_cast<const T*>(v.row(b, h, m0 + j0));
        for (int64_t d = 0; d < D; ++d) acc += q[n * Dq + d] * to_f32(row[d]);
      }
      S[n * ldS + j0] = acc;
    }
  }
#endif
}

template <typename T>
void direct_scores_n(int nq, const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, const float* q,
                     int64_t D, float* S, int64_t ldS) {
  switch (nq) {
    case 1: return direct_scores_t<T, 1>(v, b, h, m0, cnt, q, D, S, ldS);
    case 2: return direct_scores_t<T, 2>(v, b, h, m0, cnt, q, D, S, ldS);
    case 3: return direct_scores_t<T, 3>(v, b, h, m0, cnt, q, D, S, ldS);
    case 4: return direct_scores_t<T, 4>(v, b, h, m0, cnt, q, D, S, ldS);
    case 5: return direct_scores_t<T, 5>(v, b, h, m0, cnt, q, D, S, ldS);
    case 6: return direct_scores_t<T, 6>(v, b, h, m0, cnt, q, D, S, ldS);
    case 7: return direct_scores_t<T, 7>(v, b, h, m0, cnt, q, D, S, ldS);
    case 8: return direct_scores_t<T, 8>(v, b, h, m0, cnt, q, D, S, ldS);
    default: TORCH_CHECK(false, "direct_scores: bad row count ", nq);
  }
}

void direct_scores(int nq, const MemView& v, int64_t b, int64_t h, int64_t m0, int64_t cnt, const float* q, int64_t D,
                   float* S, int64_t ldS) {
  switch (v.dtype) {
    case at::kFloat: return direct_scores_n<float>(nq, v, b, h, m0, cnt, q, D, S, ldS);
    case at::kBFloat16: return direct_scores_n<c10::BFloat16>(nq, v, b, h, m0, cnt, q, D, S, ldS);
    case at::kHalf: return direct_scores_n<c10::Half>(nq, v, b, h, m0, cnt, q, D, S, ldS);
    default: TORCH_CHECK(false, "unsupported memory dtype ", v.dtype);
  }
}

// Copies rows [0, rows) of q ([rows][D]) into [rows][cdiv(D, 16) * 16] with zero padding.
void pad_queries(const float* q, int64_t rows, int64_t D, float* out) {
  const int64_t Dq = cdiv(D, 16) * 16;
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(q + r * D, q + (r + 1) * D, out + r * Dq);
    std::fill(out + r * Dq + D, out + (r + 1) * Dq, 0.f);
  }
}

// ------------------------------------------------------------------------------------------
// Top-k bookkeeping. Order: (score desc, index asc). Each row owns a reservoir of candidates
// (append-only, SIMD compress): a slot is appended when its score beats the row's threshold
// (before the first compaction: any non-NaN score). When the reservoir is nearly full it is
// compacted to the exact top-k of everything seen so far and the threshold becomes the k-th best
// score. Slots arrive in increasing index order, so a later slot whose score equals the threshold
// loses the tie and may be dropped: the comparison is strict.
FOT_INLINE bool worse(float sa, int64_t ia, float sb, int64_t ib) { return sa < sb || (sa == sb && ia > ib); }

struct Entry {
  float s;
  int32_t i;
};
FOT_INLINE bool better_entry(const Entry& a, const Entry& b) { return worse(b.s, b.i, a.s, a.i); }

struct RowRes {
  float* s;      // [cap] scores
  int32_t* i;    // [cap] slot indices
  int32_t cnt;   // entries held
  int32_t full;  // 1 once the row holds k entries that define thr
  float thr;     // k-th best score when full
};

#ifndef FOT_CAPMUL
#define FOT_CAPMUL 2
#endif
inline int64_t reservoir_cap(int64_t k) { return FOT_CAPMUL * k + 32; }

// Keeps the best min(k, cnt) entries (unordered unless `sorted`), updates thr/full.
struct CompactScratch {
  std::vector<Entry> entries;
  std::vector<float> a, b, c;
  std::vector<int32_t> ties;
};

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
      const __mmask16 tail = (__mmask16)(n - j >= 16 ? 0xFFFF : ((1u << (n - j)) - 1u));
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
    if (kk == k) {
      rr.full = 1;
      rr.thr = tmp[kk - 1].s;
    }
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
    const __mmask16 tail = (__mmask16)(n - j >= 16 ? 0xFFFF : ((1u << (n - j)) - 1u));
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
  rr.full = 1;
  rr.thr = t;
}

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
  for (int64_t d = 0; d < D; ++d) {
    const __m512 b0 = _mm512_load_ps(P + d * NR);
    const __m512 b1 = _mm512_load_ps(P + d * NR + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(Q[d * MR + r]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
  const __mmask16 v0 = (__mmask16)(vbits & 0xFFFFu), v1 = (__mmask16)(vbits >> 16);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    RowRes& rr = rows[r];
    __mmask16 m0, m1;
    if (rr.full) {
      const __m512 t = _mm512_set1_ps(rr.thr);
      m0 = _mm512_mask_cmp_ps_mask(v0, c0[r], t, _CMP_GT_OQ);
      m1 = _mm512_mask_cmp_ps_mask(v1, c1[r], t, _CMP_GT_OQ);
    } else {  // every non-NaN score (including -inf) is a candidate
      m0 = _mm512_mask_cmp_ps_mask(v0, c0[r], c0[r], _CMP_ORD_Q);
      m1 = _mm512_mask_cmp_ps_mask(v1, c1[r], c1[r], _CMP_ORD_Q);
    }
    if (__builtin_expect((m0 | m1) != 0, 0)) {
      if (rr.cnt > cap - 32) {
        compact(rr, k, tmp, false);
        const __m512 t = _mm512_set1_ps(rr.thr);
        m0 = _mm512_mask_cmp_ps_mask(m0, c0[r], t, _CMP_GT_OQ);
        m1 = _mm512_mask_cmp_ps_mask(m1, c1[r], t, _CMP_GT_OQ);
      }
      const __m512i iota = _mm512_add_epi32(_mm512_set1_epi32(slot0),
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
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
      if (std::isnan(sc) || (rr.full && !(sc > rr.thr))) continue;
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

template <int R>
void knn_tile_fn(int64_t D, const float* Q, const float* P, uint32_t vbits, int32_t slot0, RowRes* rows, int64_t k,
                 CompactScratch& tmp) {
  knn_tile<R>(D, Q, P, vbits, slot0, rows, k, tmp);
}
using KnnFn = void (*)(int64_t, const float*, const float*, uint32_t, int32_t, RowRes*, int64_t, CompactScratch&);
const KnnFn kKnn[MR + 1] = {nullptr,         knn_tile_fn<1>,  knn_tile_fn<2>,  knn_tile_fn<3>,  knn_tile_fn<4>,
                            knn_tile_fn<5>,  knn_tile_fn<6>,  knn_tile_fn<7>,  knn_tile_fn<8>,  knn_tile_fn<9>,
                            knn_tile_fn<10>, knn_tile_fn<11>, knn_tile_fn<12>, knn_tile_fn<13>, knn_tile_fn<14>};

// Appends the candidates among S[0:cnt] (cnt rounded up to 16 is readable) of one row; slot j has
// index slot0 + j and validity bit j of bits.
void select_from_scores(RowRes& rr, const float* S, int64_t cnt, const uint32_t* bits, int32_t slot0, int64_t k,
                        CompactScratch& tmp) {
  const int64_t cap = reservoir_cap(k);
#if FOT_AVX512
  for (int64_t j0 = 0; j0 < cnt; j0 += 16) {
    const __mmask16 vm = (__mmask16)(bits[j0 >> 5] >> (j0 & 31));
    if (!vm) continue;
    const __m512 x = _mm512_loadu_ps(S + j0);
    __mmask16 m = rr.full ? _mm512_mask_cmp_ps_mask(vm, x, _mm512_set1_ps(rr.thr), _CMP_GT_OQ)
                          : _mm512_mask_cmp_ps_mask(vm, x, x, _CMP_ORD_Q);
    if (__builtin_expect(m != 0, 0)) {
      if (rr.cnt > cap - 32) {
        compact(rr, k, tmp, false);
        m = _mm512_mask_cmp_ps_mask(m, x, _mm512_set1_ps(rr.thr), _CMP_GT_OQ);
      }
      const __m512i iota = _mm512_add_epi32(_mm512_set1_epi32(slot0 + (int32_t)j0),
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      _mm512_storeu_ps(rr.s + rr.cnt, _mm512_maskz_compress_ps(m, x));
      _mm512_storeu_si512(rr.i + rr.cnt, _mm512_maskz_compress_epi32(m, iota));
      rr.cnt += __builtin_popcount((unsigned)m);
    }
  }
#else
  for (int64_t j = 0; j < cnt; ++j) {
    if (!((bits[j >> 5] >> (j & 31)) & 1u)) continue;
    const float sc = S[j];
    if (std::isnan(sc) || (rr.full && !(sc > rr.thr))) continue;
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

// ------------------------------------------------------------------------------------------
// Stream path (few rows per work item, kDirectMax < nrows <= kStreamMax): no per-block transpose
// of the keys. Queries are packed transposed, Qt [Dq][W] with W = NG*16 (rows in lanes, zero
// padded). Chunks of KB key rows are converted to fp32 into an L1 buffer [nch][KB][16] (a plain
// row copy/convert, 16 d per vector) and the kernel broadcasts key elements against the query
// vectors: acc[i][g] (lanes = 16 rows) = <q[g*16 + lane], key[i]>. The resulting [KB][W] score
// tile has rows in lanes, so knn compares it directly against a vector of row thresholds; flash
// transposes it 16x16 into the row-major score block.
constexpr int kDirectMax = kSmallN;  // direct path up to here (measured faster than the stream path)
constexpr int kStreamMax = 64;

// Keys per register tile for NG row groups: KB * NG accumulators + NG query vectors <= 32 zmm
// (KB <= 16: the tile's validity bits and the key buffer [nch][KB][16] are sized for it; NG=1 with
// 8 or 16 keys measured alike, 24 spills).
template <int NG>
constexpr int stream_kb() { return NG == 1 ? 16 : NG == 2 ? 12 : NG == 3 ? 8 : 6; }

// rows [0, rows) of q ([rows][D]) -> Qt [Dq][NG*16], zero padded.
void pack_queries_t(const float* q, int64_t rows, int64_t D, int NG, float* out) {
  const int64_t Dq = cdiv(std::max<int64_t>(D, 1), 16) * 16;
  const int64_t W = NG * 16;
  std::fill(out, out + Dq * W, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) out[d * W + r] = q[r * D + d];
}

// Slots [m, m + KB) (only the first cnt are read; the rest are zero) -> buf [nch][KB][16].
template <typename T, int KB>
FOT_INLINE void stream_convert(const MemView& v, int64_t b, int64_t h, int64_t m, int64_t cnt, int64_t D,
                               float* buf) {
  const int64_t nch = cdiv(std::max<int64_t>(D, 1), 16);
#if FOT_AVX512
  const int64_t row_bytes = D * (int64_t)sizeof(T);
  for (int i = 0; i < KB; ++i) {
    if (i < cnt) {
      {  // prefetches never fault: running past the block (or the tensor) is harmless
        const char* rp = v.row(b, h, m + i + 3 * KB);
        for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(rp + off, _MM_HINT_T0);
      }
      const T* row = reinterpret_cast<const T*>(v.row(b, h, m + i));
      for (int64_t c = 0; c < nch; ++c) {
        const int64_t nd = std::min<int64_t>(16, D - c * 16);
        const __mmask16 dm = (__mmask16)((nd == 16) ? 0xFFFF : ((1u << nd) - 1u));
        _mm512_store_ps(buf + (c * KB + i) * 16, load16<T>(row + c * 16, dm));
      }
    } else {
      for (int64_t c = 0; c < nch; ++c) _mm512_store_ps(buf + (c * KB + i) * 16, _mm512_setzero_ps());
    }
  }
#else
  for (int i = 0; i < KB; ++i) {
    const T* row = i < cnt ? reinterpret_cast<const T*>(v.row(b, h, m + i)) : nullptr;
    for (int64_t d = 0; d < nch * 16; ++d)
      buf[((d >> 4) * KB + i) * 16 + (d & 15)] = (row && d < D) ? to_f32(row[d]) : 0.f;
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

// Per-row thresholds in lane layout for the knn stream path.
struct StreamThr {
  alignas(64) float thr[kStreamMax];  // rr.thr when full, +inf otherwise (never passes GT)
  uint16_t rowmask[kStreamMax / 16];  // rows that exist
  uint16_t notfull[kStreamMax / 16];  // rows not yet full: every non-NaN score is a candidate
  void init(int64_t nrows) {
    for (int r = 0; r < kStreamMax; ++r) thr[r] = std::numeric_limits<float>::infinity();
    for (int g = 0; g < kStreamMax / 16; ++g) {
      const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, nrows - g * 16));
      rowmask[g] = (uint16_t)(n == 16 ? 0xFFFFu : ((1u << n) - 1u));
      notfull[g] = rowmask[g];
    }
  }
  void update(int r, const RowRes& rr) {
    if (rr.full) {
      thr[r] = rr.thr;
      notfull[r >> 4] &= (uint16_t)~(1u << (r & 15));
    }
  }
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
      const __m512 x = _mm512_load_ps(s);
      uint32_t m = _mm512_mask_cmp_ps_mask(st.rowmask[g], x, _mm512_load_ps(st.thr + g * 16), _CMP_GT_OQ);
      if (st.notfull[g]) m |= _mm512_mask_cmp_ps_mask(st.notfull[g], x, x, _CMP_ORD_Q);
#else
      uint32_t m = 0;
      for (int l = 0; l < 16; ++l) {
        if (!((st.rowmask[g] >> l) & 1u)) continue;
        const bool nf = (st.notfull[g] >> l) & 1u;
        if (nf ? !std::isnan(s[l]) : s[l] > st.thr[g * 16 + l]) m |= 1u << l;
      }
#endif
      while (__builtin_expect(m != 0, 0)) {
        const int l = __builtin_ctz(m);
        m &= m - 1;
        const int r = g * 16 + l;
        const float sc = s[l];
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

// Chunk bits [j0, j0 + n) of a block's validity words (bits has one readable word past the end).
FOT_INLINE uint32_t chunk_bits(const uint32_t* bits, int64_t j0, int64_t n) {
  const uint64_t w = (uint64_t)bits[j0 >> 5] | ((uint64_t)bits[(j0 >> 5) + 1] << 32);
  return (uint32_t)(w >> (j0 & 31)) & (uint32_t)((1ull << n) - 1ull);
}

struct StreamBufs {
  float* kbuf;  // [nch][16][16]
  float* St;    // [16][64] (knn) or [C + 16][W] (flash)
};

template <typename T, int NG>
void knn_stream_block_t(const MemView& v, int64_t b, int64_t h, int64_t mb, int64_t cnt, const uint32_t* bits,
                        int64_t D, const float* Qt, StreamBufs bf, StreamThr& st, RowRes* rows, int64_t k,
                        CompactScratch& tmp) {
  constexpr int KB = stream_kb<NG>();
  const int64_t nch = cdiv(std::max<int64_t>(D, 1), 16);
  for (int64_t j0 = 0; j0 < cnt; j0 += KB) {
    const int64_t n = std::min<int64_t>(KB, cnt - j0);
    const uint32_t kb = chunk_bits(bits, j0, n);
    if (!kb) continue;
    stream_convert<T, KB>(v, b, h, mb + j0, n, D, bf.kbuf);
    stream_tile<NG, KB>(nch, Qt, bf.kbuf, bf.St);
    stream_select<NG, KB>(bf.St, kb, (int32_t)(mb + j0), st, rows, k, tmp);
  }
}

template <typename T>
void knn_stream_block_n(int NG, const MemView& v, int64_t b, int64_t h, int64_t mb, int64_t cnt, const uint32_t* bits,
                        int64_t D, const float* Qt, StreamBufs bf, StreamThr& st, RowRes* rows, int64_t k,
                        CompactScratch& tmp) {
  switch (NG) {
    case 1: return knn_stream_block_t<T, 1>(v, b, h, mb, cnt, bits, D, Qt, bf, st, rows, k, tmp);
    case 2: return knn_stream_block_t<T, 2>(v, b, h, mb, cnt, bits, D, Qt, bf, st, rows, k, tmp);
    case 3: return knn_stream_block_t<T, 3>(v, b, h, mb, cnt, bits, D, Qt, bf, st, rows, k, tmp);
    case 4: return knn_stream_block_t<T, 4>(v, b, h, mb, cnt, bits, D, Qt, bf, st, rows, k, tmp);
    default: TORCH_CHECK(false, "knn_stream_block: bad group count ", NG);
  }
}

void knn_stream_block(int NG, const MemView& v, int64_t b, int64_t h, int64_t mb, int64_t cnt, const uint32_t* bits,
                      int64_t D, const float* Qt, StreamBufs bf, StreamThr& st, RowRes* rows, int64_t k,
                      CompactScratch& tmp) {
  switch (v.dtype) {
    case at::kFloat: return knn_stream_block_n<float>(NG, v, b, h, mb, cnt, bits, D, Qt, bf, st, rows, k, tmp);
    case at::kBFloat16:
      return knn_stream_block_n<c10::BFloat16>(NG, v, b, h, mb, cnt, bits, D, Qt, bf, st, rows, k, tmp);
    case at::kHalf: return knn_stream_block_n<c10::Half>(NG, v, b, h, mb, cnt, bits, D, Qt, bf, st, rows, k, tmp);
    default: TORCH_CHECK(false, "unsupported memory dtype ", v.dtype);
  }
}

// Flash: scores of the first `cnt` slots of a block (validity bits as in knn) into S [nrows][ldS]
// (row-major, columns rounded up to 16 are written; skipped chunks leave stale values, which the
// validity masks of softmax_step exclude). Stm: [ldS + 16][W] scratch.
template <typename T, int NG>
void flash_stream_scores_t(const MemView& v, int64_t b, int64_t h, int64_t mb, int64_t cnt, const uint32_t* bits,
                           int64_t D, const float* Qt, int64_t nrows, float* kbuf, float* Stm, float* S, int64_t ldS) {
  constexpr int KB = stream_kb<NG>();
  constexpr int W = NG * 16;
  const int64_t nch = cdiv(std::max<int64_t>(D, 1), 16);
  for (int64_t j0 = 0; j0 < cnt; j0 += KB) {
    const int64_t n = std::min<int64_t>(KB, cnt - j0);
    if (!chunk_bits(bits, j0, n)) continue;
    stream_convert<T, KB>(v, b, h, mb + j0, n, D, kbuf);
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

template <typename T>
void flash_stream_scores_n(int NG, const MemView& v, int64_t b, int64_t h, int64_t mb, int64_t cnt,
                           const uint32_t* bits, int64_t D, const float* Qt, int64_t nrows, float* kbuf, float* Stm,
                           float* S, int64_t ldS) {
  switch (NG) {
    case 1: return flash_stream_scores_t<T, 1>(v, b, h, mb, cnt, bits, D, Qt, nrows, kbuf, Stm, S, ldS);
    case 2: return flash_stream_scores_t<T, 2>(v, b, h, mb, cnt, bits, D, Qt, nrows, kbuf, Stm, S, ldS);
    case 3: return flash_stream_scores_t<T, 3>(v, b, h, mb, cnt, bits, D, Qt, nrows, kbuf, Stm, S, ldS);
    case 4: return flash_stream_scores_t<T, 4>(v, b, h, mb, cnt, bits, D, Qt, nrows, kbuf, Stm, S, ldS);
    default: TORCH_CHECK(false, "flash_stream_scores: bad group count ", NG);
  }
}

void flash_stream_scores(int NG, const MemView& v, int64_t b, int64_t h, int64_t mb, int64_t cnt, const uint32_t* bits,
                         int64_t D, const float* Qt, int64_t nrows, float* kbuf, float* Stm, float* S, int64_t ldS) {
  switch (v.dtype) {
    case at::kFloat: return flash_stream_scores_n<float>(NG, v, b, h, mb, cnt, bits, D, Qt, nrows, kbuf, Stm, S, ldS);
    case at::kBFloat16:
      return flash_stream_scores_n<c10::BFloat16>(NG, v, b, h, mb, cnt, bits, D, Qt, nrows, kbuf, Stm, S, ldS);
    case at::kHalf:
      return flash_stream_scores_n<c10::Half>(NG, v, b, h, mb, cnt, bits, D, Qt, nrows, kbuf, Stm, S, ldS);
    default: TORCH_CHECK(false, "unsupported memory dtype ", v.dtype);
  }
}

// ------------------------------------------------------------------------------------------
// Work plan: items = BH * row_chunks * splits, chosen so that every thread gets the same amount
// of work when possible (row chunks first, memory splits when there are too few rows).
struct Plan {
  int64_t row_chunks = 1, splits = 1, rows_per_chunk = 0, slots_per_split = 0;
};

Plan make_plan(int64_t BH, int64_t N, int64_t M, int64_t min_rows, int64_t min_slots) {
  Plan p;
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  if (BH % T != 0 && T > 1) {
    const int64_t want = T;  // BH * T items divide evenly among T threads
    p.row_chunks = std::max<int64_t>(1, std::min<int64_t>(want, N / std::max<int64_t>(1, min_rows)));
    if (p.row_chunks < want) {
      const int64_t s = cdiv(want, p.row_chunks);
      p.splits = std::max<int64_t>(1, std::min<int64_t>(s, M / std::max<int64_t>(1, min_slots)));
    }
  }
  p.rows_per_chunk = std::max<int64_t>(1, cdiv(N, p.row_chunks));
  p.row_chunks = std::max<int64_t>(1, cdiv(N, p.rows_per_chunk));
  p.slots_per_split = std::max<int64_t>(1, cdiv(M, p.splits));
  p.slots_per_split = cdiv(p.slots_per_split, NR) * NR;
  p.splits = std::max<int64_t>(1, cdiv(M, p.slots_per_split));
  return p;
}

// ------------------------------------------------------------------------------------------
// Exp (AVX-512): Cephes-style range reduction + degree-5 polynomial, scalef for 2^n.
#if FOT_AVX512
FOT_INLINE __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7228f));
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

// One online-softmax step for one row over `cnt` raw scores S[0:cnt] (cnt multiple of 16 on the
// AVX-512 path; entries past the row's candidates must be excluded by the masks).
// Candidate j: validity bit, j <= lim_rel, score not NaN. Writes P = exp(scale*s - m_new) (0 for
// non-candidates) in place, updates m, l and returns alpha = exp(m_old - m_new) (1 when m stays -inf).
FOT_INLINE float softmax_step(float* S, int64_t cnt, const uint32_t* bits, int64_t lim_rel, float scale, float& m,
                              float& l) {
#if FOT_AVX512
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 vninf = _mm512_set1_ps(kNegInf);
  __m512 vmax = vninf;
  for (int64_t c = 0; c < cnt; c += 16) {
    __mmask16 cand = (__mmask16)(bits[c >> 5] >> (c & 31));
    const int64_t rem = lim_rel - c + 1;
    if (rem < 16) cand &= (__mmask16)(rem <= 0 ? 0u : ((1u << rem) - 1u));
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(S + c), vscale);
    cand &= _mm512_cmp_ps_mask(x, x, _CMP_ORD_Q);
    x = _mm512_mask_blend_ps(cand, vninf, x);
    _mm512_storeu_ps(S + c, x);
    vmax = _mm512_max_ps(vmax, x);
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
    const __mmask16 cand = _mm512_cmp_ps_mask(x, vninf, _CMP_NEQ_OQ);
    const __m512 p = _mm512_maskz_mov_ps(cand, exp512(_mm512_sub_ps(x, vm)));
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
    float x = S[c] * scale;
    if (!ok || std::isnan(x)) x = kNegInf;
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

// ------------------------------------------------------------------------------------------
void check_query_mem(const at::Tensor& query, const at::Tensor& mem, const char* mem_name) {
  CHECK_CPU(query);
  CHECK_DIM(query, 4);
  TORCH_CHECK(query.scalar_type() == at::kFloat, "query must be float32, got ", query.scalar_type());
  TORCH_CHECK(mem.device().is_cpu(), mem_name, " must be a CPU tensor, got ", mem.device());
  TORCH_CHECK(mem.dim() == 4, mem_name, " must have 4 dims, got shape ", mem.sizes());
  TORCH_CHECK(mem.scalar_type() == at::kFloat || mem.scalar_type() == at::kBFloat16 ||
                  mem.scalar_type() == at::kHalf,
              mem_name, " must be float32, bfloat16 or float16, got ", mem.scalar_type());
  TORCH_CHECK(mem.size(0) == query.size(0) && mem.size(1) == query.size(1) && mem.size(3) == query.size(3),
              mem_name, " must have shape [B, Hkv, M, D] matching query ", query.sizes(), ", got ", mem.sizes());
  TORCH_CHECK(mem.size(3) == 0 || mem.stride(3) == 1, mem_name, " must have stride(-1) == 1, got strides ",
              mem.strides());
}

Validity make_validity(const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& mask, int64_t B,
                       int64_t M, at::Tensor& lengths_keep) {
  Validity v;
  v.M = M;
  if (lengths.has_value() && lengths->defined()) {
    const at::Tensor& mem_lengths = *lengths;
    CHECK_CPU(mem_lengths);
    CHECK_SHAPE(mem_lengths, B);
    TORCH_CHECK(at::isIntegralType(mem_lengths.scalar_type(), /*includeBool=*/false),
                "mem_lengths must be an integer tensor, got ", mem_lengths.scalar_type());
    lengths_keep = mem_lengths.to(at::kLong).contiguous();
    v.lengths = lengths_keep.data_ptr<int64_t>();
  }
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& mem_mask = *mask;
    CHECK_CPU(mem_mask);
    CHECK_SHAPE(mem_mask, B, M);
    TORCH_CHECK(mem_mask.scalar_type() == at::kBool, "mem_mask must be bool, got ", mem_mask.scalar_type());
    v.mask = mem_mask.data_ptr<bool>();
    v.mask_sb = mem_mask.stride(0);
    v.mask_sm = mem_mask.stride(1);
  }
  return v;
}

// ------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> knn_scan(const at::Tensor& query_in, const at::Tensor& mem_keys,
                                            const c10::optional<at::Tensor>& mem_lengths,
                                            const c10::optional<at::Tensor>& mem_mask, int64_t k) {
  check_query_mem(query_in, mem_keys, "mem_keys");
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(mem_keys.size(2) < (int64_t(1) << 31) - 64, "mem_keys: M must be < 2^31, got ", mem_keys.size(2));
  const at::Tensor query = query_in.contiguous();
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  const int64_t M = mem_keys.size(2);
  at::Tensor lengths_keep;
  const Validity val = make_validity(mem_lengths, mem_mask, B, M, lengths_keep);
  at::Tensor scores = at::empty({B, H, N, k}, query.options());
  at::Tensor indices = at::empty({B, H, N, k}, query.options().dtype(at::kLong));
  if (B * H * N == 0) return {scores, indices};
  const MemView kv = make_view(mem_keys);
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
  const int64_t items = BH * plan.row_chunks * plan.splits;
  const int64_t cap = reservoir_cap(k);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
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
      const int64_t sp_i = it % plan.splits;
      const int64_t rc = (it / plan.splits) % plan.row_chunks;
      const int64_t bh = it / (plan.splits * plan.row_chunks);
      const int64_t b = bh / H, h = bh % H;
      const int64_t n0 = rc * plan.rows_per_chunk, n1 = std::min(N, n0 + plan.rows_per_chunk);
      const int64_t len = val.effective_len(b);
      const int64_t m0 = sp_i * plan.slots_per_split;
      const int64_t m1 = std::min(len, m0 + plan.slots_per_split);
      const int64_t nrows = n1 - n0;
      const int64_t stride = cap + 16;  // slack for full-vector compress stores
      float* rs = rs_buf.get<float>(nrows * stride);
      int32_t* ri = ri_buf.get<int32_t>(nrows * stride);
      rows.resize(nrows);
      for (int64_t r = 0; r < nrows; ++r) rows[r] = RowRes{rs + r * stride, ri + r * stride, 0, 0, kNegInf};
      const bool small = nrows <= kDirectMax;
      const bool stream = !small && nrows <= kStreamMax;
      const int NG = (int)cdiv(nrows, 16);
      float* q = qbuf.get<float>(std::max(std::max(cdiv(nrows, MR) * MR * D, nrows * cdiv(D, 16) * 16),
                                          cdiv(std::max<int64_t>(D, 1), 16) * 16 * kStreamMax));
      if (small) {
        pad_queries(qp + (bh * N + n0) * D, nrows, D, q);
      } else if (stream) {
        pack_queries_t(qp + (bh * N + n0) * D, nrows, D, NG, q);
        sthr.init(nrows);
      } else {
        pack_queries(qp + (bh * N + n0) * D, nrows, D, q);
      }
      for (int64_t mb = m0; mb < m1; mb += kKnnBlock) {
        const int64_t cnt = std::min(kKnnBlock, m1 - mb);
        const int64_t npan = cdiv(cnt, NR);
        val.fill_bits(b, mb, cnt, bits);
        if (stream) {
          knn_stream_block(NG, kv, b, h, mb, cnt, bits, D, q, sbf, sthr, rows.data(), k, tmp);
          continue;
        }
        if (small) {
          bool any = false;
          for (int64_t w = 0; w < npan; ++w) any |= bits[w] != 0;
          if (!any) continue;
          direct_scores((int)nrows, kv, b, h, mb, cnt, q, D, panels, kKnnBlock);
          for (int64_t r = 0; r < nrows; ++r)
            select_from_scores(rows[r], panels + r * kKnnBlock, cnt, bits, (int32_t)mb, k, tmp);
          continue;
        }
        pack_panels(kv, b, h, mb, cnt, D, panels);
        for (int64_t r0 = 0; r0 < nrows; r0 += MR) {
          const int R = (int)std::min<int64_t>(MR, nrows - r0);
          const KnnFn fn = kKnn[R];
          for (int64_t p = 0; p < npan; ++p) {
            if (!bits[p]) continue;
            fn(D, q + r0 * D, panels + p * D * NR, bits[p], (int32_t)(mb + p * NR), rows.data() + r0, k, tmp);
          }
        }
      }
      for (int64_t r = 0; r < nrows; ++r) {
        RowRes& rr = rows[r];
        compact(rr, k, tmp, /*sorted=*/plan.splits == 1);
        float* so;
        int64_t* io;
        if (plan.splits == 1) {
          so = sp + (bh * N + n0 + r) * k;
          io = ip + (bh * N + n0 + r) * k;
        } else {
          const int64_t off = (bh * plan.splits + sp_i) * N + n0 + r;
          so = part_s.data() + off * k;
          io = part_i.data() + off * k;
          part_c[off] = rr.cnt;
        }
        for (int64_t j = 0; j < k; ++j) {
          so[j] = j < rr.cnt ? rr.s[j] : kNegInf;
          io[j] = j < rr.cnt ? (int64_t)rr.i[j] : -1;
        }
      }
    }
  });
  if (plan.splits > 1) {
    at::parallel_for(0, BH * N, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> ts;
      std::vector<int64_t> ti;
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bh = row / N, n = row % N;
        ts.clear();
        ti.clear();
        for (int64_t s = 0; s < plan.splits; ++s) {
          const int64_t off = ((bh * plan.splits + s) * N + n);
          const int64_t c = part_c[off];
          ts.insert(ts.end(), part_s.begin() + off * k, part_s.begin() + off * k + c);
          ti.insert(ti.end(), part_i.begin() + off * k, part_i.begin() + off * k + c);
        }
        // keep the best k of the union, sorted
        std::vector<std::pair<float, int64_t>> e(ts.size());
        for (size_t j = 0; j < ts.size(); ++j) e[j] = {ts[j], ti[j]};
        const size_t kk = std::min<size_t>(k, e.size());
        auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& c) {
          return worse(c.first, c.second, a.first, a.second);
        };
        std::partial_sort(e.begin(), e.begin() + kk, e.end(), better);
        float* so = sp + row * k;
        int64_t* io = ip + row * k;
        for (int64_t j = 0; j < k; ++j) {
          if ((size_t)j < kk) {
            so[j] = e[j].first;
            io[j] = e[j].second;
          } else {
            so[j] = kNegInf;
            io[j] = -1;
          }
        }
      }
    });
  }
  return {scores, indices};
}

// ------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> flash_scan(const at::Tensor& query_in, const at::Tensor& keys,
                                              const at::Tensor& values, const c10::optional<at::Tensor>& mem_lengths,
                                              const c10::optional<at::Tensor>& mem_mask, double scale_d,
                                              int64_t causal_lq) {
  check_query_mem(query_in, keys, "keys");
  check_query_mem(query_in, values, "values");
  TORCH_CHECK(values.size(2) == keys.size(2), "values must have the same number of slots as keys: keys ",
              keys.sizes(), ", values ", values.sizes());
  TORCH_CHECK(causal_lq >= 0, "causal_lq must be >= 0, got ", causal_lq);
  const at::Tensor query = query_in.contiguous();
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  const int64_t M = keys.size(2);
  if (causal_lq > 0)
    TORCH_CHECK(N % causal_lq == 0, "query rows N=", N, " must be a multiple of causal_lq=", causal_lq);
  const float scale = (float)scale_d;
  at::Tensor lengths_keep;
  const Validity val = make_validity(mem_lengths, mem_mask, B, M, lengths_keep);
  at::Tensor out = at::empty({B, H, N, D}, query.options());
  at::Tensor lse = at::empty({B, H, N}, query.options());
  if (B * H * N == 0) return {out, lse};
  const int64_t Dp = cdiv(std::max<int64_t>(D, 1), NR) * NR;
  const MemView kv = make_view(keys), vv = make_view(values);
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
  const int64_t items = BH * plan.row_chunks * plan.splits;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Scratch kbuf, vbuf, sbuf, obuf, bbuf, qbuf;
    float* kp = kbuf.get<float>(C * std::max<int64_t>(D, 1));
    float* vs = vbuf.get<float>(C * Dp);
    float* S = sbuf.get<float>(std::max<int64_t>(MR, kStreamMax) * C);
    uint32_t* bits = bbuf.get<uint32_t>(C / 32 + 2);
    Scratch skb_buf, stm_buf;
    float* skb = skb_buf.get<float>(cdiv(std::max<int64_t>(D, 1), 16) * 16 * 16);
    float* Stm = stm_buf.get<float>((C + 16) * kStreamMax);
    std::vector<float> mrow, lrow, alpha(MR);
    std::vector<int64_t> lim;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t sp_i = it % plan.splits;
      const int64_t rc = (it / plan.splits) % plan.row_chunks;
      const int64_t bh = it / (plan.splits * plan.row_chunks);
      const int64_t b = bh / H, h = bh % H;
      const int64_t n0 = rc * plan.rows_per_chunk, n1 = std::min(N, n0 + plan.rows_per_chunk);
      const int64_t nrows = n1 - n0;
      const int64_t len = val.effective_len(b);
      const int64_t m0 = sp_i * plan.slots_per_split;
      const int64_t m1 = std::min(len, m0 + plan.slots_per_split);
      float* O = obuf.get<float>(nrows * Dp);
      std::fill(O, O + nrows * Dp, 0.f);
      mrow.assign(nrows, kNegInf);
      lrow.assign(nrows, 0.f);
      lim.resize(nrows);
      int64_t lim_max = std::numeric_limits<int64_t>::max();
      if (causal_lq > 0) {
        lim_max = std::numeric_limits<int64_t>::min();
        for (int64_t r = 0; r < nrows; ++r) {
          lim[r] = (n0 + r) % causal_lq + M - causal_lq;
          lim_max = std::max(lim_max, lim[r]);
        }
      } else {
        for (int64_t r = 0; r < nrows; ++r) lim[r] = std::numeric_limits<int64_t>::max() / 2;
      }
      const bool small = nrows <= kDirectMax;
      const bool stream = !small && nrows <= kStreamMax;
      const int NG = (int)cdiv(nrows, 16);
      float* q = qbuf.get<float>(std::max(std::max(cdiv(nrows, MR) * MR * D, nrows * cdiv(D, 16) * 16),
                                          cdiv(std::max<int64_t>(D, 1), 16) * 16 * kStreamMax));
      if (small) {
        pad_queries(qp + (bh * N + n0) * D, nrows, D, q);
      } else if (stream) {
        pack_queries_t(qp + (bh * N + n0) * D, nrows, D, NG, q);
      } else {
        pack_queries(qp + (bh * N + n0) * D, nrows, D, q);
      }
      for (int64_t mb = m0; mb < m1 && mb <= lim_max; mb += C) {
        const int64_t cnt = std::min(C, m1 - mb);
        const int64_t cntp = cdiv(cnt, NR) * NR;
        val.fill_bits(b, mb, cnt, bits);
        bool any = false;
        for (int64_t w = 0; w < cntp / 32; ++w) any |= bits[w] != 0;
        if (!any) continue;
        if (stream) {
          const int64_t used_all =
              causal_lq > 0 ? std::min(cntp, cdiv(std::max<int64_t>(0, lim_max - mb + 1), NR) * NR) : cntp;
          flash_stream_scores(NG, kv, b, h, mb, std::min(cnt, used_all), bits, D, q, nrows, skb, Stm, S, C);
        } else if (!small) {
          pack_panels(kv, b, h, mb, cnt, D, kp);
        }
        convert_rows(vv, b, h, mb, cnt, cntp, D, Dp, bits, vs);
        for (int64_t r0 = 0; r0 < nrows; r0 += MR) {
          const int R = (int)std::min<int64_t>(MR, nrows - r0);
          int64_t tl = std::numeric_limits<int64_t>::min();
          for (int r = 0; r < R; ++r) tl = std::max(tl, lim[r0 + r]);
          const int64_t used = std::min(cntp, cdiv(std::max<int64_t>(0, tl - mb + 1), NR) * NR);
          if (used <= 0) continue;
          const GemmFn fq = kGemmQ[R], fp = kGemmP[R];
          float* const St = stream ? S + r0 * C : S;
          if (stream) {
            // scores of all rows were computed above
          } else if (small) {
            direct_scores(R, kv, b, h, mb, std::min(cnt, used), q, D, S, C);
          } else {
            for (int64_t p = 0; p < used / NR; ++p) fq(D, q + r0 * D, kp + p * D * NR, NR, S + p * NR, C, nullptr);
          }
          bool live = false;
          for (int r = 0; r < R; ++r) {
            alpha[r] = softmax_step(St + r * C, used, bits, lim[r0 + r] - mb, scale, mrow[r0 + r], lrow[r0 + r]);
            live |= mrow[r0 + r] != kNegInf;
          }
          if (!live) continue;
          for (int64_t j = 0; j < Dp; j += NR) fp(used, St, vs + j, Dp, O + r0 * Dp + j, Dp, alpha.data());
        }
      }
      for (int64_t r = 0; r < nrows; ++r) {
        const int64_t n = n0 + r;
        if (plan.splits == 1) {
          float* o = op + (bh * N + n) * D;
          if (mrow[r] == kNegInf || !(lrow[r] > 0.f)) {
            std::fill(o, o + D, 0.f);
            lp[bh * N + n] = kNegInf;
          } else {
            const float inv = 1.f / lrow[r];
            for (int64_t d = 0; d < D; ++d) o[d] = O[r * Dp + d] * inv;
            lp[bh * N + n] = mrow[r] + std::log(lrow[r]);
          }
        } else {
          const int64_t off = (bh * plan.splits + sp_i) * N + n;
          std::copy(O + r * Dp, O + (r + 1) * Dp, part_o.data() + off * Dp);
          part_m[off] = mrow[r];
          part_l[off] = lrow[r];
        }
      }
    }
  });
  if (plan.splits > 1) {
    at::parallel_for(0, BH * N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bh = row / N, n = row % N;
        float mx = kNegInf;
        for (int64_t s = 0; s < plan.splits; ++s) mx = std::max(mx, part_m[(bh * plan.splits + s) * N + n]);
        float* o = op + row * D;
        std::fill(o, o + D, 0.f);
        if (mx == kNegInf) {
          lp[row] = kNegInf;
          continue;
        }
        float l = 0.f;
        for (int64_t s = 0; s < plan.splits; ++s) {
          const int64_t off = (bh * plan.splits + s) * N + n;
          if (part_m[off] == kNegInf) continue;
          const float w = std::exp(part_m[off] - mx);
          l += part_l[off] * w;
          const float* po = part_o.data() + off * Dp;
          for (int64_t d = 0; d < D; ++d) o[d] += w * po[d];
        }
        if (!(l > 0.f)) {
          std::fill(o, o + D, 0.f);
          lp[row] = kNegInf;
          continue;
        }
        const float inv = 1.f / l;
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        lp[row] = mx + std::log(l);
      }
    });
  }
  return {out, lse};
}

// ------------------------------------------------------------------------------------------
template <typename T>
FOT_INLINE void axpy_row(float w, const T* v, float* acc, int64_t D) {
#if FOT_AVX512
  const __m512 vw = _mm512_set1_ps(w);
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    const int64_t nd = std::min<int64_t>(16, D - d0);
    const __mmask16 dm = (__mmask16)((nd == 16) ? 0xFFFF : ((1u << nd) - 1u));
    const __m512 a = _mm512_maskz_loadu_ps(dm, acc + d0);
    _mm512_mask_storeu_ps(acc + d0, dm, _mm512_fmadd_ps(vw, load16<T>(v + d0, dm), a));
  }
#else
  for (int64_t d = 0; d < D; ++d) acc[d] += w * to_f32(v[d]);
#endif
}

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
      const bool ok = ix[j] >= 0 && !std::isnan(x);
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

std::tuple<at::Tensor, at::Tensor> gather_attention(const at::Tensor& scores_in, const at::Tensor& indices_in,
                                                    const at::Tensor& values, double scale_d) {
  CHECK_CPU(scores_in);
  CHECK_CPU(indices_in);
  CHECK_CPU(values);
  CHECK_DIM(scores_in, 4);
  CHECK_DIM(values, 4);
  TORCH_CHECK(scores_in.scalar_type() == at::kFloat, "scores must be float32, got ", scores_in.scalar_type());
  TORCH_CHECK(indices_in.scalar_type() == at::kLong, "indices must be int64, got ", indices_in.scalar_type());
  CHECK_MEM_DTYPE(values);
  const int64_t B = scores_in.size(0), H = scores_in.size(1), N = scores_in.size(2), k = scores_in.size(3);
  CHECK_SHAPE(indices_in, B, H, N, k);
  TORCH_CHECK(values.size(0) == B && values.size(1) == H, "values must have shape [B, Hkv, M, D] with B=", B,
              ", Hkv=", H, ", got ", values.sizes());
  TORCH_CHECK(values.size(3) == 0 || values.stride(3) == 1, "values must have stride(-1) == 1, got strides ",
              values.strides());
  const int64_t M = values.size(2), D = values.size(3);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  at::Tensor out = at::empty({B, H, N, D}, scores.options());
  at::Tensor lse = at::empty({B, H, N}, scores.options());
  if (B * H * N == 0) return {out, lse};
  const MemView vv = make_view(values);
  const float scale = (float)scale_d;
  const float* sp = scores.data_ptr<float>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, B * H * N, 8, [&](int64_t begin, int64_t end) {
    bool local_bad = false;
    switch (vv.dtype) {
      case at::kFloat: gather_rows<float>(sp, ip, vv, H, N, M, k, D, scale, op, lp, begin, end, local_bad); break;
      case at::kBFloat16:
        gather_rows<c10::BFloat16>(sp, ip, vv, H, N, M, k, D, scale, op, lp, begin, end, local_bad);
        break;
      case at::kHalf: gather_rows<c10::Half>(sp, ip, vv, H, N, M, k, D, scale, op, lp, begin, end, local_bad); break;
      default: break;
    }
    if (local_bad) bad = true;
  });
  TORCH_CHECK(!bad.load(), "indices must be < M=", M, " (or -1 for padding)");
  return {out, lse};
}

}  // namespace

int64_t simd_level() { return FOT_AVX512 ? 512 : 0; }

}  // namespace fot_cpu

TORCH_LIBRARY(fot_cpu, m) {
  m.def("knn_scan(Tensor query, Tensor mem_keys, Tensor? mem_lengths, Tensor? mem_mask, int k) -> (Tensor, Tensor)");
  m.def(
      "flash_scan(Tensor query, Tensor keys, Tensor values, Tensor? mem_lengths, Tensor? mem_mask, float scale, "
      "int causal_lq) -> (Tensor, Tensor)");
  m.def("gather_attention(Tensor scores, Tensor indices, Tensor values, float scale) -> (Tensor, Tensor)");
  // 512 when the AVX-512 kernels were compiled in, 0 for the portable fallback.
  m.def("simd_level() -> int", &fot_cpu::simd_level);
}

TORCH_LIBRARY_IMPL(fot_cpu, CPU, m) {
  m.impl("knn_scan", &fot_cpu::knn_scan);
  m.impl("flash_scan", &fot_cpu::flash_scan);
  m.impl("gather_attention", &fot_cpu::gather_attention);
}
