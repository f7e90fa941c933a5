// Running top-k bookkeeping of the kNN scan. Order: (score desc, index asc). Each row owns a
// reservoir of candidates (append-only, SIMD compress): a slot is appended when its score is finite
// and beats the row's threshold (-inf until the row holds k entries). When the reservoir is
// nearly full it is compacted to the exact top-k of everything seen so far and the threshold
// becomes the k-th best score. Slots arrive in increasing index order, so a later slot whose score
// equals the threshold loses the tie and may be dropped: the comparison is strict.
#pragma once

#include "simd.h"

namespace fot_cpu {

FOT_INLINE bool worse(float sa, int64_t ia, float sb, int64_t ib) { return sa < sb || (sa == sb && ia > ib); }

struct Entry {
  float s;
  int32_t i;
};

struct RowRes {
  float* s;      // [cap] scores
  int32_t* i;    // [cap] slot indices
  int32_t cnt;  // entries held
  float thr;    // k-th best score once the row holds k entries, else -inf
};

#ifndef FOT_CAPMUL
#define FOT_CAPMUL 2
#endif
inline int64_t reservoir_cap(int64_t k) { return FOT_CAPMUL * k + 32; }

struct CompactScratch {
  std::vector<Entry> entries;
  std::vector<float> a, b, c;
  std::vector<int32_t> ties;
};

// Keeps the best min(k, cnt) entries (unordered unless `sorted`), updates thr.
void compact(RowRes& rr, int64_t k, CompactScratch& cs, bool sorted);

// Appends the candidates among S[0:cnt] (cnt rounded up to 16 is readable) of one row; slot j has
// index slot0 + j and validity bit j of bits.
void select_from_scores(RowRes& rr, const float* S, int64_t cnt, const uint32_t* bits, int32_t slot0, int64_t k,
                        CompactScratch& tmp);

// Writes a compacted row's k entries (sorted when it was compacted with sorted=true), padded with
// (-inf, -1).
void write_row(const RowRes& rr, int64_t k, float* scores, int64_t* indices);

// Merges the per-split top-k lists of a memory split: part_s/part_i [BH, splits, N, k] with entry
// counts part_c [BH, splits, N] -> the best k of their union, sorted, into scores/indices
// [BH, N, k].
void merge_splits(const float* part_s, const int64_t* part_i, const int64_t* part_c, int64_t BH, int64_t splits,
                  int64_t N, int64_t k, float* scores, int64_t* indices);

}  // namespace fot_cpu
