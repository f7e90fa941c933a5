"""Fused backward kernels (FlashAttention-2 recomputation, docs/DESIGN.md 3.4): the Triton versions
of ``streaming.flash_scan_backward_torch`` and ``streaming.gather_attention_backward_torch``, with
their signatures and semantics (README.md beside this file: math, grids, invariants).

- ``_dense_bwd_dkdv_kernel``: grid (key blocks, B * Hkv); keeps a [BN, BD] key/value tile and its
  dK/dV accumulators, loops over every row block of the stacked rows (GQA heads summed in-register).
- ``_dense_bwd_dq_kernel``: grid (row blocks, B * Hkv); keeps a [BM, BD] query/dO tile and its dQ
  accumulator, loops over the key tiles the block may see.
- ``_knn_bwd_dq_kernel``: grid (row blocks, B * Hkv); per candidate column a [BM, BD] gather of
  keys and values, exact fp32 re-score (the forward's), dQ; writes P and dS per (row, candidate).
- ``_knn_bwd_scatter_kernel``: grid over the positions of the stably sorted slot ids; the program
  lanes that start a run of equal ids sum that slot's contributions in row order: dK, dV without
  atomics, the same bits on every run.

Every gradient is accumulated in fp32; no kernel holds anything of size rows x memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import finite, tile_dot


@triton.jit
def _split(x, LOW: tl.constexpr):
    """fp32 x -> (hi, lo) in LOW (fp16/bf16) with hi + lo = x to about 16 significant bits."""
    hi = x.to(LOW)
    return hi, (x - hi.to(tl.float32)).to(LOW)


@triton.jit
def _mm(a, b, acc, FP32: tl.constexpr, INTERPRET: tl.constexpr, LOW: tl.constexpr,
        SPLIT_A: tl.constexpr = False, SPLIT_B: tl.constexpr = False):  # fmt: skip
    """acc + a @ b with fp32 accumulation. FP32: 3xTF32 on fp32-converted tiles (fp32 or mixed
    inputs). Else the native fp16/bf16 tensor-core product: operands that hold LOW values are used
    as they are; an fp32 operand (P, dS, dO: SPLIT_A / SPLIT_B) is split into hi + lo LOW parts and
    multiplied as hi*hi + lo*hi + hi*lo, so that no fp32 intermediate is rounded to 8 (bf16) or 11
    (fp16) bits: FlashAttention-2 rounds P and dS, which can cost more than the output rounding
    when one term dominates a gradient; the split keeps about 16 bits for 2-3x the tensor-core work
    of those products."""
    if FP32:
        return tile_dot(a, b, acc, True, INTERPRET)
    elif SPLIT_A and SPLIT_B:
        a_hi, a_lo = _split(a, LOW)
        b_hi, b_lo = _split(b, LOW)
        acc = tile_dot(a_hi, b_hi, acc, False, INTERPRET)
        acc = tile_dot(a_lo, b_hi, acc, False, INTERPRET)
        return tile_dot(a_hi, b_lo, acc, False, INTERPRET)
    elif SPLIT_A:
        a_hi, a_lo = _split(a, LOW)
        acc = tile_dot(a_hi, b.to(LOW), acc, False, INTERPRET)
        return tile_dot(a_lo, b.to(LOW), acc, False, INTERPRET)
    elif SPLIT_B:
        b_hi, b_lo = _split(b, LOW)
        acc = tile_dot(a.to(LOW), b_hi, acc, False, INTERPRET)
        return tile_dot(a.to(LOW), b_lo, acc, False, INTERPRET)
    else:
        return tile_dot(a.to(LOW), b.to(LOW), acc, False, INTERPRET)


@triton.jit
def _dense_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, MLEN, MMASK, DK, DV,
    sqb, sqh, sqn,
    skb, skh, skm,
    svb, svh, svm,
    sdb, sdh, sdn,
    smask_b, smask_m,
    Hkv, M, D, n_rows, causal_lq, qk_scale, lse_scale, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DC: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr, OFF64: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    low = Q.dtype.element_ty

    offs_n = pid_n * BN + tl.arange(0, BN)  # [BN] key slots of this program
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    m_end = M
    if HAS_LEN:
        m_end = tl.minimum(tl.load(MLEN + b).to(tl.int32), M)
    slot_ok = offs_n < m_end
    offs_nk = offs_n.to(tl.int64) if OFF64 else offs_n
    if HAS_MASK:
        p_mask = MMASK + b.to(tl.int64) * smask_b + offs_nk * smask_m
        slot_ok = slot_ok & (tl.load(p_mask, mask=offs_n < M, other=0) != 0)
    # keys/values of invalid slots are never read; non-finite keys score non-finite and are dropped
    p_k = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + offs_nk[:, None] * skm  # [BN, 1]
    p_v = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + offs_nk[:, None] * svm
    if DC == BD:  # the key/value tile stays in registers for the whole row loop
        b_k = tl.load(p_k + offs_d[None, :], mask=slot_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
        b_v = tl.load(p_v + offs_d[None, :], mask=slot_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]

    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    p_q = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    p_do = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    first = pid_n * BN  # a row (query position i) sees this block only if i + M - causal_lq >= first
    if tl.max(slot_ok.to(tl.int32)) > 0:
        for m0 in range(0, n_rows, BM):
            rows = m0 + tl.arange(0, BM)  # [BM] stacked rows (group head, query) of this kv head
            row_ok = rows < n_rows
            i = rows % causal_lq if CAUSAL else rows
            see = True
            if CAUSAL:
                see = tl.max(tl.where(row_ok, i, -1)) + (M - causal_lq) >= first
            if see:
                rows_q = rows.to(tl.int64)
                flat = pid_bh.to(tl.int64) * n_rows + rows
                lse = tl.load(LSE + flat, mask=row_ok, other=float("-inf"))  # [BM] natural log, merged
                delta = tl.load(DELTA + flat, mask=row_ok, other=0.0)  # [BM]
                if DC == BD:
                    rd_mask = row_ok[None, :] & d_ok[:, None]
                    b_qt = tl.load(p_q + rows_q[None, :] * sqn + offs_d[:, None], mask=rd_mask, other=0.0)  # [BD, BM]
                    b_dot = tl.load(p_do + rows_q[None, :] * sdn + offs_d[:, None], mask=rd_mask, other=0.0)
                    b_st = _mm(b_k, b_qt, tl.zeros([BN, BM], tl.float32), DOT_FP32, INTERPRET, low)  # [BN, BM] S^T
                    b_dpt = _mm(b_v, b_dot, tl.zeros([BN, BM], tl.float32), DOT_FP32, INTERPRET, low, False, True)
                    b_qf = tl.trans(b_qt)  # [BM, BD]
                    b_dof = tl.trans(b_dot)
                else:  # fp32 / wide heads: S^T and dP^T over head-dim chunks (tiles re-read, L1-resident)
                    b_st = tl.zeros([BN, BM], tl.float32)
                    b_dpt = tl.zeros([BN, BM], tl.float32)
                    for d0 in range(0, BD, DC):  # a loop, not unrolled: one chunk live at a time
                        offs_c = d0 + tl.arange(0, DC)
                        c_ok = offs_c < D
                        kv_c = slot_ok[:, None] & c_ok[None, :]
                        rc = row_ok[None, :] & c_ok[:, None]
                        b_kc = tl.load(p_k + offs_c[None, :], mask=kv_c, other=0.0)  # [BN, DC]
                        b_qtc = tl.load(p_q + rows_q[None, :] * sqn + offs_c[:, None], mask=rc, other=0.0)  # [DC, BM]
                        b_st = _mm(b_kc, b_qtc, b_st, DOT_FP32, INTERPRET, low)
                        b_vc = tl.load(p_v + offs_c[None, :], mask=kv_c, other=0.0)
                        b_dotc = tl.load(p_do + rows_q[None, :] * sdn + offs_c[:, None], mask=rc, other=0.0)
                        b_dpt = _mm(b_vc, b_dotc, b_dpt, DOT_FP32, INTERPRET, low, False, True)
                    rd_mask = row_ok[:, None] & d_ok[None, :]
                    b_qf = tl.load(p_q + rows_q[:, None] * sqn + offs_d[None, :], mask=rd_mask, other=0.0)  # [BM, BD]
                    b_dof = tl.load(p_do + rows_q[:, None] * sdn + offs_d[None, :], mask=rd_mask, other=0.0)
                keep = slot_ok[:, None] & (row_ok & (lse > float("-inf")))[None, :] & finite(b_st)
                if CAUSAL:
                    keep = keep & (offs_n[:, None] <= i[None, :] + (M - causal_lq))
                b_pt = tl.exp2(b_st * qk_scale - (lse * lse_scale)[None, :])  # [BN, BM]
                keep = keep & (b_pt < float("inf"))  # a P that overflows (lse not of these scores) is dropped
                b_pt = tl.where(keep, b_pt, 0.0)
                dv = _mm(b_pt, b_dof, dv, DOT_FP32, INTERPRET, low, True, True)  # dV += P^T dO
                b_dst = tl.where(keep, b_pt * (b_dpt - delta[None, :]), 0.0)  # [BN, BM] dS^T; no NaN of V leaks
                dk = _mm(b_dst, b_qf, dk, DOT_FP32, INTERPRET, low, True, False)  # dK += dS^T Q

    out_off = (pid_bh.to(tl.int64) * M + offs_n)[:, None] * D + offs_d[None, :]
    out_mask = (offs_n < M)[:, None] & d_ok[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dense_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, MLEN, MMASK, DQ,
    sqb, sqh, sqn,
    skb, skh, skm,
    svb, svh, svm,
    sdb, sdh, sdn,
    smask_b, smask_m,
    Hkv, M, D, n_rows, causal_lq, qk_scale, lse_scale, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DC: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr, OFF64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    low = Q.dtype.element_ty

    rows = pid_m * BM + tl.arange(0, BM)  # [BM]
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    rows_q = rows.to(tl.int64)
    rd_mask = row_ok[:, None] & d_ok[None, :]
    p_q = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows_q[:, None] * sqn  # [BM, 1]
    p_do = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + rows_q[:, None] * sdn
    if DC == BD:  # the query and dO tiles stay in registers for the whole key loop
        b_q = tl.load(p_q + offs_d[None, :], mask=rd_mask, other=0.0)  # [BM, BD]
        b_do = tl.load(p_do + offs_d[None, :], mask=rd_mask, other=0.0)  # [BM, BD] fp32
    flat = pid_bh.to(tl.int64) * n_rows + rows
    lse = tl.load(LSE + flat, mask=row_ok, other=float("-inf"))
    live = row_ok & (lse > float("-inf"))  # a row that dropped everything has P = 0 everywhere
    lse2 = tl.where(live, lse * lse_scale, 0.0)  # [BM] base 2
    delta = tl.load(DELTA + flat, mask=row_ok, other=0.0)

    hi = M
    if HAS_LEN:
        hi = tl.minimum(tl.load(MLEN + b).to(tl.int32), M)
    i = rows % causal_lq if CAUSAL else rows
    if CAUSAL:  # last key any row of the block may see: j <= i + M - causal_lq
        hi = tl.minimum(tl.maximum(tl.max(tl.where(row_ok, i, 0)) + M - causal_lq + 1, 0), hi)
    if tl.max(live.to(tl.int32)) == 0:
        hi = 0
    p_k = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    p_v = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    dq = tl.zeros([BM, BD], tl.float32)
    for n0 in range(0, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        slot_ok = offs_n < hi
        offs_nk = offs_n.to(tl.int64) if OFF64 else offs_n
        if HAS_MASK:
            p_mask = MMASK + b.to(tl.int64) * smask_b + offs_nk * smask_m
            slot_ok = slot_ok & (tl.load(p_mask, mask=offs_n < M, other=0) != 0)
        kv_mask = slot_ok[:, None] & d_ok[None, :]
        b_k = tl.load(p_k + offs_nk[:, None] * skm + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        if DC == BD:
            b_v = tl.load(p_v + offs_nk[:, None] * svm + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
            b_s = _mm(b_q, tl.trans(b_k), tl.zeros([BM, BN], tl.float32), DOT_FP32, INTERPRET, low)  # [BM, BN]
            b_dp = _mm(b_do, tl.trans(b_v), tl.zeros([BM, BN], tl.float32), DOT_FP32, INTERPRET, low, True, False)
        else:  # fp32 / wide heads: S and dP over head-dim chunks (tiles re-read, L1-resident)
            b_s = tl.zeros([BM, BN], tl.float32)
            b_dp = tl.zeros([BM, BN], tl.float32)
            for d0 in range(0, BD, DC):  # a loop, not unrolled: one chunk live at a time
                offs_c = d0 + tl.arange(0, DC)
                c_ok = offs_c < D
                rc = row_ok[:, None] & c_ok[None, :]
                kc = c_ok[:, None] & slot_ok[None, :]
                b_qc = tl.load(p_q + offs_c[None, :], mask=rc, other=0.0)  # [BM, DC]
                b_kct = tl.load(p_k + offs_nk[None, :] * skm + offs_c[:, None], mask=kc, other=0.0)  # [DC, BN]
                b_s = _mm(b_qc, b_kct, b_s, DOT_FP32, INTERPRET, low)
                b_doc = tl.load(p_do + offs_c[None, :], mask=rc, other=0.0)
                b_vct = tl.load(p_v + offs_nk[None, :] * svm + offs_c[:, None], mask=kc, other=0.0)
                b_dp = _mm(b_doc, b_vct, b_dp, DOT_FP32, INTERPRET, low, True, False)
        keep = live[:, None] & slot_ok[None, :] & finite(b_s)
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= i[:, None] + (M - causal_lq))
        b_p = tl.exp2(b_s * qk_scale - lse2[:, None])
        keep = keep & (b_p < float("inf"))  # a P that overflows (lse not of these scores) is dropped
        b_p = tl.where(keep, b_p, 0.0)
        b_ds = tl.where(keep, b_p * (b_dp - delta[:, None]), 0.0)  # [BM, BN]
        b_k = tl.where(finite(b_k), b_k, 0.0)  # a dropped key's inf/NaN never meets its dS = 0
        dq = _mm(b_ds, b_k, dq, DOT_FP32, INTERPRET, low, True, False)

    p_dq = DQ + flat[:, None] * D + offs_d[None, :]  # dq is contiguous
    tl.store(p_dq, dq * scale, mask=rd_mask)


@triton.jit
def _knn_bwd_dq_kernel(
    Q, IDX, MK, MV, DO, LSE, DELTA, DQ, PBUF, DSBUF,
    sqb, sqh, sqn,
    smkb, smkh, smkm,
    smvb, smvh, smvm,
    sdb, sdh, sdn,
    Hkv, M, D, n_rows, k_sel, qk_scale, lse_scale, scale,
    BM: tl.constexpr, BD: tl.constexpr, NEED_DKV: tl.constexpr, OFF64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv

    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    rows_q = rows.to(tl.int64)
    rd_mask = row_ok[:, None] & d_ok[None, :]
    p_q = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows_q[:, None] * sqn + offs_d[None, :]
    p_do = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + rows_q[:, None] * sdn + offs_d[None, :]
    b_q = tl.load(p_q, mask=rd_mask, other=0.0).to(tl.float32)  # [BM, BD]
    b_do = tl.load(p_do, mask=rd_mask, other=0.0)  # [BM, BD] fp32
    flat = pid_bh.to(tl.int64) * n_rows + rows
    lse = tl.load(LSE + flat, mask=row_ok, other=float("-inf"))
    live = row_ok & (lse > float("-inf"))
    lse2 = tl.where(live, lse * lse_scale, 0.0)
    delta = tl.load(DELTA + flat, mask=row_ok, other=0.0)

    p_mk = MK + b.to(tl.int64) * smkb + h.to(tl.int64) * smkh
    p_mv = MV + b.to(tl.int64) * smvb + h.to(tl.int64) * smvh
    p_idx = IDX + flat * k_sel  # [BM]
    dq = tl.zeros([BM, BD], tl.float32)
    for c in range(0, k_sel):
        idx = tl.load(p_idx + c, mask=row_ok, other=-1)  # [BM] int64
        ok = live & (idx >= 0) & (idx < M)
        idx = tl.where(ok, idx, 0)
        if not OFF64:
            idx = idx.to(tl.int32)
        b_kg = tl.load(p_mk + idx[:, None] * smkm + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        b_kg = b_kg.to(tl.float32)  # [BM, BD]
        b_s = tl.sum(b_q * b_kg, 1)  # [BM] the forward's exact fp32 re-score
        keep = ok & finite(b_s)
        b_p = tl.exp2(b_s * qk_scale - lse2)  # [BM]
        keep = keep & (b_p < float("inf"))  # a P that overflows (lse not of these scores) is dropped
        b_p = tl.where(keep, b_p, 0.0)
        b_vg = tl.load(p_mv + idx[:, None] * smvm + offs_d[None, :], mask=keep[:, None] & d_ok[None, :], other=0.0)
        b_dp = tl.sum(b_do * b_vg.to(tl.float32), 1)  # [BM]
        b_ds = tl.where(keep, b_p * (b_dp - delta), 0.0)
        dq += b_ds[:, None] * tl.where(keep[:, None], b_kg, 0.0)
        if NEED_DKV:
            tl.store(PBUF + flat * k_sel + c, b_p, mask=row_ok)
            tl.store(DSBUF + flat * k_sel + c, b_ds, mask=row_ok)

    tl.store(DQ + flat[:, None] * D + offs_d[None, :], dq * scale, mask=rd_mask)


@triton.jit
def _knn_bwd_scatter_kernel(
    Q, DO, PBUF, DSBUF, ORDER, SORTED, RUN, DK, DV,
    n_entries, k_sel, n_rows, D, scale,
    sqb, sqh, sqn, sdb, sdh, sdn, Hkv,
    BS: tl.constexpr, BD: tl.constexpr,
):
    """Lane e of the block starts a run of RUN[e] equal slot ids (0: not a run start, or padding) in
    the stably sorted ids SORTED; ORDER[e] is the (row, candidate) entry of sorted position e. The
    lane sums the run in sorted (= row) order and writes the slot's dK, dV once."""
    pos = tl.program_id(0).to(tl.int64) * BS + tl.arange(0, BS)  # [BS] (B * Hkv * N * k may pass 2**31)
    in_e = pos < n_entries
    run = tl.load(RUN + pos, mask=in_e, other=0)  # [BS] int32
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    acc_k = tl.zeros([BS, BD], tl.float32)
    acc_v = tl.zeros([BS, BD], tl.float32)
    for t in range(0, tl.max(run)):
        m = t < run
        ent = tl.load(ORDER + pos + t, mask=m, other=0)  # [BS] int64 entry of [B * Hkv * N * k]
        row = ent // k_sel  # flat stacked row of [B * Hkv * N]
        bh = row // n_rows
        n = row % n_rows
        b = bh // Hkv
        h = bh % Hkv
        b_p = tl.load(PBUF + ent, mask=m, other=0.0)
        b_ds = tl.load(DSBUF + ent, mask=m, other=0.0)
        rm = m[:, None] & d_ok[None, :]
        b_q = tl.load(Q + (b * sqb + h * sqh + n * sqn)[:, None] + offs_d[None, :], mask=rm, other=0.0)
        b_do = tl.load(DO + (b * sdb + h * sdh + n * sdn)[:, None] + offs_d[None, :], mask=rm, other=0.0)
        acc_k += b_ds[:, None] * b_q.to(tl.float32)
        acc_v += b_p[:, None] * b_do
    starts = run > 0
    slot = tl.load(SORTED + pos, mask=starts, other=0)  # flat slot id of [B * Hkv * M]
    off = slot[:, None] * D + offs_d[None, :]
    wm = starts[:, None] & d_ok[None, :]
    tl.store(DK + off, (acc_k * scale).to(DK.dtype.element_ty), mask=wm)
    tl.store(DV + off, acc_v.to(DV.dtype.element_ty), mask=wm)
