// The three row-count paths of a work item (direct.h, stream.h, packed panels of gemm.h) and the
// query layout each one reads.
#pragma once

#include "direct.h"
#include "gemm.h"
#include "stream.h"

namespace fot_cpu {

enum class Path { kDirect, kStream, kPacked };

struct QueryRows {
  Path path;
  int NG;          // groups of 16 rows (stream path)
  const float* q;  // the queries in the path's layout
};

// Rows [0, nrows) of q (row-major [nrows][D]) laid out for the path that serves nrows rows, in
// scratch: direct: [nrows][Dq] zero padded; stream: Qt [Dq][NG*16]; packed: tiles [D][MR].
inline QueryRows pack_rows(const float* q, int64_t nrows, int64_t D, Scratch& scratch) {
  const int64_t Dq = cdiv(std::max<int64_t>(D, 1), 16) * 16;
  float* out = scratch.get<float>(std::max(std::max(cdiv(nrows, MR) * MR * D, nrows * Dq), Dq * kStreamMax));
  QueryRows rows{Path::kPacked, (int)cdiv(nrows, 16), out};
  if (nrows <= kDirectMax) {
    rows.path = Path::kDirect;
    pad_queries(q, nrows, D, out);
  } else if (nrows <= kStreamMax) {
    rows.path = Path::kStream;
    pack_queries_t(q, nrows, D, rows.NG, out);
  } else {
    pack_queries(q, nrows, D, out);
  }
  return rows;
}

}  // namespace fot_cpu
