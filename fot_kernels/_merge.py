"""Exact combination rules shared by the production paths (the block-streaming composition, the
public ``merge_attention``): log-sum-exp merge of partial attentions, the running top-k merge, the
causal mask and the accumulation dtype. The reference backend does not use this module: it stays
a self-contained oracle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision every op accumulates in."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def lse_dtype(cd: torch.dtype) -> torch.dtype:
    """The dtype of a returned lse: float32, or float64 when computing in float64."""
    return torch.float64 if cd == torch.float64 else torch.float32


def merge_attention(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact log-sum-exp merge of partial attentions over disjoint candidate sets.

    outs: each [..., D]; lses: each [...] (natural log). Returns (out in outs[0].dtype, lse).
    A part whose lse is -inf (an empty candidate set) contributes nothing, even when its output
    holds NaN (what a fully masked softmax row gives); a row where every part is empty gets output
    0 and lse -inf. Differentiable.
    """
    cd = compute_dtype(*outs, *lses)
    lse_stack = torch.stack([x.to(cd) for x in lses])  # [P, ...]
    empty = lse_stack == float("-inf")
    # logsumexp with every branch finite, so that gradients of empty parts and rows are 0, not NaN
    top = lse_stack.amax(0)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.where(empty, 0.0, torch.exp(lse_stack - top))  # [P, ...]
    total = weights.sum(0)
    nothing = total == 0
    weights = weights / torch.where(nothing, 1.0, total)
    lse = torch.where(nothing, float("-inf"), top + torch.log(torch.where(nothing, 1.0, total)))
    out = None
    for w, o, e in zip(weights, outs, empty):
        term = w[..., None] * torch.where(e[..., None], 0.0, o.to(cd))
        out = term if out is None else out + term
    return out.to(outs[0].dtype), lse.to(lse_dtype(cd))


def select_topk(scores: Tensor, indices: Tensor, selectable: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim in the contract's order: selectable entries only, score
    descending, then position ascending (the lower index wins ties when ``indices`` ascend along
    the last dim, as they do for slot order and for [running top-k | next block]). Selectable
    scores are finite. The last dim of the result is exactly k; the tail is (-inf, -1)."""
    n = scores.shape[-1]
    if n < k:  # pad so that the output always has k columns
        pad = k - n
        scores = torch.cat([scores, scores.new_full((*scores.shape[:-1], pad), float("-inf"))], -1)
        indices = torch.cat([indices, indices.new_full((*indices.shape[:-1], pad), -1)], -1)
        selectable = torch.cat([selectable, selectable.new_zeros((*selectable.shape[:-1], pad))], -1)
    key = scores.masked_fill(~selectable, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
    top_sel = selectable.gather(-1, order)
    return key.gather(-1, order), indices.gather(-1, order).masked_fill(~top_sel, -1)


def causal_allowed(len_q: int, len_k: int, device) -> Tensor:
    """Bool [Lq, Lk], bottom-right aligned: query i sees key j iff j <= i + Lk - Lq."""
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    return j <= i + (len_k - len_q)


def finite_rows(x: Tensor) -> Tensor:
    """Bool [..., L]: rows of x [..., L, D] with no NaN/inf element. A key row that is not finite
    has a non-finite score against every query (so it is dropped everywhere); a query row that is
    not finite has a non-finite score against every key."""
    return torch.isfinite(x).all(-1)
