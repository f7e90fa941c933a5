// Entry points of the CPU kernels, called by ops.cpp after its checks. Tensors are validated and
// allocated by the caller: query [B, Hkv, N, D] float32 contiguous; memory views [B, Hkv, M, D]
// (float32 / bfloat16 / float16, stride(-1) == 1); outputs contiguous float32 / int64.
#pragma once

#include "common.h"

namespace fot_cpu {

// Top-k slots of each query row by inner product -> scores/indices [B, Hkv, N, k].
void knn_scan_kernel(const at::Tensor& query, const MemView& keys, const Validity& val, int64_t k,
                     at::Tensor& scores, at::Tensor& indices);

// Online-softmax attention of each row over the valid keys -> out [B, Hkv, N, D], lse [B, Hkv, N].
void flash_scan_kernel(const at::Tensor& query, const MemView& keys, const MemView& values, const Validity& val,
                       float scale, int64_t causal_lq, at::Tensor& out, at::Tensor& lse);

// Softmax over the selected slots of a knn_scan -> out [B, Hkv, N, D], lse [B, Hkv, N]. Returns
// false when an index is >= M (the rows holding one are garbage: the caller raises).
bool gather_attention_kernel(const at::Tensor& scores, const at::Tensor& indices, const MemView& values, int64_t M,
                             float scale, at::Tensor& out, at::Tensor& lse);

// FlashAttention-2 backward of flash_scan (query rows float32, d_out [B, Hkv, N, D], lse / delta
// [B, Hkv, N] float32, contiguous) -> dq [B, Hkv, N, D] float32 and, when dk / dv are given,
// dk / dv [B, Hkv, M, D] contiguous in the keys' / values' dtypes (every element written).
void flash_scan_backward_kernel(const at::Tensor& query, const MemView& keys, const MemView& values,
                                const at::Tensor& d_out, const at::Tensor& lse, const at::Tensor& delta,
                                const Validity& val, float scale, int64_t causal_lq, at::Tensor& dq, at::Tensor* dk,
                                at::Tensor* dv);

// Backward of gather_attention over the selection indices [B, Hkv, N, k] (same tensors as
// flash_scan_backward_kernel). Returns false when an index is >= M (the caller raises).
bool gather_attention_backward_kernel(const at::Tensor& query, const at::Tensor& indices, const MemView& keys,
                                      const MemView& values, const at::Tensor& d_out, const at::Tensor& lse,
                                      const at::Tensor& delta, int64_t M, float scale, at::Tensor& dq,
                                      at::Tensor* dk, at::Tensor* dv);

}  // namespace fot_cpu
