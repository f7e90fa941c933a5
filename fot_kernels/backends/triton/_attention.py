"""Fused memory attention: ONE online softmax (flash-attention style, base-2 exponentials) over
[local keys (causal, bottom-right aligned) | memory candidates].

``_attn_fwd_kernel`` grid: (row blocks, B * Hkv). Rows are (query head of the kv group, query)
pairs of one kv head, as in the kNN scan. MEM_MODE selects the memory part:
- 0: none (plain local attention);
- 1: dense: every valid memory slot, tile by tile with ``tl.dot``, padding mask;
- 2: kNN: the slots listed in IDX ([B, Hq, Lq, k] int64, -1 = none) are re-scored exactly (fp32
  products of the gathered keys) and their values gathered, one candidate per row per step.
LOCAL_VALID (only with MEM_MODE 0: the op-shaped ``flash_scan`` of the launcher, causal with a
validity): MLEN / MMASK (HAS_LEN / HAS_MASK) select the valid LOCAL keys, as they select the valid
memory slots in MEM_MODE 1.
In every part a candidate whose unscaled fp32 score is NaN or +-inf is dropped (docs/DESIGN.md 3.2), and
the value row of a key with a NaN/inf element is never read (0 * inf would be NaN). See README.md
beside this file for the invariants.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import finite, tile_dot


@triton.jit
def _softmax_step(s, m_i, l_i):
    """s [BM, BN] base-2 logits (-inf = not a candidate). Returns (m_new, l_new, alpha, p)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no candidate yet stays at 0
    alpha = tl.exp2(m_i - m_safe)  # [BM]
    p = tl.exp2(s - m_safe[:, None])  # [BM, BN]
    l_new = l_i * alpha + tl.sum(p, 1)
    return m_new, l_new, alpha, p


@triton.jit
def live_columns(ok, b_kt, col_ok, BY_KEYS: tl.constexpr):
    """Columns of a flash tile whose value rows are read (the others are loaded as 0): ok [BM, BN]
    the candidates each row keeps, b_kt [BD, BN] the key tile, col_ok [BN] the valid columns ->
    bool [BN]. Never a column whose key has a NaN/inf element: its score is non-finite for every
    query, so its weight is 0 in every row, and 0 * inf would be NaN in P @ V. BY_KEYS (the fp32 /
    3xTF32 path): valid columns with a finite key; else: the columns some row keeps. Both are
    exact; each is the one that fits its path's registers without spills (the compile table)."""
    if BY_KEYS:
        return col_ok & (tl.min(finite(b_kt).to(tl.int32), 0) > 0)
    else:
        return tl.max(ok.to(tl.int32), 0) > 0


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, MK, MV, IDX, MLEN, MMASK, OUT, LSE,
    sqb, sqh, sql,
    skb, skh, skl,
    svb, svh, svl,
    smkb, smkh, smkm,
    smvb, smvh, smvm,
    smask_b, smask_m,
    Hkv, Lq, Lk, M, D, G, n_rows, k_sel, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    HAS_LOCAL: tl.constexpr, CAUSAL: tl.constexpr, MEM_MODE: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
    LOCAL_FP32: tl.constexpr, MEM_FP32: tl.constexpr, INTERPRET: tl.constexpr, OFF64: tl.constexpr,
    LOCAL_VALID: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv

    rows = pid_m * BM + tl.arange(0, BM)  # [BM]
    row_ok = rows < n_rows
    g = rows // Lq
    i = rows % Lq
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D

    p_q = Q + b.to(tl.int64) * sqb + (hkv * G + g).to(tl.int64)[:, None] * sqh + i[:, None] * sql + offs_d[None, :]
    b_q = tl.load(p_q, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)

    if HAS_LOCAL:
        p_k = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
        p_v = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
        hi = Lk
        if CAUSAL:
            # last local key any row of the block may see: j <= i + Lk - Lq
            hi = tl.minimum(tl.maximum(tl.max(tl.where(row_ok, i, 0)) + Lk - Lq + 1, 0), Lk)
        l_end = Lk
        if LOCAL_VALID and HAS_LEN:  # the op-shaped flash_scan: MLEN bounds the valid local keys
            l_end = tl.minimum(tl.load(MLEN + b).to(tl.int32), Lk)
            hi = tl.minimum(hi, l_end)
        for n0 in range(0, hi, BN):
            offs_n = n0 + tl.arange(0, BN)  # [BN]
            n_ok = offs_n < l_end
            if LOCAL_VALID and HAS_MASK:
                p_lmask = MMASK + b.to(tl.int64) * smask_b + offs_n * smask_m
                n_ok = n_ok & (tl.load(p_lmask, mask=n_ok, other=0) != 0)
            p_kt = p_k + offs_n[None, :] * skl + offs_d[:, None]
            b_kt = tl.load(p_kt, mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [BD, BN]
            b_s = tile_dot(b_q, b_kt, tl.zeros([BM, BN], tl.float32), LOCAL_FP32, INTERPRET)  # [BM, BN] unscaled
            ok = n_ok[None, :] & row_ok[:, None] & finite(b_s)
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= i[:, None] + (Lk - Lq))
            b_s = tl.where(ok, b_s * qk_scale, float("-inf"))
            m_i, l_i, alpha, b_p = _softmax_step(b_s, m_i, l_i)
            live = live_columns(ok, b_kt, n_ok, LOCAL_FP32)  # [BN] the other value rows read as 0
            p_vt = p_v + offs_n[:, None] * svl + offs_d[None, :]
            b_v = tl.load(p_vt, mask=live[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
            if not LOCAL_FP32:
                b_p = b_p.to(b_v.dtype)
            acc = tile_dot(b_p, b_v, acc * alpha[:, None], LOCAL_FP32, INTERPRET)

    p_mk = MK + b.to(tl.int64) * smkb + hkv.to(tl.int64) * smkh
    p_mv = MV + b.to(tl.int64) * smvb + hkv.to(tl.int64) * smvh
    if MEM_MODE == 1:
        m_end = M
        if HAS_LEN:
            m_end = tl.minimum(tl.load(MLEN + b).to(tl.int32), M)
        for n0 in range(0, m_end, BN):
            offs_n = n0 + tl.arange(0, BN)  # [BN]
            n_ok = offs_n < m_end
            offs_nk = offs_n.to(tl.int64) if OFF64 else offs_n
            p_mkt = p_mk + offs_nk[None, :] * smkm + offs_d[:, None]
            b_kt = tl.load(p_mkt, mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [BD, BN]
            b_s = tile_dot(b_q, b_kt, tl.zeros([BM, BN], tl.float32), MEM_FP32, INTERPRET)  # [BM, BN] unscaled
            slot_ok = n_ok  # [BN] valid slots
            if HAS_MASK:
                p_mask = MMASK + b.to(tl.int64) * smask_b + offs_nk * smask_m
                slot_ok = slot_ok & (tl.load(p_mask, mask=n_ok, other=0) != 0)
            ok = slot_ok[None, :] & row_ok[:, None] & finite(b_s)  # non-finite scores are dropped like masked slots
            b_s = tl.where(ok, b_s * qk_scale, float("-inf"))
            m_i, l_i, alpha, b_p = _softmax_step(b_s, m_i, l_i)
            # value rows of invalid slots (unused capacity) and non-finite keys are read as 0: their
            # weight 0 must not meet a NaN or inf there
            live = live_columns(ok, b_kt, slot_ok, MEM_FP32)  # [BN]
            p_mvt = p_mv + offs_nk[:, None] * smvm + offs_d[None, :]
            b_v = tl.load(p_mvt, mask=live[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
            if not MEM_FP32:
                b_p = b_p.to(b_v.dtype)
            acc = tile_dot(b_p, b_v, acc * alpha[:, None], MEM_FP32, INTERPRET)

    if MEM_MODE == 2:
        b_qf = b_q.to(tl.float32)  # [BM, BD]
        p_idx = IDX + (pid_bh.to(tl.int64) * n_rows + rows) * k_sel  # [BM]
        for c in range(0, k_sel):
            idx = tl.load(p_idx + c, mask=row_ok, other=-1)  # [BM] int64 slot of each row's c-th candidate
            ok = (idx >= 0) & (idx < M)
            idx = tl.where(ok, idx, 0)
            if not OFF64:
                idx = idx.to(tl.int32)
            gmask = ok[:, None] & d_ok[None, :]
            b_kg = tl.load(p_mk + idx[:, None] * smkm + offs_d[None, :], mask=gmask, other=0.0)  # [BM, BD]
            b_s = tl.sum(b_qf * b_kg.to(tl.float32), 1)  # [BM] exact fp32 re-score
            ok = ok & finite(b_s)  # the scan selects finite scores only; kept as the same rule here
            b_s = tl.where(ok, b_s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, b_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)  # [BM]
            b_p = tl.exp2(b_s - m_safe)  # [BM]
            l_i = l_i * alpha + b_p
            m_i = m_new
            # a dropped candidate's value is not read: weight 0 must not meet its inf or NaN
            b_vg = tl.load(p_mv + idx[:, None] * smvm + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + b_p[:, None] * b_vg.to(tl.float32)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    b_o = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])  # [BM, BD]; a row with no candidate reads no value
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # [BM] natural log
    flat = pid_bh.to(tl.int64) * n_rows + rows  # [BM] row of the [B, Hq, Lq] output
    p_o = OUT + flat[:, None] * D + offs_d[None, :]
    tl.store(p_o, b_o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + flat, lse, mask=row_ok)
