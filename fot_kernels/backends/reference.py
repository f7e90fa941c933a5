"""Reference backend: the correctness oracle.

Plain, readable PyTorch that follows DESIGN.md section 3 line by line. It materialises the full
query x memory score matrix, so it is only for tests, small inputs and as a benchmark baseline.
It runs in any floating dtype; with float64 inputs every intermediate is float64 (the upcast oracle
of the tests), otherwise intermediates are float32.

Semantics fixed here (and followed by every other backend):
- a memory slot m of batch row b is *valid* iff ``m < mem_lengths[b]`` and ``mem_mask[b, m]``;
- a memory slot is a *candidate* for a query iff it is valid and its score is not NaN (a NaN key
  drops only its own slot);
- kNN order: candidates first, then score descending, then index ascending (ties keep the lower
  index); a candidate with score -inf is still selected (after every finite one); the tail of a row
  with fewer than k candidates is padded with score -inf and index -1;
- local causal mask is bottom-right aligned: query i sees local key j iff ``j <= i + Lk - Lq``;
- one joint softmax over [allowed local keys | memory candidates]; a row with no candidate at all
  has output 0 and lse -inf; invalid memory slots contribute exactly nothing, even when their
  (unused) values hold NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NAME = "reference"


def unsupported_reasons(op: str, query: Tensor, mem_keys: Tensor, **_: object) -> list[str]:
    """The reference serves every validated input (it is slow and materialises Lq x M)."""
    return []


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision every op accumulates in."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * n_rep, L, D]: query head h reads kv head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def valid_slots(
    batch: int, num_slots: int, mem_lengths: Tensor | None, mem_mask: Tensor | None, device
) -> Tensor:
    """Bool [B, M]: slot m of batch row b may be attended to / selected."""
    valid = torch.ones(batch, num_slots, dtype=torch.bool, device=device)
    if mem_lengths is not None:
        positions = torch.arange(num_slots, device=device)
        valid &= positions[None, :] < mem_lengths.to(device)[:, None]
    if mem_mask is not None:
        valid &= mem_mask.to(device)
    return valid


def select_topk(scores: Tensor, indices: Tensor, selectable: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim in the contract's order: selectable first, score descending,
    index ascending. Non-selected tail entries become (-inf, -1). Output last dim is exactly k.

    ``indices`` must be ascending along the last dim within equal scores' candidates' original
    order, which holds for slot order and for [running top-k | next block] concatenations.
    """
    n = scores.shape[-1]
    if n < k:  # pad so that the output always has k columns
        pad = k - n
        scores = torch.cat([scores, scores.new_full((*scores.shape[:-1], pad), float("-inf"))], -1)
        indices = torch.cat([indices, indices.new_full((*indices.shape[:-1], pad), -1)], -1)
        selectable = torch.cat([selectable, selectable.new_zeros((*selectable.shape[:-1], pad))], -1)
    key = scores.masked_fill(~selectable, float("-inf"))
    # Two stable sorts: by score descending, then by "selectable" so that a candidate scoring -inf
    # still ranks before non-candidates. Stability keeps the lower index first on ties, because
    # the inputs arrive in ascending index order.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    sel_sorted = selectable.gather(-1, order)
    order = order.gather(-1, torch.sort(sel_sorted.to(torch.int8), dim=-1, descending=True, stable=True).indices)
    order = order[..., :k]
    top_sel = selectable.gather(-1, order)
    top_scores = key.gather(-1, order)
    top_idx = indices.gather(-1, order).masked_fill(~top_sel, -1)
    return top_scores, top_idx


def knn_topk(
    query: Tensor, mem_keys: Tensor, k: int, *, mem_lengths: Tensor | None = None, mem_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Exact top-k memory slots by inner product. See DESIGN.md 3.1 and the module docstring.

    Returns ``(scores, indices)`` of shape [B, Hq, Lq, k]: scores in fp32 (fp64 for fp64
    inputs), indices int64 into M.
    """
    batch, num_q_heads, _, _ = query.shape
    num_kv_heads, num_slots = mem_keys.shape[1], mem_keys.shape[2]
    cd = compute_dtype(query, mem_keys)
    keys = repeat_kv(mem_keys.to(cd), num_q_heads // num_kv_heads)
    scores = query.to(cd) @ keys.transpose(-1, -2)  # [B, Hq, Lq, M]
    valid = valid_slots(batch, num_slots, mem_lengths, mem_mask, query.device)[:, None, None, :]
    selectable = valid & ~torch.isnan(scores)
    slot_index = torch.arange(num_slots, device=query.device).expand_as(scores)
    return select_topk(scores, slot_index, selectable, k)


def causal_allowed(len_q: int, len_k: int, device) -> Tensor:
    """Bool [Lq, Lk], bottom-right aligned: query i sees key j iff j <= i + Lk - Lq.

    Example with Lq = 2, Lk = 5 (x = allowed)::

        key   0 1 2 3 4
        q 0   x x x x .
        q 1   x x x x x
    """
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    return j <= i + (len_k - len_q)


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
) -> tuple[Tensor, Tensor]:
    """Joint softmax over [local causal keys | memory slots (all valid, or the kNN top-k)].

    ``key``/``value`` may be None (no local part: the memory part alone, ``knn_attention``).
    Returns ``(out, lse)``: out [B, Hq, Lq, D] in query.dtype, lse [B, Hq, Lq] (fp32, or fp64 for
    fp64 inputs).
    """
    batch, num_q_heads, len_q, head_dim = query.shape
    num_kv_heads, num_slots = mem_keys.shape[1], mem_keys.shape[2]
    n_rep = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    cd = compute_dtype(query, key, value, mem_keys, mem_values)
    q = query.to(cd)

    logits, values = [], []  # per part: [B, Hq, Lq, n] logits and a function of the weights
    if key is not None and key.shape[2] > 0:
        k_loc = repeat_kv(key.to(cd), n_rep)
        v_loc = repeat_kv(value.to(cd), n_rep)
        s_loc = (q @ k_loc.transpose(-1, -2)) * scale
        if causal:
            s_loc = s_loc.masked_fill(~causal_allowed(len_q, key.shape[2], q.device), float("-inf"))
        logits.append(s_loc)
        values.append(lambda p, v=v_loc: p @ v)

    if topk is None:
        k_mem = repeat_kv(mem_keys.to(cd), n_rep)
        v_mem = repeat_kv(mem_values.to(cd), n_rep)
        s_mem = q @ k_mem.transpose(-1, -2)
        valid = valid_slots(batch, num_slots, mem_lengths, mem_mask, q.device)[:, None, None, :]
        s_mem = (s_mem * scale).masked_fill(~valid | torch.isnan(s_mem), float("-inf"))
        v_mem = v_mem.masked_fill(~valid.transpose(-1, -2), 0)  # weight 0 must not meet a NaN in an unused slot
        logits.append(s_mem)
        values.append(lambda p, v=v_mem: p @ v)
    else:
        sel_scores, sel_idx = knn_topk(query.to(cd), mem_keys.to(cd), topk, mem_lengths=mem_lengths, mem_mask=mem_mask)
        v_mem = repeat_kv(mem_values.to(cd), n_rep)  # [B, Hq, M, D]
        gathered = v_mem[:, :, None, :, :].expand(-1, -1, len_q, -1, -1) if num_slots > 0 else None

        def weigh_selected(p: Tensor, idx: Tensor = sel_idx, v: Tensor | None = gathered) -> Tensor:
            if v is None:
                return p.new_zeros(batch, num_q_heads, len_q, head_dim)
            sel = idx.clamp_min(0)[..., None].expand(-1, -1, -1, -1, head_dim)  # [B, Hq, Lq, k, D]
            v_sel = v.gather(3, sel).masked_fill(idx[..., None] < 0, 0)  # padding reads slot 0: weight 0
            return (p[..., None] * v_sel).sum(-2)

        logits.append(sel_scores.to(cd) * scale)  # padding is -inf, so it gets weight 0
        values.append(weigh_selected)

    if not logits:
        out = torch.zeros_like(query)
        lse = torch.full((batch, num_q_heads, len_q), float("-inf"), dtype=cd, device=q.device)
        return out, lse.to(torch.float32 if cd == torch.float32 else cd)

    all_logits = torch.cat(logits, dim=-1)
    lse = torch.logsumexp(all_logits, dim=-1)  # -inf for rows with no candidate
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(all_logits - safe_lse[..., None])
    out = torch.zeros(batch, num_q_heads, len_q, head_dim, dtype=cd, device=q.device)
    start = 0
    for part_logits, weigh in zip(logits, values):
        width = part_logits.shape[-1]
        out = out + weigh(probs[..., start : start + width])
        start += width
    return out.to(query.dtype), lse


def merge_attention(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact log-sum-exp merge of partial attentions over disjoint candidate sets.

    outs: each [..., D]; lses: each [...] (natural log). Returns (out in outs[0].dtype, lse).
    A row where every part has lse -inf gets output 0 and lse -inf.
    """
    cd = compute_dtype(*outs, *lses)
    lse_stack = torch.stack([x.to(cd) for x in lses])  # [P, ...]
    lse = torch.logsumexp(lse_stack, dim=0)
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lse_stack - safe_lse)  # 0 for empty parts
    out = sum(w[..., None] * o.to(cd) for w, o in zip(weights, outs))
    return out.to(outs[0].dtype), lse.to(torch.float32 if cd == torch.float32 else cd)
