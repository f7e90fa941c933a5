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

// ------------------------------------------------------------------------------- backward
// FlashAttention-2 backward of flash_scan (backward.cu): query rows [B*H, N, D] contiguous (TQ:
// float32, or the memory's fp16/bf16 dtype when tc), d_out fp32 [B*H, N, D], lse and
// delta = rowsum(dO * O) - dlse fp32 [B*H, N], keys/values [B, H, M, D] with the forward's
// validity and causal mask. P = exp(scale * q.k - lse) is recomputed with the forward's drop rules
// (invalid or masked slots, causally hidden keys, keys or query rows with a non-finite element,
// non-finite scores, rows whose lse is -inf: P = 0, and nothing of theirs is read). Two kernels,
// no atomics: dq per row tile (looping over the key tiles), dk/dv per key tile (looping over the
// row tiles; every stacked query head of the kv head is a row). dq fp32 [B*H, N, D]; dk/dv
// contiguous [B, H, M, D] in the memory dtype (fp32 accumulation), or not written (nullptr).
struct FlashBwdParams {
  const void* q;
  const float* d_out;
  const float* lse;
  const float* delta;
  MemRef keys, values;
  const int64_t* lengths;  // [B] or nullptr
  const bool* mask;        // [B, M] contiguous or nullptr
  int B, H, N, D;
  int64_t M;
  int64_t causal_lq;
  float scale;
  DType dtype;  // memory dtype
  bool tc;      // query rows in the memory's fp16/bf16 dtype (else fp32 rows)
  int q_vec, do_vec, k_vec, v_vec;  // widest vector loads allowed (vec_bytes in bindings.cpp)
  float* dq;
  void* dk;  // nullptr: need_dkv false
  void* dv;
  // plan: the dq kernel's row tile x key tile, the dk/dv kernel's row tile x key tile, bytes of
  // dynamic shared memory of each
  int dq_bm, dq_bn, kv_bm, kv_bn;
  size_t dq_smem, kv_smem;
};

bool flash_backward_plan(FlashBwdParams& p, const DeviceLimits& lim, const char** why);
cudaError_t flash_scan_backward_launch(const FlashBwdParams& p, cudaStream_t stream);

// Backward of gather_attention over the forward's selection indices [B*H, N, k] (-1 padding;
// indices outside [0, M) are skipped): the selected keys are re-scored exactly (fp32 products of
// the stored values), a non-finite score drops the entry. The dq kernel (one warp per row) writes
// dq and, when dk/dv are wanted, each entry's P and dS to `p_ent` / `ds_ent` [B*H*N*k]. The dk/dv
// kernel (one warp per memory slot) sums the entries of its slot in the order of `order`, the
// stable sort of the entries by flattened slot id `sorted_ids` ((b*H + h)*M + index; entries
// skipped above carry B*H*M and sort last): deterministic, no atomics; unselected slots get 0.
struct GatherBwdParams {
  const void* q;
  const int64_t* indices;
  MemRef keys, values;
  const float* d_out;
  const float* lse;
  const float* delta;
  int B, H, N, D, k;
  int64_t M;
  float scale;
  DType dtype;
  bool tc;
  float* dq;
  float* p_ent;  // nullptr: need_dkv false
  float* ds_ent;
  const int64_t* sorted_ids;
  const int64_t* order;
  int64_t entries;  // B*H*N*k
  void* dk;
  void* dv;
};

cudaError_t gather_attention_backward_launch(const GatherBwdParams& p, cudaStream_t stream);

}  // namespace fot_cuda
