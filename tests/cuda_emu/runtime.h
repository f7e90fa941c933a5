// CUDA emulator, host side: the runtime API subset csrc/cuda uses, and the block scheduler that
// runs a kernel's threads as cooperative fibers on one CPU thread. See tests/cuda_emu/README.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

// ------------------------------------------------------------------------- runtime API subset
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The error message of the last failed call or launch (more detail than the real runtime gives:
// the failing check, thread and block).
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetLastError();
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t fot_emu_func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return fot_emu_func_set_attribute(reinterpret_cast<const void*>(func), attr, value);
}

namespace fot_emu {

// ----------------------------------------------------------------------------- configuration
// schedule: 0 forward (thread 0 runs first between barriers, blocks in grid order), 1 reverse,
// 2 seeded shuffle of both. A kernel whose result depends on it has a race.
struct Config {
  int num_sms = 132;                     // an H100 SXM
  int smem_optin = 227 * 1024;           // cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90
  int schedule = 0;
  uint64_t seed = 0;
};
Config& config();

// Launch statistics, for tests that check which code path ran.
struct Stats {
  int64_t launches = 0, blocks = 0, max_dynamic_smem = 0;
};
Stats& stats();

// --------------------------------------------------------------------- scheduler (device.h)
// Runs body() once per thread of every block; returns cudaSuccess or the error it recorded.
cudaError_t launch(const void* func, const char* name, dim3 grid, dim3 block, size_t dynamic_smem,
                   const std::function<void()>& body);

// Warp-collective operations, all lanes of the calling warp must reach the same one.
enum class Op : int { SyncWarp, ShflXor, Ballot, Wmma, Call };
uint64_t warp_collective(Op op, unsigned mask, uint64_t value, int param, const char* what);
// A warp-wide computation: once every lane has arrived, fn(args of lanes 0..n-1, n) runs once.
using WarpFn = void (*)(void* const* lane_args, int lanes);
void warp_call(WarpFn fn, void* arg, const char* what);
void sync_threads();
unsigned char* dynamic_smem();
// The block's storage for the static __shared__ array declared at `site` (0xFF-filled at every
// block start, like the garbage a GPU leaves in shared memory).
void* static_smem(const void* site, size_t bytes, size_t align);
// cp.async (cuda_pipeline.h): copies queue in the thread's open group; a commit closes it; a wait
// lands every group but the newest n. When they land otherwise depends on the schedule: at the
// wait (forward, the latest a GPU may), at once (reverse, the earliest) or either (shuffle), so
// that a read before the wait or a prefetch into a buffer still in use changes the results.
void async_copy(void* dst, const void* src, size_t bytes, size_t zfill);
void async_commit();
void async_wait_prior(size_t n);
// Records a device-side fault (the first one is reported by the launch); execution goes on.
void fault(const char* what);

}  // namespace fot_emu
