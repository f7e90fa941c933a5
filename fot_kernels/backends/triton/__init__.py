"""Triton backend: the fused GPU kernels (README.md beside this file has the math and invariants).

Offers the backend interface of ``fot_kernels.backends``: ``unsupported_reasons``, ``knn_topk``
and ``memory_attention``. Serves CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` (the
Triton interpreter, used by the tests without a GPU).

What is served on chip: head dims 1..256 (padded to a power of two inside the kernels with masks,
no padded copy); k in 1..256 for fp16/bf16 with D <= 64, k <= 128 for fp16/bf16 with D <= 256,
k <= 64 for fp32 or mixed dtypes with D <= 128 (the running top-k is a power-of-two list of width
max(16, next_pow2(k)) kept in registers; mixed or fp32 products run as 3xTF32 on tiles converted
in registers, never by upcasting a whole tensor; fp32/mixed attention needs D <= 128); GQA; memory tensors that are
strided views of a larger store (last dim contiguous). Anything else is rejected by
``unsupported_reasons`` with the reason.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from .. import capability_reasons, dtype_reasons, grad_reasons
from . import _configs as C

NAME = "triton"

_LOW = (torch.float16, torch.bfloat16)
_SERVED = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


def _interpret() -> bool:
    """True under the Triton interpreter (CPU tensors); then the interpreter fix-up is applied."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from . import _interpreter_compat

    _interpreter_compat.ensure()
    return True


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _triton_import_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return f"triton is not installed ({exc})"
    return None


def unsupported_reasons(
    op: str,
    query: Tensor,
    mem_keys: Tensor,
    *,
    key: Tensor | None = None,
    value: Tensor | None = None,
    mem_values: Tensor | None = None,
    topk: int | None = None,
    needs_grad: bool = False,
) -> list[str]:
    """Why this backend cannot serve ``op`` for these (validated) inputs; empty if it can."""
    reasons = grad_reasons("triton", needs_grad)
    reason = _triton_import_reason()
    if reason:
        reasons.append(reason)
    device = query.device
    if device.type == "cuda":
        reasons += capability_reasons("triton", device)
    elif not (device.type == "cpu" and _interpret()):
        reasons.append(f"triton backend needs CUDA tensors (got {device.type}) and TRITON_INTERPRET is not set")
    reasons += dtype_reasons(_SERVED, query=query, mem_keys=mem_keys, key=key, value=value, mem_values=mem_values)
    head_dim = query.shape[-1]
    if head_dim > C.MAX_D:
        reasons.append(f"head_dim {head_dim} > {C.MAX_D}")
    if op == "memory_attention":
        dts = {t.dtype for t in (query, mem_keys, key, value, mem_values) if t is not None}
        reason = C.attn_unserved_reason(head_dim, not (len(dts) == 1 and query.dtype in _LOW))
        if reason:
            reasons.append(reason)
    if topk is not None:
        fp32 = not (query.dtype == mem_keys.dtype and query.dtype in _LOW)
        reason = C.knn_unserved_reason(topk, head_dim, fp32)
        if reason:
            reasons.append(reason)
    if mem_keys.shape[2] >= 2**31 - 2**16:
        reasons.append(f"memory of {mem_keys.shape[2]} slots >= 2**31 - 2**16 (slot numbers are 32-bit in the kernels)")
    return reasons


def _dummy(device) -> Tensor:
    return torch.empty(1, dtype=torch.int64, device=device)


def _validity_args(mem_keys: Tensor, mem_lengths: Tensor | None, mem_mask: Tensor | None):
    """Kernel arguments for the memory validity: (lengths, mask as uint8 view, mask strides)."""
    device = mem_keys.device
    lengths = _dummy(device) if mem_lengths is None else mem_lengths.to(torch.int64)
    if mem_mask is None:
        return lengths, _dummy(device), 0, 0
    mask = mem_mask.view(torch.uint8)  # same bytes, no copy
    return lengths, mask, mask.stride(0), mask.stride(1)


def _needs_off64(num_slots: int, *strides: int) -> bool:
    """Whether slot offsets within one (batch, kv head) can overflow int32."""
    return any((num_slots + 1) * abs(s) + 256 >= 2**31 for s in strides)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _check_local_geometry(key: Tensor | None, value: Tensor | None, mem_keys: Tensor) -> None:
    """The attention kernel reads local keys/values with the memory's (batch, kv head) index and
    head dim: anything else would read the wrong heads or out of bounds, so it is refused here even
    though the public ops' validation rejects it first (docs/DESIGN.md 3.2)."""
    if key is None and value is None:
        return
    if key is None or value is None:
        raise ValueError("triton memory_attention: key and value must both be given or both be None")
    b, h, _, d = mem_keys.shape
    if key.shape[:2] != (b, h) or key.shape[3] != d or value.shape != key.shape:
        raise ValueError(
            f"triton memory_attention: local key {tuple(key.shape)} and value {tuple(value.shape)} must be "
            f"[B, Hkv, Lk, D] with the memory's B, Hkv and D: mem_keys {tuple(mem_keys.shape)}"
        )


def _num_splits(n_programs: int, num_slots: int, block_n: int, device, splits: int | None) -> int:
    """Memory splits per (row block, kv head): enough programs for about two waves on the GPU,
    at least 8 tiles per split."""
    max_splits = max(1, math.ceil(num_slots / block_n))
    if splits is not None:
        return max(1, min(splits, max_splits))
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = math.ceil(2 * _sm_count(index) / n_programs)
    return max(1, min(want, math.ceil(num_slots / (8 * block_n))))


def knn_topk(
    query: Tensor,
    mem_keys: Tensor,
    k: int,
    *,
    mem_lengths: Tensor | None,
    mem_mask: Tensor | None,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k by inner product (docs/DESIGN.md 3.1): query [B, Hq, Lq, D], mem_keys [B, Hkv, M, D]
    -> (scores fp32 [B, Hq, Lq, k] descending, indices int64 [B, Hq, Lq, k]; tail (-inf, -1)).
    Slots whose fp32 score is NaN or +-inf are never selected.

    ``splits`` (tests, benchmarks) forces the number of memory splits per row block; by default it
    is chosen to fill the GPU.
    """
    from ._knn import _knn_merge_kernel, _knn_scan_kernel

    batch, num_q_heads, len_q, head_dim = query.shape
    num_kv_heads, num_slots = mem_keys.shape[1], mem_keys.shape[2]
    device = query.device
    scores = torch.empty(batch, num_q_heads, len_q, k, dtype=torch.float32, device=device)
    indices = torch.empty(batch, num_q_heads, len_q, k, dtype=torch.int64, device=device)
    if scores.numel() == 0:
        return scores, indices
    q = _last_dim_contiguous(query)
    mk = _last_dim_contiguous(mem_keys)  # validated: already last-dim contiguous, so never a copy
    group = num_q_heads // num_kv_heads
    n_rows = group * len_q
    bd = C.block_d(head_dim)
    dot_fp32 = not (q.dtype == mk.dtype and q.dtype in _LOW)
    cfg = C.knn_config(k, bd, n_rows, dot_fp32)
    row_blocks = math.ceil(n_rows / cfg.BM)
    n_split = _num_splits(row_blocks * batch * num_kv_heads, num_slots, cfg.BN, device, splits)
    split_len = math.ceil(math.ceil(max(num_slots, 1) / n_split) / cfg.BN) * cfg.BN
    n_split = max(1, math.ceil(num_slots / split_len))
    lengths, mask, smask_b, smask_m = _validity_args(mk, mem_lengths, mem_mask)
    final = n_split == 1
    part = _dummy(device)
    if not final:
        part = torch.empty(batch * num_q_heads * len_q, n_split, cfg.K, dtype=torch.int64, device=device)
    grid = (row_blocks, batch * num_kv_heads, n_split)
    _knn_scan_kernel[grid](
        q, mk, lengths, mask, scores, indices, part,
        q.stride(0), q.stride(1), q.stride(2),
        mk.stride(0), mk.stride(1), mk.stride(2),
        smask_b, smask_m,
        num_kv_heads, len_q, num_slots, head_dim, group, n_rows, split_len, k, n_split,
        BM=cfg.BM, BN=cfg.BN, BD=bd, DC=cfg.DC, K=cfg.K,
        HAS_LEN=mem_lengths is not None, HAS_MASK=mem_mask is not None,
        DOT_FP32=dot_fp32,
        INTERPRET=_interpret(), FINAL=final, OFF64=_needs_off64(num_slots, mk.stride(2), smask_m),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=C.MAXNREG,
    )  # fmt: skip
    if not final:
        total = batch * num_q_heads * len_q
        bm = C.knn_merge_block(cfg.K)
        _knn_merge_kernel[(math.ceil(total / bm),)](
            part, scores, indices, total, n_split, k, BM=bm, K=cfg.K, num_warps=4, maxnreg=C.MAXNREG
        )
    return scores, indices


def memory_attention(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    mem_keys: Tensor,
    mem_values: Tensor,
    *,
    topk: int | None,
    causal: bool,
    softmax_scale: float,
    mem_lengths: Tensor | None,
    mem_mask: Tensor | None,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Joint softmax over [local (causal) keys | memory] (docs/DESIGN.md 3.2): returns
    (out [B, Hq, Lq, D] in query.dtype, lse fp32 [B, Hq, Lq]). key/value None: memory part only.
    topk None: dense memory (every valid slot); else the ``knn_topk`` selection of topk slots.
    Candidates (local or memory) whose unscaled fp32 score is NaN or +-inf are dropped, their values
    unread; a row left with none gets out 0 and lse -inf."""
    from ._attention import _attn_fwd_kernel

    batch, num_q_heads, len_q, head_dim = query.shape
    num_kv_heads, num_slots = mem_keys.shape[1], mem_keys.shape[2]
    _check_local_geometry(key, value, mem_keys)
    device = query.device
    out = torch.empty(batch, num_q_heads, len_q, head_dim, dtype=query.dtype, device=device)
    lse = torch.empty(batch, num_q_heads, len_q, dtype=torch.float32, device=device)
    if lse.numel() == 0:
        return out, lse
    q = _last_dim_contiguous(query)
    mk, mv = _last_dim_contiguous(mem_keys), _last_dim_contiguous(mem_values)
    has_local = key is not None and key.shape[2] > 0
    k_loc = _last_dim_contiguous(key) if has_local else q
    v_loc = _last_dim_contiguous(value) if has_local else q
    len_k = key.shape[2] if has_local else 0

    idx, k_sel, mem_mode = _dummy(device), 0, 0
    if num_slots > 0 and topk is not None:
        _, idx = knn_topk(q, mk, topk, mem_lengths=mem_lengths, mem_mask=mem_mask, splits=splits)
        k_sel, mem_mode = topk, 2
    elif num_slots > 0:
        mem_mode = 1
    lengths, mask, smask_b, smask_m = _validity_args(mk, mem_lengths, mem_mask)

    group = num_q_heads // num_kv_heads
    n_rows = group * len_q
    bd = C.block_d(head_dim)
    low_local = q.dtype == k_loc.dtype == v_loc.dtype and q.dtype in _LOW
    low_mem = q.dtype == mk.dtype == mv.dtype and q.dtype in _LOW
    cfg = C.attn_config(bd, n_rows, mem_mode, not (low_local and low_mem))
    grid = (math.ceil(n_rows / cfg.BM), batch * num_kv_heads)
    _attn_fwd_kernel[grid](
        q, k_loc, v_loc, mk, mv, idx, lengths, mask, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_loc.stride(0), k_loc.stride(1), k_loc.stride(2),
        v_loc.stride(0), v_loc.stride(1), v_loc.stride(2),
        mk.stride(0), mk.stride(1), mk.stride(2),
        mv.stride(0), mv.stride(1), mv.stride(2),
        smask_b, smask_m,
        num_kv_heads, len_q, len_k, num_slots, head_dim, group, n_rows, k_sel, float(softmax_scale) * _LOG2E,
        BM=cfg.BM, BN=cfg.BN, BD=bd,
        HAS_LOCAL=has_local, CAUSAL=bool(causal), MEM_MODE=mem_mode,
        HAS_LEN=mem_lengths is not None, HAS_MASK=mem_mask is not None,
        LOCAL_FP32=not low_local, MEM_FP32=not low_mem, INTERPRET=_interpret(),
        OFF64=_needs_off64(num_slots, mk.stride(2), mv.stride(2), smask_m),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=C.MAXNREG,
    )  # fmt: skip
    return out, lse


__all__ = ["NAME", "knn_topk", "memory_attention", "unsupported_reasons"]
