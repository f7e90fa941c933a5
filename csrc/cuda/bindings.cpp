// fot_cuda: input checks and launches of the CUDA kernels, registered as the CUDA implementations
// of the package's custom ops (schemas and fake kernels: fot_kernels/_library.py, the one place
// they are defined; this file only implements them):
//
//   fot::knn_scan(query, mem_keys, mem_lengths?, mem_mask?, k) -> (scores, indices)
//   fot::flash_scan(query, keys, values, mem_lengths?, mem_mask?, scale, causal_lq) -> (out, lse)
//   fot::gather_attention(scores, indices, values, scale) -> (out, lse)
//   fot::flash_scan_backward(query, keys, values, d_out, lse, delta, mem_lengths?, mem_mask?, scale,
//                            causal_lq, need_dkv) -> (dq, dk, dv)
//   fot::gather_attention_backward(query, indices, mem_keys, mem_values, d_out, lse, delta, scale,
//                                  need_dkv) -> (dq, dk, dv)
//
// Same semantics as the CPU kernels of those ops (csrc/cpu): query rows [B, Hkv, N, D]
// (N = G * Lq stacked query heads of one kv head), memory [B, Hkv, M, D] with stride(-1) == 1 and
// any other strides. Dtypes: memory float32 / float16 / bfloat16; the query is float32 (exact fp32
// products, SIMT) or the memory's own fp16/bf16 dtype (tensor cores). Outputs: scores float32 /
// indices int64 [B, Hkv, N, k]; out float32 [B, Hkv, N, D], lse float32 [B, Hkv, N].
//
// FOT_OPS_NAMESPACE / FOT_OPS_DISPATCH_KEY (default fot / CUDA) name the namespace and dispatch key
// the implementations are registered under. tests/cuda_emu, which compiles these sources as host
// C++ and runs the kernels on the CPU, sets them to fot_cuda_emu / CPU (its Python side defines
// that namespace's schemas with the same _library.ops) and defines FOT_CUDA_EMULATION: no device
// guard or stream, and every output filled with NaN / -7777 before the kernels run.
#ifndef FOT_CUDA_NO_PYTHON_MODULE  // defined only by tests/test_cuda_compile.py where Python.h is missing
#include <Python.h>
#endif

#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef FOT_CUDA_EMULATION
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "fot_cuda.h"

#ifdef FOT_CUDA_EMULATION
#define ON_KERNEL_DEVICE(x) (x).device().is_cpu()
#define DEVICE_GUARD(dev)
#define CURRENT_STREAM() cudaStream_t(nullptr)
#else
#define ON_KERNEL_DEVICE(x) (x).device().is_cuda()
#define DEVICE_GUARD(dev) const c10::cuda::CUDAGuard device_guard(dev)
#define CURRENT_STREAM() c10::cuda::getCurrentCUDAStream().stream()
#endif
#define CHECK_CUDA(x) TORCH_CHECK(ON_KERNEL_DEVICE(x), #x " must be a CUDA tensor, got ", (x).device())
#define CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dims, got shape ", (x).sizes())
#define CHECK_SHAPE(x, ...)                                                                       \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              ") = ", at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
#define CHECK_LAST_CONTIGUOUS(x) \
  TORCH_CHECK((x).size(-1) <= 1 || (x).stride(-1) == 1, #x " must have stride(-1) == 1, got strides ", (x).strides())
#define CHECK_SAME_DEVICE(x, ref) \
  TORCH_CHECK((x).device() == (ref).device(), #x " must be on " #ref "'s device ", (ref).device(), ", got ", (x).device())
#define CHECK_MEM_DTYPE(x)                                                                             \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||                 \
                  (x).scalar_type() == at::kHalf,                                                      \
              #x " must be float32, bfloat16 or float16, got ", (x).scalar_type())
#define CHECK_CUDA_OK(err, what) \
  TORCH_CHECK((err) == cudaSuccess, "fot_cuda: ", what, " failed: ", cudaGetErrorString(err))

namespace fot_cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

MemRef mem_ref(const at::Tensor& t) { return MemRef{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// The widest vector load (16, 8 or 4 bytes; 0: scalar) such that the head dim, every row stride
// and the base pointer are multiples of it.
int vec_bytes(const at::Tensor& t) {
  const int64_t esz = (int64_t)t.element_size();
  for (int64_t w : {16, 8, 4}) {
    if (w < esz || (t.size(-1) * esz) % w != 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % w != 0) continue;
    bool ok = true;
    for (int64_t d = 0; d + 1 < t.dim(); ++d)
      if (t.size(d) > 1 && (t.stride(d) * esz) % w != 0) ok = false;
    if (ok) return (int)w;
  }
  return 0;
}

DeviceLimits device_limits(const at::Tensor& t) {
  DeviceLimits lim{};
  const int dev = t.get_device();
  CHECK_CUDA_OK(cudaDeviceGetAttribute(&lim.num_sms, cudaDevAttrMultiProcessorCount, dev), "reading the SM count");
  CHECK_CUDA_OK(cudaDeviceGetAttribute(&lim.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                "reading the shared-memory limit");
  return lim;
}

// query [B, H, N, D]: float32, or fp16/bf16 equal to the memory dtype. Returns true for the
// tensor-core path.
bool check_query_mem(const at::Tensor& query, const at::Tensor& mem, const char* mem_name) {
  CHECK_CUDA(query);
  CHECK_DIM(query, 4);
  CHECK_MEM_DTYPE(query);
  TORCH_CHECK(mem.device() == query.device(), mem_name, " must be on query's device ", query.device(), ", got ",
              mem.device());
  TORCH_CHECK(mem.dim() == 4, mem_name, " must have 4 dims, got shape ", mem.sizes());
  TORCH_CHECK(mem.scalar_type() == at::kFloat || mem.scalar_type() == at::kBFloat16 || mem.scalar_type() == at::kHalf,
              mem_name, " must be float32, bfloat16 or float16, got ", mem.scalar_type());
  TORCH_CHECK(mem.size(0) == query.size(0) && mem.size(1) == query.size(1) && mem.size(3) == query.size(3),
              mem_name, " must have shape [B, Hkv, M, D] matching query ", query.sizes(), ", got ", mem.sizes());
  TORCH_CHECK(mem.size(3) <= 1 || mem.stride(3) == 1, mem_name, " must have stride(-1) == 1, got strides ",
              mem.strides());
  TORCH_CHECK(query.size(3) >= 1 && query.size(3) <= 256, "query head dim must be in [1, 256], got ", query.size(3));
  TORCH_CHECK(mem.size(2) <= std::numeric_limits<int32_t>::max(), mem_name, " must have at most 2^31 - 1 slots, got ",
              mem.size(2));
  TORCH_CHECK(query.size(0) * query.size(1) <= 65535, "B * Hkv must be <= 65535, got shape ", query.sizes());
  TORCH_CHECK(query.size(2) <= std::numeric_limits<int32_t>::max(), "query must have at most 2^31 - 1 rows, got ",
              query.sizes());
  const bool tc = query.scalar_type() != at::kFloat;
  TORCH_CHECK(!tc || query.scalar_type() == mem.scalar_type(), "query must be float32 or have ", mem_name,
              "'s dtype ", mem.scalar_type(), ", got ", query.scalar_type());
  return tc;
}

// mem_lengths: int64 [B] (any integer dtype is converted); mem_mask: bool [B, M].
void check_validity(const c10::optional<at::Tensor>& mem_lengths, const c10::optional<at::Tensor>& mem_mask,
                    const at::Tensor& query, int64_t B, int64_t M, at::Tensor& lengths, at::Tensor& mask) {
  if (mem_lengths.has_value() && mem_lengths->defined()) {
    const at::Tensor& l = *mem_lengths;
    TORCH_CHECK(l.device() == query.device(), "mem_lengths must be on query's device ", query.device(), ", got ",
                l.device());
    TORCH_CHECK(l.dim() == 1 && l.size(0) == B, "mem_lengths must have shape (B,) = (", B, "), got ", l.sizes());
    TORCH_CHECK(at::isIntegralType(l.scalar_type(), /*includeBool=*/false), "mem_lengths must be an integer tensor, got ",
                l.scalar_type());
    lengths = l.to(at::kLong).contiguous();
  }
  if (mem_mask.has_value() && mem_mask->defined()) {
    const at::Tensor& m = *mem_mask;
    TORCH_CHECK(m.device() == query.device(), "mem_mask must be on query's device ", query.device(), ", got ",
                m.device());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == M, "mem_mask must have shape (B, M) = (", B, ", ", M,
                "), got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool, "mem_mask must be bool, got ", m.scalar_type());
    mask = m.contiguous();
  }
}

// Output and scratch allocations; under emulation poisoned, so that an element a kernel forgets
// to write fails the tests.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef FOT_CUDA_EMULATION
  if (at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else {
    t.fill_(-7777);
  }
#endif
  return t;
}

const int64_t* lengths_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<int64_t>() : nullptr; }
const bool* mask_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<bool>() : nullptr; }

// The fields the tile kernels share (no plan yet): query rows [B, H, N, D] (contiguous), the
// memory's shape and dtype, validity pointers.
ScanParams scan_params(const at::Tensor& query, const at::Tensor& mem, const at::Tensor& lengths, const at::Tensor& mask,
                       bool tc) {
  ScanParams p{};
  p.q = query.data_ptr();
  p.lengths = lengths_ptr(lengths);
  p.mask = mask_ptr(mask);
  p.B = (int)query.size(0);
  p.H = (int)query.size(1);
  p.N = (int)query.size(2);
  p.D = (int)query.size(3);
  p.M = mem.size(2);
  p.dtype = dtype_of(mem);
  p.tc = tc;
  p.q_vec = vec_bytes(query);
  return p;
}

std::tuple<at::Tensor, at::Tensor> knn_scan(const at::Tensor& query_in, const at::Tensor& mem_keys,
                                            const c10::optional<at::Tensor>& mem_lengths,
                                            const c10::optional<at::Tensor>& mem_mask, int64_t k) {
  const bool tc = check_query_mem(query_in, mem_keys, "mem_keys");
  TORCH_CHECK(k >= 1 && k <= kMaxK, "k must be in [1, ", kMaxK, "] for the CUDA kNN scan, got ", k);
  DEVICE_GUARD(query_in.device());
  const at::Tensor query = query_in.contiguous();
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), M = mem_keys.size(2);
  at::Tensor lengths, mask;
  check_validity(mem_lengths, mem_mask, query, B, M, lengths, mask);
  at::Tensor scores = empty_output({B, H, N, k}, query.options().dtype(at::kFloat));
  at::Tensor indices = empty_output({B, H, N, k}, query.options().dtype(at::kLong));
  if (B * H * N == 0) return {scores, indices};

  KnnParams p{};
  static_cast<ScanParams&>(p) = scan_params(query, mem_keys, lengths, mask, tc);
  p.keys = mem_ref(mem_keys);
  p.k = (int)k;
  p.k_vec = M > 0 ? vec_bytes(mem_keys) : 0;
  p.out_s = scores.data_ptr<float>();
  p.out_i = indices.data_ptr<int64_t>();
  const char* why = "";
  TORCH_CHECK(knn_plan(p, device_limits(query), &why), "knn_scan (CUDA): ", why);
  at::Tensor part;
  if (p.splits > 1) {
    part = empty_output({B * H * N, (int64_t)p.splits, k}, query.options().dtype(at::kLong));
    p.part = reinterpret_cast<uint64_t*>(part.data_ptr<int64_t>());
  }
  CHECK_CUDA_OK(knn_scan_launch(p, CURRENT_STREAM()), "knn_scan launch");
  return {scores, indices};
}

std::tuple<at::Tensor, at::Tensor> flash_scan(const at::Tensor& query_in, const at::Tensor& keys,
                                              const at::Tensor& values, const c10::optional<at::Tensor>& mem_lengths,
                                              const c10::optional<at::Tensor>& mem_mask, double scale,
                                              int64_t causal_lq) {
  const bool tc = check_query_mem(query_in, keys, "keys");
  check_query_mem(query_in, values, "values");
  TORCH_CHECK(values.sizes() == keys.sizes(), "values must have the shape of keys ", keys.sizes(), ", got ",
              values.sizes());
  TORCH_CHECK(values.scalar_type() == keys.scalar_type(), "values must have keys' dtype ", keys.scalar_type(),
              ", got ", values.scalar_type());
  TORCH_CHECK(causal_lq >= 0, "causal_lq must be >= 0, got ", causal_lq);
  TORCH_CHECK(std::isfinite((float)scale), "scale must be finite in float32, got ", scale);
  DEVICE_GUARD(query_in.device());
  const at::Tensor query = query_in.contiguous();
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3), M = keys.size(2);
  if (causal_lq > 0) TORCH_CHECK(N % causal_lq == 0, "query rows N=", N, " must be a multiple of causal_lq=", causal_lq);
  at::Tensor lengths, mask;
  check_validity(mem_lengths, mem_mask, query, B, M, lengths, mask);
  at::Tensor out = empty_output({B, H, N, D}, query.options().dtype(at::kFloat));
  at::Tensor lse = empty_output({B, H, N}, query.options().dtype(at::kFloat));
  if (B * H * N == 0) return {out, lse};

  FlashParams p{};
  static_cast<ScanParams&>(p) = scan_params(query, keys, lengths, mask, tc);
  p.keys = mem_ref(keys);
  p.values = mem_ref(values);
  p.causal_lq = causal_lq;
  p.scale = (float)scale;
  p.k_vec = M > 0 ? vec_bytes(keys) : 0;
  p.v_vec = M > 0 ? vec_bytes(values) : 0;
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  const char* why = "";
  TORCH_CHECK(flash_plan(p, device_limits(query), &why), "flash_scan (CUDA): ", why);
  at::Tensor part_o, part_lse;
  if (p.splits > 1) {
    part_o = empty_output({B * H * N, (int64_t)p.splits, D}, query.options().dtype(at::kFloat));
    part_lse = empty_output({B * H * N, (int64_t)p.splits}, query.options().dtype(at::kFloat));
    p.part_o = part_o.data_ptr<float>();
    p.part_lse = part_lse.data_ptr<float>();
  }
  CHECK_CUDA_OK(flash_scan_launch(p, CURRENT_STREAM()), "flash_scan launch");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> gather_attention(const at::Tensor& scores, const at::Tensor& indices,
                                                    const at::Tensor& values, double scale) {
  CHECK_CUDA(scores);
  CHECK_CUDA(indices);
  CHECK_CUDA(values);
  CHECK_SAME_DEVICE(indices, scores);
  CHECK_SAME_DEVICE(values, scores);
  CHECK_DIM(scores, 4);
  CHECK_DIM(values, 4);
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  CHECK_MEM_DTYPE(values);
  CHECK_LAST_CONTIGUOUS(values);
  TORCH_CHECK(std::isfinite((float)scale), "scale must be finite in float32, got ", scale);
  const int64_t B = scores.size(0), H = scores.size(1), N = scores.size(2), k = scores.size(3);
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "scores must have at most 2^31 - 1 rows, got ", scores.sizes());
  CHECK_SHAPE(indices, B, H, N, k);
  TORCH_CHECK(values.size(0) == B && values.size(1) == H, "values must have shape [B, Hkv, M, D] with B=", B,
              ", Hkv=", H, ", got ", values.sizes());
  const int64_t M = values.size(2), D = values.size(3);
  TORCH_CHECK(D >= 1 && D <= 256, "values head dim must be in [1, 256], got ", D);
  DEVICE_GUARD(scores.device());
  const at::Tensor scores_c = scores.contiguous();
  const at::Tensor indices_c = indices.contiguous();
  at::Tensor out = empty_output({B, H, N, D}, scores.options());
  at::Tensor lse = empty_output({B, H, N}, scores.options());
  if (B * H * N == 0) return {out, lse};
  GatherParams p{};
  p.scores = scores_c.data_ptr<float>();
  p.indices = indices_c.data_ptr<int64_t>();
  p.values = mem_ref(values);
  p.B = (int)B;
  p.H = (int)H;
  p.N = (int)N;
  p.D = (int)D;
  p.k = (int)k;
  p.M = M;
  p.scale = (float)scale;
  p.dtype = dtype_of(values);
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  CHECK_CUDA_OK(gather_attention_launch(p, CURRENT_STREAM()), "gather_attention launch");
  return {out, lse};
}

// ------------------------------------------------------------------------------- backward
// d_out float32 [B, H, N, D], lse / delta float32 [B, H, N], on query's device (query: [B, H, N, D]).
void check_grad_inputs(const at::Tensor& query, const at::Tensor& d_out, const at::Tensor& lse,
                       const at::Tensor& delta) {
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  CHECK_SAME_DEVICE(d_out, query);
  CHECK_SAME_DEVICE(lse, query);
  CHECK_SAME_DEVICE(delta, query);
  TORCH_CHECK(d_out.scalar_type() == at::kFloat, "d_out must be float32, got ", d_out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(delta.scalar_type() == at::kFloat, "delta must be float32, got ", delta.scalar_type());
  CHECK_SHAPE(d_out, B, H, N, D);
  CHECK_SHAPE(lse, B, H, N);
  CHECK_SHAPE(delta, B, H, N);
}

// dk / dv: the memory's shape and dtype (contiguous), or empty when not needed.
std::tuple<at::Tensor, at::Tensor> dkv_outputs(const at::Tensor& keys, const at::Tensor& values, bool need_dkv) {
  if (!need_dkv) return {at::empty({0}, keys.options()), at::empty({0}, values.options())};
  return {empty_output(keys.sizes(), keys.options()), empty_output(values.sizes(), values.options())};
}

void check_same_memory(const at::Tensor& keys, const at::Tensor& values, const char* keys_name,
                       const char* values_name) {
  TORCH_CHECK(values.sizes() == keys.sizes(), values_name, " must have the shape of ", keys_name, " ", keys.sizes(),
              ", got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == keys.scalar_type(), values_name, " must have ", keys_name, "' dtype ",
              keys.scalar_type(), ", got ", values.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_scan_backward(
    const at::Tensor& query_in, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& d_out_in,
    const at::Tensor& lse_in, const at::Tensor& delta_in, const c10::optional<at::Tensor>& mem_lengths,
    const c10::optional<at::Tensor>& mem_mask, double scale, int64_t causal_lq, bool need_dkv) {
  const bool tc = check_query_mem(query_in, keys, "keys");
  check_query_mem(query_in, values, "values");
  check_same_memory(keys, values, "keys", "values");
  check_grad_inputs(query_in, d_out_in, lse_in, delta_in);
  TORCH_CHECK(causal_lq >= 0, "causal_lq must be >= 0, got ", causal_lq);
  TORCH_CHECK(std::isfinite((float)scale), "scale must be finite in float32, got ", scale);
  DEVICE_GUARD(query_in.device());
  const at::Tensor query = query_in.contiguous();
  const at::Tensor d_out = d_out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor delta = delta_in.contiguous();
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3), M = keys.size(2);
  if (causal_lq > 0) TORCH_CHECK(N % causal_lq == 0, "query rows N=", N, " must be a multiple of causal_lq=", causal_lq);
  at::Tensor lengths, mask;
  check_validity(mem_lengths, mem_mask, query, B, M, lengths, mask);
  at::Tensor dq = empty_output({B, H, N, D}, query.options().dtype(at::kFloat));
  auto [dk, dv] = dkv_outputs(keys, values, need_dkv);
  if (B * H == 0) return {dq, dk, dv};

  FlashBwdParams p{};
  p.q = query.data_ptr();
  p.d_out = d_out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.keys = mem_ref(keys);
  p.values = mem_ref(values);
  p.lengths = lengths_ptr(lengths);
  p.mask = mask_ptr(mask);
  p.B = (int)B;
  p.H = (int)H;
  p.N = (int)N;
  p.D = (int)D;
  p.M = M;
  p.causal_lq = causal_lq;
  p.scale = (float)scale;
  p.dtype = dtype_of(keys);
  p.tc = tc;
  p.q_vec = N > 0 ? vec_bytes(query) : 0;
  p.do_vec = N > 0 ? vec_bytes(d_out) : 0;
  p.k_vec = M > 0 ? vec_bytes(keys) : 0;
  p.v_vec = M > 0 ? vec_bytes(values) : 0;
  p.dq = dq.data_ptr<float>();
  p.dk = need_dkv ? dk.data_ptr() : nullptr;
  p.dv = need_dkv ? dv.data_ptr() : nullptr;
  const char* why = "";
  TORCH_CHECK(flash_backward_plan(p, device_limits(query), &why), "flash_scan_backward (CUDA): ", why);
  CHECK_CUDA_OK(flash_scan_backward_launch(p, CURRENT_STREAM()), "flash_scan_backward launch");
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_attention_backward(
    const at::Tensor& query_in, const at::Tensor& indices, const at::Tensor& mem_keys, const at::Tensor& mem_values,
    const at::Tensor& d_out_in, const at::Tensor& lse_in, const at::Tensor& delta_in, double scale, bool need_dkv) {
  const bool tc = check_query_mem(query_in, mem_keys, "mem_keys");
  check_query_mem(query_in, mem_values, "mem_values");
  check_same_memory(mem_keys, mem_values, "mem_keys", "mem_values");
  check_grad_inputs(query_in, d_out_in, lse_in, delta_in);
  CHECK_SAME_DEVICE(indices, query_in);
  CHECK_DIM(indices, 4);
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  const int64_t B = query_in.size(0), H = query_in.size(1), N = query_in.size(2), D = query_in.size(3);
  const int64_t M = mem_keys.size(2), k = indices.size(3);
  CHECK_SHAPE(indices, B, H, N, k);
  TORCH_CHECK(k <= std::numeric_limits<int32_t>::max(), "indices must have at most 2^31 - 1 entries per row, got ",
              indices.sizes());
  TORCH_CHECK(std::isfinite((float)scale), "scale must be finite in float32, got ", scale);
  DEVICE_GUARD(query_in.device());
  const at::Tensor query = query_in.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor d_out = d_out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor delta = delta_in.contiguous();
  at::Tensor dq = empty_output({B, H, N, D}, query.options().dtype(at::kFloat));
  auto [dk, dv] = dkv_outputs(mem_keys, mem_values, need_dkv);
  if (B * H == 0) return {dq, dk, dv};

  GatherBwdParams p{};
  p.q = query.data_ptr();
  p.indices = idx.data_ptr<int64_t>();
  p.keys = mem_ref(mem_keys);
  p.values = mem_ref(mem_values);
  p.d_out = d_out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.B = (int)B;
  p.H = (int)H;
  p.N = (int)N;
  p.D = (int)D;
  p.k = (int)k;
  p.M = M;
  p.scale = (float)scale;
  p.dtype = dtype_of(mem_keys);
  p.tc = tc;
  p.dq = dq.data_ptr<float>();
  // dk / dv: the entries (row, j) stably sorted by flattened slot id (b * H + h) * M + index, with
  // padding and out-of-range indices sent past every slot (B * H * M); O(N * k) scratch, on the
  // current stream like the kernels
  at::Tensor ent, sorted, order;
  if (need_dkv && M > 0) {
    p.entries = idx.numel();
    ent = empty_output({2, p.entries}, query.options().dtype(at::kFloat));
    p.p_ent = ent.data_ptr<float>();
    p.ds_ent = p.p_ent + p.entries;
    const at::Tensor base = at::arange(B * H, idx.options()).mul_(M).view({B, H, 1, 1});
    const at::Tensor flat = at::where(idx.ge(0).logical_and_(idx.lt(M)), idx + base,
                                      at::scalar_tensor(B * H * M, idx.options()));
    std::tie(sorted, order) = at::sort(flat.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    p.sorted_ids = sorted.data_ptr<int64_t>();
    p.order = order.data_ptr<int64_t>();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
  }
  CHECK_CUDA_OK(gather_attention_backward_launch(p, CURRENT_STREAM()), "gather_attention_backward launch");
  return {dq, dk, dv};
}

void impl_ops(torch::Library& m) {
  m.impl("knn_scan", &knn_scan);
  m.impl("flash_scan", &flash_scan);
  m.impl("gather_attention", &gather_attention);
  m.impl("flash_scan_backward", &flash_scan_backward);
  m.impl("gather_attention_backward", &gather_attention_backward);
}
}  // namespace
}  // namespace fot_cuda

#ifndef FOT_OPS_NAMESPACE
#define FOT_OPS_NAMESPACE fot
#endif
#ifndef FOT_OPS_DISPATCH_KEY
#define FOT_OPS_DISPATCH_KEY CUDA
#endif
// Implementations only: the schemas come from Python (fot_kernels._library.ops), whether this
// library is loaded before or after they are defined.
TORCH_LIBRARY_IMPL(FOT_OPS_NAMESPACE, FOT_OPS_DISPATCH_KEY, m) { fot_cuda::impl_ops(m); }

// `import fot_kernels._C` loads this library, which runs the registration above; the module itself
// is empty (the ops live under torch.ops.fot).
#ifndef FOT_CUDA_NO_PYTHON_MODULE
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr,
                                          nullptr};
  return PyModule_Create(&module_def);
}
#endif
