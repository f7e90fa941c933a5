"""Block-streaming PyTorch backend: runs on any device, never materialises Lq x M.

- kNN mode: ``knn_scan`` keeps a running top-k per query over blocks of memory slots, then
  ``gather_attention`` softmaxes over the k selected slots, gathering a block of rows at a time;
- dense mode: ``flash_scan``, an online-softmax pass over the memory blocks;
- the local causal part is ``flash_scan`` on the local keys, merged with the memory part by
  log-sum-exp (exact).

Queries of the Hq / Hkv heads that share a kv head are stacked into one row block
``[B, Hkv, G * Lq, D]``, so every memory block is read once per kv head (grouped-query attention
without repeating keys). The three kernels here have the signatures of the C++ CPU kernels
(``torch.ops.fot.*``); the ``cpu`` backend runs the same composition with those. This backend
is the last resort of ``backend="auto"`` on GPUs, for inputs the fused kernels do not serve;
extra memory is O(Lq * (BLOCK + k)) per (batch, kv head).

Gradients: when autograd records a call, the composition runs through ``fot_kernels.autograd``:
the forward kernels (any of the kernel sets) save out, lse and the kNN selection, and
``memory_attention_backward`` below recomputes the probabilities block by block from the saved
lse (FlashAttention-2), within the forward's memory bound.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .. import autograd
from .._merge import compute_dtype, finite_rows, lse_dtype, merge_attention, select_topk

NAME = "streaming"
BLOCK = 1024  # memory slots per block
GATHER_ENTRIES = 65536  # kNN backward: selected slots gathered at a time (B * Hkv * rows * k), each [D]


def unsupported_reasons(op: str, query: Tensor, mem_keys: Tensor, **_: object) -> list[str]:
    """Serves every validated input on any device; differentiable through PyTorch's autograd."""
    return []


# --------------------------------------------------------------------------------------------
# Kernels: same signatures as torch.ops.fot.*
# --------------------------------------------------------------------------------------------


def _block_validity(batch: int, start: int, stop: int, mem_lengths: Tensor | None, mem_mask: Tensor | None, device):
    """Bool [B, 1, 1, stop - start] validity of a block of slots."""
    valid = torch.ones(batch, stop - start, dtype=torch.bool, device=device)
    if mem_lengths is not None:
        valid &= torch.arange(start, stop, device=device)[None, :] < mem_lengths[:, None]
    if mem_mask is not None:
        valid &= mem_mask[:, start:stop]
    return valid[:, None, None, :]


def _finite_or_zero(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., L, D] with its non-finite rows zeroed, and which rows were finite [..., L]. A key
    (query) row with a NaN/inf element scores non-finite against every query (key), so it is
    dropped everywhere (docs/DESIGN.md 3.2); zeroing it keeps NaN out of values' weights and gradients."""
    ok = finite_rows(x)
    return torch.where(ok[..., None], x, 0), ok


def _kept(s: Tensor, q_ok: Tensor, k_ok: Tensor) -> Tensor:
    """Bool like s [..., N, C]: the score is finite (not dropped) and neither row was zeroed."""
    return torch.isfinite(s) & q_ok[..., :, None] & k_ok[..., None, :]


def knn_scan_torch(query: Tensor, mem_keys: Tensor, mem_lengths: Tensor | None, mem_mask: Tensor | None, k: int):
    """query [B, Hkv, N, D], mem_keys [B, Hkv, M, D] -> top-k (scores, indices) [B, Hkv, N, k]."""
    batch, heads, rows, _ = query.shape
    cd = compute_dtype(query, mem_keys)
    best_s = query.new_full((batch, heads, rows, 0), float("-inf"), dtype=cd)
    best_i = torch.full((batch, heads, rows, 0), -1, dtype=torch.int64, device=query.device)
    q, q_ok = _finite_or_zero(query.to(cd))
    for start in range(0, mem_keys.shape[2], BLOCK):
        stop = min(start + BLOCK, mem_keys.shape[2])
        keys, k_ok = _finite_or_zero(mem_keys[:, :, start:stop].to(cd))
        s = q @ keys.transpose(-1, -2)  # [B, Hkv, N, C]
        sel = _block_validity(batch, start, stop, mem_lengths, mem_mask, query.device) & _kept(s, q_ok, k_ok)
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
    q, q_ok = _finite_or_zero(query.to(cd))
    row_max = q.new_full((batch, heads, rows), float("-inf"))
    row_sum = q.new_zeros((batch, heads, rows))
    acc = q.new_zeros((batch, heads, rows, head_dim))
    if causal_lq > 0:
        last_allowed = torch.arange(rows, device=q.device) % causal_lq + (num_keys - causal_lq)  # [N]
    for start in range(0, num_keys, BLOCK):
        stop = min(start + BLOCK, num_keys)
        k_blk, k_ok = _finite_or_zero(keys[:, :, start:stop].to(cd))
        s = q @ k_blk.transpose(-1, -2)
        valid = _block_validity(batch, start, stop, mem_lengths, mem_mask, q.device)
        keep = valid & _kept(s, q_ok, k_ok)
        if causal_lq > 0:
            keep = keep & (torch.arange(start, stop, device=q.device)[None, :] <= last_allowed[:, None])
        s = (s * scale).masked_fill(~keep, float("-inf"))
        new_max = torch.maximum(row_max, s.amax(-1))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        p = torch.exp(s - safe_max[..., None])
        correction = torch.exp(row_max - safe_max)
        row_sum = row_sum * correction + p.sum(-1)
        unread = ~valid.transpose(-1, -2) | ~k_ok[..., None]  # [B, Hkv, C, 1]: NaN in unused/dropped slots
        v = values[:, :, start:stop].to(cd).masked_fill(unread, 0)
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


class Kernels(NamedTuple):
    """The kernels the composition runs: the forward ones ``ops.knn_scan``, ``ops.flash_scan``,
    ``ops.gather_attention`` (``torch.ops.fot`` for the C++ and CUDA kernels, or the PyTorch ones
    above); ``row_dtype(query, *operands)``, the dtype they take the stacked query rows in; and the
    backward ones ``grad_ops.flash_scan_backward``, ``grad_ops.gather_attention_backward`` (same
    signatures as ``torch.ops.fot.*_backward``; the PyTorch ones below by default)."""

    ops: object
    row_dtype: Callable[..., torch.dtype]
    grad_ops: object = None  # None: TORCH_GRAD_KERNELS below


TORCH_KERNELS = Kernels(
    SimpleNamespace(knn_scan=knn_scan_torch, flash_scan=flash_scan_torch, gather_attention=gather_attention_torch),
    compute_dtype,
)


def kernels(*_tensors: Tensor | None) -> Kernels:
    """The op-shaped kernels of this backend (every backend module but the reference has
    ``kernels(*tensors)``): the PyTorch ones, forward and backward."""
    return TORCH_KERNELS


# --------------------------------------------------------------------------------------------
# Backend functions
# --------------------------------------------------------------------------------------------


def _group_queries(query: Tensor, num_kv_heads: int, dtype: torch.dtype) -> Tensor:
    """[B, Hq, Lq, D] -> [B, Hkv, G * Lq, D]: query head h = kv * G + g becomes rows g * Lq ..."""
    batch, num_q_heads, len_q, head_dim = query.shape
    return query.to(dtype).reshape(batch, num_kv_heads, (num_q_heads // num_kv_heads) * len_q, head_dim).contiguous()


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _ungroup(x: Tensor, num_q_heads: int, len_q: int) -> Tensor:
    """[B, Hkv, G * Lq, ...] -> [B, Hq, Lq, ...]."""
    return x.reshape(x.shape[0], num_q_heads, len_q, *x.shape[3:])


def knn_topk(
    query: Tensor, mem_keys: Tensor, k: int, *, mem_lengths: Tensor | None, mem_mask: Tensor | None,
    kernels: Kernels = TORCH_KERNELS,
):
    rows = _group_queries(query, mem_keys.shape[1], kernels.row_dtype(query, mem_keys))
    scores, indices = kernels.ops.knn_scan(rows, mem_keys, mem_lengths, mem_mask, k)
    return _ungroup(scores, query.shape[1], query.shape[2]), _ungroup(indices, query.shape[1], query.shape[2])


def memory_attention(
    query, key, value, mem_keys, mem_values, *, topk, causal, softmax_scale, mem_lengths, mem_mask,
    kernels: Kernels = TORCH_KERNELS,
) -> tuple[Tensor, Tensor]:
    """The composition. When autograd records the call it runs through
    ``fot_kernels.autograd`` (forward kernels, then the block-recomputing backward below), so that
    the backward keeps the forward's memory bound; otherwise the forward kernels alone."""
    forward = partial(_forward, topk=topk, causal=causal, softmax_scale=softmax_scale, kernels=kernels)
    if autograd.needs_grad(query, key, value, mem_keys, mem_values):
        backward = partial(memory_attention_backward, topk=topk, causal=causal, softmax_scale=softmax_scale,
                           kernels=kernels)
        composition = autograd.Composition(forward, backward)
        return autograd.memory_attention(query, key, value, mem_keys, mem_values, mem_lengths, mem_mask, composition)
    out, lse, _ = forward(query, key, value, mem_keys, mem_values, mem_lengths, mem_mask)
    return out.to(query.dtype), lse


def _forward(
    query, key, value, mem_keys, mem_values, mem_lengths, mem_mask, *, topk, causal, softmax_scale, kernels: Kernels
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(out in the kernels' dtype, lse, kNN indices [B, Hkv, G * Lq, k] or None)."""
    batch, num_q_heads, len_q, _ = query.shape
    ops = kernels.ops
    outs, lses, indices = [], [], None
    if key is not None and key.shape[2] > 0 and len_q > 0:
        rows = _group_queries(query, key.shape[1], kernels.row_dtype(query, key, value))
        key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)  # local: small, any strides
        out, lse = ops.flash_scan(rows, key, value, None, None, softmax_scale, len_q if causal else 0)
        outs.append(_ungroup(out, num_q_heads, len_q))
        lses.append(_ungroup(lse, num_q_heads, len_q))
    if mem_keys.shape[2] > 0 and len_q > 0:
        rows = _group_queries(query, mem_keys.shape[1], kernels.row_dtype(query, mem_keys, mem_values))
        if topk is None:
            out, lse = ops.flash_scan(rows, mem_keys, mem_values, mem_lengths, mem_mask, softmax_scale, 0)
        else:
            scores, indices = ops.knn_scan(rows, mem_keys, mem_lengths, mem_mask, topk)
            out, lse = ops.gather_attention(scores, indices, mem_values, softmax_scale)
        outs.append(_ungroup(out, num_q_heads, len_q))
        lses.append(_ungroup(lse, num_q_heads, len_q))
    if not outs:
        cd = compute_dtype(query, key, value, mem_keys, mem_values)
        lse = torch.full((batch, num_q_heads, len_q), float("-inf"), dtype=lse_dtype(cd), device=query.device)
        return query.new_zeros(query.shape, dtype=cd), lse, indices
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else merge_attention(outs, lses)
    return out, lse, indices


# --------------------------------------------------------------------------------------------
# Backward: FlashAttention-2 style recomputation (the math is in fot_kernels/autograd.py)
# --------------------------------------------------------------------------------------------


def flash_scan_backward_torch(query, keys, values, d_out, lse, delta, mem_lengths, mem_mask, scale: float,
                              causal_lq: int, need_dkv: bool):  # fmt: skip
    """Backward of ``flash_scan`` (the op ``fot::flash_scan_backward``; schema in ``_library``).

    query [B, Hkv, N, D] stacked rows (non-finite rows zeroed by the caller), keys/values
    [B, Hkv, M, D], d_out [B, Hkv, N, D], lse and delta [B, Hkv, N] (the MERGED lse of all parts,
    -inf for a row that dropped everything; delta = rowsum(dO * O) - dlse) in the accumulation
    dtype. Returns (dq [B, Hkv, N, D] in d_out's dtype: this part's contribution; dk, dv in the
    keys'/values' dtypes, or empty tensors when not ``need_dkv``). BLOCK keys at a time: two
    [N, BLOCK] blocks alive at most, never N x M. Dropped entries (invalid or masked slots,
    causally masked keys, non-finite scores, rows with lse -inf) have P = 0 and read zeroed
    keys/values, so their gradients are exactly 0."""
    batch, _, num_rows, _ = query.shape
    num_keys = keys.shape[2]
    acc = d_out.dtype
    q = query.to(acc)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # exp(s - inf) = 0: a row that dropped all
    dq = torch.zeros(d_out.shape, dtype=acc, device=d_out.device)
    dk = torch.zeros(keys.shape, dtype=keys.dtype, device=keys.device) if need_dkv else keys.new_empty(0)
    dv = torch.zeros(values.shape, dtype=values.dtype, device=values.device) if need_dkv else values.new_empty(0)
    if causal_lq > 0:
        last_allowed = torch.arange(num_rows, device=dq.device) % causal_lq + (num_keys - causal_lq)  # [N]
    for start in range(0, num_keys, BLOCK):
        stop = min(start + BLOCK, num_keys)
        k_blk, k_ok = _finite_or_zero(keys[:, :, start:stop].to(acc))  # [B, Hkv, C, D]
        col_ok = _block_validity(batch, start, stop, mem_lengths, mem_mask, dq.device) & k_ok[..., None, :]
        # P in place, two [B, Hkv, N, C] blocks alive at most: s -> P, dP -> dS
        p = q @ k_blk.transpose(-1, -2)  # [B, Hkv, N, C] scores
        p.masked_fill_(~col_ok, float("-inf"))  # invalid slots, non-finite keys: [B, Hkv, 1, C]
        if causal_lq > 0:
            p.masked_fill_(torch.arange(start, stop, device=dq.device)[None, :] > last_allowed[:, None], float("-inf"))
        p.mul_(scale).sub_(lse[..., None]).exp_()  # kept entries: <= 1; dropped (-inf): exactly 0
        p.nan_to_num_(nan=0.0, posinf=0.0)  # a score that overflowed to +-inf (or NaN) was dropped
        v_blk = values[:, :, start:stop].to(acc).masked_fill(~col_ok.transpose(-1, -2), 0)  # no NaN meets P = 0
        ds = (d_out @ v_blk.transpose(-1, -2)).sub_(delta[..., None]).mul_(p)  # [B, Hkv, N, C]
        dq.add_(ds @ k_blk, alpha=scale)
        if need_dkv:
            dk[:, :, start:stop] = (ds.transpose(-1, -2) @ q).mul_(scale).to(dk.dtype)
            dv[:, :, start:stop] = (p.transpose(-1, -2) @ d_out).to(dv.dtype)
    return dq, dk, dv


def gather_attention_backward_torch(query, indices, mem_keys, mem_values, d_out, lse, delta, scale: float,
                                    need_dkv: bool):  # fmt: skip
    """Backward of the kNN part (the op ``fot::gather_attention_backward``) over the forward's
    selection indices [B, Hkv, N, k] (-1 padding; never recomputed): the scores of the selected
    slots are recomputed exactly from the rows and the gathered keys. Arguments and returns as
    :func:`flash_scan_backward_torch`; d mem_keys / d mem_values are non-zero only at selected
    slots. Slot gradients are summed with ``index_add_`` into an accumulator in the accumulation
    dtype: the gradient itself when it has that dtype, else a compact buffer over the touched slots
    only (never an fp32 copy of the whole memory). ``index_add_`` is deterministic on the CPU (on
    CUDA only under ``torch.use_deterministic_algorithms``)."""
    batch, heads, num_rows, k = indices.shape
    num_slots, head_dim = mem_keys.shape[2], mem_keys.shape[3]
    acc_dtype = d_out.dtype
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    dq = torch.zeros(d_out.shape, dtype=acc_dtype, device=d_out.device)
    # slot ids in the flattened gradient [B * Hkv * M, D]; padding points at slot 0 of its (b, h)
    # with a contribution of exactly 0
    base = torch.arange(batch * heads, device=indices.device).view(batch, heads, 1, 1) * num_slots
    flat_ids = indices.clamp_min(0) + base
    grads, targets = [], []
    for like in (mem_keys, mem_values):
        if not need_dkv:
            grads.append(like.new_empty(0))
            continue
        grad = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        if like.dtype == acc_dtype:
            targets.append((grad.view(-1, head_dim), flat_ids, None))
        else:
            touched, compact = torch.unique(flat_ids, return_inverse=True)  # sorted: deterministic
            targets.append((grad.new_zeros((touched.numel(), head_dim), dtype=acc_dtype), compact, touched))
        grads.append(grad)
    step = max(1, GATHER_ENTRIES // max(1, batch * heads * k))  # rows per block: [B, Hkv, step, k, D] gathered
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        idx = indices[:, :, start:stop]  # [B, Hkv, r, k]
        pad = idx < 0
        gather_at = idx.clamp_min(0).flatten(2)[..., None].expand(-1, -1, -1, head_dim)
        shape = (batch, heads, stop - start, k, head_dim)
        k_sel = mem_keys.gather(2, gather_at).view(shape).to(acc_dtype).masked_fill(pad[..., None], 0)
        v_sel = mem_values.gather(2, gather_at).view(shape).to(acc_dtype).masked_fill(pad[..., None], 0)
        q, g_out = query[:, :, start:stop].to(acc_dtype), d_out[:, :, start:stop]  # [B, Hkv, r, D]
        p = (k_sel @ q[..., None]).squeeze(-1).masked_fill_(pad, float("-inf"))  # [B, Hkv, r, k] scores
        p.mul_(scale).sub_(lse[:, :, start:stop, None]).exp_().nan_to_num_(nan=0.0, posinf=0.0)
        ds = p * ((v_sel @ g_out[..., None]).squeeze(-1) - delta[:, :, start:stop, None])  # [B, Hkv, r, k]
        dq[:, :, start:stop] = (ds[..., None, :] @ k_sel).squeeze(-2) * scale
        if need_dkv:
            (acc_k, ids_k, _), (acc_v, ids_v, _) = targets
            contrib = ds[..., None] * (q[..., None, :] * scale)  # dk_j += scale * dS_ij q_i: [B, Hkv, r, k, D]
            acc_k.index_add_(0, ids_k[:, :, start:stop].flatten(), contrib.flatten(0, -2))
            acc_v.index_add_(0, ids_v[:, :, start:stop].flatten(), (p[..., None] * g_out[..., None, :]).flatten(0, -2))
    for grad, target in zip(grads, targets):
        if target[2] is not None:  # compact buffer -> the gradient's dtype
            grad.view(-1, head_dim).index_copy_(0, target[2], target[0].to(grad.dtype))
    return dq, grads[0], grads[1]


TORCH_GRAD_KERNELS = SimpleNamespace(
    flash_scan_backward=flash_scan_backward_torch, gather_attention_backward=gather_attention_backward_torch
)


def memory_attention_backward(
    grad_out, grad_lse, query, key, value, mem_keys, mem_values, out, lse, indices, mem_lengths, mem_mask, needs,
    *, topk, causal, softmax_scale, kernels: Kernels = TORCH_KERNELS, dq_in_acc: bool = False,
) -> tuple[Tensor | None, ...]:
    """Gradients (dq, dk, dv, d mem_keys, d mem_values), each in its input's dtype (None where
    ``needs`` says it is not wanted), accumulated in fp32 (float64 for float64 inputs), by the
    backward kernels ``kernels.grad_ops`` of each part (local, then dense or kNN memory) with the
    merged lse: the parts' dq are summed; nothing of size Lq x M is held. ``dq_in_acc``: dq stays
    in the accumulation dtype (a partial dq that the caller sums with others before rounding)."""
    batch, num_q_heads, len_q, _ = query.shape
    num_kv_heads = mem_keys.shape[1]
    cd = compute_dtype(query, key, value, mem_keys, mem_values)
    acc = lse_dtype(cd)
    num_rows = (num_q_heads // num_kv_heads) * len_q
    rows_f = _group_queries(query, num_kv_heads, acc)
    q_ok = finite_rows(rows_f)
    if grad_out is None:
        d_out = rows_f.new_zeros(rows_f.shape)
        delta = rows_f.new_zeros(rows_f.shape[:3])
    else:
        d_out = _group_queries(grad_out, num_kv_heads, acc)
        delta = (d_out * _group_queries(out, num_kv_heads, acc)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc).reshape(batch, num_kv_heads, num_rows)
    # a row whose lse is -inf (a non-finite query, or nothing to attend to) dropped every entry:
    # its dO and delta are zeroed too, so that no NaN/inf upstream gradient reaches a key through it
    lse_rows = lse.to(acc).reshape(batch, num_kv_heads, num_rows)
    dead = torch.isneginf(lse_rows) | ~q_ok
    d_out = d_out.masked_fill(dead[..., None], 0)
    delta = delta.masked_fill(dead, 0)
    grad_ops = TORCH_GRAD_KERNELS if kernels.grad_ops is None else kernels.grad_ops

    def rows_for(*operands):
        rows = _group_queries(query, num_kv_heads, kernels.row_dtype(query, *operands))
        return rows.masked_fill(~q_ok[..., None], 0)  # a NaN/inf query row scored nothing

    dq = None
    d_key = d_value = d_mem_keys = d_mem_values = None
    if key is not None and key.shape[2] > 0 and len_q > 0:
        key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
        dq, d_key, d_value = grad_ops.flash_scan_backward(
            rows_for(key, value), key, value, d_out, lse_rows, delta, None, None, softmax_scale,
            len_q if causal else 0, needs[1] or needs[2],
        )  # fmt: skip
    if mem_keys.shape[2] > 0 and len_q > 0:
        rows = rows_for(mem_keys, mem_values)
        need_mem = needs[3] or needs[4]
        if topk is None:
            dq_m, d_mem_keys, d_mem_values = grad_ops.flash_scan_backward(
                rows, mem_keys, mem_values, d_out, lse_rows, delta, mem_lengths, mem_mask, softmax_scale, 0, need_mem
            )  # fmt: skip
        else:
            dq_m, d_mem_keys, d_mem_values = grad_ops.gather_attention_backward(
                rows, indices, mem_keys, mem_values, d_out, lse_rows, delta, softmax_scale, need_mem
            )  # fmt: skip
        dq = dq_m if dq is None else dq.add_(dq_m)
    d_query = None
    if needs[0]:
        d_query = (_ungroup(dq, num_q_heads, len_q) if dq is not None else torch.zeros_like(query, dtype=acc))
        d_query = d_query.to(acc if dq_in_acc else query.dtype)
    if key is not None:  # a part that did not run (no rows, no keys) has zero gradient
        d_key = _grad_or_zeros(d_key, key, needs[1])
        d_value = _grad_or_zeros(d_value, value, needs[2])
    d_mem_keys = _grad_or_zeros(d_mem_keys, mem_keys, needs[3])
    d_mem_values = _grad_or_zeros(d_mem_values, mem_values, needs[4])
    return d_query, d_key, d_value, d_mem_keys, d_mem_values


def _grad_or_zeros(grad: Tensor | None, like: Tensor, needed: bool) -> Tensor | None:
    if not needed:
        return None
    if grad is None or grad.numel() != like.numel():  # the part did not run, or returned no dk/dv
        return torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    return grad
