"""Reference backend: the correctness oracle.

Plain, readable PyTorch that follows docs/DESIGN.md section 3 line by line. It materialises the full
query x memory score matrix, so it is only for tests, small inputs and as a benchmark baseline.
It runs in any floating dtype; with float64 inputs every intermediate is float64 (the upcast oracle
of the tests), otherwise intermediates are float32.

Semantics fixed here (and followed by every other backend):
- a memory slot m of batch row b is *valid* iff ``m < mem_lengths[b]`` and ``mem_mask[b, m]``;
- a local key or memory slot is *dropped* for a query when their unscaled score is not finite
  (NaN, +inf or -inf): it is never selected and contributes nothing. A key row with a non-finite
  element has a non-finite score against every query, so it is dropped everywhere and its value
  is never read (a NaN/inf value there contributes nothing); a query row with a non-finite element
  drops every candidate (output 0, lse -inf). Below, such key and query rows are zeroed before the
  score product and their scores dropped by mask, so that gradients of dropped entries are exactly
  0, never 0 * NaN;
- kNN order: score descending, then index ascending (ties keep the lower index) among the valid
  slots with a finite score; the tail of a row with fewer than k of them is padded with score
  -inf and index -1;
- local causal mask is bottom-right aligned: query i sees local key j iff ``j <= i + Lk - Lq``;
- one joint softmax over [allowed local keys | memory candidates]; a row with no candidate at all
  has output 0 and lse -inf; invalid memory slots contribute exactly nothing, even when their
  (unused) values hold NaN.

Self-contained on purpose: the production paths share their helpers in ``fot_kernels._merge``;
nothing here is imported by them, so the tests never compare code with itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

NAME = "reference"


def unsupported_reasons(op: str, query: Tensor, mem_keys: Tensor, **_: object) -> list[str]:
    """The reference serves every validated input (it is slow and materialises Lq x M), and is
    differentiable through PyTorch's autograd (the gradient oracle)."""
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


def finite_rows(x: Tensor) -> Tensor:
    """Bool [..., L]: rows of x [..., L, D] without a NaN/inf element."""
    return torch.isfinite(x).all(-1)


def scores_and_keep(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Unscaled scores q @ k^T [..., Lq, Lk] and whether each is kept (finite). Non-finite query
    and key rows are zeroed before the product (their scores are dropped anyway); for finite rows
    the product is the true score, which may still overflow to inf and then is dropped too."""
    q_ok, k_ok = finite_rows(q), finite_rows(k)
    scores = torch.where(q_ok[..., None], q, 0) @ torch.where(k_ok[..., None], k, 0).transpose(-1, -2)
    return scores, torch.isfinite(scores) & q_ok[..., :, None] & k_ok[..., None, :]


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


def knn_topk(
    query: Tensor, mem_keys: Tensor, k: int, *, mem_lengths: Tensor | None = None, mem_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Exact top-k memory slots by inner product. See docs/DESIGN.md 3.1 and the module docstring.

    Returns ``(scores, indices)`` of shape [B, Hq, Lq, k]: scores in fp32 (fp64 for fp64
    inputs), indices int64 into M.
    """
    batch, num_q_heads, len_q, _ = query.shape
    num_kv_heads, num_slots = mem_keys.shape[1], mem_keys.shape[2]
    cd = compute_dtype(query, mem_keys)
    keys = repeat_kv(mem_keys.to(cd), num_q_heads // num_kv_heads)
    scores, keep = scores_and_keep(query.to(cd), keys)  # [B, Hq, Lq, M]
    keep = keep & valid_slots(batch, num_slots, mem_lengths, mem_mask, query.device)[:, None, None, :]
    # Kept slots have finite scores, so they sort before every dropped one (-inf); the stable sort
    # keeps the lower index first among equal scores. Then pad (or cut) to exactly k columns.
    ranked = scores.masked_fill(~keep, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :k]
    top_keep = keep.gather(-1, order)
    top_scores = ranked.gather(-1, order)
    top_idx = order.masked_fill(~top_keep, -1)
    if num_slots < k:
        pad = (batch, num_q_heads, len_q, k - num_slots)
        top_scores = torch.cat([top_scores, top_scores.new_full(pad, float("-inf"))], -1)
        top_idx = torch.cat([top_idx, top_idx.new_full(pad, -1)], -1)
    return top_scores, top_idx


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
    neg_inf = float("-inf")

    logits, weighers = [], []  # per part: [B, Hq, Lq, n] logits (dropped: -inf), probs -> output
    if key is not None and key.shape[2] > 0:
        k_loc = repeat_kv(key.to(cd), n_rep)
        s_loc, keep = scores_and_keep(q, k_loc)
        if causal:
            keep = keep & causal_allowed(len_q, key.shape[2], q.device)
        v_loc = repeat_kv(value.to(cd), n_rep).masked_fill(~finite_rows(k_loc)[..., None], 0)
        logits.append((s_loc * scale).masked_fill(~keep, neg_inf))
        weighers.append(lambda p, v=v_loc: p @ v)

    if topk is None:
        k_mem = repeat_kv(mem_keys.to(cd), n_rep)
        s_mem, keep = scores_and_keep(q, k_mem)
        valid = valid_slots(batch, num_slots, mem_lengths, mem_mask, q.device)[:, None, :]  # [B, 1, M]
        keep = keep & valid[..., None, :]
        # weight 0 must not meet a NaN in an unused slot or at a dropped (non-finite) key
        unread = ~valid | ~finite_rows(k_mem)
        v_mem = repeat_kv(mem_values.to(cd), n_rep).masked_fill(unread[..., None], 0)
        logits.append((s_mem * scale).masked_fill(~keep, neg_inf))
        weighers.append(lambda p, v=v_mem: p @ v)
    else:
        sel_scores, sel_idx = knn_topk(q, mem_keys.to(cd), topk, mem_lengths=mem_lengths, mem_mask=mem_mask)
        v_mem = repeat_kv(mem_values.to(cd), n_rep)  # [B, Hq, M, D]

        def weigh_selected(p: Tensor, idx: Tensor = sel_idx, v: Tensor = v_mem) -> Tensor:
            if num_slots == 0:
                return p.new_zeros(batch, num_q_heads, len_q, head_dim)
            flat = idx.clamp_min(0).flatten(2)  # [B, Hq, Lq * k]: padding reads slot 0 with weight 0
            v_sel = v.gather(2, flat[..., None].expand(-1, -1, -1, head_dim)).view(*idx.shape, head_dim)
            v_sel = v_sel.masked_fill(idx[..., None] < 0, 0)
            return (p[..., None] * v_sel).sum(-2)

        logits.append(sel_scores.to(cd) * scale)  # padding is -inf, so it gets weight 0
        weighers.append(weigh_selected)

    if sum(part.shape[-1] for part in logits) == 0:  # no local key and no memory slot at all
        lse = torch.full((batch, num_q_heads, len_q), neg_inf, dtype=cd, device=q.device)
        return torch.zeros_like(query), lse.to(torch.float32 if cd == torch.float32 else cd)

    # One softmax over every part, written so that empty rows (and their gradients) stay finite.
    all_logits = torch.cat(logits, dim=-1)
    row_max = all_logits.amax(-1)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(all_logits - row_max[..., None])  # dropped entries: exp(-inf) = 0
    total = weights.sum(-1)
    empty = total == 0
    probs = weights / torch.where(empty, 1.0, total)[..., None]
    lse = torch.where(empty, neg_inf, row_max + torch.log(torch.where(empty, 1.0, total)))
    out = torch.zeros(batch, num_q_heads, len_q, head_dim, dtype=cd, device=q.device)
    start = 0
    for part_logits, weigh in zip(logits, weighers):
        width = part_logits.shape[-1]
        out = out + weigh(probs[..., start : start + width])
        start += width
    out = torch.where(empty[..., None], 0.0, out)  # a row with no candidate reads no value at all
    return out.to(query.dtype), lse


def crossbatch_pack(batch: int, cross_batch_range: int, dataset_packing: int, cross_batch_stepping: bool) -> Tensor:
    """pack(b) [B] of docs/DESIGN.md 3.5, written out again here (the oracle imports nothing from
    the production path): context c of row b is visible iff c < pack(b)."""
    d, p = cross_batch_range, dataset_packing
    b = torch.arange(batch)
    if p == 1 or not cross_batch_stepping:
        pack = torch.full((batch,), d + 1)
    else:
        step = -(-(d + 1) // max(p - 1, 1))  # ceil((d + 1) / max(P - 1, 1))
        pack = torch.clamp((b % p) * step + 1, max=d + 1)
    return torch.minimum(pack, b + 1)


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
) -> tuple[Tensor, Tensor]:
    """FoT's CrossBatch attention (docs/DESIGN.md 3.5), literally: gather the memory of each row's
    contexts c = 1..d, rows (b - c) mod B, into [B, Hkv, d * L, D] (context c at slots
    (c - 1) * L .. c * L - 1), mask the contexts with c >= pack(b), and take one softmax over
    [local causal (and key-padded) scores | gathered memory scores].

    Returns ``(out [B, Hq, L, D] in query.dtype, lse [B, Hq, L])`` (fp32, fp64 for fp64 inputs).
    Differentiable through plain autograd (the gradient oracle).
    """
    batch, num_q_heads, length, head_dim = query.shape
    num_kv_heads = key.shape[1]
    n_rep = num_q_heads // num_kv_heads
    # contexts c >= B are never visible (pack(b) <= b + 1 <= B): not gathered, whatever d is
    d = min(cross_batch_range, max(batch, 1))
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    cd = compute_dtype(query, key, value, mem_keys)
    q = query.to(cd)
    neg_inf = float("-inf")
    device = query.device

    # local part: causal, key padding
    k_loc = repeat_kv(key.to(cd), n_rep)
    s_loc, keep_loc = scores_and_keep(q, k_loc)
    keep_loc = keep_loc & causal_allowed(length, length, device)
    if key_padding_mask is not None:
        keep_loc = keep_loc & key_padding_mask.to(device)[:, None, None, :]
    v_loc = repeat_kv(value.to(cd), n_rep).masked_fill(~finite_rows(k_loc)[..., None], 0)

    # memory part: the gathered contexts
    rows = torch.arange(batch, device=device)
    ctx = torch.arange(1, d + 1, device=device)
    source = (rows[:, None] - ctx[None, :]) % max(batch, 1)  # [B, d]: row of context c
    pack = crossbatch_pack(batch, cross_batch_range, dataset_packing, cross_batch_stepping).to(device)
    visible = ctx[None, :] < pack[:, None]  # [B, d]

    def gather(x: Tensor) -> Tensor:  # [B, Hkv, L, D] -> [B, Hkv, d * L, D]
        g = x.to(cd)[source]  # [B, d, Hkv, L, D]
        return g.permute(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, d * length, head_dim)

    k_mem = repeat_kv(gather(mem_keys), n_rep)
    slot_visible = visible.repeat_interleave(length, dim=1)  # [B, d * L]
    s_mem, keep_mem = scores_and_keep(q, k_mem)
    keep_mem = keep_mem & slot_visible[:, None, None, :]
    unread = ~slot_visible[:, None, :] | ~finite_rows(k_mem)  # [B, Hq, d * L]
    v_mem = repeat_kv(gather(value), n_rep).masked_fill(unread[..., None], 0)

    logits = torch.cat([(s_loc * scale).masked_fill(~keep_loc, neg_inf),
                        (s_mem * scale).masked_fill(~keep_mem, neg_inf)], dim=-1)  # fmt: skip
    values = torch.cat([v_loc, v_mem], dim=2)  # [B, Hq, (d + 1) * L, D]
    row_max = logits.amax(-1) if logits.shape[-1] else logits.new_full(logits.shape[:-1], neg_inf)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(logits - row_max[..., None])
    total = weights.sum(-1)
    empty = total == 0
    probs = weights / torch.where(empty, 1.0, total)[..., None]
    lse = torch.where(empty, neg_inf, row_max + torch.log(torch.where(empty, 1.0, total)))
    out = torch.where(empty[..., None], 0.0, probs @ values)
    return out.to(query.dtype), lse
