// Device helpers shared by the fot_cuda kernels: element conversion, tile loads, the score tile
// (tensor cores via WMMA for fp16/bf16, exact fp32 FMA otherwise), packed top-k keys and the
// warp-level sorted-list merge. The math and invariants are in csrc/cuda/README.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "fot_cuda.h"

namespace fot_cuda {

constexpr int kThreads = 256;  // every tile kernel: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// Scratch budget of the memory split: partial results of every (row, split) pair
// (rows * splits * k * 8 bytes of kNN lists, rows * splits * (D + 1) * 4 bytes of attention
// partials) stay under it, whatever Lq and M, at some loss of parallelism for short memories.
constexpr int64_t kSplitScratchBytes = 4 << 20;

__host__ __device__ inline int round_up(int x, int a) { return (x + a - 1) / a * a; }
__host__ __device__ inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
__host__ __device__ inline int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ------------------------------------------------------------------------ plans and launches
// Smallest power-of-two row tile in [16, 64] that holds all N rows: the first one a plan tries.
inline int first_row_tile(int N) {
  int bm = 16;
  while (bm < 64 && bm < N) bm *= 2;
  return bm;
}

// Picks the largest tiles whose layout fits the device's opt-in shared memory: bn from `bns`
// (largest first), for each bm from first_row_tile(N) down to 16; smem_of(bm, bn) is a layout's
// size in bytes. Sets p.bm, p.bn, p.smem; false if none fits.
template <typename F>
bool pick_tiles(ScanParams& p, const DeviceLimits& lim, std::initializer_list<int> bns, F smem_of) {
  for (int bn : bns) {
    for (int bm = first_row_tile(p.N); bm >= 16; bm /= 2) {
      const size_t smem = smem_of(bm, bn);
      if (smem <= (size_t)lim.smem_optin) {
        p.bm = bm;
        p.bn = bn;
        p.smem = smem;
        return true;
      }
    }
  }
  return false;
}

// Cuts the memory into splits so that about 4 blocks per SM are in flight, each scanning >= 8
// tiles of `bn` slots, with the partial results (scratch_per_row_split bytes per row and split)
// within kSplitScratchBytes.
inline void plan_splits(ScanParams& p, const DeviceLimits& lim, int bn, int64_t scratch_per_row_split) {
  const int64_t rows = (int64_t)p.B * p.H * p.N;
  const int64_t base = cdiv64(p.N, p.bm) * p.B * p.H;
  const int64_t tiles = cdiv64(p.M > 1 ? p.M : 1, bn);
  int64_t splits = cdiv64(4LL * lim.num_sms, base > 1 ? base : 1);
  splits = min64(min64(splits, tiles / 8), min64(256, kSplitScratchBytes / (rows * scratch_per_row_split)));
  splits = max64(1, splits);
  p.split_len = cdiv64(tiles, splits) * bn;
  p.splits = (int)max64(1, cdiv64(p.M, p.split_len));
}

// Calls launch(TK(), std::integral_constant<bool, TC>()) for the memory dtype TK and the
// tensor-core flag TC (fp16/bf16 only).
template <typename F>
cudaError_t dispatch_dtype(DType dtype, bool tc, F&& launch) {
  switch (dtype) {
    case DType::kFloat16:
      return tc ? launch(__half(), std::true_type()) : launch(__half(), std::false_type());
    case DType::kBFloat16:
      return tc ? launch(__nv_bfloat16(), std::true_type()) : launch(__nv_bfloat16(), std::false_type());
    default:
      return launch(float(), std::false_type());
  }
}

// A tile kernel over grid (row tiles, B*H, splits), kThreads threads, p.smem bytes of dynamic
// shared memory (opted in above the 48 KB default).
template <typename P>
cudaError_t launch_tiles(void (*kernel)(P), const P& p, cudaStream_t stream) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)p.smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((unsigned)cdiv64(p.N, p.bm), (unsigned)(p.B * p.H), (unsigned)p.splits);
  kernel<<<grid, kThreads, p.smem, stream>>>(p);
  return cudaGetLastError();
}

// A block's place: rows [row0, row0 + rows) of query row block bh = (b, h), memory slots
// [m_begin, m_end) of its split (clipped to the batch row's length).
struct TileCoords {
  int row0, rows, bh, b, h;
  int64_t m_begin, m_end;
};

__device__ __forceinline__ TileCoords tile_coords(const ScanParams& p) {
  TileCoords t;
  t.row0 = blockIdx.x * p.bm;
  t.rows = min(p.bm, p.N - t.row0);
  t.bh = blockIdx.y;
  t.b = t.bh / p.H;
  t.h = t.bh - t.b * p.H;
  int64_t len = p.M;
  if (p.lengths != nullptr) len = max64(0, min64(p.M, p.lengths[t.b]));
  t.m_begin = (int64_t)blockIdx.z * p.split_len;
  t.m_end = min64(len, t.m_begin + p.split_len);
  return t;
}

// ------------------------------------------------------------------------------ conversion
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename TDST, typename TSRC>
__device__ __forceinline__ TDST convert(TSRC x) {
  if constexpr (std::is_same<TDST, TSRC>::value) {
    return x;
  } else {
    return from_float<TDST>(to_float<TSRC>(x));
  }
}

// ------------------------------------------------------------------------------ tile loads
template <int VB>
struct VecOf;
template <>
struct VecOf<16> {
  using type = uint4;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<4> {
  using type = unsigned int;
};

// dst[r * ld + d] for r < rows_total, d < Dp: element (r, d) of the source rows (row stride
// `stride` elements) when r < rows_valid and d < D (and keep_row[r], if given), else 0.
// keep_row zeroes the value rows of invalid memory slots, so that they never meet a zero weight
// as NaN * 0. Loads are VB-byte vectors (the host checked that D, the strides and the base allow
// them: vec_bytes in bindings.cpp).
template <typename TDST, typename TSRC, int VB>
__device__ __forceinline__ void load_tile_vec(TDST* dst, int ld, const TSRC* src, int64_t stride, int rows_valid,
                                              int rows_total, int D, int Dp, const uint8_t* keep_row) {
  using Vec = typename VecOf<VB>::type;
  constexpr int V = VB / (int)sizeof(TSRC);
  const int cpr = Dp / V;  // Dp is a multiple of 16 >= V
  for (int e = threadIdx.x; e < rows_total * cpr; e += kThreads) {
    const int r = e / cpr, d0 = (e - r * cpr) * V;
    Vec raw;
    memset(&raw, 0, sizeof(raw));
    if (r < rows_valid && d0 < D && (keep_row == nullptr || keep_row[r])) {
      raw = __ldg(reinterpret_cast<const Vec*>(src + r * stride + d0));
    }
    const TSRC* v = reinterpret_cast<const TSRC*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) dst[r * ld + d0 + i] = convert<TDST, TSRC>(v[i]);
  }
}

template <typename TDST, typename TSRC>
__device__ __forceinline__ void load_tile(TDST* dst, int ld, const TSRC* src, int64_t stride, int rows_valid,
                                          int rows_total, int D, int Dp, int vec_bytes, const uint8_t* keep_row) {
  if (vec_bytes == 16) {
    load_tile_vec<TDST, TSRC, 16>(dst, ld, src, stride, rows_valid, rows_total, D, Dp, keep_row);
  } else if (vec_bytes == 8) {
    load_tile_vec<TDST, TSRC, 8>(dst, ld, src, stride, rows_valid, rows_total, D, Dp, keep_row);
  } else if (vec_bytes == 4 && sizeof(TSRC) < 4) {
    load_tile_vec<TDST, TSRC, 4>(dst, ld, src, stride, rows_valid, rows_total, D, Dp, keep_row);
  } else {
    for (int e = threadIdx.x; e < rows_total * Dp; e += kThreads) {
      const int r = e / Dp, d = e - r * Dp;
      TDST x = from_float<TDST>(0.f);
      if (r < rows_valid && d < D && (keep_row == nullptr || keep_row[r])) x = convert<TDST, TSRC>(src[r * stride + d]);
      dst[r * ld + d] = x;
    }
  }
}

// The same tile (dst and src of one 16-bit type, VB-byte vector loads allowed, VB >= 4) through
// cp.async: the valid elements are copied asynchronously in the calling thread's current pipeline
// group, the rest are zero-stored at once; keep_row (bool per row, from global memory, or nullptr)
// as in load_tile. The caller commits the group (__pipeline_commit), waits for it
// (__pipeline_wait_prior) and then __syncthreads before any thread reads the tile.
template <typename T, int VB>
__device__ __forceinline__ void load_tile_async_vec(T* dst, int ld, const T* src, int64_t stride, int rows_valid,
                                                    int rows_total, int D, int Dp, const bool* keep_row) {
  constexpr int V = VB / (int)sizeof(T);
  const int cpr = Dp / V;
  for (int e = threadIdx.x; e < rows_total * cpr; e += kThreads) {
    const int r = e / cpr, d0 = (e - r * cpr) * V;
    T* d = dst + r * ld + d0;
    if (r < rows_valid && d0 < D && (keep_row == nullptr || keep_row[r])) {
      __pipeline_memcpy_async(d, src + r * stride + d0, VB);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) d[i] = from_float<T>(0.f);
    }
  }
}

template <typename T>
__device__ __forceinline__ void load_tile_async(T* dst, int ld, const T* src, int64_t stride, int rows_valid,
                                                int rows_total, int D, int Dp, int vec_bytes, const bool* keep_row) {
  if (vec_bytes == 16) {
    load_tile_async_vec<T, 16>(dst, ld, src, stride, rows_valid, rows_total, D, Dp, keep_row);
  } else if (vec_bytes == 8) {
    load_tile_async_vec<T, 8>(dst, ld, src, stride, rows_valid, rows_total, D, Dp, keep_row);
  } else {
    load_tile_async_vec<T, 4>(dst, ld, src, stride, rows_valid, rows_total, D, Dp, keep_row);
  }
}

// ------------------------------------------------------------------------------ score tile
// s[r * lds + c] = <q row r, k row c> for r < BM, c < BN, fp32 accumulation.
// TC: q/k are fp16/bf16 [rows][ld] (ld = Dp + 8), WMMA 16x16x16 per warp fragment.
// SIMT: q/k are fp32 (ld = Dp + 1, odd: conflict-free column reads), each thread a 4x4 micro tile
// of rows ty + 16 i and columns tx + 16 j: the exact fp32 dot product of the (upcast) inputs.
template <typename TS, bool TC>
__device__ __forceinline__ void score_tile(const TS* q, int ldq, const TS* k, int ldk, float* s, int lds, int BM,
                                           int BN, int D, int Dp) {
  if constexpr (TC) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int ncol = BN / 16, nfrag = (BM / 16) * ncol;
    for (int f = warp; f < nfrag; f += kWarps) {
      const int fr = f / ncol, fc = f - fr * ncol;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < Dp; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, TS, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TS, wmma::col_major> b;
        wmma::load_matrix_sync(a, q + fr * 16 * ldq + kk, ldq);
        wmma::load_matrix_sync(b, k + fc * 16 * ldk + kk, ldk);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(s + fr * 16 * lds + fc * 16, acc, lds, wmma::mem_row_major);
    }
  } else {
    (void)Dp;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    // rows/cols past BM/BN read row 0 / col 0 (in range) and are never stored
    int qrow[4], kcol[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) qrow[i] = (ty + 16 * i < BM) ? (ty + 16 * i) * ldq : 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) kcol[j] = (tx + 16 * j < BN) ? (tx + 16 * j) * ldk : 0;
    for (int d = 0; d < D; ++d) {
      float qv[4], kv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) qv[i] = q[qrow[i] + d];
#pragma unroll
      for (int j = 0; j < 4; ++j) kv[j] = k[kcol[j] + d];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(qv[i], kv[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (ty + 16 * i < BM && tx + 16 * j < BN) s[(ty + 16 * i) * lds + tx + 16 * j] = acc[i][j];
  }
}

// ------------------------------------------------------------------------------ warp reductions
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// ------------------------------------------------------------------------------ packed keys
// key = ord32(score) << 32 | (0xFFFFFFFF - slot). ord32 is monotone from fp32 to uint32 (-0.0
// folded to +0.0), so unsigned key order is the contract's order: score descending, then lower
// slot first. Every real key is > 0 (ord32(-inf) = 0x007FFFFF), so 0 is the "empty" sentinel.
__device__ __forceinline__ uint64_t pack_key(float s, int64_t slot) {
  uint32_t u = __float_as_uint(s == 0.f ? 0.f : s);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(slot));
}

__device__ __forceinline__ void unpack_key(uint64_t key, float& s, int64_t& slot) {
  if (key == 0) {
    s = -INFINITY;
    slot = -1;
    return;
  }
  const uint32_t u = static_cast<uint32_t>(key >> 32);
  s = __uint_as_float((u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u);
  slot = static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key));
}

// number of entries > x among a[0, n), a sorted descending
__device__ __forceinline__ int count_greater(const uint64_t* a, int n, uint64_t x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] > x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Bitonic sort of a[0, N) descending by one warp (N a power of two, N/2 a multiple of 32).
template <int N>
__device__ __forceinline__ void warp_sort_desc(uint64_t* a, int lane) {
  static_assert((N & (N - 1)) == 0 && N >= 64, "N must be a power of two >= 64");
  for (int size = 2; size <= N; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = lane; t < N / 2; t += 32) {
        const int lo = 2 * stride * (t / stride) + (t % stride), hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const uint64_t x = a[lo], y = a[hi];
        if (desc ? (x < y) : (x > y)) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      __syncwarp();
    }
  }
}

// top[0, k) := the k largest of top[0, k) and other[0, n), sorted descending (both inputs sorted
// descending, zeros at their tails). Merge by rank: the new position of an element is its index
// in its own list plus the number of larger elements in the other list (keys are distinct, except
// zeros, which land behind every real key and only ever write zeros). One warp; every lane holds
// its elements in registers between the reads and the writes. k <= 32 * KT, n <= 32 * NT.
template <int KT, int NT>
__device__ __forceinline__ void warp_merge_into_top(uint64_t* top, int k, const uint64_t* other, int n, int lane) {
  uint64_t tv[KT], ov[NT];
  int tr[KT], orank[NT];
#pragma unroll
  for (int t = 0; t < KT; ++t) {
    const int i = lane + 32 * t;
    tv[t] = i < k ? top[i] : 0;
    tr[t] = i < k ? i + count_greater(other, n, tv[t]) : k;
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int j = lane + 32 * t;
    ov[t] = j < n ? other[j] : 0;
    orank[t] = (j < n && ov[t] != 0) ? j + count_greater(top, k, ov[t]) : k;
  }
  __syncwarp();
#pragma unroll
  for (int t = 0; t < KT; ++t)
    if (tr[t] < k) top[tr[t]] = tv[t];
#pragma unroll
  for (int t = 0; t < NT; ++t)
    if (orank[t] < k) top[orank[t]] = ov[t];
  __syncwarp();
}

}  // namespace fot_cuda
