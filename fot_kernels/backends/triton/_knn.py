"""Fused exact kNN scan: scores = Q @ K_mem^T per tile on the tensor cores, running top-k on chip.

Two kernels (README.md beside this file has the math and the invariants):
- ``_knn_scan_kernel``: grid (row blocks, B * Hkv, memory splits). Rows are the (query head of the
  kv group, query) pairs of one kv head, so decoding with GQA still fills a tensor-core tile. Each
  program keeps the top K of its rows over its memory split as packed int64 keys and either writes
  the final (scores, indices) (one split) or its K packed keys per row (several splits).
- ``_knn_merge_kernel``: merges the per-split lists of each row and writes (scores, indices).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import EMPTY_KEY, finite, merge_topk, pack_keys, tile_dot, unpack_keys


@triton.jit
def _knn_scan_kernel(
    Q, MK, MLEN, MMASK, OUT_S, OUT_I, PART,
    sqb, sqh, sql,
    smb, smh, smm,
    smask_b, smask_m,
    Hkv, Lq, M, D, G, n_rows, split_len, k_out, n_splits,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DC: tl.constexpr, K: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
    INTERPRET: tl.constexpr, FINAL: tl.constexpr, OFF64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv

    rows = pid_m * BM + tl.arange(0, BM)  # [BM] (group head g, query i) pairs of this kv head
    row_ok = rows < n_rows
    g = rows // Lq
    i = rows % Lq
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D

    p_q = Q + b.to(tl.int64) * sqb + (hkv * G + g).to(tl.int64)[:, None] * sqh + i[:, None] * sql  # [BM, 1]
    if DC == BD:  # the query tile stays in registers for the whole scan
        b_q = tl.load(p_q + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]

    m_end = M
    if HAS_LEN:
        m_end = tl.minimum(tl.load(MLEN + b).to(tl.int32), M)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, m_end)

    p_mk = MK + b.to(tl.int64) * smb + hkv.to(tl.int64) * smh
    run = tl.full([BM, K], EMPTY_KEY, tl.int64)  # [BM, K] sorted descending
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)  # [BN]
        n_ok = offs_n < end
        offs_nk = offs_n.to(tl.int64) if OFF64 else offs_n
        if DC == BD:
            p_kt = p_mk + offs_nk[None, :] * smm + offs_d[:, None]
            b_kt = tl.load(p_kt, mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [BD, BN]
            b_s = tile_dot(b_q, b_kt, tl.zeros([BM, BN], tl.float32), DOT_FP32, INTERPRET)  # [BM, BN]
        else:  # wide heads / fp32: the product runs over head-dim chunks, query chunks re-read (L1-resident)
            b_s = tl.zeros([BM, BN], tl.float32)
            for d0 in tl.static_range(0, BD, DC):
                offs_c = d0 + tl.arange(0, DC)  # [DC]
                c_ok = offs_c < D
                b_qc = tl.load(p_q + offs_c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)  # [BM, DC]
                p_kc = p_mk + offs_nk[None, :] * smm + offs_c[:, None]
                b_kc = tl.load(p_kc, mask=c_ok[:, None] & n_ok[None, :], other=0.0)  # [DC, BN]
                b_s = tile_dot(b_qc, b_kc, b_s, DOT_FP32, INTERPRET)
        ok = n_ok
        if HAS_MASK:
            ok = ok & (tl.load(MMASK + b.to(tl.int64) * smask_b + offs_nk * smask_m, mask=n_ok, other=0) != 0)
        ok = (ok[None, :] & row_ok[:, None]) & finite(b_s)  # [BM, BN]; NaN and +-inf scores are never candidates
        keys = tl.where(ok, pack_keys(b_s, offs_n[None, :]), EMPTY_KEY)  # [BM, BN]
        # per-row threshold: the K-th key so far; a tile with nothing above it for any row is skipped
        thr = tl.min(run, axis=1)  # [BM]
        if tl.max((keys > thr[:, None]).to(tl.int32)) > 0:
            run = merge_topk(run, keys, K)

    offs_k = tl.arange(0, K)
    flat = pid_bh.to(tl.int64) * n_rows + rows  # [BM] row of the [B, Hq, Lq] output
    if FINAL:
        score, index = unpack_keys(run)
        k_ok = row_ok[:, None] & (offs_k[None, :] < k_out)
        tl.store(OUT_S + flat[:, None] * k_out + offs_k[None, :], score, mask=k_ok)
        tl.store(OUT_I + flat[:, None] * k_out + offs_k[None, :], index, mask=k_ok)
    else:
        p_part = PART + (flat[:, None] * n_splits + pid_s) * K + offs_k[None, :]
        tl.store(p_part, run, mask=row_ok[:, None])


@triton.jit
def _knn_merge_kernel(
    PART, OUT_S, OUT_I, n_rows_total, n_splits, k_out,
    BM: tl.constexpr, K: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM] flat rows of [B, Hq, Lq]
    row_ok = rows < n_rows_total
    offs_k = tl.arange(0, K)
    base = rows.to(tl.int64)[:, None] * n_splits * K + offs_k[None, :]
    run = tl.load(PART + base, mask=row_ok[:, None], other=EMPTY_KEY)  # [BM, K]
    for s in range(1, n_splits):
        cand = tl.load(PART + base + s * K, mask=row_ok[:, None], other=EMPTY_KEY)  # [BM, K] sorted
        both = tl.maximum(run, tl.flip(cand, 1))
        run = tl.bitonic_merge(both, 1, descending=True)
    score, index = unpack_keys(run)
    k_ok = row_ok[:, None] & (offs_k[None, :] < k_out)
    flat = rows.to(tl.int64)[:, None] * k_out + offs_k[None, :]
    tl.store(OUT_S + flat, score, mask=k_ok)
    tl.store(OUT_I + flat, index, mask=k_ok)
