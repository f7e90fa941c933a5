"""Public functional ops: validate -> pick a backend -> call it.

Shapes follow torch SDPA / Hugging Face: ``[B, H, L, D]``. B batch, Hq query heads, Hkv key/value
heads (Hq % Hkv == 0: grouped-query attention, query head h reads kv head h // (Hq // Hkv)),
Lq queries, Lk local keys, M memory slots, D head dim (1..256, any value).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _merge
from . import _validate as V
from .autograd import needs_grad
from .backends import NAMES, auto_order, load, load_all

# Every backend module is imported here, once, so that dispatch inside a torch.compile'd region
# is a dictionary lookup (no importlib call to trace). Importing a backend imports no GPU library.
load_all()


class BackendUnavailableError(ValueError):
    """No backend (or not the requested one) can serve the given inputs; the message says why."""


def _pick_backend(op: str, backend: str, query: Tensor, mem_keys: Tensor, **features):
    backend = V.check_backend(backend, NAMES)
    names = auto_order(query.device.type) if backend == "auto" else (backend,)
    rejected = {}
    for name in names:
        module, reason = load(name)
        reasons = [reason] if module is None else module.unsupported_reasons(op, query, mem_keys, **features)
        if not reasons:
            return module
        rejected[name] = reasons
    lines = "\n".join(f"  - {name}: {'; '.join(reasons)}" for name, reasons in rejected.items())
    what = f"backend {backend!r} cannot" if backend != "auto" else "no backend can"
    raise BackendUnavailableError(f"{what} serve {op} for these inputs:\n{lines}")


def _cap_k(k: int, num_slots: int) -> int:
    """k beyond the memory's slot count selects the same slots as k = M: internal work is capped
    at min(k, M) (the caller pads the result where the contract asks for k columns)."""
    return min(k, max(num_slots, 1))


def knn_topk(
    query: Tensor,
    mem_keys: Tensor,
    k: int,
    *,
    mem_lengths: Tensor | None = None,
    mem_mask: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Exact k nearest memory slots of each query by inner product.

    Args:
        query: ``[B, Hq, Lq, D]`` float tensor.
        mem_keys: ``[B, Hkv, M, D]`` float tensor (any float dtype, e.g. bf16 with an fp32 query;
            never upcast as a whole), last dim contiguous; may be a view of a larger store.
        k: number of slots per query, ``k >= 1`` (may exceed M: the tail is padded).
        mem_lengths: optional integer ``[B]``: slot m of row b is valid iff ``m < mem_lengths[b]``.
        mem_mask: optional bool ``[B, M]``: slot m of row b is valid iff ``mem_mask[b, m]``.
        backend: ``"auto"`` or one of ``"reference"``, ``"streaming"``, ``"cpu"``, ``"triton"``,
            ``"cuda"``.

    Returns:
        ``(scores, indices)``, both ``[B, Hq, Lq, k]``: scores float32 (float64 when an input is
        float64) inner products in descending order, indices int64 into M. Ties keep the lower
        index. Invalid slots and slots with a non-finite score (NaN, +inf, -inf) are never
        selected; with fewer than k of the others the tail is (-inf, -1). Not differentiable.
    """
    q, mk = V.check_query_and_memory(query, mem_keys)
    k = V.check_k("k", k)
    lengths, mask = V.check_memory_validity(q, mk, mem_lengths, mem_mask)
    batch, num_q_heads, len_q, _ = q.shape
    work_k = _cap_k(k, mk.shape[2])
    impl = _pick_backend("knn_topk", backend, q, mk, topk=work_k)  # no gradient: a selection
    if mk.shape[2] > 0 and work_k == k:
        return impl.knn_topk(q, mk, k, mem_lengths=lengths, mem_mask=mask)
    # k > M: the tail is padding; write the selection of min(k, M) into the padded result
    scores = q.new_full((batch, num_q_heads, len_q, k), float("-inf"), dtype=_merge.compute_dtype(q, mk))
    indices = torch.full(scores.shape, -1, dtype=torch.int64, device=q.device)
    if mk.shape[2] > 0:
        part_s, part_i = impl.knn_topk(q, mk, work_k, mem_lengths=lengths, mem_mask=mask)
        scores[..., :work_k] = part_s
        indices[..., :work_k] = part_i
    return scores, indices


def memory_attention(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    mem_keys: Tensor,
    mem_values: Tensor,
    *,
    topk: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    mem_lengths: Tensor | None = None,
    mem_mask: Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of each query over its local context plus an external memory, in ONE softmax.

    Args:
        query: ``[B, Hq, Lq, D]``.
        key, value: ``[B, Hkv, Lk, D]`` local context (or both None: memory only).
        mem_keys, mem_values: ``[B, Hkv, M, D]`` memory (any float dtype; last dim contiguous).
        topk: None attends to every valid memory slot (dense memory, the released LongLLaMA
            mode); an int k attends to the ``knn_topk`` selection of k slots per query.
        causal: mask local keys causally, aligned to the bottom-right corner as in FlashAttention:
            query i sees local key j iff ``j <= i + Lk - Lq``. With Lq = 2, Lk = 5::

                local key  0 1 2 3 4  | memory (never causally masked)
                query 0    x x x x .  | x x x ...
                query 1    x x x x x  | x x x ...

        softmax_scale: default ``1 / sqrt(D)``, applied to local and memory scores alike.
        mem_lengths, mem_mask: memory validity, as in ``knn_topk`` (shared by heads and queries).
        return_lse: also return the natural-log log-sum-exp ``[B, Hq, Lq]`` in float32.
        backend: ``"auto"`` or a backend name.

    Returns:
        out ``[B, Hq, Lq, D]`` in query.dtype (and lse if ``return_lse``). A row with nothing to
        attend to gets output 0 and lse -inf.
    """
    q, mk = V.check_query_and_memory(query, mem_keys, mem_values)
    V.check_local(q, key, value, mk)
    topk = V.check_topk(topk)
    causal = V.check_flag("causal", causal)
    return_lse = V.check_flag("return_lse", return_lse)
    scale = V.check_scale(softmax_scale, q.shape[-1])
    lengths, mask = V.check_memory_validity(q, mk, mem_lengths, mem_mask)
    topk = None if topk is None else _cap_k(topk, mk.shape[2])
    impl = _pick_backend(
        "memory_attention", backend, q, mk, key=key, value=value, mem_values=mem_values, topk=topk,
        needs_grad=needs_grad(q, key, value, mk, mem_values),
    )  # fmt: skip
    out, lse = impl.memory_attention(
        q, key, value, mk, mem_values,
        topk=topk, causal=causal, softmax_scale=scale, mem_lengths=lengths, mem_mask=mask,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def knn_attention(
    query: Tensor,
    mem_keys: Tensor,
    mem_values: Tensor,
    *,
    topk: int | None,
    softmax_scale: float | None = None,
    mem_lengths: Tensor | None = None,
    mem_mask: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The memory part alone: softmax over the top-k memory slots (every valid slot when
    ``topk is None``). Returns ``(out [B, Hq, Lq, D] in query.dtype, lse [B, Hq, Lq] float32)``,
    ready for ``merge_attention`` or a gate (``g * out_mem + (1 - g) * out_local``)."""
    q, mk = V.check_query_and_memory(query, mem_keys, mem_values)
    topk = V.check_topk(topk)
    scale = V.check_scale(softmax_scale, q.shape[-1])
    lengths, mask = V.check_memory_validity(q, mk, mem_lengths, mem_mask)
    topk = None if topk is None else _cap_k(topk, mk.shape[2])
    impl = _pick_backend(
        "memory_attention", backend, q, mk, mem_values=mem_values, topk=topk, needs_grad=needs_grad(q, mk, mem_values)
    )
    return impl.memory_attention(
        q, None, None, mk, mem_values,
        topk=topk, causal=False, softmax_scale=scale, mem_lengths=lengths, mem_mask=mask,
    )  # fmt: skip


def merge_attention(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact log-sum-exp merge of attentions over disjoint candidate sets.

    Args:
        outs: P tensors ``[..., D]`` (e.g. ``[B, Hq, Lq, D]``), each normalised over its own set.
        lses: P tensors ``[...]``, the natural-log log-sum-exp of each part's scaled scores.

    Returns:
        ``(out, lse)``: the attention over the union, in outs[0].dtype, and its lse (float32, or
        float64 for float64 inputs). Parts with lse -inf contribute nothing (even when their output
        holds NaN, as a fully masked softmax row gives); a row where every part is empty gets 0
        and -inf. Differentiable.
    """
    outs_t, lses_t = V.check_merge_inputs(outs, lses)
    return _merge.merge_attention(outs_t, lses_t)


__all__ = ["BackendUnavailableError", "knn_attention", "knn_topk", "memory_attention", "merge_attention"]
