// CUDA emulator self-test: small kernels with the bugs the emulator claims to catch (and one
// without), so that tests/test_cuda.py can check that every check can fail.
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

namespace {

constexpr int kN = 256;

// Correct: block sum through shared memory, barriers and warp shuffles.
__global__ void block_sum(const int* in, int* out) {
  __shared__ int part[kN / 32];
  int x = in[threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int w = 0; w < kN / 32; ++w) s += part[w];
    *out = s;
  }
}

__global__ void divergent_syncthreads(int* out) {
  if (threadIdx.x < kN / 2) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_shuffle(int* out) {
  int x = (int)threadIdx.x;
  if (threadIdx.x % 32 < 16) x = __shfl_xor_sync(0xffffffffu, x, 1);
  out[threadIdx.x] = x;
}

// Missing __syncthreads between the write and the neighbour's read: schedule-dependent.
__global__ void missing_barrier(int* out) {
  extern __shared__ int buf[];
  buf[threadIdx.x] = (int)threadIdx.x + 1;
  out[threadIdx.x] = buf[(threadIdx.x + 1) % kN];
}

__global__ void misaligned_wmma(float* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  const __half* tile = reinterpret_cast<const __half*>(smem) + 1;
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile, 16);
  out[threadIdx.x] = a.v[0];
}

__global__ void shared_overflow(int n) {
  extern __shared__ int buf[];
  if (threadIdx.x == 0) buf[n] = 0;  // n = elements of dynamic shared memory: one past the end
}

// Reads one element past the end of its input (global memory): only AddressSanitizer sees it.
__global__ void global_overflow(const int* in, int* out, int n) {
  if (threadIdx.x == 0) out[0] = in[n];
}

// Issues a cp.async copy and never waits for it.
__global__ void unwaited_async_copy(const int* in) {
  extern __shared__ __align__(16) int tile[];
  __pipeline_memcpy_async(tile + 4 * threadIdx.x, in + 4 * threadIdx.x, 16);
  __pipeline_commit();
}

// Reads static shared memory it never wrote: the emulator's garbage (0xFF bytes: -1 ints).
__global__ void unwritten_static_shared(int* out) {
  __shared__ int cache[32];
  out[threadIdx.x] = cache[threadIdx.x];
}

std::string last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace

// which: 0 correct kernel (checksum = its sum), 1 divergent __syncthreads, 2 divergent shuffle,
// 3 missing barrier (checksum of the schedule-dependent output), 4 misaligned WMMA, 5 shared
// memory overflow, 6 dynamic shared memory above the default without cudaFuncSetAttribute, 7 a
// global-memory read past the end of a heap buffer (reported by AddressSanitizer builds only), 8 a
// cp.async copy never waited for, 9 a read of unwritten static shared memory (checksum: the sum of
// what the 32 threads read).
std::string fot_emu_selftest(int which, int64_t* checksum) {
  std::vector<int> in(kN), out(kN, 0);
  std::vector<float> fout(kN, 0.f);
  for (int i = 0; i < kN; ++i) in[i] = 3 * i + 1;
  *checksum = 0;
  cudaGetLastError();
  switch (which) {
    case 0:
      block_sum<<<1, kN>>>(in.data(), out.data());
      *checksum = out[0];
      break;
    case 1:
      divergent_syncthreads<<<1, kN>>>(out.data());
      break;
    case 2:
      divergent_shuffle<<<1, kN>>>(out.data());
      break;
    case 3:
      missing_barrier<<<1, kN, kN * sizeof(int)>>>(out.data());
      for (int i = 0; i < kN; ++i) *checksum = *checksum * 31 + out[i];
      break;
    case 4:
      misaligned_wmma<<<1, 32, 1024>>>(fout.data());
      break;
    case 5:
      shared_overflow<<<1, kN, kN * sizeof(int)>>>(kN);
      break;
    case 6:
      block_sum<<<1, kN, 64 * 1024>>>(in.data(), out.data());
      break;
    case 7: {  // allocated as torch allocates CPU tensors (c10::alloc_cpu: posix_memalign, 64 B)
      void* small = nullptr;
      if (posix_memalign(&small, 64, 5 * sizeof(int)) != 0) return "posix_memalign failed";
      std::memset(small, 0, 5 * sizeof(int));
      global_overflow<<<1, 32>>>(static_cast<const int*>(small), out.data(), 5);
      free(small);
      break;
    }
    case 8:
      unwaited_async_copy<<<1, 32, 32 * 16>>>(in.data());
      break;
    case 9:
      unwritten_static_shared<<<2, 32>>>(out.data());
      for (int i = 0; i < 32; ++i) *checksum += out[i];
      break;
    default:
      return "unknown self-test";
  }
  return last_error();
}
