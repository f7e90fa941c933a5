// CPU implementations of the fot::* custom ops (schemas and fakes: fot_kernels/_library.py):
// input checks, output allocation, and the registration.
//
//   fot::knn_scan(query, mem_keys, mem_lengths?, mem_mask?, k) -> (scores, indices)
//   fot::flash_scan(query, keys, values, mem_lengths?, mem_mask?, scale, causal_lq) -> (out, lse)
//   fot::gather_attention(scores, indices, values, scale) -> (out, lse)
//   fot::flash_scan_backward(query, keys, values, d_out, lse, delta, mem_lengths?, mem_mask?, scale, causal_lq,
//                            need_dkv) -> (dq, dk, dv)
//   fot::gather_attention_backward(query, indices, mem_keys, mem_values, d_out, lse, delta, scale, need_dkv)
//                                  -> (dq, dk, dv)
//   fot::cpu_simd_level() -> int: 512 when the AVX-512 kernels were compiled in, 0 for the portable build
//
// Layout: query [B, Hkv, N, D] float32 (N = G * Lq stacked query heads); memory [B, Hkv, M, D] in
// float32 / bfloat16 / float16 with stride(-1) == 1 and otherwise any strides. The scheme of the
// kernels is in README.md beside this file.
#include <torch/library.h>

#include <cstdlib>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernels.h"

#define CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dims, got shape ", (x).sizes())
#define CHECK_SHAPE(x, ...)                                                                   \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())
#define CHECK_MEM_DTYPE(x)                                                                          \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||              \
                  (x).scalar_type() == at::kHalf,                                                   \
              #x " must be float32, bfloat16 or float16, got ", (x).scalar_type())

namespace fot_cpu {
namespace {

// An output of an op. With FOT_KERNELS_CPU_POISON=1 (the tests) it is filled with NaN (floating
// point) or -7777 (integers) before the kernels run, so that an element they forget to write fails.
// huge: a large output written once in full (the dk / dv of the memory): its pages are requested as
// transparent huge pages before the first touch (Linux, THP mode "madvise"; a hint, ignored where
// unsupported): one fault per 2 MiB instead of 512, the first-touch cost of a fresh gradient of the
// whole memory (a third of the kNN backward at M=16k) drops about 4x.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options, bool huge = false) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (huge && t.nbytes() >= 4 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (p + kHuge - 1) & ~(kHuge - 1), last = (p + t.nbytes()) & ~(kHuge - 1);
    if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  const char* poison = std::getenv("FOT_KERNELS_CPU_POISON");
  if (poison != nullptr && poison[0] == '1') {
    if (at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
    else t.fill_(-7777);
  }
  return t;
}

// query [B, H, N, D] float32 on the CPU; mem [B, H, M, D] (mem_name in messages) with the query's
// B, H, D, a memory dtype and stride(-1) == 1.
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

// Checks mem_lengths [B] (integer) and mem_mask [B, M] (bool); lengths_keep holds the int64 copy
// the returned view points into.
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

std::tuple<at::Tensor, at::Tensor> knn_scan(const at::Tensor& query_in, const at::Tensor& mem_keys,
                                            const c10::optional<at::Tensor>& mem_lengths,
                                            const c10::optional<at::Tensor>& mem_mask, int64_t k) {
  check_query_mem(query_in, mem_keys, "mem_keys");
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(mem_keys.size(2) < (int64_t(1) << 31) - 64, "mem_keys: M must be < 2^31, got ", mem_keys.size(2));
  const at::Tensor query = query_in.contiguous();
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2);
  at::Tensor lengths_keep;
  const Validity val = make_validity(mem_lengths, mem_mask, B, mem_keys.size(2), lengths_keep);
  at::Tensor scores = new_output({B, H, N, k}, query.options());
  at::Tensor indices = new_output({B, H, N, k}, query.options().dtype(at::kLong));
  if (B * H * N > 0) knn_scan_kernel(query, make_view(mem_keys), val, k, scores, indices);
  return {scores, indices};
}

std::tuple<at::Tensor, at::Tensor> flash_scan(const at::Tensor& query_in, const at::Tensor& keys,
                                              const at::Tensor& values, const c10::optional<at::Tensor>& mem_lengths,
                                              const c10::optional<at::Tensor>& mem_mask, double scale,
                                              int64_t causal_lq) {
  check_query_mem(query_in, keys, "keys");
  check_query_mem(query_in, values, "values");
  TORCH_CHECK(values.size(2) == keys.size(2), "values must have the same number of slots as keys: keys ",
              keys.sizes(), ", values ", values.sizes());
  TORCH_CHECK(causal_lq >= 0, "causal_lq must be >= 0, got ", causal_lq);
  const at::Tensor query = query_in.contiguous();
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  if (causal_lq > 0)
    TORCH_CHECK(N % causal_lq == 0, "query rows N=", N, " must be a multiple of causal_lq=", causal_lq);
  at::Tensor lengths_keep;
  const Validity val = make_validity(mem_lengths, mem_mask, B, keys.size(2), lengths_keep);
  at::Tensor out = new_output({B, H, N, D}, query.options());
  at::Tensor lse = new_output({B, H, N}, query.options());
  if (B * H * N > 0)
    flash_scan_kernel(query, make_view(keys), make_view(values), val, (float)scale, causal_lq, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> gather_attention(const at::Tensor& scores_in, const at::Tensor& indices_in,
                                                    const at::Tensor& values, double scale) {
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
  at::Tensor out = new_output({B, H, N, D}, scores.options());
  at::Tensor lse = new_output({B, H, N}, scores.options());
  if (B * H * N == 0) return {out, lse};
  const bool ok = gather_attention_kernel(scores, indices, make_view(values), M, (float)scale, out, lse);
  TORCH_CHECK(ok, "indices must be < M=", M, " (or -1 for padding)");
  return {out, lse};
}

// The backward ops' row tensors: d_out [B, H, N, D], lse and delta [B, H, N], float32 on the CPU.
void check_grad_rows(const at::Tensor& query, const at::Tensor& d_out, const at::Tensor& lse,
                     const at::Tensor& delta) {
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  CHECK_CPU(d_out);
  CHECK_CPU(lse);
  CHECK_CPU(delta);
  CHECK_SHAPE(d_out, B, H, N, D);
  CHECK_SHAPE(lse, B, H, N);
  CHECK_SHAPE(delta, B, H, N);
  TORCH_CHECK(d_out.scalar_type() == at::kFloat, "d_out must be float32, got ", d_out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(delta.scalar_type() == at::kFloat, "delta must be float32, got ", delta.scalar_type());
}

// dk / dv of a backward op: the memory's shape and dtype (contiguous), or empty without need_dkv.
at::Tensor new_grad(const at::Tensor& like, bool need) {
  if (!need) return at::empty({0}, like.options());
  return new_output(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous), /*huge=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_scan_backward(
    const at::Tensor& query_in, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& d_out_in,
    const at::Tensor& lse_in, const at::Tensor& delta_in, const c10::optional<at::Tensor>& mem_lengths,
    const c10::optional<at::Tensor>& mem_mask, double scale, int64_t causal_lq, bool need_dkv) {
  check_query_mem(query_in, keys, "keys");
  check_query_mem(query_in, values, "values");
  TORCH_CHECK(values.size(2) == keys.size(2), "values must have the same number of slots as keys: keys ",
              keys.sizes(), ", values ", values.sizes());
  TORCH_CHECK(causal_lq >= 0, "causal_lq must be >= 0, got ", causal_lq);
  check_grad_rows(query_in, d_out_in, lse_in, delta_in);
  const at::Tensor query = query_in.contiguous();
  const at::Tensor d_out = d_out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor delta = delta_in.contiguous();
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  if (causal_lq > 0)
    TORCH_CHECK(N % causal_lq == 0, "query rows N=", N, " must be a multiple of causal_lq=", causal_lq);
  at::Tensor lengths_keep;
  const Validity val = make_validity(mem_lengths, mem_mask, B, keys.size(2), lengths_keep);
  at::Tensor dq = new_output({B, H, N, D}, query.options());
  at::Tensor dk = new_grad(keys, need_dkv);
  at::Tensor dv = new_grad(values, need_dkv);
  if (B * H * N == 0 || keys.size(2) == 0) {  // nothing attended: zero gradients
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  flash_scan_backward_kernel(query, make_view(keys), make_view(values), d_out, lse, delta, val, (float)scale,
                             causal_lq, dq, need_dkv ? &dk : nullptr, need_dkv ? &dv : nullptr);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_attention_backward(
    const at::Tensor& query_in, const at::Tensor& indices_in, const at::Tensor& mem_keys,
    const at::Tensor& mem_values, const at::Tensor& d_out_in, const at::Tensor& lse_in, const at::Tensor& delta_in,
    double scale, bool need_dkv) {
  check_query_mem(query_in, mem_keys, "mem_keys");
  check_query_mem(query_in, mem_values, "mem_values");
  TORCH_CHECK(mem_values.size(2) == mem_keys.size(2),
              "mem_values must have the same number of slots as mem_keys: mem_keys ", mem_keys.sizes(),
              ", mem_values ", mem_values.sizes());
  check_grad_rows(query_in, d_out_in, lse_in, delta_in);
  CHECK_CPU(indices_in);
  CHECK_DIM(indices_in, 4);
  TORCH_CHECK(indices_in.scalar_type() == at::kLong, "indices must be int64, got ", indices_in.scalar_type());
  const int64_t B = query_in.size(0), H = query_in.size(1), N = query_in.size(2), D = query_in.size(3);
  TORCH_CHECK(indices_in.size(0) == B && indices_in.size(1) == H && indices_in.size(2) == N,
              "indices must have shape [B, Hkv, N, k] matching query ", query_in.sizes(), ", got ",
              indices_in.sizes());
  const int64_t M = mem_keys.size(2);
  TORCH_CHECK(M < (int64_t(1) << 62), "mem_keys: too many slots");
  const at::Tensor query = query_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor d_out = d_out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor delta = delta_in.contiguous();
  at::Tensor dq = new_output({B, H, N, D}, query.options());
  at::Tensor dk = new_grad(mem_keys, need_dkv);
  at::Tensor dv = new_grad(mem_values, need_dkv);
  if (B * H * N == 0 || indices.size(3) == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const bool ok = gather_attention_backward_kernel(query, indices, make_view(mem_keys), make_view(mem_values), d_out,
                                                   lse, delta, M, (float)scale, dq, need_dkv ? &dk : nullptr,
                                                   need_dkv ? &dv : nullptr);
  TORCH_CHECK(ok, "indices must be < M=", M, " (or -1 for padding)");
  return {dq, dk, dv};
}

int64_t cpu_simd_level() { return FOT_AVX512 ? 512 : 0; }

}  // namespace
}  // namespace fot_cpu

// The schemas of the kernels are defined in Python (fot_kernels/_library.py); this library
// only adds their CPU implementations, and the utility op below.
TORCH_LIBRARY_FRAGMENT(fot, m) {
  m.def("cpu_simd_level() -> int", &fot_cpu::cpu_simd_level);
}

TORCH_LIBRARY_IMPL(fot, CPU, m) {
  m.impl("knn_scan", &fot_cpu::knn_scan);
  m.impl("flash_scan", &fot_cpu::flash_scan);
  m.impl("gather_attention", &fot_cpu::gather_attention);
  m.impl("flash_scan_backward", &fot_cpu::flash_scan_backward);
  m.impl("gather_attention_backward", &fot_cpu::gather_attention_backward);
}
