// CUDA emulator, device side: what csrc/cuda's kernels use from CUDA, as host C++. Threads are
// fibers (runtime.cpp); every barrier and warp collective is a scheduling point, checked for
// convergence; WMMA fragments hold the whole 16x16 tile in every lane. See README.md.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// __shared__ declarations are rewritten by __init__.py (translate): dynamic ones to the block's
// dynamic shared memory, static ones to block-scoped storage (fot_emu::static_smem).

struct uint3 {
  unsigned x, y, z;
};
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------ intrinsics
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }

template <typename T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) fot_emu::fault("misaligned __ldg (vector load)");
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

inline void __syncthreads() { fot_emu::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  fot_emu::warp_collective(fot_emu::Op::SyncWarp, mask, 0, 0, "__syncwarp");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return (unsigned)fot_emu::warp_collective(fot_emu::Op::Ballot, mask, pred ? 1 : 0, 0, "__ballot_sync");
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a 1..8-byte value");
  if (width != 32) fot_emu::fault("__shfl_xor_sync width != 32 is not emulated");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = fot_emu::warp_collective(fot_emu::Op::ShflXor, mask, bits, lane_mask, "__shfl_xor_sync");
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// -------------------------------------------------------------------- cp.async (pipeline)
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align, size_t zfill = 0) {
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16) {
    fot_emu::fault("__pipeline_memcpy_async size must be 4, 8 or 16");
  } else if (reinterpret_cast<uintptr_t>(dst) % size_and_align != 0 ||
             reinterpret_cast<uintptr_t>(src) % size_and_align != 0) {
    fot_emu::fault("__pipeline_memcpy_async pointers not aligned to the copy size");
  } else if (zfill > size_and_align) {
    fot_emu::fault("__pipeline_memcpy_async zfill larger than the copy");
  }
  fot_emu::async_copy(dst, src, size_and_align, zfill);
}
inline void __pipeline_commit() { fot_emu::async_commit(); }
inline void __pipeline_wait_prior(size_t n) { fot_emu::async_wait_prior(n); }

// ------------------------------------------------------------------------- 16-bit floats
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return (float)f;
}
inline __half __float2half_rn(float x) {
  const _Float16 f = (_Float16)x;  // round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((unsigned)b.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  unsigned u = __float_as_uint(x);
  if (std::isnan(x)) {
    u = (u >> 16) | 0x40u;  // quiet NaN, sign kept
  } else {
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  }
  return __nv_bfloat16{(uint16_t)u};
}

// ------------------------------------------------------------------------------------ WMMA
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Each lane holds 8 of the 256 elements (lane l: row-major elements 8l .. 8l + 7 of A: M x K,
// B: K x N or the accumulator: M x N), so a lane that skips a load or store leaves part of the
// tile undone, as on the GPU. mma_sync computes the product once per warp from all lanes' parts.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator models the 16x16x16 shape only");
  float v[8];
};

namespace detail {
inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
inline int lane() { return (int)(threadIdx.x % 32); }

// WMMA's documented requirements: a 256-bit aligned pointer, ldm a multiple of 16 bytes; the
// warp must be converged (the call is warp-synchronous).
template <typename T>
inline void enter(const void* p, unsigned ldm, int kind, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) fot_emu::fault("wmma pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) fot_emu::fault("wmma ldm not a multiple of 16 bytes");
  fot_emu::warp_collective(fot_emu::Op::Wmma, 0xffffffffu, 0, kind, what);
}

template <typename T, typename F>
inline void load(F& f, const T* p, unsigned ldm, bool row_major) {
  for (int i = 0; i < 8; ++i) {
    const int e = lane() * 8 + i, r = e / 16, c = e % 16;
    f.v[i] = to_f(row_major ? p[r * ldm + c] : p[c * ldm + r]);
  }
}

struct MmaArgs {
  float* d;
  const float *a, *b, *c;
};
inline void mma_warp(void* const* lane_args, int lanes) {
  float A[256], B[256], C[256];
  for (int l = 0; l < lanes; ++l) {
    const auto* m = static_cast<const MmaArgs*>(lane_args[l]);
    for (int i = 0; i < 8; ++i) {
      A[l * 8 + i] = m->a[i];
      B[l * 8 + i] = m->b[i];
      C[l * 8 + i] = m->c[i];
    }
  }
  for (int l = 0; l < lanes; ++l) {
    auto* m = static_cast<MmaArgs*>(lane_args[l]);
    for (int i = 0; i < 8; ++i) {
      const int e = l * 8 + i, r = e / 16, col = e % 16;
      float acc = C[e];
      for (int k = 0; k < 16; ++k) acc = fmaf(A[r * 16 + k], B[k * 16 + col], acc);
      m->d[i] = acc;
    }
  }
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout");
  detail::enter<T>(p, ldm, 0, "wmma::load_matrix_sync");
  detail::load(f, p, ldm, std::is_same<Layout, row_major>::value);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::enter<float>(p, ldm, 0, "wmma::load_matrix_sync");
  detail::load(f, p, ldm, layout == mem_row_major);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::enter<float>(p, ldm, 1, "wmma::store_matrix_sync");
  for (int i = 0; i < 8; ++i) {
    const int e = detail::lane() * 8 + i, r = e / 16, c = e % 16;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[i];
  }
}

template <typename T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float x) {
  for (float& e : f.v) e = x;
}

// d = a @ b + c with exact products and fp32 accumulation in k order. The tensor cores' fp32
// accumulation differs (order, truncation): a few ulp, so tests compare with tolerances.
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(!std::is_same<T, float>::value, "fp32 WMMA (tf32) is not used by csrc/cuda");
  float out[8];
  detail::MmaArgs args{out, a.v, b.v, c.v};
  fot_emu::warp_call(detail::mma_warp, &args, "wmma::mma_sync");
  std::memcpy(d.v, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda

// ---------------------------------------------------------------------------------- launch
namespace fot_emu {
// `kernel<<<grid, block, smem, stream>>>(args)` is rewritten by __init__.py to
// `::fot_emu::launcher(kernel, "kernel", grid, block, smem, stream)(args)`.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<typename std::decay<P>::type...> params(std::forward<A>(args)...);  // by value, as CUDA
    auto* k = kernel;
    launch(reinterpret_cast<const void*>(k), name, grid, block, smem, [&] { std::apply(k, params); });
  }
};
template <typename... P>
Launch<P...> launcher(void (*kernel)(P...), const char* name, dim3 grid, dim3 block, size_t smem = 0,
                      cudaStream_t = nullptr) {
  return Launch<P...>{kernel, name, grid, block, smem};
}
}  // namespace fot_emu
