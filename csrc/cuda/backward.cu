// fot_cuda backward: FlashAttention-2 backward of flash_scan (a dq kernel over row tiles and a
// dk/dv kernel over key tiles, both recomputing P from q, k and the saved lse) and of
// gather_attention (dq per row, dk/dv per memory slot over the entries sorted by slot). No
// atomics: every output element is summed by one thread in a fixed order, so results are
// bitwise reproducible. See csrc/cuda/README.md.
#include "common.cuh"

namespace fot_cuda {
namespace {

// Shared-memory layout of both dense backward kernels (fp32 tiles, CUDA-core products):
// q / dO row tiles [BM][ld] and k / v key tiles [BN][ld] (ld = Dp + 1, odd: the score tile's
// conflict-free column reads; Dp = D rounded up to 16, zero padded), S -> P and dP -> dS tiles
// [BM][lds], an fp32 accumulator [acc_rows][Dp] (dq: BM rows; dk and dv: 2 * BN rows), lse and
// delta [BM], per-row and per-slot "kept" flags.
struct BwdLayout {
  int Dp, ld, lds;
  size_t off_q, off_do, off_k, off_v, off_s, off_dp, off_acc, off_lse, off_delta, off_rowok, off_colok, total;
};

__host__ __device__ inline BwdLayout bwd_layout(int BM, int BN, int D, int acc_rows) {
  BwdLayout L;
  L.Dp = round_up(D < 1 ? 1 : D, 16);
  L.ld = L.Dp + 1;
  L.lds = BN + 4;
  size_t o = 0;
  auto take = [&](size_t bytes) {
    const size_t at = o;
    o = align_up(o + bytes, 128);
    return at;
  };
  L.off_q = take((size_t)BM * L.ld * sizeof(float));
  L.off_do = take((size_t)BM * L.ld * sizeof(float));
  L.off_k = take((size_t)BN * L.ld * sizeof(float));
  L.off_v = take((size_t)BN * L.ld * sizeof(float));
  L.off_s = take((size_t)BM * L.lds * sizeof(float));
  L.off_dp = take((size_t)BM * L.lds * sizeof(float));
  L.off_acc = take((size_t)acc_rows * L.Dp * sizeof(float));
  L.off_lse = take((size_t)BM * sizeof(float));
  L.off_delta = take((size_t)BM * sizeof(float));
  L.off_rowok = take((size_t)BM);
  L.off_colok = take((size_t)BN);
  L.total = o;
  return L;
}

// Rows c < n of the fp32 tile t [n][ld] with a non-finite element among their first D are zeroed
// and their flag cleared (one warp per row): such a key scores non-finite against every query (a
// query row against every key), so it is dropped everywhere, and zeroing it keeps inf / NaN out
// of the products with the zero weights of the dropped entries.
__device__ __forceinline__ void drop_nonfinite_rows(float* t, int ld, int n, int D, uint8_t* ok) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int c = warp; c < n; c += kWarps) {
    bool bad = false;
    for (int d = lane; d < D; d += 32) bad |= !isfinite(t[c * ld + d]);
    if (__ballot_sync(kFull, bad) != 0) {
      for (int d = lane; d < D; d += 32) t[c * ld + d] = 0.f;
      if (lane == 0) ok[c] = 0;
    }
  }
}

// P and dS of one row tile x key tile, in place: s_s holds S = Q K^T and becomes P; dp_s holds
// dP = dO V^T and becomes dS = P * (dP - delta). An entry is kept iff its row and slot are
// (row_ok, col_ok: in range, valid, finite), its key is causally visible (causal_lq > 0: slot
// m0 + c <= (row0 + r) % causal_lq + M - causal_lq), its score is finite and its row's lse is not
// -inf; P = exp(scale * s - lse), and a P that is not finite (an lse that is NaN or inconsistent)
// counts as dropped, like the PyTorch version's nan_to_num. Dropped entries get P = dS = 0.
__device__ __forceinline__ void probabilities(float* s_s, float* dp_s, int lds, int BM, int BN, int row0, int64_t m0,
                                              const uint8_t* row_ok, const uint8_t* col_ok, const float* lse_s,
                                              const float* delta_s, int64_t causal_lq, int64_t M, float scale) {
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e - r * BN;
    float pr = 0.f, ds = 0.f;
    if (row_ok[r] && col_ok[c]) {
      const float s = s_s[r * lds + c];
      const float l = lse_s[r];
      const bool visible = causal_lq == 0 || m0 + c <= (row0 + r) % causal_lq + M - causal_lq;
      if (visible && isfinite(s) && l != -INFINITY) {
        pr = expf(s * scale - l);
        if (!(pr < INFINITY)) pr = 0.f;  // NaN or +inf: dropped
        if (pr != 0.f) ds = pr * (dp_s[r * lds + c] - delta_s[r]);
      }
    }
    s_s[r * lds + c] = pr;
    dp_s[r * lds + c] = ds;
  }
}

// Loads rows [row0, row0 + rows) of q (TQ) and dO into q_s / do_s (zero padded to BM rows), their
// lse / delta, and sets row_ok (in range, finite query row; a non-finite one is zeroed).
// The caller synchronises before and after.
template <typename TQ>
__device__ __forceinline__ void load_rows(const FlashBwdParams& p, const BwdLayout& L, int bh, int row0, int rows,
                                          int BM, float* q_s, float* do_s, float* lse_s, float* delta_s,
                                          uint8_t* row_ok) {
  const int64_t g0 = (int64_t)bh * p.N + row0;
  load_tile<float, TQ>(q_s, L.ld, reinterpret_cast<const TQ*>(p.q) + g0 * p.D, p.D, rows, BM, p.D, L.Dp, p.q_vec,
                       nullptr);
  load_tile<float, float>(do_s, L.ld, p.d_out + g0 * p.D, p.D, rows, BM, p.D, L.Dp, p.do_vec, nullptr);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    lse_s[r] = r < rows ? p.lse[g0 + r] : -INFINITY;
    delta_s[r] = r < rows ? p.delta[g0 + r] : 0.f;
    row_ok[r] = r < rows ? 1 : 0;
  }
}

// ------------------------------------------------------------------------------------ dq
// grid (ceil(N / BM), B*H), kThreads threads: dq of a row tile = scale * sum over the key tiles
// (up to the batch row's length, and the tile's last causally visible key) of dS K.
template <typename TK, bool TC>
__global__ void __launch_bounds__(kThreads, 1) flash_bwd_dq_kernel(const FlashBwdParams p) {
  using TQ = typename std::conditional<TC, TK, float>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  const int BM = p.dq_bm, BN = p.dq_bn;
  const BwdLayout L = bwd_layout(BM, BN, p.D, BM);
  float* q_s = reinterpret_cast<float*>(smem + L.off_q);
  float* do_s = reinterpret_cast<float*>(smem + L.off_do);
  float* k_s = reinterpret_cast<float*>(smem + L.off_k);
  float* v_s = reinterpret_cast<float*>(smem + L.off_v);
  float* s_s = reinterpret_cast<float*>(smem + L.off_s);
  float* dp_s = reinterpret_cast<float*>(smem + L.off_dp);
  float* dq_s = reinterpret_cast<float*>(smem + L.off_acc);  // [BM][Dp]
  float* lse_s = reinterpret_cast<float*>(smem + L.off_lse);
  float* delta_s = reinterpret_cast<float*>(smem + L.off_delta);
  uint8_t* row_ok = smem + L.off_rowok;
  uint8_t* col_ok = smem + L.off_colok;

  const int row0 = blockIdx.x * BM, rows = min(BM, p.N - row0);
  const int bh = blockIdx.y, b = bh / p.H, h = bh - b * p.H;
  int64_t m_end = p.M;
  if (p.lengths != nullptr) m_end = max64(0, min64(p.M, p.lengths[b]));
  if (p.causal_lq > 0) {  // the last key any row of this tile may see
    const int64_t first = row0 % p.causal_lq;
    const int64_t last_i = (first + rows - 1 >= p.causal_lq) ? p.causal_lq - 1 : first + rows - 1;
    m_end = min64(m_end, last_i + p.M - p.causal_lq + 1);
  }
  load_rows<TQ>(p, L, bh, row0, rows, BM, q_s, do_s, lse_s, delta_s, row_ok);
  for (int i = threadIdx.x; i < BM * L.Dp; i += kThreads) dq_s[i] = 0.f;
  __syncthreads();
  drop_nonfinite_rows(q_s, L.ld, rows, p.D, row_ok);

  const TK* kbase = reinterpret_cast<const TK*>(p.keys.ptr) + b * p.keys.sb + h * p.keys.sh;
  const TK* vbase = reinterpret_cast<const TK*>(p.values.ptr) + b * p.values.sb + h * p.values.sh;
  const bool* mrow = p.mask != nullptr ? p.mask + (int64_t)b * p.M : nullptr;
  for (int64_t m0 = 0; m0 < m_end; m0 += BN) {
    const int nvalid = (int)min64(BN, m_end - m0);
    __syncthreads();  // the previous step has finished with k_s, v_s, s_s, dp_s, col_ok
    load_tile<float, TK>(k_s, L.ld, kbase + m0 * p.keys.sm, p.keys.sm, nvalid, BN, p.D, L.Dp, p.k_vec, nullptr);
    for (int c = threadIdx.x; c < BN; c += kThreads) col_ok[c] = (c < nvalid && (mrow == nullptr || mrow[m0 + c]));
    __syncthreads();
    drop_nonfinite_rows(k_s, L.ld, nvalid, p.D, col_ok);
    __syncthreads();  // col_ok final: the value rows of dropped slots are never read
    load_tile<float, TK>(v_s, L.ld, vbase + m0 * p.values.sm, p.values.sm, nvalid, BN, p.D, L.Dp, p.v_vec, col_ok);
    __syncthreads();
    score_tile<float, false>(q_s, L.ld, k_s, L.ld, s_s, L.lds, BM, BN, p.D, L.Dp);
    score_tile<float, false>(do_s, L.ld, v_s, L.ld, dp_s, L.lds, BM, BN, p.D, L.Dp);
    __syncthreads();
    probabilities(s_s, dp_s, L.lds, BM, BN, row0, m0, row_ok, col_ok, lse_s, delta_s, p.causal_lq, p.M, p.scale);
    __syncthreads();
    // dq[r][d] += sum_c dS[r][c] k[c][d]: each element summed by one thread, slots in order
    for (int e = threadIdx.x; e < rows * p.D; e += kThreads) {
      const int r = e / p.D, d = e - r * p.D;
      float acc = dq_s[r * L.Dp + d];
      const float* dsr = dp_s + r * L.lds;
      for (int c = 0; c < nvalid; ++c) acc = fmaf(dsr[c], k_s[c * L.ld + d], acc);
      dq_s[r * L.Dp + d] = acc;
    }
  }
  __syncthreads();
  float* dst = p.dq + ((int64_t)bh * p.N + row0) * p.D;
  for (int e = threadIdx.x; e < rows * p.D; e += kThreads) {
    const int r = e / p.D, d = e - r * p.D;
    dst[e] = p.scale * dq_s[r * L.Dp + d];
  }
}

// ---------------------------------------------------------------------------------- dk, dv
// grid (ceil(M / BN), B*H), kThreads threads: the key tile's dv = sum over the row tiles of P^T dO
// and dk = scale * dS^T Q (every stacked query head of the kv head is a row). Slots past the batch
// row's length, masked, or with a non-finite key get 0.
template <typename TK, bool TC>
__global__ void __launch_bounds__(kThreads, 1) flash_bwd_dkv_kernel(const FlashBwdParams p) {
  using TQ = typename std::conditional<TC, TK, float>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  const int BM = p.kv_bm, BN = p.kv_bn;
  const BwdLayout L = bwd_layout(BM, BN, p.D, 2 * BN);
  float* q_s = reinterpret_cast<float*>(smem + L.off_q);
  float* do_s = reinterpret_cast<float*>(smem + L.off_do);
  float* k_s = reinterpret_cast<float*>(smem + L.off_k);
  float* v_s = reinterpret_cast<float*>(smem + L.off_v);
  float* s_s = reinterpret_cast<float*>(smem + L.off_s);
  float* dp_s = reinterpret_cast<float*>(smem + L.off_dp);
  float* dk_s = reinterpret_cast<float*>(smem + L.off_acc);  // [BN][Dp]
  float* dv_s = dk_s + (size_t)BN * L.Dp;                     // [BN][Dp]
  float* lse_s = reinterpret_cast<float*>(smem + L.off_lse);
  float* delta_s = reinterpret_cast<float*>(smem + L.off_delta);
  uint8_t* row_ok = smem + L.off_rowok;
  uint8_t* col_ok = smem + L.off_colok;

  const int64_t m0 = (int64_t)blockIdx.x * BN;
  const int bh = blockIdx.y, b = bh / p.H, h = bh - b * p.H;
  const int ntile = (int)min64(BN, p.M - m0);  // slots of this tile: every one is written
  int64_t len = p.M;
  if (p.lengths != nullptr) len = max64(0, min64(p.M, p.lengths[b]));
  const int nvalid = (int)max64(0, min64(ntile, len - m0));
  const TK* kbase = reinterpret_cast<const TK*>(p.keys.ptr) + b * p.keys.sb + h * p.keys.sh;
  const TK* vbase = reinterpret_cast<const TK*>(p.values.ptr) + b * p.values.sb + h * p.values.sh;
  const bool* mrow = p.mask != nullptr ? p.mask + (int64_t)b * p.M : nullptr;

  for (int i = threadIdx.x; i < 2 * BN * L.Dp; i += kThreads) dk_s[i] = 0.f;
  load_tile<float, TK>(k_s, L.ld, kbase + m0 * p.keys.sm, p.keys.sm, nvalid, BN, p.D, L.Dp, p.k_vec, nullptr);
  for (int c = threadIdx.x; c < BN; c += kThreads) col_ok[c] = (c < nvalid && (mrow == nullptr || mrow[m0 + c]));
  __syncthreads();
  drop_nonfinite_rows(k_s, L.ld, nvalid, p.D, col_ok);
  __syncthreads();
  load_tile<float, TK>(v_s, L.ld, vbase + m0 * p.values.sm, p.values.sm, nvalid, BN, p.D, L.Dp, p.v_vec, col_ok);
  bool any = false;  // a tile with no kept slot has zero gradients: skip the rows
  for (int c = 0; c < BN; ++c) any |= col_ok[c] != 0;

  for (int row0 = 0; any && row0 < p.N; row0 += BM) {
    const int rows = min(BM, p.N - row0);
    if (p.causal_lq > 0) {  // skip row tiles none of whose rows sees this key tile
      const int64_t first = row0 % p.causal_lq;
      const int64_t last_i = (first + rows - 1 >= p.causal_lq) ? p.causal_lq - 1 : first + rows - 1;
      if (last_i + p.M - p.causal_lq < m0) continue;
    }
    __syncthreads();  // the previous row tile has finished with q_s, do_s, s_s, dp_s
    load_rows<TQ>(p, L, bh, row0, rows, BM, q_s, do_s, lse_s, delta_s, row_ok);
    __syncthreads();
    drop_nonfinite_rows(q_s, L.ld, rows, p.D, row_ok);
    __syncthreads();
    score_tile<float, false>(q_s, L.ld, k_s, L.ld, s_s, L.lds, BM, BN, p.D, L.Dp);
    score_tile<float, false>(do_s, L.ld, v_s, L.ld, dp_s, L.lds, BM, BN, p.D, L.Dp);
    __syncthreads();
    probabilities(s_s, dp_s, L.lds, BM, BN, row0, m0, row_ok, col_ok, lse_s, delta_s, p.causal_lq, p.M, p.scale);
    __syncthreads();
    // dv[c][d] += sum_r P[r][c] dO[r][d], dk[c][d] += sum_r dS[r][c] q[r][d]: one thread per
    // element, rows in order
    for (int e = threadIdx.x; e < nvalid * p.D; e += kThreads) {
      const int c = e / p.D, d = e - c * p.D;
      float av = dv_s[c * L.Dp + d], ak = dk_s[c * L.Dp + d];
      for (int r = 0; r < rows; ++r) {
        av = fmaf(s_s[r * L.lds + c], do_s[r * L.ld + d], av);
        ak = fmaf(dp_s[r * L.lds + c], q_s[r * L.ld + d], ak);
      }
      dv_s[c * L.Dp + d] = av;
      dk_s[c * L.Dp + d] = ak;
    }
  }
  __syncthreads();
  TK* dk = reinterpret_cast<TK*>(p.dk) + ((int64_t)bh * p.M + m0) * p.D;
  TK* dv = reinterpret_cast<TK*>(p.dv) + ((int64_t)bh * p.M + m0) * p.D;
  for (int e = threadIdx.x; e < ntile * p.D; e += kThreads) {
    const int c = e / p.D, d = e - c * p.D;
    dk[e] = from_float<TK>(p.scale * dk_s[c * L.Dp + d]);
    dv[e] = from_float<TK>(dv_s[c * L.Dp + d]);
  }
}

// -------------------------------------------------------------------------------------- kNN
constexpr int kBwdRowWarps = 4;             // warps per block of the kNN backward kernels
constexpr int kMaxPerLane = 256 / 32;       // D <= 256: lanes split the head dim
constexpr int64_t kMaxRowBlocks = 1 << 20;  // grid-stride beyond this many blocks

// One warp per query row (grid-stride): re-scores the row's selected slots, dq = scale * sum_j dS_j
// k_j, and (p.p_ent) each entry's P and dS for the dk/dv kernel. Every lane holds D / 32 elements
// of q, dO and dq; the warp sums (xor butterflies) are bitwise equal in all lanes, so the
// branches on them are warp-uniform.
template <typename TK, bool TC>
__global__ void __launch_bounds__(kBwdRowWarps * 32) gather_bwd_dq_kernel(const GatherBwdParams p) {
  using TQ = typename std::conditional<TC, TK, float>::type;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t total = (int64_t)p.B * p.H * p.N;
  for (int64_t row = (int64_t)blockIdx.x * kBwdRowWarps + warp; row < total;
       row += (int64_t)gridDim.x * kBwdRowWarps) {
    const int64_t bh = row / p.N;
    const int b = (int)(bh / p.H), h = (int)(bh - (int64_t)b * p.H);
    const TQ* q = reinterpret_cast<const TQ*>(p.q) + row * p.D;
    const float* g = p.d_out + row * p.D;
    float qv[kMaxPerLane], gv[kMaxPerLane], acc[kMaxPerLane];
    bool bad = false;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int d = lane + 32 * t;
      qv[t] = d < p.D ? to_float<TQ>(q[d]) : 0.f;
      gv[t] = d < p.D ? g[d] : 0.f;
      acc[t] = 0.f;
      bad |= !isfinite(qv[t]);
    }
    const float l = p.lse[row], delta = p.delta[row];
    // a non-finite query row scores non-finite everywhere; a row whose lse is -inf kept nothing
    const bool live = __ballot_sync(kFull, bad) == 0 && l != -INFINITY;
    const TK* kb = reinterpret_cast<const TK*>(p.keys.ptr) + b * p.keys.sb + h * p.keys.sh;
    const TK* vb = reinterpret_cast<const TK*>(p.values.ptr) + b * p.values.sb + h * p.values.sh;
    const int64_t* ix = p.indices + row * p.k;
    for (int j = 0; j < p.k; ++j) {
      const int64_t i = ix[j];
      float pr = 0.f, ds = 0.f;
      if (live && i >= 0 && i < p.M) {
        const TK* kr = kb + i * p.keys.sm;
        float kv[kMaxPerLane];
        float part = 0.f;
#pragma unroll
        for (int t = 0; t < kMaxPerLane; ++t) {
          const int d = lane + 32 * t;
          kv[t] = d < p.D ? to_float<TK>(kr[d]) : 0.f;
          part = fmaf(qv[t], kv[t], part);
        }
        const float s = warp_sum(part);
        if (isfinite(s)) {  // (then every element of the key is finite too)
          pr = expf(s * p.scale - l);
          if (!(pr < INFINITY)) pr = 0.f;  // NaN or +inf: dropped
        }
        if (pr != 0.f) {
          const TK* vr = vb + i * p.values.sm;
          float dp = 0.f;
#pragma unroll
          for (int t = 0; t < kMaxPerLane; ++t) {
            const int d = lane + 32 * t;
            if (d < p.D) dp = fmaf(gv[t], to_float<TK>(vr[d]), dp);
          }
          ds = pr * (warp_sum(dp) - delta);
#pragma unroll
          for (int t = 0; t < kMaxPerLane; ++t) acc[t] = fmaf(ds, kv[t], acc[t]);
        }
      }
      if (p.p_ent != nullptr && lane == 0) {
        p.p_ent[row * p.k + j] = pr;
        p.ds_ent[row * p.k + j] = ds;
      }
    }
    float* dq = p.dq + row * p.D;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < p.D) dq[d] = p.scale * acc[t];
    }
  }
}

// first position in a[0, n) (sorted ascending) whose value is >= x
__device__ __forceinline__ int64_t first_not_less(const int64_t* a, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (a[mid] < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// One warp per memory slot (b, h, m) (grid-stride): dk = scale * sum dS q, dv = sum P dO over the
// entries that selected it, in their (row, j) order (the stable sort's), then written in the
// memory dtype; a slot no row selected gets 0.
template <typename TK, bool TC>
__global__ void __launch_bounds__(kBwdRowWarps * 32) gather_bwd_dkv_kernel(const GatherBwdParams p) {
  using TQ = typename std::conditional<TC, TK, float>::type;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t total = (int64_t)p.B * p.H * p.M;
  for (int64_t slot = (int64_t)blockIdx.x * kBwdRowWarps + warp; slot < total;
       slot += (int64_t)gridDim.x * kBwdRowWarps) {
    const int64_t lo = first_not_less(p.sorted_ids, p.entries, slot);
    const int64_t hi = first_not_less(p.sorted_ids, p.entries, slot + 1);
    float ak[kMaxPerLane], av[kMaxPerLane];
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) ak[t] = av[t] = 0.f;
    for (int64_t e = lo; e < hi; ++e) {
      const int64_t ent = p.order[e], row = ent / p.k;
      const float pr = p.p_ent[ent], ds = p.ds_ent[ent];
      if (pr == 0.f) continue;  // dropped (then dS = 0 too): nothing of its row is read
      const TQ* q = reinterpret_cast<const TQ*>(p.q) + row * p.D;
      const float* g = p.d_out + row * p.D;
#pragma unroll
      for (int t = 0; t < kMaxPerLane; ++t) {
        const int d = lane + 32 * t;
        if (d < p.D) {
          av[t] = fmaf(pr, g[d], av[t]);
          ak[t] = fmaf(ds, to_float<TQ>(q[d]), ak[t]);
        }
      }
    }
    TK* dk = reinterpret_cast<TK*>(p.dk) + slot * p.D;
    TK* dv = reinterpret_cast<TK*>(p.dv) + slot * p.D;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < p.D) {
        dk[d] = from_float<TK>(p.scale * ak[t]);
        dv[d] = from_float<TK>(av[t]);
      }
    }
  }
}

cudaError_t launch_tile_kernel(void (*kernel)(FlashBwdParams), dim3 grid, size_t smem, const FlashBwdParams& p,
                               cudaStream_t stream) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool flash_backward_plan(FlashBwdParams& p, const DeviceLimits& lim, const char** why) {
  // (BM, BN) in order of preference; row tiles no larger than first_row_tile(N) (decoding has few
  // rows), and an 8 x 16 tile last: fp32 D = 256 dk/dv on a 99 KB device
  static const int kDq[][2] = {{64, 64}, {64, 32}, {32, 64}, {32, 32}, {16, 64}, {16, 32}, {16, 16}, {8, 16}};
  static const int kKv[][2] = {{64, 64}, {32, 64}, {64, 32}, {32, 32}, {16, 64}, {16, 32}, {16, 16}, {8, 16}};
  const int cap = first_row_tile(p.N);
  auto pick = [&](const int (*tiles)[2], int n, bool dkv, int& bm, int& bn, size_t& smem) {
    for (int i = 0; i < n; ++i) {
      if (tiles[i][0] > cap) continue;
      const size_t s = bwd_layout(tiles[i][0], tiles[i][1], p.D, dkv ? 2 * tiles[i][1] : tiles[i][0]).total;
      if (s <= (size_t)lim.smem_optin) {
        bm = tiles[i][0];
        bn = tiles[i][1];
        smem = s;
        return true;
      }
    }
    return false;
  };
  if (!pick(kDq, 8, false, p.dq_bm, p.dq_bn, p.dq_smem) || !pick(kKv, 8, true, p.kv_bm, p.kv_bn, p.kv_smem)) {
    *why = "the attention backward kernels' shared memory does not fit this device";
    return false;
  }
  return true;
}

cudaError_t flash_scan_backward_launch(const FlashBwdParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, p.tc, [&](auto tk, auto tc) {
    using TK = decltype(tk);
    constexpr bool TC = decltype(tc)::value;
    const unsigned bh = (unsigned)(p.B * p.H);
    if (p.N > 0 && bh > 0) {
      const dim3 grid((unsigned)cdiv64(p.N, p.dq_bm), bh);
      const cudaError_t err = launch_tile_kernel(flash_bwd_dq_kernel<TK, TC>, grid, p.dq_smem, p, stream);
      if (err != cudaSuccess) return err;
    }
    if (p.dk != nullptr && p.M > 0 && bh > 0) {
      const dim3 grid((unsigned)cdiv64(p.M, p.kv_bn), bh);
      const cudaError_t err = launch_tile_kernel(flash_bwd_dkv_kernel<TK, TC>, grid, p.kv_smem, p, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

cudaError_t gather_attention_backward_launch(const GatherBwdParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, p.tc, [&](auto tk, auto tc) {
    using TK = decltype(tk);
    constexpr bool TC = decltype(tc)::value;
    const int64_t rows = (int64_t)p.B * p.H * p.N;
    if (rows > 0) {
      const unsigned blocks = (unsigned)min64(cdiv64(rows, kBwdRowWarps), kMaxRowBlocks);
      gather_bwd_dq_kernel<TK, TC><<<blocks, kBwdRowWarps * 32, 0, stream>>>(p);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    const int64_t slots = (int64_t)p.B * p.H * p.M;
    if (p.dk != nullptr && slots > 0) {
      const unsigned blocks = (unsigned)min64(cdiv64(slots, kBwdRowWarps), kMaxRowBlocks);
      gather_bwd_dkv_kernel<TK, TC><<<blocks, kBwdRowWarps * 32, 0, stream>>>(p);
      return cudaGetLastError();
    }
    return cudaSuccess;
  });
}

}  // namespace fot_cuda
