// fot_cuda kNN scan: fused score tile + on-chip exact top-k, memory split across blocks, and the
// merge of the splits' sorted lists. See csrc/cuda/README.md for the invariants.
#include "common.cuh"

namespace fot_cuda {
namespace {

constexpr int kCB = 64;  // candidate buffer entries per row (flushed into the top list when full)
constexpr int kKT = kMaxK / 32;

struct KnnLayout {
  int Dp, ldq, ldk, lds, K32;
  size_t k_tile;  // elements of one key tile buffer (two buffers on the tensor-core path)
  size_t off_q, off_k, off_s, off_valid, off_top, off_cand, off_cnt, off_thr, total;
};

// Shared-memory layout of one block, computed identically on the host (plan) and the device.
__host__ __device__ inline KnnLayout knn_layout(int BM, int BN, int D, int k, bool tc, int esz) {
  KnnLayout L;
  L.Dp = round_up(D < 1 ? 1 : D, 16);
  L.ldq = L.ldk = tc ? L.Dp + 8 : L.Dp + 1;
  L.lds = BN + 4;
  L.K32 = round_up(k, 32);
  size_t o = 0;
  L.off_q = o;
  o = align_up(o + (size_t)BM * L.ldq * esz, 128);
  L.off_k = o;
  L.k_tile = align_up((size_t)BN * L.ldk * esz, 128) / esz;
  o += (tc ? 2 : 1) * L.k_tile * esz;
  L.off_s = o;
  o = align_up(o + (size_t)BM * L.lds * sizeof(float), 128);
  L.off_valid = o;
  o = align_up(o + BN, 128);
  L.off_top = o;
  o = align_up(o + (size_t)BM * L.K32 * sizeof(uint64_t), 128);
  L.off_cand = o;
  o = align_up(o + (size_t)BM * kCB * sizeof(uint64_t), 128);
  L.off_cnt = o;
  o = align_up(o + (size_t)BM * sizeof(int), 128);
  L.off_thr = o;
  o = align_up(o + (size_t)BM * sizeof(uint64_t), 128);
  L.total = o;
  return L;
}

// Empties row r's candidate buffer into its top list (one warp).
__device__ __forceinline__ void flush_row(uint64_t* cand, int& cnt, uint64_t* top, int k, uint64_t& thr, int lane) {
  for (int i = lane; i < kCB; i += 32)
    if (i >= cnt) cand[i] = 0;
  __syncwarp();
  warp_sort_desc<kCB>(cand, lane);
  warp_merge_into_top<kKT, kCB / 32>(top, k, cand, cnt, lane);
  thr = top[k - 1];  // the k-th best so far (0 while fewer than k: everything is taken)
  cnt = 0;
}

// grid (row tiles, B*H, splits), kThreads threads, dynamic shared memory knn_layout(...).total
template <typename TK, bool TC>
__global__ void __launch_bounds__(kThreads, 2) knn_scan_kernel(const KnnParams p) {
  using TS = typename std::conditional<TC, TK, float>::type;  // tile storage / product type
  extern __shared__ __align__(128) unsigned char smem[];
  const int BM = p.bm, BN = p.bn;  // BN: 64 or 32 (a multiple of the 32 selection lanes)
  const KnnLayout L = knn_layout(BM, BN, p.D, p.k, TC, (int)sizeof(TS));
  TS* q_s = reinterpret_cast<TS*>(smem + L.off_q);        // [BM][ldq]
  TS* k_s = reinterpret_cast<TS*>(smem + L.off_k);        // [2 (TC) or 1][BN][ldk]
  float* s_s = reinterpret_cast<float*>(smem + L.off_s);  // [BM][lds]
  uint8_t* valid_s = smem + L.off_valid;                  // [BN]
  uint64_t* top_s = reinterpret_cast<uint64_t*>(smem + L.off_top);    // [BM][K32], sorted desc
  uint64_t* cand_s = reinterpret_cast<uint64_t*>(smem + L.off_cand);  // [BM][CB]
  int* cnt_s = reinterpret_cast<int*>(smem + L.off_cnt);              // [BM]
  uint64_t* thr_s = reinterpret_cast<uint64_t*>(smem + L.off_thr);    // [BM]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const TileCoords t = tile_coords(p);
  const int row0 = t.row0, rows = t.rows, bh = t.bh, b = t.b, h = t.h;
  const int64_t m_begin = t.m_begin, m_end = t.m_end;

  const TS* qg = reinterpret_cast<const TS*>(p.q) + ((int64_t)bh * p.N + row0) * p.D;
  load_tile<TS, TS>(q_s, L.ldq, qg, p.D, rows, BM, p.D, L.Dp, p.q_vec, nullptr);
  for (int i = threadIdx.x; i < BM * L.K32; i += kThreads) top_s[i] = 0;
  for (int i = threadIdx.x; i < BM; i += kThreads) {
    cnt_s[i] = 0;
    thr_s[i] = 0;
  }
  const TK* kbase = reinterpret_cast<const TK*>(p.keys.ptr) + b * p.keys.sb + h * p.keys.sh;
  const bool* mrow = p.mask != nullptr ? p.mask + (int64_t)b * p.M : nullptr;

  // Tensor-core path with >= 4-byte vector loads: key tiles come in through cp.async into two
  // buffers, tile i + 1 in flight while tile i is scored and selected. Otherwise (fp32 products of
  // converted tiles, or odd D) one buffer, loaded synchronously at the top of each step.
  const bool pipelined = TC && p.k_vec >= 4;
  auto load_keys = [&](int64_t m, TS* buf) {
    const int nv = (int)min64(BN, m_end - m);
    if constexpr (TC) {
      if (pipelined) {
        load_tile_async<TS>(buf, L.ldk, kbase + m * p.keys.sm, p.keys.sm, nv, BN, p.D, L.Dp, p.k_vec, nullptr);
        return;
      }
    }
    load_tile<TS, TK>(buf, L.ldk, kbase + m * p.keys.sm, p.keys.sm, nv, BN, p.D, L.Dp, p.k_vec, nullptr);
  };
  if (pipelined && m_begin < m_end) load_keys(m_begin, k_s);
  __pipeline_commit();

  int step = 0;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += BN, ++step) {
    const int nvalid = (int)min64(BN, m_end - m0);
    TS* k_tile = k_s + (pipelined ? (size_t)(step & 1) * L.k_tile : 0);
    __syncthreads();  // the previous step has finished reading s_s / valid_s and its key buffer
    if (pipelined) {
      if (m0 + BN < m_end) load_keys(m0 + BN, k_s + (size_t)((step + 1) & 1) * L.k_tile);
      __pipeline_commit();
      __pipeline_wait_prior(1);  // this thread's copies of the current tile have landed
    } else {
      load_keys(m0, k_tile);
    }
    for (int c = threadIdx.x; c < BN; c += kThreads)
      valid_s[c] = (c < nvalid && (mrow == nullptr || mrow[m0 + c])) ? 1 : 0;
    __syncthreads();  // every thread's part of the tile
    score_tile<TS, TC>(q_s, L.ldq, k_tile, L.ldk, s_s, L.lds, BM, BN, p.D, L.Dp);
    __syncthreads();
    // selection: warp w owns rows w, w + 8, ...; a score is a candidate if its slot is valid,
    // it is finite (NaN and +-inf scores are dropped), and its key beats the row's current k-th best
    for (int r = warp; r < rows; r += kWarps) {
      uint64_t thr = thr_s[r];
      int cnt = cnt_s[r];
      for (int c0 = 0; c0 < BN; c0 += 32) {
        if (cnt + 32 > kCB) flush_row(cand_s + r * kCB, cnt, top_s + r * L.K32, p.k, thr, lane);
        const int c = c0 + lane;
        const float s = s_s[r * L.lds + c];
        const uint64_t key = pack_key(s, m0 + c);
        const bool take = valid_s[c] && isfinite(s) && key > thr;
        const unsigned ballot = __ballot_sync(kFull, take);
        if (take) cand_s[r * kCB + cnt + __popc(ballot & ((1u << lane) - 1u))] = key;
        cnt += __popc(ballot);
      }
      __syncwarp();
      if (lane == 0) {
        thr_s[r] = thr;
        cnt_s[r] = cnt;
      }
    }
  }
  __syncthreads();
  for (int r = warp; r < rows; r += kWarps) {
    uint64_t thr = thr_s[r];
    int cnt = cnt_s[r];
    uint64_t* top = top_s + r * L.K32;
    if (cnt > 0) flush_row(cand_s + r * kCB, cnt, top, p.k, thr, lane);
    const int64_t grow = (int64_t)bh * p.N + row0 + r;
    if (p.splits == 1) {
      for (int j = lane; j < p.k; j += 32) {
        float s;
        int64_t slot;
        unpack_key(top[j], s, slot);
        p.out_s[grow * p.k + j] = s;
        p.out_i[grow * p.k + j] = slot;
      }
    } else {
      uint64_t* dst = p.part + (grow * p.splits + blockIdx.z) * p.k;
      for (int j = lane; j < p.k; j += 32) dst[j] = top[j];
    }
  }
}

constexpr int kMergeWarps = 4;

// One warp per row folds the row's `splits` sorted lists into the top k and unpacks them.
__global__ void __launch_bounds__(kMergeWarps * 32) knn_merge_kernel(const uint64_t* part, int splits, int k,
                                                                     int64_t rows, float* out_s, int64_t* out_i) {
  __shared__ uint64_t buf[kMergeWarps][2][kMaxK];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = (int64_t)blockIdx.x * kMergeWarps + warp;
  if (row >= rows) return;  // warp-uniform; no block-wide barrier below
  uint64_t* top = buf[warp][0];
  uint64_t* other = buf[warp][1];
  const uint64_t* src = part + row * splits * k;
  for (int j = lane; j < k; j += 32) top[j] = src[j];
  __syncwarp();
  for (int s = 1; s < splits; ++s) {
    for (int j = lane; j < k; j += 32) other[j] = src[(int64_t)s * k + j];
    __syncwarp();
    warp_merge_into_top<kKT, kKT>(top, k, other, k, lane);
  }
  for (int j = lane; j < k; j += 32) {
    float sc;
    int64_t slot;
    unpack_key(top[j], sc, slot);
    out_s[row * k + j] = sc;
    out_i[row * k + j] = slot;
  }
}

}  // namespace

bool knn_plan(KnnParams& p, const DeviceLimits& lim, const char** why) {
  if (p.k < 1 || p.k > kMaxK) {
    *why = "k must be in [1, 256] for the CUDA kNN scan";
    return false;
  }
  const int esz = p.tc ? 2 : 4;
  // BN = 32 only where 64 does not fit even at BM = 16 (fp32 D ~ 256 with k = 256 on a 99 KB device)
  if (!pick_tiles(p, lim, {64, 32}, [&](int bm, int bn) { return knn_layout(bm, bn, p.D, p.k, p.tc, esz).total; })) {
    *why = "the kNN scan's shared memory does not fit this device";
    return false;
  }
  plan_splits(p, lim, p.bn, (int64_t)p.k * (int64_t)sizeof(uint64_t));
  return true;
}

cudaError_t knn_scan_launch(const KnnParams& p, cudaStream_t stream) {
  const cudaError_t err = dispatch_dtype(p.dtype, p.tc, [&](auto tk, auto tc) {
    return launch_tiles(knn_scan_kernel<decltype(tk), decltype(tc)::value>, p, stream);
  });
  if (err != cudaSuccess || p.splits == 1) return err;
  const int64_t rows = (int64_t)p.B * p.H * p.N;
  knn_merge_kernel<<<(unsigned)cdiv64(rows, kMergeWarps), kMergeWarps * 32, 0, stream>>>(p.part, p.splits, p.k, rows,
                                                                                          p.out_s, p.out_i);
  return cudaGetLastError();
}

}  // namespace fot_cuda
