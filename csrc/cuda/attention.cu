// fot_cuda attention: flash-style online softmax over keys/values (dense memory with validity,
// or local keys with the bottom-right causal mask), the log-sum-exp merge of memory splits, and
// the softmax over gathered kNN slots. See csrc/cuda/README.md.
#include "common.cuh"

namespace fot_cuda {
namespace {

constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

struct FlashLayout {
  int Dp, ldq, ldk, ldv, lds, ldp, ldo;
  size_t k_tile, v_tile;  // elements of one key / value tile buffer (two each on the tensor-core path)
  size_t off_q, off_k, off_v, off_s, off_p, off_o, off_m, off_l, off_alpha, off_flags, total;
};

// TC: q/k/v tiles in fp16/bf16 (ld = Dp + 8), P in the same dtype for the second product.
// SIMT: q/k tiles fp32 with odd ld (Dp + 1), v fp32 (ld = Dp), P kept in the fp32 score tile.
__host__ __device__ inline FlashLayout flash_layout(int BM, int BN, int D, bool tc, int esz) {
  FlashLayout L;
  L.Dp = round_up(D < 1 ? 1 : D, 16);
  L.ldq = L.ldk = tc ? L.Dp + 8 : L.Dp + 1;
  L.ldv = tc ? L.Dp + 8 : L.Dp;
  L.lds = BN + 4;
  L.ldp = BN + 8;
  L.ldo = L.Dp + 4;
  size_t o = 0;
  L.off_q = o;
  o = align_up(o + (size_t)BM * L.ldq * esz, 128);
  const int nbuf = tc ? 2 : 1;
  L.k_tile = align_up((size_t)BN * L.ldk * esz, 128) / esz;
  L.v_tile = align_up((size_t)BN * L.ldv * esz, 128) / esz;
  L.off_k = o;
  o += nbuf * L.k_tile * esz;
  L.off_v = o;
  o += nbuf * L.v_tile * esz;
  L.off_s = o;
  o = align_up(o + (size_t)BM * L.lds * sizeof(float), 128);
  L.off_p = o;
  o = align_up(o + (tc ? (size_t)BM * L.ldp * esz : 0), 128);
  L.off_o = o;
  o = align_up(o + (size_t)BM * L.ldo * sizeof(float), 128);
  L.off_m = o;
  o = align_up(o + (size_t)BM * sizeof(float), 128);
  L.off_l = o;
  o = align_up(o + (size_t)BM * sizeof(float), 128);
  L.off_alpha = o;
  o = align_up(o + (size_t)BM * sizeof(float), 128);
  L.off_flags = o;  // valid_s [BN], then used_s [BN]
  o = align_up(o + 2 * (size_t)BN, 128);
  L.total = o;
  return L;
}

// grid (row tiles, B*H, splits), kThreads threads.
template <typename TK, bool TC>
__global__ void __launch_bounds__(kThreads, 2) flash_scan_kernel(const FlashParams p) {
  using TS = typename std::conditional<TC, TK, float>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  const int BM = p.bm, BN = p.bn;
  const FlashLayout L = flash_layout(BM, BN, p.D, TC, (int)sizeof(TS));
  TS* q_s = reinterpret_cast<TS*>(smem + L.off_q);            // [BM][ldq]
  TS* k_s = reinterpret_cast<TS*>(smem + L.off_k);            // [2 (TC) or 1][BN][ldk]
  TS* v_s = reinterpret_cast<TS*>(smem + L.off_v);            // [2 (TC) or 1][BN][ldv]
  float* s_s = reinterpret_cast<float*>(smem + L.off_s);      // [BM][lds] scores, then P (SIMT)
  TS* p_s = reinterpret_cast<TS*>(smem + L.off_p);            // [BM][ldp] P (TC)
  float* o_s = reinterpret_cast<float*>(smem + L.off_o);      // [BM][ldo] unnormalised output
  float* m_s = reinterpret_cast<float*>(smem + L.off_m);      // [BM] running max (base 2)
  float* l_s = reinterpret_cast<float*>(smem + L.off_l);      // [BM] running sum
  float* alpha_s = reinterpret_cast<float*>(smem + L.off_alpha);  // [BM] rescale of this tile
  uint8_t* valid_s = smem + L.off_flags;                      // [BN] slot valid (length, mask)
  uint8_t* used_s = valid_s + BN;                             // [BN] kept by some row of the tile

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const TileCoords t = tile_coords(p);
  const int row0 = t.row0, rows = t.rows, bh = t.bh, b = t.b, h = t.h;
  const int64_t m_begin = t.m_begin;
  int64_t m_end = t.m_end;
  if (p.causal_lq > 0) {  // the last key any row of this tile may see
    const int64_t first = row0 % p.causal_lq;
    const int64_t last_i = (first + rows - 1 >= p.causal_lq) ? p.causal_lq - 1 : first + rows - 1;
    m_end = min64(m_end, last_i + p.M - p.causal_lq + 1);
  }

  const TS* qg = reinterpret_cast<const TS*>(p.q) + ((int64_t)bh * p.N + row0) * p.D;
  load_tile<TS, TS>(q_s, L.ldq, qg, p.D, rows, BM, p.D, L.Dp, p.q_vec, nullptr);
  for (int i = threadIdx.x; i < BM * L.ldo; i += kThreads) o_s[i] = 0.f;
  if constexpr (TC) {
    for (int i = threadIdx.x; i < BM * L.ldp; i += kThreads) p_s[i] = from_float<TS>(0.f);
  }
  for (int i = threadIdx.x; i < BM; i += kThreads) {
    m_s[i] = -INFINITY;
    l_s[i] = 0.f;
    alpha_s[i] = 1.f;
  }
  const TK* kbase = reinterpret_cast<const TK*>(p.keys.ptr) + b * p.keys.sb + h * p.keys.sh;
  const TK* vbase = reinterpret_cast<const TK*>(p.values.ptr) + b * p.values.sb + h * p.values.sh;
  const bool* mrow = p.mask != nullptr ? p.mask + (int64_t)b * p.M : nullptr;

  // Tensor-core path with >= 4-byte vector loads of keys and values: their tiles come in through
  // cp.async into two buffers each, tile i + 1 in flight while tile i is processed. Otherwise
  // (fp32 products of converted tiles, or odd D) one buffer each, loaded synchronously.
  const bool pipelined = TC && p.k_vec >= 4 && p.v_vec >= 4;
  auto load_kv_async = [&](int64_t m, int buf) {
    if constexpr (TC) {
      const int nv = (int)min64(BN, m_end - m);
      load_tile_async<TS>(k_s + buf * L.k_tile, L.ldk, kbase + m * p.keys.sm, p.keys.sm, nv, BN, p.D, L.Dp, p.k_vec,
                          nullptr);
      load_tile_async<TS>(v_s + buf * L.v_tile, L.ldv, vbase + m * p.values.sm, p.values.sm, nv, BN, p.D, L.Dp,
                          p.v_vec, mrow != nullptr ? mrow + m : nullptr);
    }
  };
  if (pipelined && m_begin < m_end) load_kv_async(m_begin, 0);
  __pipeline_commit();

  int step = 0;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += BN, ++step) {
    const int nvalid = (int)min64(BN, m_end - m0);
    const int buf = pipelined ? (step & 1) : 0;
    TS* k_tile = k_s + buf * L.k_tile;
    TS* v_tile = v_s + buf * L.v_tile;
    __syncthreads();  // the previous step's P @ V has finished with its buffers, s_s and p_s
    if (pipelined) {
      if (m0 + BN < m_end) load_kv_async(m0 + BN, buf ^ 1);
      __pipeline_commit();
      __pipeline_wait_prior(1);  // this thread's copies of the current tiles have landed
    }
    for (int c = threadIdx.x; c < BN; c += kThreads) {
      valid_s[c] = (c < nvalid && (mrow == nullptr || mrow[m0 + c])) ? 1 : 0;
      used_s[c] = 0;
    }
    if (!pipelined) {
      load_tile<TS, TK>(k_tile, L.ldk, kbase + m0 * p.keys.sm, p.keys.sm, nvalid, BN, p.D, L.Dp, p.k_vec, nullptr);
    }
    __syncthreads();  // every thread's part of the tiles; valid_s for the value load below
    if (!pipelined) {
      load_tile<TS, TK>(v_tile, L.ldv, vbase + m0 * p.values.sm, p.values.sm, nvalid, BN, p.D, L.Dp, p.v_vec, valid_s);
    }
    score_tile<TS, TC>(q_s, L.ldq, k_tile, L.ldk, s_s, L.lds, BM, BN, p.D, L.Dp);
    __syncthreads();
    // online softmax, warp w owns rows w, w + 8, ... (logits x = score * scale and the running max
    // m in natural-log units, finite wherever the fp32 logit is; exponentials in base 2); a key
    // is kept by a row iff its slot is valid, its score finite (NaN / +-inf are dropped) and, with
    // causal_lq, it is visible to the row. used: kept by some row of this warp.
    bool used[2] = {false, false};
    for (int r = warp; r < rows; r += kWarps) {
      const int64_t lim = p.causal_lq > 0 ? (row0 + r) % p.causal_lq + p.M - p.causal_lq : m_end;
      float x[2];
      float mx = -INFINITY;
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int c = lane + 32 * t;
        x[t] = -INFINITY;
        if (c < BN) {
          const float s = s_s[r * L.lds + c];
          if (valid_s[c] && isfinite(s) && m0 + c <= lim) {
            x[t] = s * p.scale;
            used[t] = true;
          }
        }
        mx = fmaxf(mx, x[t]);
      }
      mx = warp_max(mx);
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mx);
      float alpha = 1.f, psum = 0.f;
      if (m_new != -INFINITY) alpha = exp2f((m_old - m_new) * kLog2e);  // 0 when m_old is -inf
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int c = lane + 32 * t;
        if (c < BN) {
          const float pr = (m_new == -INFINITY) ? 0.f : exp2f((x[t] - m_new) * kLog2e);  // exp2(-inf) = 0
          psum += pr;
          if constexpr (TC) {
            p_s[r * L.ldp + c] = from_float<TS>(pr);
          } else {
            s_s[r * L.lds + c] = pr;
          }
        }
      }
      psum = warp_sum(psum);
      __syncwarp();
      if (lane == 0) {
        m_s[r] = m_new;
        l_s[r] = l_s[r] * alpha + psum;
        alpha_s[r] = alpha;
      }
    }
#pragma unroll
    for (int t = 0; t < 2; ++t)
      if (used[t]) used_s[lane + 32 * t] = 1;  // several warps may store the same 1
    __syncthreads();
    // The value row of a slot no row of the tile keeps is zeroed: its weights are all 0, and
    // 0 * inf = NaN would poison the rows through P @ V (a key with an inf / NaN element, e.g. fp16
    // overflow upstream, has a non-finite score for every query and often an inf value too).
    // Invalid slots and padding were loaded as zeros already.
    for (int c = warp; c < BN; c += kWarps) {
      if (valid_s[c] && !used_s[c]) {
        for (int d = lane; d < L.Dp; d += 32) v_tile[c * L.ldv + d] = from_float<TS>(0.f);
      }
    }
    // O = O * alpha + P @ V
    if constexpr (TC) {
      for (int e = threadIdx.x; e < rows * L.Dp; e += kThreads) {
        const int r = e / L.Dp, d = e - r * L.Dp;
        o_s[r * L.ldo + d] *= alpha_s[r];
      }
      __syncthreads();  // o_s rescaled, v_tile's dropped rows zeroed
      using namespace nvcuda;
      const int ncol = L.Dp / 16, nfrag = (BM / 16) * ncol;
      for (int f = warp; f < nfrag; f += kWarps) {
        const int fr = f / ncol, fc = f - fr * ncol;
        if (fr * 16 >= rows) continue;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::load_matrix_sync(acc, o_s + fr * 16 * L.ldo + fc * 16, L.ldo, wmma::mem_row_major);
        for (int kk = 0; kk < BN; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, TS, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, TS, wmma::row_major> bv;
          wmma::load_matrix_sync(a, p_s + fr * 16 * L.ldp + kk, L.ldp);
          wmma::load_matrix_sync(bv, v_tile + kk * L.ldv + fc * 16, L.ldv);
          wmma::mma_sync(acc, a, bv, acc);
        }
        wmma::store_matrix_sync(o_s + fr * 16 * L.ldo + fc * 16, acc, L.ldo, wmma::mem_row_major);
      }
    } else {
      __syncthreads();  // v_tile's dropped rows zeroed
      for (int e = threadIdx.x; e < rows * p.D; e += kThreads) {
        const int r = e / p.D, d = e - r * p.D;
        float acc = o_s[r * L.ldo + d] * alpha_s[r];
        const float* pr = s_s + r * L.lds;
        for (int c = 0; c < BN; ++c) acc = fmaf(pr[c], v_tile[c * L.ldv + d], acc);
        o_s[r * L.ldo + d] = acc;
      }
    }
  }
  __syncthreads();
  for (int r = warp; r < rows; r += kWarps) {
    const float m = m_s[r], l = l_s[r];
    // no kept key (l >= 1 otherwise); an fp32 logit that overflows (|score * scale| > 3.4e38)
    // leaves m = +inf and l = NaN: NaN out, as in the reference, never a silent (0, -inf)
    const bool empty = m == -INFINITY || l == 0.f;
    const float inv = empty ? 0.f : 1.f / l;
    const float lse = empty ? -INFINITY : m + log2f(l) * kLn2;
    const int64_t grow = (int64_t)bh * p.N + row0 + r;
    float* dst;
    if (p.splits == 1) {
      dst = p.out + grow * p.D;
      if (lane == 0) p.lse[grow] = lse;
    } else {
      dst = p.part_o + (grow * p.splits + blockIdx.z) * p.D;
      if (lane == 0) p.part_lse[grow * p.splits + blockIdx.z] = lse;
    }
    for (int d = lane; d < p.D; d += 32) dst[d] = empty ? 0.f : o_s[r * L.ldo + d] * inv;
  }
}

constexpr int kRowWarps = 4;  // warps per block of the row-wise kernels below

// out[row] = sum_s w_s part_o[row, s] / sum_s w_s with w_s = exp(lse_s - max lse); one warp per row.
__global__ void __launch_bounds__(kRowWarps * 32) flash_merge_kernel(const float* part_o, const float* part_lse,
                                                                     int splits, int D, int64_t rows, float* out,
                                                                     float* lse) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = (int64_t)blockIdx.x * kRowWarps + warp;
  if (row >= rows) return;
  const float* pl = part_lse + row * splits;
  float mx = -INFINITY;
  bool nan = false;  // a split whose fp32 logits overflowed: NaN, and fmaxf would drop it
  for (int s = lane; s < splits; s += 32) {
    mx = fmaxf(mx, pl[s]);
    nan |= isnan(pl[s]);
  }
  mx = __ballot_sync(kFull, nan) ? NAN : warp_max(mx);
  float* o = out + row * D;
  if (mx == -INFINITY) {
    for (int d = lane; d < D; d += 32) o[d] = 0.f;
    if (lane == 0) lse[row] = -INFINITY;
    return;
  }
  float total = 0.f;
  for (int s = 0; s < splits; ++s) total += (pl[s] == -INFINITY) ? 0.f : expf(pl[s] - mx);
  for (int d = lane; d < D; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) {
      if (pl[s] == -INFINITY) continue;
      acc = fmaf(expf(pl[s] - mx), part_o[(row * splits + s) * D + d], acc);
    }
    o[d] = acc / total;
  }
  if (lane == 0) lse[row] = mx + logf(total);
}

// Softmax over a row's selected slots, one warp per row; lanes split the head dim (D <= 256).
template <typename TV>
__global__ void __launch_bounds__(kRowWarps * 32) gather_attention_kernel(const GatherParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = (int64_t)blockIdx.x * kRowWarps + warp;
  if (row >= (int64_t)p.B * p.H * p.N) return;
  const int64_t bh = row / p.N;
  const int b = (int)(bh / p.H), h = (int)(bh - (int64_t)b * p.H);
  const float* sc = p.scores + row * p.k;
  const int64_t* ix = p.indices + row * p.k;
  auto logit = [&](int j) -> float {
    const int64_t i = ix[j];
    const float s = sc[j];
    return (i >= 0 && i < p.M && isfinite(s)) ? s * p.scale : -INFINITY;  // non-finite: dropped
  };
  float mx = -INFINITY;
  for (int j = lane; j < p.k; j += 32) mx = fmaxf(mx, logit(j));
  mx = warp_max(mx);
  float* o = p.out + row * p.D;
  if (mx == -INFINITY) {
    for (int d = lane; d < p.D; d += 32) o[d] = 0.f;
    if (lane == 0) p.lse[row] = -INFINITY;
    return;
  }
  const TV* vbase = reinterpret_cast<const TV*>(p.values.ptr) + b * p.values.sb + h * p.values.sh;
  constexpr int kMaxPerLane = 256 / 32;
  float acc[kMaxPerLane];
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) acc[t] = 0.f;
  float total = 0.f;
  for (int j = 0; j < p.k; ++j) {  // every lane walks every slot: the logit loads are broadcasts
    const float x = logit(j);
    if (x == -INFINITY) continue;
    const float w = exp2f((x - mx) * kLog2e);
    total += w;
    const TV* v = vbase + ix[j] * p.values.sm;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < p.D) acc[t] = fmaf(w, to_float<TV>(v[d]), acc[t]);
    }
  }
  const float inv = 1.f / total;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int d = lane + 32 * t;
    if (d < p.D) o[d] = acc[t] * inv;
  }
  if (lane == 0) p.lse[row] = mx + log2f(total) * kLn2;
}

}  // namespace

bool flash_plan(FlashParams& p, const DeviceLimits& lim, const char** why) {
  const int esz = p.tc ? 2 : 4;
  if (!pick_tiles(p, lim, {64, 32, 16}, [&](int bm, int bn) { return flash_layout(bm, bn, p.D, p.tc, esz).total; })) {
    *why = "the attention kernel's shared memory does not fit this device";
    return false;
  }
  // Causal (local) parts split too: decoding over a long local cache has few rows and blocks;
  // splits past a row tile's last visible key find an empty range and merge in as lse -inf.
  plan_splits(p, lim, p.bn, (int64_t)(p.D + 1) * (int64_t)sizeof(float));
  return true;
}

cudaError_t flash_scan_launch(const FlashParams& p, cudaStream_t stream) {
  const cudaError_t err = dispatch_dtype(p.dtype, p.tc, [&](auto tk, auto tc) {
    return launch_tiles(flash_scan_kernel<decltype(tk), decltype(tc)::value>, p, stream);
  });
  if (err != cudaSuccess || p.splits == 1) return err;
  const int64_t rows = (int64_t)p.B * p.H * p.N;
  flash_merge_kernel<<<(unsigned)cdiv64(rows, kRowWarps), kRowWarps * 32, 0, stream>>>(
      p.part_o, p.part_lse, p.splits, p.D, rows, p.out, p.lse);
  return cudaGetLastError();
}

cudaError_t gather_attention_launch(const GatherParams& p, cudaStream_t stream) {
  const int64_t rows = (int64_t)p.B * p.H * p.N;
  const unsigned blocks = (unsigned)cdiv64(rows, kRowWarps);
  return dispatch_dtype(p.dtype, /*tc=*/false, [&](auto tv, auto) {
    gather_attention_kernel<decltype(tv)><<<blocks, kRowWarps * 32, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fot_cuda
