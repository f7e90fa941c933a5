"""The baselines every benchmark compares the package's ops with, one copy each, in plain PyTorch.

Imported by bench_cpu.py, bench_gpu.py, bench_hf_prefill.py, bench_crossbatch.py and test_bench_ops.py, and checked
against the reference in tests/test_bench_gpu.py. Every function runs on CPU and CUDA tensors.
Layout as in the package: query ``[B, Hq, Lq, D]``, local key/value ``[B, Hkv, Lk, D]``, memory
``[B, Hkv, M, D]``; query head h reads kv head ``h // G`` with ``G = Hq // Hkv``. The local causal
mask is bottom-right aligned: query i sees local key j iff ``j <= i + Lk - Lq``. Every memory slot
is valid unless a function takes ``mem_valid`` (bool ``[B, M]``).

- :func:`sdpa_concat`: what a user writes today, torch SDPA over ``cat([memory, local])`` with a
  bool mask; :func:`sdpa_concat_inputs` + :func:`sdpa` are its two halves, so that a benchmark
  can time the SDPA call alone, on a concatenation made outside the timing;
  :func:`sdpa_flash_serves` says whether torch's flash kernel serves a call.
- :func:`longllama_attention`: the dense (or top-k thresholded) computation of the released
  LongLLaMA code, scores materialised per (heads, queries) group.
- :func:`chunked_topk`: the plain chunked top-k loop; :func:`attend_selected`: the joint softmax
  over [local causal | given memory slots]; together the unfused kNN memory attention.
- :func:`score_product`: ``q @ K^T`` alone (the throughput ceiling of the score product).
- :func:`crossbatch_gather_sdpa`: FoT's CrossBatch attention as gather + SDPA (bench_crossbatch.py).
- :func:`grouped_rows` / :func:`ungrouped`, :func:`chunk_for`, :func:`longllama_grouping`,
  :func:`longllama_saved_bytes`, :func:`sdpa_concat_bytes`: helpers.

Every attention baseline is differentiable (plain PyTorch under autograd: the benchmarks' bwd and
fwdbwd modes time them so, SDPA's backward being torch's own kernel, flash where torch picks it).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

#: the floor the released LongLLaMA code clamps scores to (and adds for masked keys)
LONGLLAMA_FLOOR = -1e6


def grouped_rows(query: Tensor, kv_heads: int) -> Tensor:
    """``[B, Hq, Lq, D] -> [B, Hkv, G * Lq, D]`` (a view): the G query heads that share a kv head as
    one block of rows, so that no baseline repeats the keys."""
    b, hq, lq, d = query.shape
    return query.reshape(b, kv_heads, hq // kv_heads * lq, d)


def ungrouped(x: Tensor, q_heads: int, len_q: int) -> Tensor:
    """``[B, Hkv, G * Lq, ...] -> [B, Hq, Lq, ...]``, the inverse of :func:`grouped_rows`."""
    return x.reshape(x.shape[0], q_heads, len_q, *x.shape[3:])


def causal_allowed(len_q: int, len_k: int, device=None) -> Tensor:
    """Bool ``[Lq, Lk]``: query i may see local key j (``j <= i + Lk - Lq``, bottom-right aligned)."""
    i = torch.arange(len_q, device=device)[:, None]
    return torch.arange(len_k, device=device)[None, :] <= i + (len_k - len_q)


def chunk_for(rows: int, bytes_per_entry: int, budget: float, m: int, cap: int | None = None) -> int:
    """Memory chunk whose ``[rows, chunk]`` score block takes at most ``budget`` bytes (>= 1024
    slots, a multiple of 1024 below M, at most ``cap``)."""
    chunk = max(1024, int(budget // (rows * bytes_per_entry)) // 1024 * 1024)
    return min(m, chunk if cap is None else min(chunk, cap))


def score_product(query: Tensor, mem_keys: Tensor, chunk: int) -> None:
    """``q @ K^T`` alone, over memory chunks of ``chunk`` slots (all heads in one batched matmul per
    chunk). Each chunk's output is dropped before the next is computed; nothing is returned."""
    qg = grouped_rows(query, mem_keys.shape[1])
    for start in range(0, mem_keys.shape[2], chunk):
        torch.matmul(qg, mem_keys[:, :, start : start + chunk].transpose(-1, -2))


def chunked_topk(query: Tensor, mem_keys: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """The plain chunked top-k loop: per memory chunk, the scores (a matmul in the memory's dtype,
    then fp32), ``torch.topk``, and a merge with the best k so far; one chunk's scores alive at a
    time. Returns ``(scores fp32, indices int64)``, both ``[B, Hq, Lq, min(k, M)]``, descending."""
    _, hq, lq, _ = query.shape
    qg = grouped_rows(query.to(mem_keys.dtype), mem_keys.shape[1])
    best_s = best_i = None
    for start in range(0, mem_keys.shape[2], chunk):
        scores = (qg @ mem_keys[:, :, start : start + chunk].transpose(-1, -2)).float()  # [B, Hkv, G*Lq, chunk]
        s, i = scores.topk(min(k, scores.shape[-1]), dim=-1)
        del scores
        i = i + start
        if best_s is not None:
            s, j = torch.cat([best_s, s], -1).topk(min(k, best_s.shape[-1] + s.shape[-1]), dim=-1)
            i = torch.cat([best_i, i], -1).gather(-1, j)
        best_s, best_i = s, i
    return ungrouped(best_s, hq, lq), ungrouped(best_i, hq, lq)


def attend_selected(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    mem_values: Tensor,
    scores: Tensor,
    indices: Tensor,
    *,
    scale: float,
    causal: bool = True,
) -> Tensor:
    """Joint fp32 softmax over [local keys (causal) | the given memory slots] (gather + softmax).

    ``scores``/``indices`` ``[B, Hq, Lq, k]``: raw inner products and their slots (index -1 with
    score -inf: padding). ``key``/``value`` None: the memory part alone. Returns ``[B, Hq, Lq, D]``
    in query.dtype."""
    b, hq, lq, d = query.shape
    hkv = mem_values.shape[1]
    logits = [scores.float() * scale]
    if key is not None:
        local = ungrouped(grouped_rows(query, hkv) @ key.transpose(-1, -2), hq, lq).float() * scale  # [B, Hq, Lq, Lk]
        if causal:
            local = local.masked_fill(~causal_allowed(lq, key.shape[2], query.device), float("-inf"))
        logits.insert(0, local)
    probs = torch.softmax(torch.cat(logits, -1), -1)
    lk = 0 if key is None else key.shape[2]
    flat = indices.clamp_min(0).reshape(b, hkv, -1)  # [B, Hkv, G*Lq*k]: head h's rows lie under kv head h // G
    picked = torch.gather(mem_values, 2, flat[..., None].expand(-1, -1, -1, d)).reshape(*indices.shape, d)
    out = (probs[..., None, lk:] @ picked.float()).squeeze(-2)
    if key is not None:
        p_local = grouped_rows(probs[..., :lk], hkv)  # [B, Hkv, G*Lq, Lk]
        out = out + ungrouped(p_local @ value.float(), hq, lq)
    return out.to(query.dtype)


def longllama_grouping(
    batch: int, q_heads: int, len_q: int, keys: int, dim: int, itemsize: int, budget: float
) -> tuple[int, int]:
    """``(head_chunk, query_chunk)`` for :func:`longllama_attention` within ``budget`` bytes per
    group: the score block (~12 bytes per entry: logits, fp32 softmax, probabilities) and the
    per-group copy of the values (``keys`` = Lk + M rows of ``dim`` x ``itemsize`` bytes per head).
    Every query group copies the values again, so queries are grouped as widely as fits first
    (one head), then heads."""
    per_head_values = batch * keys * dim * itemsize
    per_row_scores = batch * keys * 12
    query_chunk = max(1, min(len_q, int((budget - per_head_values) // per_row_scores)))
    head_chunk = max(1, min(q_heads, int(budget // (per_head_values + query_chunk * per_row_scores))))
    return head_chunk, query_chunk


def longllama_saved_bytes(batch: int, q_heads: int, len_q: int, keys: int, itemsize: int) -> int:
    """About the bytes :func:`longllama_attention` keeps for its backward under autograd, whatever
    the grouping (every group's tensors stay saved until the backward): per score entry (B * Hq *
    Lq * ``keys`` of them, keys = Lk + M) the fp32 softmax and, in the query's dtype of ``itemsize``
    bytes, the product, the clamped scores and the probabilities."""
    return batch * q_heads * len_q * keys * (4 + 3 * itemsize)


def longllama_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mem_keys: Tensor | None,
    mem_values: Tensor | None,
    *,
    scale: float | None = None,
    causal: bool = True,
    local_valid: Tensor | None = None,
    mem_valid: Tensor | None = None,
    topk: int | None = None,
    head_chunk: int | None = None,
    query_chunk: int | None = None,
) -> Tensor:
    """LongLLaMA's memory-layer attention as in its released PyTorch code (``LongLlamaAttention``
    with ``mem_attention_grouping = (head_chunk, query_chunk)``; None: all at once).

    Per group of heads and queries: local scores plus an additive mask (causal; ``local_valid``
    bool ``[B, Lk]``: key padding), memory scores plus the memory mask (``mem_valid`` bool
    ``[B, M]``), both clamped to >= -1e6, concatenated; one softmax in fp32, cast back to the
    query's dtype; times ``cat([value, memory values])`` (copied per group, as the released code
    does). ``topk``: keep only each row's top-k memory scores (not in the released code, which is
    dense: the kNN variant of this benchmark suite). GQA: each group reads its heads' kv heads (a
    copy of those alone; the released models are MHA). Returns ``[B, Hq, Lq, D]`` in query.dtype."""
    b, hq, lq, d = query.shape
    g = hq // key.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lk = key.shape[2]
    local_bias = torch.zeros(b, 1, lq, lk, dtype=query.dtype, device=query.device)
    if causal:
        local_bias = local_bias.masked_fill(~causal_allowed(lq, lk, query.device), LONGLLAMA_FLOOR)
    if local_valid is not None:
        local_bias = local_bias.masked_fill(~local_valid[:, None, None, :], LONGLLAMA_FLOOR)
    has_memory = mem_keys is not None and mem_keys.shape[2] > 0
    if has_memory:
        m = mem_keys.shape[2]
        mem_bias = torch.zeros(b, 1, 1, m, dtype=query.dtype, device=query.device)
        if mem_valid is not None:
            mem_bias = mem_bias.masked_fill(~mem_valid[:, None, None, :], LONGLLAMA_FLOOR)
    head_chunk, query_chunk = head_chunk or hq, query_chunk or lq
    outs_h = []
    for h0 in range(0, hq, head_chunk):
        h1 = min(h0 + head_chunk, hq)
        keys, values = _kv_heads(key, h0, h1, g), _kv_heads(value, h0, h1, g)
        if has_memory:
            group_keys, group_values = _kv_heads(mem_keys, h0, h1, g), _kv_heads(mem_values, h0, h1, g)
        outs_q = []
        for q0 in range(0, lq, query_chunk):
            q = query[:, h0:h1, q0 : q0 + query_chunk]
            w = torch.clamp_min(q @ keys.transpose(2, 3) * scale + local_bias[:, :, q0 : q0 + query_chunk],
                                LONGLLAMA_FLOOR)  # fmt: skip
            v = values
            if has_memory:
                mw = torch.clamp_min(q @ group_keys.transpose(2, 3).to(q.dtype) * scale + mem_bias,
                                     LONGLLAMA_FLOOR)  # fmt: skip
                if topk is not None and topk < m:
                    kth = mw.topk(topk, dim=-1).values[..., -1:]
                    mw = mw.masked_fill(mw < kth, LONGLLAMA_FLOOR)
                w = torch.cat([w, mw], dim=-1)
                v = torch.cat([v, group_values.to(v.dtype)], dim=-2)
            probs = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            outs_q.append(probs @ v)
        outs_h.append(torch.cat(outs_q, dim=2))
    return torch.cat(outs_h, dim=1)


def _kv_heads(x: Tensor, h0: int, h1: int, g: int) -> Tensor:
    """The kv heads ``[B, h1 - h0, L, D]`` that query heads h0..h1-1 read (a view without GQA)."""
    if g == 1:
        return x[:, h0:h1]
    return x.index_select(1, torch.arange(h0, h1, device=x.device) // g)


def _repeat_heads(x: Tensor, g: int) -> Tensor:
    """``[B, Hkv, L, D] -> [B, Hkv * g, L, D]``; no copy when g == 1 (``repeat_interleave`` copies)."""
    return x if g == 1 else x.repeat_interleave(g, 1)


def sdpa_mask(
    len_q: int, len_k: int, num_mem: int, *, causal: bool = True, mem_valid: Tensor | None = None, device=None
) -> Tensor | None:
    """SDPA's bool mask over ``[memory | local]`` keys (True: attend): every memory slot visible
    (or those of ``mem_valid`` ``[B, M]``), local keys causal (bottom-right aligned) or all.
    ``[Lq, M + Lk]``, or ``[B, 1, Lq, M + Lk]`` with ``mem_valid``; None when all is visible."""
    if not causal and mem_valid is None:
        return None
    local = causal_allowed(len_q, len_k, device)
    if not causal:
        local.fill_(True)
    if mem_valid is None:
        return torch.cat([torch.ones(len_q, num_mem, dtype=torch.bool, device=device), local], 1)
    b = mem_valid.shape[0]
    return torch.cat([mem_valid[:, None, None, :].expand(b, 1, len_q, num_mem), local.expand(b, 1, len_q, len_k)], -1)


def sdpa_concat_inputs(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    mem_keys: Tensor,
    mem_values: Tensor,
    *,
    causal: bool = True,
    mem_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """What a user hands SDPA: ``(cat([mem_keys, key]), cat([mem_values, value]), mask)`` along
    the sequence, in the query's dtype (the memory is cast: SDPA wants one dtype); no local part
    when ``key`` is None. A copy of the whole memory."""
    if key is None:
        kc, vc, len_k = mem_keys.to(query.dtype), mem_values.to(query.dtype), 0
    else:
        kc, vc, len_k = torch.cat([mem_keys, key], 2), torch.cat([mem_values, value], 2), key.shape[2]
        kc, vc = kc.to(query.dtype), vc.to(query.dtype)  # no copy when the dtypes already agree
    mask = sdpa_mask(query.shape[2], len_k, mem_keys.shape[2], causal=causal and key is not None, mem_valid=mem_valid,
                     device=query.device)  # fmt: skip
    return kc, vc, mask


def sdpa(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, *, scale: float | None = None) -> Tensor:
    """``F.scaled_dot_product_attention`` with grouped-query attention through ``enable_gqa``
    (torch >= 2.5) or, before, ``repeat_interleave`` of keys and values. torch picks the kernel
    (flash / memory-efficient / math on CUDA, its flash kernel on the CPU). A row whose mask is all
    False gets NaN (the package's ops give 0)."""
    g = query.shape[1] // keys.shape[1]
    if g == 1:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
    if _torch_version() >= (2, 5):
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(query, _repeat_heads(keys, g), _repeat_heads(values, g), attn_mask=mask,
                                          scale=scale)  # fmt: skip


def sdpa_flash_serves(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> bool | None:
    """Whether torch's flash-attention SDPA kernel accepts these inputs (dtype, head dim, mask,
    GQA, device, and the backward's limits when they require grad), which torch then picks first:
    :func:`sdpa` tried with that kernel alone on one query row and key. None: torch < 2.3 cannot
    say."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    row_mask = None if mask is None else mask[..., :1, :1]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns why flash is not served
        try:
            sdpa(query[:, :, :1], keys[:, :, :1], values[:, :, :1], row_mask)
        except RuntimeError:
            return False
    return True


def sdpa_concat(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    mem_keys: Tensor,
    mem_values: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    mem_valid: Tensor | None = None,
) -> Tensor:
    """Dense memory attention as a user writes it today: ``F.scaled_dot_product_attention(q,
    cat([mem_k, k]), cat([mem_v, v]), attn_mask=bool mask)``, concatenation and mask made per call.
    Same result as ``memory_attention(..., topk=None)`` (except for rows with nothing to see)."""
    kc, vc, mask = sdpa_concat_inputs(query, key, value, mem_keys, mem_values, causal=causal, mem_valid=mem_valid)
    return sdpa(query, kc, vc, mask, scale=scale)


def crossbatch_gather_sdpa(query: Tensor, key: Tensor, value: Tensor, mem_keys: Tensor, *, d: int, pack) -> Tensor:
    """FoT's CrossBatch attention (docs/DESIGN.md 3.5) as a user writes it in PyTorch: gather each
    row b's context rows ``(b - c) mod B``, c = 1..d, of ``mem_keys`` and ``value`` into
    ``[B, Hkv, d * L, D]``, concatenate the local keys, and one :func:`sdpa` with a bool mask
    (context c of row b visible iff ``c < pack[b]``, FoT's packing/stepping rule, e.g.
    ``fot_kernels.crossbatch.crossbatch_pack``; local keys causal). Differentiable through the
    gather. A copy of the d contexts per row."""
    batch, kv_heads, length, dim = key.shape
    d = min(d, batch)
    ctx = torch.arange(1, d + 1, device=query.device)
    source = (torch.arange(batch, device=query.device)[:, None] - ctx[None, :]) % batch  # [B, d]
    visible = ctx[None, :] < torch.as_tensor(pack, device=query.device)[:, None]  # [B, d]

    def gather(x: Tensor) -> Tensor:
        return x[source].permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, d * length, dim)

    kc, vc = torch.cat([gather(mem_keys), key], 2), torch.cat([gather(value), value], 2)
    mask = sdpa_mask(length, length, d * length, mem_valid=visible.repeat_interleave(length, 1), device=query.device)
    return sdpa(query, kc, vc, mask)


def sdpa_concat_bytes(query: Tensor, len_k: int, num_mem: int, kv_heads: int) -> int:
    """About the bytes :func:`sdpa_concat` allocates beyond its inputs (no ``mem_valid``): the
    concatenated keys and values (and their repeats without ``enable_gqa``), the bool mask, and the
    float copy of the mask SDPA makes."""
    b, hq, lq, d = query.shape
    heads = kv_heads + (hq if hq != kv_heads and _torch_version() < (2, 5) else 0)
    return 2 * b * heads * (num_mem + len_k) * d * query.element_size() + lq * (num_mem + len_k) * (1 + 4)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)
