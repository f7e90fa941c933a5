"""The autograd layer over the forward kernels: ONE ``torch.autograd.Function`` for the
block-streaming composition (local causal part + dense or kNN memory part, one softmax).

Forward runs a backend's forward kernels with autograd off and saves the inputs, the merged output
(in the compute dtype), the merged lse and, in kNN mode, the selected slot indices (the selection
is piecewise constant: it has no gradient and is never recomputed). Backward is FlashAttention-2
style: it recomputes the probabilities block by block from the queries, the keys and the saved
lse, so that nothing of size Lq x M is ever held (docs/DESIGN.md 3.4). The math, for a row i with
scaled scores s_ij, P_ij = exp(s_ij - lse_i), output O_i = sum_j P_ij v_j::

    D_i   = rowsum(dO_i * O_i) - dlse_i
    dP_ij = dO_i . v_j
    dS_ij = P_ij * (dP_ij - D_i)        (gradient of the scaled score)
    dq_i += scale * sum_j dS_ij k_j,  dk_j += scale * sum_i dS_ij q_i,  dv_j += sum_i P_ij dO_i

The backend supplies both halves (``forward`` and ``backward`` callables); this module only wires
them into autograd.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class Composition(NamedTuple):
    """What the Function runs: ``forward(query, key, value, mem_keys, mem_values, mem_lengths,
    mem_mask) -> (out, lse, indices | None)`` with out in the compute dtype, and
    ``backward(grad_out | None, grad_lse | None, query, key, value, mem_keys, mem_values, out, lse,
    indices, mem_lengths, mem_mask, needs) -> (dq, dk, dv, dmk, dmv)`` (None where not needed)."""

    forward: Callable[..., tuple[Tensor, Tensor, Tensor | None]]
    backward: Callable[..., tuple[Tensor | None, ...]]


class MemoryAttentionFunction(torch.autograd.Function):
    """(query, key, value, mem_keys, mem_values) -> (out in query.dtype, lse)."""

    @staticmethod
    def forward(ctx, query, key, value, mem_keys, mem_values, mem_lengths, mem_mask, composition):
        out, lse, indices = composition.forward(query, key, value, mem_keys, mem_values, mem_lengths, mem_mask)
        ctx.composition = composition
        ctx.set_materialize_grads(False)  # an unused lse (or out) gets no zero-filled gradient
        ctx.save_for_backward(query, key, value, mem_keys, mem_values, out, lse, indices, mem_lengths, mem_mask)
        return out.to(query.dtype), lse

    @staticmethod
    @once_differentiable  # no double backward: it raises instead of returning a wrong graph
    def backward(ctx, grad_out, grad_lse):
        query, key, value, mem_keys, mem_values, out, lse, indices, mem_lengths, mem_mask = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:5])
        if (grad_out is None and grad_lse is None) or not any(needs):
            return (None,) * 8
        grads = ctx.composition.backward(
            grad_out, grad_lse, query, key, value, mem_keys, mem_values, out, lse, indices, mem_lengths, mem_mask,
            needs,
        )  # fmt: skip
        return (*grads, None, None, None)


def memory_attention(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    mem_keys: Tensor,
    mem_values: Tensor,
    mem_lengths: Tensor | None,
    mem_mask: Tensor | None,
    composition: Composition,
) -> tuple[Tensor, Tensor]:
    """The composition with a memory-bounded backward: ``(out [B, Hq, Lq, D], lse [B, Hq, Lq])``."""
    return MemoryAttentionFunction.apply(query, key, value, mem_keys, mem_values, mem_lengths, mem_mask, composition)


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will record a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
