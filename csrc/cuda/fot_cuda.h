// fot_cuda: host-side interface between the torch bindings (bindings.cpp) and the kernels (*.cu).
//
// Plain C++ with no torch headers, so that the .cu files compile quickly and their warnings are
// ours alone. Tensors arrive as raw pointers plus element strides; the bindings check them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fot_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A [B, H, M, D] tensor with stride(-1) == 1; strides in elements.
struct MemRef {
  const void* ptr;
  int64_t sb, sh, sm;
};

// Device limits the launch plans need (read by the bindings per call, never at import).
struct DeviceLimits {
  int num_sms;
  int smem_optin;  // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
};

// ------------------------------------------------------------------------------- tile scans
// What the two tile kernels (knn_scan, flash_scan) share: query rows [B*H, N, D] contiguous, the
// memory's validity, and the launch plan: grid (row tiles of bm rows, B*H, splits), memory tiles
// of bn slots, the memory cut into `splits` ranges of split_len slots, `smem` bytes of dynamic
// shared memory per block.
struct ScanParams {
  const void* q;
  const int64_t* lengths;  // [B] or nullptr
  const bool* mask;        // [B, M] contiguous or nullptr
  int B, H, N, D;
  int64_t M;
  DType dtype;  // memory dtype
  bool tc;      // tensor cores: fp16/bf16 query and memory of the same dtype; else fp32 query rows
  int q_vec;    // widest vector load allowed for the query: 16, 8, 4 bytes, or 0 (scalar)
  // plan
  int bm, bn, splits;
  int64_t split_len;
  size_t smem;
};

// ---------------------------------------------------------------------------------- knn_scan
// The top k valid slots with a finite score (NaN / +-inf scores are dropped) per query row.
// Writes scores fp32 / indices int64 [B*H, N, k] directly (splits == 1), or sorted packed keys
// [B*H*N, splits, k] to `part` which the merge kernel folds into the outputs.
struct KnnParams : ScanParams {
  MemRef keys;
  int k;
  int k_vec;
  float* out_s;
  int64_t* out_i;
  uint64_t* part;
};

constexpr int kMaxK = 256;  // largest k served on chip

// Picks bm / splits / split_len / smem; returns false (with `why` set) if nothing fits.
bool knn_plan(KnnParams& p, const DeviceLimits& lim, const char** why);
cudaError_t knn_scan_launch(const KnnParams& p, cudaStream_t stream);

// ------------------------------------------------------------------------------ flash_scan
// Online-softmax attention of query rows [B*H, N, D] over keys/values [B, H, M, D] (same dtype),
// with memory validity (lengths/mask) and an optional bottom-right causal mask: causal_lq > 0
// means rows are G blocks of causal_lq queries and row n sees key j iff
// j <= n % causal_lq + M - causal_lq. Keys whose score is NaN / +-inf are dropped (their values,
// even inf / NaN, contribute nothing); a row left with no key gets out 0, lse -inf. Outputs out
// fp32 [B*H, N, D] (normalised) and the natural log-sum-exp fp32 [B*H, N]; splits > 1 writes
// partials [B*H*N, splits, D] / [B*H*N, splits] that flash_merge_kernel combines.
struct FlashParams : ScanParams {
  MemRef keys, values;
  int64_t causal_lq;
  float scale;  // softmax_scale: logits x = score * scale (natural-log units)
  int k_vec, v_vec;
  float* out;
  float* lse;
  float* part_o;
  float* part_lse;
};

bool flash_plan(FlashParams& p, const DeviceLimits& lim, const char** why);
cudaError_t flash_scan_launch(const FlashParams& p, cudaStream_t stream);

// ------------------------------------------------------------------------ gather_attention
// Softmax over the selected slots: scores fp32 / indices int64 [B*H, N, k] (-1 = none), values
// [B, H, M, D] -> out fp32 [B*H, N, D], lse fp32 [B*H, N]. Indices outside [0, M) and non-finite
// scores are skipped (their values never read).
struct GatherParams {
  const float* scores;
  const int64_t* indices;
  MemRef values;
  int B, H, N, D, k;
  int64_t M;
  float scale;  // softmax_scale
  DType dtype;
  float* out;
  float* lse;
};

cudaError_t gather_attention_launch(const GatherParams& p, cudaStream_t stream);

}  // namespace fot_cuda
