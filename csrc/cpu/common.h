// Shared by every CPU kernel: build switches, tile constants, per-thread scratch, the memory view,
// slot validity, the work plan and the dtype / row-count dispatch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FOT_AVX512 1
#include <immintrin.h>
#else
#define FOT_AVX512 0
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#if defined(__GNUC__)
#define FOT_INLINE inline __attribute__((always_inline))
#else
#define FOT_INLINE inline
#endif

namespace fot_cpu {

constexpr int NR = 32;  // key slots per packed panel (two zmm)
constexpr int MR = 14;  // query rows per micro tile (2*MR accumulators + 2 panel registers)
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr float kNegInf = -kPosInf;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// Memory view: element (b, h, m, d) of a [B, H, M, D] tensor with stride(-1) == 1.
struct MemView {
  const char* base;
  at::ScalarType dtype;
  int64_t esize, sb, sh, sm;  // strides in elements
  const char* row(int64_t b, int64_t h, int64_t m) const {
    return base + (b * sb + h * sh + m * sm) * esize;
  }
};

inline MemView make_view(const at::Tensor& t) {
  return MemView{static_cast<const char*>(t.data_ptr()), t.scalar_type(), (int64_t)t.element_size(),
                 t.stride(0), t.stride(1), t.stride(2)};
}

// Clears bit j of a block's validity words (a key with a non-finite element: its score is non-finite
// for every query, so the slot is dropped like a masked one and its value row is never read).
FOT_INLINE void clear_bit(uint32_t* bits, int64_t j) { bits[j >> 5] &= ~(1u << (j & 31)); }

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

// Work plan: items = BH * row_chunks * splits. When there are fewer than kPlanItems (b, h) rows,
// each is cut into row chunks first, then into memory splits (merged exactly afterwards), so that
// a few threads all get work. The plan depends on the shapes only, never on the thread count: a
// row's arithmetic (its row path, its splits) and hence every result is bit-identical whatever the
// number of threads.
constexpr int64_t kPlanItems = 8;

struct Plan {
  int64_t row_chunks = 1, splits = 1, rows_per_chunk = 0, slots_per_split = 0;
  int64_t items(int64_t BH) const { return BH * row_chunks * splits; }
};

inline Plan make_plan(int64_t BH, int64_t N, int64_t M, int64_t min_rows, int64_t min_slots) {
  Plan p;
  const int64_t want = cdiv(kPlanItems, std::max<int64_t>(BH, 1));  // pieces per (b, h)
  if (want > 1) {
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

// One work item of a plan: (b, h), query rows [n0, n1) and memory slots [m0, m1) (clipped to the
// batch row's valid length).
struct WorkItem {
  int64_t bh, b, h, split, n0, n1, m0, m1;
  int64_t rows() const { return n1 - n0; }
};

inline WorkItem work_item(const Plan& plan, int64_t it, int64_t H, int64_t N, const Validity& val) {
  WorkItem w;
  w.split = it % plan.splits;
  const int64_t rc = (it / plan.splits) % plan.row_chunks;
  w.bh = it / (plan.splits * plan.row_chunks);
  w.b = w.bh / H;
  w.h = w.bh % H;
  w.n0 = rc * plan.rows_per_chunk;
  w.n1 = std::min(N, w.n0 + plan.rows_per_chunk);
  w.m0 = w.split * plan.slots_per_split;
  w.m1 = std::min(val.effective_len(w.b), w.m0 + plan.slots_per_split);
  return w;
}

// Calls f(T()) with T the C++ type of a memory dtype (float32, bfloat16, float16).
template <typename F>
decltype(auto) dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kBFloat16: return f(c10::BFloat16());
    case at::kHalf: return f(c10::Half());
    case at::kFloat: return f(float());
    default: TORCH_CHECK(false, "unsupported memory dtype ", dtype);
  }
}

// Calls f(std::integral_constant<int, n>()) for a run-time n in [Lo, Hi] (row counts, row groups).
template <int Lo, int Hi, typename F>
decltype(auto) dispatch_count(int n, F&& f) {
  if constexpr (Lo == Hi) {
    TORCH_CHECK(n == Lo, "dispatch_count: ", n, " is outside [", Lo, ", ", Hi, "]");
    return f(std::integral_constant<int, Lo>());
  } else {
    if (n == Lo) return f(std::integral_constant<int, Lo>());
    return dispatch_count<Lo + 1, Hi>(n, std::forward<F>(f));
  }
}

// Calls f(T(), std::integral_constant<int, n>()): the memory dtype and a count in [Lo, Hi].
template <int Lo, int Hi, typename F>
decltype(auto) dispatch(at::ScalarType dtype, int n, F&& f) {
  return dispatch_dtype(dtype, [&](auto t) {
    return dispatch_count<Lo, Hi>(n, [&](auto c) { return f(t, c); });
  });
}

}  // namespace fot_cpu
