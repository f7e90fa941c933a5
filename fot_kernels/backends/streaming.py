"""Block-streaming PyTorch backend: runs on any device, never materialises Lq x M.

- kNN mode: ``knn_scan`` keeps a running top-k per query over blocks of memory slots, then
  ``gather_attention`` softmaxes over the k selected slots, gathering a block of rows at a time;
- dense mode: ``flash_scan``, an online-softmax pass over the memory blocks;
- the local causal part is ``flash_scan`` on the local keys, merged with the memory part by
  log-sum-exp (exact).

Queries of the Hq / Hkv heads that share a kv head are stacked into one row block
``[B, Hkv, G * Lq, D]``, so every memory block is read once per kv head (grouped-query attention
without repeating keys). The three kernels here have the signatures of the C++ CPU kernels
(``torch.ops.fot_cpu.*``); the ``cpu`` backend runs the same composition with those. This backend
is the last resort of ``backend="auto"`` on GPUs, for inputs the fused kernels do not serve;
extra memory is O(Lq * (BLOCK + k)) per (batch, kv head).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from .reference import compute_dtype, merge_attention, select_topk

NAME = "streaming"
BLOCK = 1024  # memory slots per block


def unsupported_reasons(op: str, query: Tensor, mem_keys: Tensor, **_: object) -> list[str]:
    return []


# --------------------------------------------------------------------------------------------
# Kernels: same signatures as torch.ops.fot_cpu.*
# --------------------------------------------------------------------------------------------


def _block_validity(batch: int, start: int, stop: int, mem_lengths: Tensor | None, mem_mask: Tensor | None, device):
    """Bool [B, 1, 1, stop - start] validity of a block of slots."""
    valid = torch.ones(batch, stop - start, dtype=torch.bool, device=device)
    if mem_lengths is not None:
        valid &= torch.arange(start, stop, device=device)[None, :] < mem_lengths[:, None]
    if mem_mask is not None:
        valid &= mem_mask[:, start:stop]
    return valid[:, None, None, :]


def knn_scan_torch(query: Tensor, mem_keys: Tensor, mem_lengths: Tensor | None, mem_mask: Tensor | None, k: int):
    """query [B, Hkv, N, D], mem_keys [B, Hkv, M, D] -> top-k (scores, indices) [B, Hkv, N, k]."""
    batch, heads, rows, _ = query.shape
    cd = compute_dtype(query, mem_keys)
    best_s = query.new_full((batch, heads, rows, 0), float("-inf"), dtype=cd)
    best_i = torch.full((batch, heads, rows, 0), -1, dtype=torch.int64, device=query.device)
    for start in range(0, mem_keys.shape[2], BLOCK):
        stop = min(start + BLOCK, mem_keys.shape[2])
        s = query.to(cd) @ mem_keys[:, :, start:stop].to(cd).transpose(-1, -2)  # [B, Hkv, N, C]
        sel = _block_validity(batch, start, stop, mem_lengths, mem_mask, query.device) & ~torch.isnan(s)
        idx = torch.arange(start, stop, device=query.device).expand_as(s)
        best_s, best_i = select_topk(torch.cat([best_s, s], -1), torch.cat([best_i, idx], -1),
                                     torch.cat([best_i >= 0, sel], -1), k)  # fmt: skip
    if best_s.shape[-1] < k:  # empty memory
        best_s, best_i = select_topk(best_s, best_i, best_i >= 0, k)
    return best_s, best_i


def flash_scan_torch(query, keys, values, mem_lengths, mem_mask, scale: float, causal_lq: int):
    """Online-softmax attention of query [B, Hkv, N, D] over keys/values [B, Hkv, M, D].

    causal_lq > 0: rows are G blocks of causal_lq queries; row n (position i = n % causal_lq)
    sees key j iff j <= i + M - causal_lq. Returns (out [B, Hkv, N, D], lse [B, Hkv, N])."""
    batch, heads, rows, head_dim = query.shape
    num_keys = keys.shape[2]
    cd = compute_dtype(query, keys, values)
    q = query.to(cd)
    row_max = q.new_full((batch, heads, rows), float("-inf"))
    row_sum = q.new_zeros((batch, heads, rows))
    acc = q.new_zeros((batch, heads, rows, head_dim))
    if causal_lq > 0:
        last_allowed = torch.arange(rows, device=q.device) % causal_lq + (num_keys - causal_lq)  # [N]
    for start in range(0, num_keys, BLOCK):
        stop = min(start + BLOCK, num_keys)
        s = q @ keys[:, :, start:stop].to(cd).transpose(-1, -2)
        valid = _block_validity(batch, start, stop, mem_lengths, mem_mask, q.device)
        keep = valid & ~torch.isnan(s)
        if causal_lq > 0:
            keep = keep & (torch.arange(start, stop, device=q.device)[None, :] <= last_allowed[:, None])
        s = (s * scale).masked_fill(~keep, float("-inf"))
        new_max = torch.maximum(row_max, s.amax(-1))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        p = torch.exp(s - safe_max[..., None])
        correction = torch.exp(row_max - safe_max)
        row_sum = row_sum * correction + p.sum(-1)
        v = values[:, :, start:stop].to(cd).masked_fill(~valid.transpose(-1, -2), 0)  # NaN in unused slots
        acc = acc * correction[..., None] + p @ v
        row_max = new_max
    empty = row_sum == 0
    out = torch.where(empty[..., None], torch.zeros_like(acc), acc / torch.where(empty, 1, row_sum)[..., None])
    lse = torch.where(empty, torch.full_like(row_max, float("-inf")), row_max + torch.log(row_sum))
    return out, lse


def gather_attention_torch(scores: Tensor, indices: Tensor, values: Tensor, scale: float):
    """Softmax over selected slots: scores/indices [B, Hkv, N, k] (-inf/-1 padding), values
    [B, Hkv, M, D] -> (out [B, Hkv, N, D], lse [B, Hkv, N]). Gathers BLOCK rows at a time."""
    batch, heads, rows, _ = scores.shape
    cd = compute_dtype(scores, values)
    out = scores.new_zeros((batch, heads, rows, values.shape[-1]), dtype=cd)
    lse = scores.new_full((batch, heads, rows), float("-inf"), dtype=cd)
    if values.shape[2] == 0:
        return out, lse
    for start in range(0, rows, BLOCK):
        stop = min(start + BLOCK, rows)
        logits = scores[:, :, start:stop].to(cd) * scale
        idx = indices[:, :, start:stop]
        row_lse = torch.logsumexp(logits, -1)
        safe = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
        p = torch.exp(logits - safe[..., None])  # [B, Hkv, n, k]
        flat = idx.clamp_min(0).flatten(2)  # [B, Hkv, n * k]
        v_sel = values.gather(2, flat[..., None].expand(-1, -1, -1, values.shape[-1])).to(cd)
        v_sel = v_sel.view(batch, heads, stop - start, idx.shape[-1], -1).masked_fill(idx[..., None] < 0, 0)
        out[:, :, start:stop] = (p[..., None] * v_sel).sum(-2)
        lse[:, :, start:stop] = row_lse
    return out, lse


def kernel_set(ops, row_dtype) -> SimpleNamespace:
    """The three kernels of a backend (``ops.knn_scan``, ``ops.flash_scan``,
    ``ops.gather_attention``, e.g. ``torch.ops.fot_cpu``) and ``row_dtype(query, *operands)``,
    the dtype its kernels take the stacked query rows in."""
    return SimpleNamespace(knn_scan=ops.knn_scan, flash_scan=ops.flash_scan, gather_attention=ops.gather_attention,
                           row_dtype=row_dtype)  # fmt: skip


TORCH_KERNELS = kernel_set(
    SimpleNamespace(knn_scan=knn_scan_torch, flash_scan=flash_scan_torch, gather_attention=gather_attention_torch),
    compute_dtype,
)


# --------------------------------------------------------------------------------------------
# Backend functions
# --------------------------------------------------------------------------------------------


def _group_queries(query: Tensor, num_kv_heads: int, dtype: torch.dtype) -> Tensor:
    """[B, Hq, Lq, D] -> [B, Hkv, G * Lq, D]: query head h = kv * G + g becomes rows g * Lq ..."""
    batch, num_q_heads, len_q, head_dim = query.shape
    return query.to(dtype).reshape(batch, num_kv_heads, (num_q_heads // num_kv_heads) * len_q, head_dim).contiguous()


def _ungroup(x: Tensor, num_q_heads: int, len_q: int) -> Tensor:
    """[B, Hkv, G * Lq, ...] -> [B, Hq, Lq, ...]."""
    return x.reshape(x.shape[0], num_q_heads, len_q, *x.shape[3:])


def knn_topk(query: Tensor, mem_keys: Tensor, k: int, *, mem_lengths: Tensor | None, mem_mask: Tensor | None,
             kernels: SimpleNamespace = TORCH_KERNELS):  # fmt: skip
    rows = _group_queries(query, mem_keys.shape[1], kernels.row_dtype(query, mem_keys))
    scores, indices = kernels.knn_scan(rows, mem_keys, mem_lengths, mem_mask, k)
    return _ungroup(scores, query.shape[1], query.shape[2]), _ungroup(indices, query.shape[1], query.shape[2])


def memory_attention(
    query, key, value, mem_keys, mem_values, *, topk, causal, softmax_scale, mem_lengths, mem_mask,
    kernels: SimpleNamespace = TORCH_KERNELS,
) -> tuple[Tensor, Tensor]:
    batch, num_q_heads, len_q, head_dim = query.shape
    outs, lses = [], []
    if key is not None and key.shape[2] > 0 and len_q > 0:
        rows = _group_queries(query, key.shape[1], kernels.row_dtype(query, key, value))
        out, lse = kernels.flash_scan(rows, key, value, None, None, softmax_scale, len_q if causal else 0)
        outs.append(_ungroup(out, num_q_heads, len_q))
        lses.append(_ungroup(lse, num_q_heads, len_q))
    if mem_keys.shape[2] > 0 and len_q > 0:
        rows = _group_queries(query, mem_keys.shape[1], kernels.row_dtype(query, mem_keys, mem_values))
        if topk is None:
            out, lse = kernels.flash_scan(rows, mem_keys, mem_values, mem_lengths, mem_mask, softmax_scale, 0)
        else:
            scores, indices = kernels.knn_scan(rows, mem_keys, mem_lengths, mem_mask, topk)
            out, lse = kernels.gather_attention(scores, indices, mem_values, softmax_scale)
        outs.append(_ungroup(out, num_q_heads, len_q))
        lses.append(_ungroup(lse, num_q_heads, len_q))
    if not outs:
        lse_dtype = compute_dtype(query, key, value, mem_keys, mem_values)
        lse = torch.full((batch, num_q_heads, len_q), float("-inf"), dtype=lse_dtype, device=query.device)
        return query.new_zeros(query.shape), lse
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else merge_attention(outs, lses)
    return out.to(query.dtype), lse
