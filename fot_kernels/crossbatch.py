"""``crossbatch_attention``: the memory-layer attention of FoT's CrossBatch training
(docs/DESIGN.md 3.5), fused: a composition of the op-shaped kernels of ``fot_kernels._library``.

Visibility. Context c = 1..d of batch row b is row b - c, visible iff c < pack(b); since
pack(b) <= b + 1 a visible context never wraps around the batch. So for context c the query rows
are b in [c, B) and their memory is ``mem_keys[0 : B - c]`` / ``value[0 : B - c]``: plain batch
slices (views, no copy) of the inputs, with per-row lengths L (visible) or 0 (not visible). The
output is ONE softmax over the parts, computed as a running log-sum-exp merge in fp32::

    part 0:  flash_scan(rows,       key,              value,            mask=key_padding_mask, causal)
    part c:  flash_scan(rows[c:],   mem_keys[:B - c], value[:B - c],    lengths_c)          c = 1..d

where ``rows`` are the query heads that share a kv head stacked as ``[B, Hkv, G * L, D]``. Nothing
of size [B, Hkv, d * L, D] (the gathered memory) nor any score matrix beyond the kernels' blocks
is ever built. Contexts that no row sees are skipped.

Gradients (FlashAttention-2, as ``backends.streaming.memory_attention_backward``): with the merged
lse and delta = rowsum(dO * O), each part's ``flash_scan_backward`` gives its dq (summed) and the
dk / dv of the slice it read; d value (local part + memory parts) and d mem_keys (memory parts)
are summed over the slices in an fp32 buffer and cast once at the end (for bf16 / fp16 inputs the
backward kernels read fp32 copies of key, value and mem_keys, so that no part's dk / dv is rounded
before the sum). The backward kernels are ``Kernels.grad_ops`` (C++ on the CPU, CUDA on GPUs when
the loaded extension has them; the Triton launchers on the ``triton`` backend), else the PyTorch
ones of ``backends.streaming``. Double backward is refused.

Backends: ``backend="auto"`` tries ``backends.auto_order`` (on GPUs triton, then cuda, then
streaming; on the CPU cpu, then streaming); each serves through its ``Kernels``: the C++ ops
(``cpu``), the CUDA ops (``cuda``), the Triton launchers ``backends.triton.kernels()``
(``flash_scan`` on the fused attention kernel, CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), the PyTorch ones (``streaming``).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _validate as V
from ._merge import compute_dtype, finite_rows, lse_dtype
from .autograd import needs_grad
from .backends import NAMES, auto_order, load, load_all
from .backends.streaming import (
    TORCH_GRAD_KERNELS,
    Kernels,
    _group_queries,
    _last_dim_contiguous,
    _ungroup,
)
from .ops import BackendUnavailableError

load_all()  # dispatch inside a torch.compile'd region is then a dictionary lookup

OP = "crossbatch_attention"


def crossbatch_pack(batch: int, cross_batch_range: int, dataset_packing: int, cross_batch_stepping: bool) -> list[int]:
    """pack(b) for every batch row b (docs/DESIGN.md 3.5): row b sees its contexts c < pack(b),
    context 0 being its own local context and context c >= 1 row b - c. Never more than b + 1, so
    a row never sees a later row nor wraps around the batch."""
    d, p = cross_batch_range, dataset_packing
    packs = []
    for b in range(batch):
        if p == 1 or not cross_batch_stepping:
            pack = d + 1
        else:
            pack = min((b % p) * math.ceil((d + 1) / max(p - 1, 1)) + 1, d + 1)
        packs.append(min(pack, b + 1))
    return packs


def visible_contexts(batch: int, cross_batch_range: int, dataset_packing: int,
                     cross_batch_stepping: bool) -> list[tuple[int, list[bool]]]:  # fmt: skip
    """The contexts c >= 1 some row sees, each with which of the query rows b = c .. B-1 see it
    (their memory is row b - c)."""
    packs = crossbatch_pack(batch, cross_batch_range, dataset_packing, cross_batch_stepping)
    contexts = []
    for c in range(1, min(cross_batch_range, batch - 1) + 1):
        seen = [c < packs[b] for b in range(c, batch)]
        if any(seen):
            contexts.append((c, seen))
    return contexts


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _kernels_or_reasons(name: str, query: Tensor, key: Tensor, value: Tensor, mem_keys: Tensor):
    """(Kernels, []) when backend ``name`` can serve the inputs (its ``unsupported_reasons`` for
    this op, with the gradients it would have to compute), else (None, reasons); the reference is
    (None, [])."""
    module, reason = load(name)
    if module is None:
        return None, [reason]
    if name == "reference":
        return None, []
    reasons = module.unsupported_reasons(OP, query, mem_keys, key=key, value=value, mem_values=value,
                                         needs_grad=needs_grad(query, key, value, mem_keys))  # fmt: skip
    return (None, reasons) if reasons else (module.kernels(query, key, value, mem_keys), [])


def _pick(backend: str, query: Tensor, key: Tensor, value: Tensor, mem_keys: Tensor):
    """(name, Kernels or None for the reference)."""
    backend = V.check_backend(backend, NAMES)
    names = auto_order(query.device.type) if backend == "auto" else (backend,)
    rejected = {}
    for name in names:
        kernels, reasons = _kernels_or_reasons(name, query, key, value, mem_keys)
        if not reasons:
            return name, kernels
        rejected[name] = reasons
    lines = "\n".join(f"  - {name}: {'; '.join(reasons)}" for name, reasons in rejected.items())
    what = f"backend {backend!r} cannot" if backend != "auto" else "no backend can"
    raise BackendUnavailableError(f"{what} serve {OP} for these inputs:\n{lines}")


# --------------------------------------------------------------------------------------------
# The fused composition
# --------------------------------------------------------------------------------------------


def _row_dtype(kernels: Kernels, query, key, value, mem_keys) -> torch.dtype:
    return kernels.row_dtype(query, key, value, mem_keys)


def _lengths(seen: list[bool], length: int, device) -> Tensor:
    return torch.tensor([length if s else 0 for s in seen], dtype=torch.int64, device=device)


def _merge_into(out: Tensor, lse: Tensor, part_out: Tensor, part_lse: Tensor) -> None:
    """out, lse (views, updated in place) := the log-sum-exp merge of (out, lse) and the part.
    Empty parts (lse -inf, out 0) contribute nothing; a row empty in both stays (0, -inf)."""
    new = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    out.mul_(torch.exp(lse - safe)[..., None]).add_(torch.exp(part_lse - safe)[..., None] * part_out.to(out.dtype))
    lse.copy_(new)


def _forward(query, key, value, mem_keys, key_padding_mask, *, contexts, scale: float, kernels: Kernels):
    """(out [B, Hkv, G * L, D] and lse [B, Hkv, G * L] in the accumulation dtype)."""
    batch, _, length, _ = query.shape
    num_kv_heads = key.shape[1]
    acc = lse_dtype(compute_dtype(query, key, value, mem_keys))
    rows = _group_queries(query, num_kv_heads, _row_dtype(kernels, query, key, value, mem_keys))
    if batch == 0 or length == 0:
        return rows.new_zeros(rows.shape, dtype=acc), rows.new_full(rows.shape[:3], float("-inf"), dtype=acc)
    ops = kernels.ops
    out, lse = ops.flash_scan(rows, key, value, None, key_padding_mask, scale, length)
    out, lse = out.to(acc), lse.to(acc)  # fresh tensors from the kernel (no-op casts): merged in place
    for c, seen in contexts:
        part_out, part_lse = ops.flash_scan(
            rows[c:], mem_keys[: batch - c], value[: batch - c], _lengths(seen, length, query.device), None, scale, 0
        )  # fmt: skip
        _merge_into(out[c:], lse[c:], part_out, part_lse.to(acc))
    return out, lse


def _backward(grad_out, query, key, value, mem_keys, key_padding_mask, out, lse, needs, *, contexts, scale: float,
              kernels: Kernels):  # fmt: skip
    """(dq, dk, dv, d mem_keys), each in its input's dtype (None where not needed)."""
    batch, num_q_heads, length, _ = query.shape
    num_kv_heads = key.shape[1]
    acc = out.dtype
    grad_ops = TORCH_GRAD_KERNELS if kernels.grad_ops is None else kernels.grad_ops
    rows_acc = _group_queries(query, num_kv_heads, acc)
    q_ok = finite_rows(rows_acc)
    d_out = _group_queries(grad_out, num_kv_heads, acc)
    delta = (d_out * out).sum(-1)
    # a row whose lse is -inf (a non-finite query, or nothing to attend to) dropped every entry:
    # its dO and delta are zeroed, so that no NaN/inf upstream gradient reaches a key through it
    dead = torch.isneginf(lse) | ~q_ok
    d_out = d_out.masked_fill(dead[..., None], 0)
    delta = delta.masked_fill(dead, 0)
    # d value (local part + memory parts) and d mem_keys (memory parts) are sums of several parts'
    # dk / dv, which the kernels return in the operands' dtype: so that no part is rounded to a
    # low precision before the sum, the kernels then read fp32 copies of key, value and mem_keys
    # (one dtype, as some kernels require; O(B * Hkv * L * D) each, the gradients' own size).
    # Every sum is in fp32, cast once to the input's dtype at the end.
    if (needs[2] or needs[3]) and any(t.dtype != acc for t in (key, value, mem_keys)):
        key_acc, value_acc, mem_keys_acc = key.to(acc), value.to(acc), mem_keys.to(acc)
    else:
        key_acc, value_acc, mem_keys_acc = key, value, mem_keys
    rows = _group_queries(query, num_kv_heads, _row_dtype(kernels, query, key_acc, value_acc, mem_keys_acc))
    rows = rows.masked_fill(~q_ok[..., None], 0)  # a NaN/inf query row scored nothing
    d_key = d_value = d_mem = None
    if batch == 0 or length == 0:
        dq = torch.zeros(rows_acc.shape, dtype=acc, device=rows_acc.device)
    else:
        dq, d_key, d_value = grad_ops.flash_scan_backward(
            rows, key_acc, value_acc, d_out, lse, delta, None, key_padding_mask, scale, length, needs[1] or needs[2]
        )  # fmt: skip
        if needs[3]:
            d_mem = torch.zeros(mem_keys.shape, dtype=acc, device=mem_keys.device)
        if needs[2]:
            d_value = d_value.to(acc)
        for c, seen in contexts:
            need_mem = needs[2] or needs[3]
            dq_c, dmk_c, dv_c = grad_ops.flash_scan_backward(
                rows[c:], mem_keys_acc[: batch - c], value_acc[: batch - c], d_out[c:], lse[c:], delta[c:],
                _lengths(seen, length, query.device), None, scale, 0, need_mem,
            )  # fmt: skip
            dq[c:] += dq_c
            if needs[3]:
                d_mem[: batch - c] += dmk_c
            if needs[2]:
                d_value[: batch - c] += dv_c
    grads = []
    for grad, like, needed in ((d_key, key, needs[1]), (d_value, value, needs[2]), (d_mem, mem_keys, needs[3])):
        if not needed:
            grads.append(None)
        elif grad is None or grad.numel() != like.numel():
            grads.append(torch.zeros(like.shape, dtype=like.dtype, device=like.device))
        else:
            grads.append(grad.to(like.dtype))
    d_query = _ungroup(dq, num_q_heads, length).to(query.dtype) if needs[0] else None
    return (d_query, *grads)


class CrossBatchFunction(torch.autograd.Function):
    """(query, key, value, mem_keys) -> out [B, Hq, L, D] in query.dtype."""

    @staticmethod
    def forward(ctx, query, key, value, mem_keys, key_padding_mask, forward, backward):
        out, lse = forward(query, key, value, mem_keys, key_padding_mask)
        ctx.backward_fn = backward
        ctx.save_for_backward(query, key, value, mem_keys, key_padding_mask, out, lse)
        return _ungroup(out, query.shape[1], query.shape[2]).to(query.dtype)

    @staticmethod
    @once_differentiable  # no double backward: it raises instead of returning a wrong graph
    def backward(ctx, grad_out):
        query, key, value, mem_keys, key_padding_mask, out, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        if grad_out is None or not any(needs):
            return (None,) * 7
        grads = ctx.backward_fn(grad_out, query, key, value, mem_keys, key_padding_mask, out, lse, needs)
        return (*grads, None, None, None)


def _fused(query, key, value, mem_keys, key_padding_mask, *, contexts, scale, kernels) -> Tensor:
    key, value, mem_keys = (_last_dim_contiguous(t) for t in (key, value, mem_keys))
    forward = partial(_forward, contexts=contexts, scale=scale, kernels=kernels)
    if needs_grad(query, key, value, mem_keys):
        backward = partial(_backward, contexts=contexts, scale=scale, kernels=kernels)
        return CrossBatchFunction.apply(query, key, value, mem_keys, key_padding_mask, forward, backward)
    out, _ = forward(query, key, value, mem_keys, key_padding_mask)
    return _ungroup(out, query.shape[1], query.shape[2]).to(query.dtype)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------


def crossbatch_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mem_keys: Tensor,
    *,
    cross_batch_range: int,
    dataset_packing: int = 1,
    cross_batch_stepping: bool = False,
    key_padding_mask: Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """FoT's CrossBatch attention (docs/DESIGN.md 3.5): each row's queries attend, in ONE fp32
    softmax, to their causal local context and to the whole of the previous rows' memory keys.

    With d = ``cross_batch_range``, P = ``dataset_packing``: context c = 0 of batch row b is its
    own local context, context c = 1..d is row b - c; context c is visible to row b iff
    c < pack(b), where pack(b) = d + 1 if P == 1 or not ``cross_batch_stepping``, else
    min((b mod P) * ceil((d + 1) / max(P - 1, 1)) + 1, d + 1), and then pack(b) = min(pack(b), b + 1)
    (a row never sees later rows, nor wraps around). For query i of row b, with s = scale * q.k::

        out[b, h, i] = sum_j p_j value[b, h', j]  +  sum_{visible c >= 1} sum_m p_cm value[b - c, h', m]
        p ~ exp(s(q_i, key[b, h', j]))            for j <= i with key_padding_mask[b, j] (if given)
            exp(s(q_i, mem_keys[b - c, h', m]))   for every m in 0..L-1 (never causally masked)

    normalised together (h' = h // (Hq / Hkv), grouped-query attention). A key whose score is
    not finite is dropped; a row with nothing to attend to gets 0.

    Args:
        query: ``[B, Hq, L, D]`` (RoPE-rotated).
        key: ``[B, Hkv, L, D]`` (RoPE-rotated local keys).
        value: ``[B, Hkv, L, D]``: the local values, and the memory values other rows see.
        mem_keys: ``[B, Hkv, L, D]``: the keys other rows see (LongLLaMA: the un-rotated keys).
        cross_batch_range: d >= 1, the number of previous rows each row may see.
        dataset_packing: P >= 1 dividing B: rows s*P .. s*P + P - 1 are consecutive chunks of a stream.
        cross_batch_stepping: the stepping rule above (only with P > 1).
        key_padding_mask: optional bool ``[B, L]``, True = attend; applies to the local part only.
        softmax_scale: default ``1 / sqrt(D)``, for local and memory scores alike.
        backend: ``"auto"`` or one of ``"reference"`` (the float64-capable oracle: gathers the
            contexts and materialises the scores), ``"streaming"``, ``"cpu"``, ``"cuda"``,
            ``"triton"``.

    Returns:
        out ``[B, Hq, L, D]`` in query.dtype; differentiable w.r.t. query, key, value and mem_keys
        (row b - c receives gradient from row b's queries through mem_keys and value).
    """
    d, packing, stepping, mask, scale = V.check_crossbatch(
        query, key, value, mem_keys, cross_batch_range, dataset_packing, cross_batch_stepping, key_padding_mask,
        softmax_scale,
    )  # fmt: skip
    name, kernels = _pick(backend, query, key, value, mem_keys)
    if name == "reference":
        from .backends import reference

        out, _ = reference.crossbatch_attention(
            query, key, value, mem_keys, cross_batch_range=d, dataset_packing=packing, cross_batch_stepping=stepping,
            key_padding_mask=mask, softmax_scale=scale,
        )  # fmt: skip
        return out
    contexts = visible_contexts(query.shape[0], d, packing, stepping)
    return _fused(query, key, value, mem_keys, mask, contexts=contexts, scale=scale, kernels=kernels)


__all__ = ["crossbatch_attention", "crossbatch_pack"]
