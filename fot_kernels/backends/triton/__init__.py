"""Triton backend: the fused GPU kernels (README.md beside this file has the math and invariants).

Offers the backend interface of ``fot_kernels.backends``: ``unsupported_reasons``, ``knn_topk``
and ``memory_attention`` (differentiable: when autograd records the call, the fused forward and the
fused backward kernels of ``_backward.py`` run through ``fot_kernels.autograd``), the op-shaped
forward launcher ``flash_scan`` (on the fused attention kernel), ``selected_attention`` (its kNN
mode over slots chosen elsewhere, for ``fot_kernels.distributed``) and backward launchers
``flash_scan_backward`` / ``gather_attention_backward``, and ``kernels()``: those as a
``streaming.Kernels`` for compositions over stacked rows (``fot_kernels.crossbatch``). Serves CUDA
tensors, and CPU tensors when ``TRITON_INTERPRET=1`` (the Triton interpreter, used by the tests
without a GPU).

What is served on chip: head dims 1..256 (padded to a power of two inside the kernels with masks,
no padded copy); k in 1..256 for fp16/bf16 with D <= 64, k <= 128 for fp16/bf16 with D <= 256,
k <= 64 for fp32 or mixed dtypes with D <= 128 (the running top-k is a power-of-two list of width
max(16, next_pow2(k)) kept in registers; mixed or fp32 products run as 3xTF32 on tiles converted
in registers, never by upcasting a whole tensor; fp32/mixed attention needs D <= 128); GQA; memory tensors that are
strided views of a larger store (last dim contiguous). Anything else is rejected by
``unsupported_reasons`` with the reason. Gradients are served for everything the forward serves.
"""

from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace

import torch
from torch import Tensor

from ... import autograd
from .. import capability_reasons, dtype_reasons, streaming
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
    reasons: list[str] = []
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
    if op in ("memory_attention", "crossbatch_attention"):
        dts = {t.dtype for t in (query, mem_keys, key, value, mem_values) if t is not None}
        reason = C.attn_unserved_reason(head_dim, not (len(dts) == 1 and query.dtype in _LOW))
        if reason:
            reasons.append(reason)
        elif op == "crossbatch_attention" and needs_grad and dts != {torch.float32}:
            # its backward sums several parts' dk / dv and reads fp32 copies of fp16/bf16 operands
            # (fot_kernels.crossbatch): the fp32 product path of the backward kernels
            reason = C.attn_unserved_reason(head_dim, True)
            if reason:
                reasons.append(f"gradients: {reason}")
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
    unread; a row left with none gets out 0 and lse -inf.

    When autograd records the call, it runs through ``fot_kernels.autograd``: this fused forward
    (saving out in fp32, lse and the kNN selection) and ``streaming.memory_attention_backward`` with
    the fused backward kernels of ``_backward.py`` (docs/DESIGN.md 3.4)."""
    _check_local_geometry(key, value, mem_keys)
    forward = functools.partial(_forward, topk=topk, causal=causal, softmax_scale=softmax_scale, splits=splits)
    if autograd.needs_grad(query, key, value, mem_keys, mem_values):
        backward = functools.partial(streaming.memory_attention_backward, topk=topk, causal=causal,
                                     softmax_scale=softmax_scale, kernels=_grad_kernels())  # fmt: skip
        composition = autograd.Composition(forward, backward)
        return autograd.memory_attention(query, key, value, mem_keys, mem_values, mem_lengths, mem_mask, composition)
    out, lse, _ = forward(query, key, value, mem_keys, mem_values, mem_lengths, mem_mask, out_dtype=query.dtype)
    return out, lse


def _forward(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    mem_keys: Tensor,
    mem_values: Tensor,
    mem_lengths: Tensor | None,
    mem_mask: Tensor | None,
    *,
    topk: int | None,
    causal: bool,
    softmax_scale: float,
    splits: int | None = None,
    out_dtype: torch.dtype = torch.float32,
    selection: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The fused forward: (out [B, Hq, Lq, D] in out_dtype, lse fp32 [B, Hq, Lq], the kNN selection
    in the stacked layout [B, Hkv, G * Lq, k] or None). The autograd composition keeps out in fp32
    (default out_dtype) for the backward's delta = rowsum(dO * O). ``selection`` (kNN mode): the
    slots to attend to, given instead of found by ``knn_topk`` (see :func:`selected_attention`)."""
    from ._attention import _attn_fwd_kernel

    batch, num_q_heads, len_q, head_dim = query.shape
    num_kv_heads, num_slots = mem_keys.shape[1], mem_keys.shape[2]
    group = num_q_heads // num_kv_heads
    n_rows = group * len_q
    device = query.device
    out = torch.empty(batch, num_q_heads, len_q, head_dim, dtype=out_dtype, device=device)
    lse = torch.empty(batch, num_q_heads, len_q, dtype=torch.float32, device=device)
    if lse.numel() == 0:
        idx = None if topk is None else torch.empty(batch, num_kv_heads, n_rows, topk, dtype=torch.int64,
                                                    device=device)  # fmt: skip
        return out, lse, idx
    q = _last_dim_contiguous(query)
    mk, mv = _last_dim_contiguous(mem_keys), _last_dim_contiguous(mem_values)
    has_local = key is not None and key.shape[2] > 0
    k_loc = _last_dim_contiguous(key) if has_local else q
    v_loc = _last_dim_contiguous(value) if has_local else q
    len_k = key.shape[2] if has_local else 0

    idx, k_sel, mem_mode = _dummy(device), 0, 0
    if num_slots > 0 and selection is not None:
        idx = selection.contiguous()
        k_sel, mem_mode = idx.shape[-1], 2
    elif num_slots > 0 and topk is not None:
        _, idx = knn_topk(q, mk, topk, mem_lengths=mem_lengths, mem_mask=mem_mask, splits=splits)
        k_sel, mem_mode = topk, 2
        selection = idx.view(batch, num_kv_heads, n_rows, topk)  # [B, Hq, Lq, k] is contiguous: a view
    elif num_slots > 0:
        mem_mode = 1
    lengths, mask, smask_b, smask_m = _validity_args(mk, mem_lengths, mem_mask)

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
    return out, lse, selection


def selected_attention(
    query: Tensor, mem_keys: Tensor, mem_values: Tensor, selection: Tensor, *, softmax_scale: float
) -> tuple[Tensor, Tensor]:
    """Softmax of each query over memory slots chosen elsewhere: ``selection`` int64
    [B, Hkv, G * Lq, k] in the stacked layout of the kNN selection (query head h = kv * G + g:
    rows g * Lq ...; -1 or a slot >= M: no slot) -> (out fp32 [B, Hq, Lq, D], lse fp32
    [B, Hq, Lq]). The kNN mode of the fused attention kernel with the selection given: scores
    recomputed exactly (fp32 products, as the kNN scan makes them), non-finite ones dropped, a row
    left with no slot gets (0, -inf). The selection is taken as given: slot validity (lengths,
    masks) is the selecting side's concern, as for the kNN scan, which selects valid slots only.
    ``fot_kernels.distributed`` runs it over the slots of a rank's shard that made the global top-k."""
    batch, num_q_heads, len_q, _ = query.shape
    want = (batch, mem_keys.shape[1], (num_q_heads // mem_keys.shape[1]) * len_q)
    if selection.dtype != torch.int64 or selection.dim() != 4 or tuple(selection.shape[:3]) != want:
        raise ValueError(f"triton selected_attention: selection must be int64 [B, Hkv, G * Lq, k] = [*{want}, k], "
                         f"got {selection.dtype} {tuple(selection.shape)}")  # fmt: skip
    if mem_keys.shape[2] == 0 or selection.shape[-1] == 0:  # no slot to attend to
        out = query.new_zeros(query.shape, dtype=torch.float32)
        return out, out.new_full(query.shape[:3], float("-inf"))
    out, lse, _ = _forward(query, None, None, mem_keys, mem_values, None, None, topk=selection.shape[-1],
                           causal=False, softmax_scale=softmax_scale, selection=selection)  # fmt: skip
    return out, lse


# --------------------------------------------------------------------------------------------
# Op-shaped forward (the ``flash_scan`` op of ``fot_kernels._library``) on ``_attn_fwd_kernel``
# --------------------------------------------------------------------------------------------


def flash_scan(
    query: Tensor, keys: Tensor, values: Tensor, mem_lengths: Tensor | None, mem_mask: Tensor | None,
    scale: float, causal_lq: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Online-softmax attention of stacked rows over keys/values (the semantics of
    ``streaming.flash_scan_torch``): query [B, Hkv, N, D], keys/values [B, Hkv, M, D], optional
    mem_lengths int [B] and mem_mask bool [B, M] -> (out float32 [B, Hkv, N, D], lse float32
    [B, Hkv, N]). ``causal_lq > 0``: the rows are N / causal_lq blocks of causal_lq queries, row n
    (i = n mod causal_lq) sees key j iff j <= i + M - causal_lq (and the key is valid).

    One launch of ``_attn_fwd_kernel``: causal_lq == 0 is its dense memory mode (MEM_MODE 1) with
    the rows as a [B, Hkv, N, D] query (one query head per kv head); causal_lq > 0 is its local
    mode with the rows viewed as [B, Hkv * G, causal_lq, D] (the kernel's GQA row packing) and
    the validity applied to the local keys (LOCAL_VALID)."""
    from ._attention import _attn_fwd_kernel

    batch, heads, n_rows, head_dim = query.shape
    num_keys = keys.shape[2]
    if causal_lq < 0 or (causal_lq > 0 and n_rows % causal_lq != 0):
        raise ValueError(f"triton flash_scan: causal_lq {causal_lq} must be 0 or divide the {n_rows} rows")
    if keys.shape[:2] != (batch, heads) or keys.shape[3] != head_dim or values.shape != keys.shape:
        raise ValueError(
            f"triton flash_scan: keys {tuple(keys.shape)} and values {tuple(values.shape)} must be "
            f"[B, Hkv, M, D] with the rows' B, Hkv and D: query {tuple(query.shape)}"
        )
    device = query.device
    out = torch.empty(batch, heads, n_rows, head_dim, dtype=torch.float32, device=device)
    lse = torch.empty(batch, heads, n_rows, dtype=torch.float32, device=device)
    if lse.numel() == 0:
        return out, lse
    if num_keys == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    causal = causal_lq > 0
    len_q = causal_lq if causal else n_rows
    group = n_rows // len_q
    # the kernel addresses query head h_kv * G + g, query i: a view when the rows are contiguous
    # in (head, row), else one copy of the rows
    q = _last_dim_contiguous(query.reshape(batch, heads * group, len_q, head_dim))
    k, v = _last_dim_contiguous(keys), _last_dim_contiguous(values)
    lengths, mask, smask_b, smask_m = _validity_args(k, mem_lengths, mem_mask)
    low = q.dtype == k.dtype == v.dtype and q.dtype in _LOW
    bd = C.block_d(head_dim)
    mem_mode = 0 if causal else 1
    cfg = C.attn_config(bd, n_rows, mem_mode, not low)
    # causal: the keys are the kernel's local keys; dense: its memory (the local pointers unused)
    k_loc, v_loc = (k, v) if causal else (q, q)
    grid = (math.ceil(n_rows / cfg.BM), batch * heads)
    _attn_fwd_kernel[grid](
        q, k_loc, v_loc, k, v, _dummy(device), lengths, mask, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_loc.stride(0), k_loc.stride(1), k_loc.stride(2),
        v_loc.stride(0), v_loc.stride(1), v_loc.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        smask_b, smask_m,
        heads, len_q, num_keys if causal else 0, 0 if causal else num_keys, head_dim, group, n_rows, 0,
        float(scale) * _LOG2E,
        BM=cfg.BM, BN=cfg.BN, BD=bd,
        HAS_LOCAL=causal, CAUSAL=causal, MEM_MODE=mem_mode,
        HAS_LEN=mem_lengths is not None, HAS_MASK=mem_mask is not None,
        LOCAL_FP32=not low, MEM_FP32=not low, INTERPRET=_interpret(),
        OFF64=_needs_off64(num_keys, k.stride(2), v.stride(2), smask_m), LOCAL_VALID=causal,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=C.MAXNREG,
    )  # fmt: skip
    return out, lse


# --------------------------------------------------------------------------------------------
# Backward (docs/DESIGN.md 3.4): the op-shaped launchers of ``_backward.py``
# --------------------------------------------------------------------------------------------


def _check_backward_args(name: str, d_out: Tensor, lse: Tensor, delta: Tensor) -> None:
    for arg, t in (("d_out", d_out), ("lse", lse), ("delta", delta)):
        if t.dtype != torch.float32:
            raise TypeError(f"triton {name}: {arg} must be float32 (got {t.dtype})")


def flash_scan_backward(
    query: Tensor, keys: Tensor, values: Tensor, d_out: Tensor, lse: Tensor, delta: Tensor,
    mem_lengths: Tensor | None, mem_mask: Tensor | None, scale: float, causal_lq: int, need_dkv: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Fused backward of one flash part (the semantics of ``streaming.flash_scan_backward_torch``):
    query [B, Hkv, N, D] stacked rows (non-finite rows zeroed), keys/values [B, Hkv, M, D], d_out
    [B, Hkv, N, D], lse (merged, natural log) and delta [B, Hkv, N], all three float32 ->
    (dq float32 [B, Hkv, N, D], dk, dv in the keys'/values' dtypes or empty when not need_dkv).
    Two deterministic kernels (no atomics): dK/dV over key blocks, dQ over row blocks."""
    from ._backward import _dense_bwd_dkdv_kernel, _dense_bwd_dq_kernel

    _check_backward_args("flash_scan_backward", d_out, lse, delta)
    batch, heads, n_rows, head_dim = query.shape
    num_keys = keys.shape[2]
    device = query.device
    dq = torch.empty(d_out.shape, dtype=torch.float32, device=device)
    dk = torch.empty(keys.shape, dtype=keys.dtype, device=device) if need_dkv else keys.new_empty(0)
    dv = torch.empty(values.shape, dtype=values.dtype, device=device) if need_dkv else values.new_empty(0)
    if batch * heads == 0:
        return dq, dk, dv
    q, k, v, g = (_last_dim_contiguous(t) for t in (query, keys, values, d_out))
    lse, delta = lse.contiguous(), delta.contiguous()
    lengths, mask, smask_b, smask_m = _validity_args(k, mem_lengths, mem_mask)
    bd = C.block_d(head_dim)
    fp32 = not (q.dtype == k.dtype == v.dtype and q.dtype in _LOW)
    args = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        smask_b, smask_m,
        heads, num_keys, head_dim, n_rows, int(causal_lq), float(scale) * _LOG2E, _LOG2E, float(scale),
    )  # fmt: skip
    flags = dict(CAUSAL=causal_lq > 0, HAS_LEN=mem_lengths is not None, HAS_MASK=mem_mask is not None,
                 DOT_FP32=fp32, INTERPRET=_interpret(),
                 OFF64=_needs_off64(num_keys, k.stride(2), v.stride(2), smask_m))  # fmt: skip
    if n_rows > 0:
        cfg = C.bwd_dq_config(bd, fp32)
        _dense_bwd_dq_kernel[(math.ceil(n_rows / cfg.BM), batch * heads)](
            q, k, v, g, lse, delta, lengths, mask, dq, *args, BM=cfg.BM, BN=cfg.BN, BD=bd, DC=cfg.DC, **flags,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=C.MAXNREG,
        )  # fmt: skip
    if need_dkv and num_keys > 0:
        cfg = C.bwd_dkdv_config(bd, fp32)
        _dense_bwd_dkdv_kernel[(math.ceil(num_keys / cfg.BN), batch * heads)](
            q, k, v, g, lse, delta, lengths, mask, dk, dv, *args, BM=cfg.BM, BN=cfg.BN, BD=bd, DC=cfg.DC, **flags,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=C.MAXNREG,
        )  # fmt: skip
    return dq, dk, dv


def gather_attention_backward(
    query: Tensor, indices: Tensor, mem_keys: Tensor, mem_values: Tensor, d_out: Tensor, lse: Tensor,
    delta: Tensor, scale: float, need_dkv: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Fused backward of the kNN part (the semantics of ``streaming.gather_attention_backward_torch``)
    over the forward's selection indices [B, Hkv, N, k] (-1 padding): dQ per row block with the
    exact fp32 re-score; dK/dV by a deterministic scatter (a stable sort of the selected slot ids,
    then one lane per selected slot sums its contributions in row order): no atomics, the same bits
    on every run, O(N k) work and memory besides the zero-initialised gradients."""
    from ._backward import _knn_bwd_dq_kernel, _knn_bwd_scatter_kernel

    _check_backward_args("gather_attention_backward", d_out, lse, delta)
    batch, heads, n_rows, k_sel = indices.shape
    num_slots, head_dim = mem_keys.shape[2], mem_keys.shape[3]
    device = query.device
    dq = torch.empty(d_out.shape, dtype=torch.float32, device=device)
    if need_dkv:
        dk = torch.zeros(mem_keys.shape, dtype=mem_keys.dtype, device=device)
        dv = torch.zeros(mem_values.shape, dtype=mem_values.dtype, device=device)
    else:
        dk, dv = mem_keys.new_empty(0), mem_values.new_empty(0)
    if batch * heads * n_rows == 0:
        return dq, dk, dv
    q, g = _last_dim_contiguous(query), _last_dim_contiguous(d_out)
    mk, mv = _last_dim_contiguous(mem_keys), _last_dim_contiguous(mem_values)
    idx = indices.contiguous()
    lse, delta = lse.contiguous(), delta.contiguous()
    bd = C.block_d(head_dim)
    scatter = need_dkv and num_slots > 0 and k_sel > 0
    pbuf = torch.empty(idx.shape, dtype=torch.float32, device=device) if scatter else _dummy(device)
    dsbuf = torch.empty(idx.shape, dtype=torch.float32, device=device) if scatter else _dummy(device)
    cfg = C.knn_bwd_dq_config(bd)
    _knn_bwd_dq_kernel[(math.ceil(n_rows / cfg.BM), batch * heads)](
        q, idx, mk, mv, g, lse, delta, dq, pbuf, dsbuf,
        q.stride(0), q.stride(1), q.stride(2),
        mk.stride(0), mk.stride(1), mk.stride(2),
        mv.stride(0), mv.stride(1), mv.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        heads, num_slots, head_dim, n_rows, k_sel, float(scale) * _LOG2E, _LOG2E, float(scale),
        BM=cfg.BM, BD=bd, NEED_DKV=scatter, OFF64=_needs_off64(num_slots, mk.stride(2), mv.stride(2)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=C.MAXNREG,
    )  # fmt: skip
    if not scatter:
        return dq, dk, dv
    # deterministic scatter: stable sort of the (b, h)-flattened slot ids; padding (and any index
    # outside [0, M)) sorts last under the sentinel B * Hkv * M and starts no run
    sentinel = batch * heads * num_slots
    base = torch.arange(batch * heads, device=device).view(batch, heads, 1, 1) * num_slots
    ids = torch.where((idx >= 0) & (idx < num_slots), idx + base, sentinel).flatten()
    sorted_ids, order = torch.sort(ids, stable=True)
    n_entries = ids.numel()
    pos = torch.arange(n_entries, device=device)
    start = torch.ones(n_entries, dtype=torch.bool, device=device)
    start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    start_pos = torch.where(start, pos, n_entries)
    # next run start after each position: a suffix minimum (no host synchronisation)
    following = torch.cat([start_pos[1:], start_pos.new_full((1,), n_entries)])
    next_start = following.flip(0).cummin(0).values.flip(0)
    run = torch.where(start & (sorted_ids < sentinel), next_start - pos, 0).to(torch.int32)
    scfg = C.knn_bwd_scatter_config(bd)
    _knn_bwd_scatter_kernel[(math.ceil(n_entries / scfg.BM),)](
        q, g, pbuf, dsbuf, order, sorted_ids, run, dk, dv,
        n_entries, k_sel, n_rows, head_dim, float(scale),
        q.stride(0), q.stride(1), q.stride(2), g.stride(0), g.stride(1), g.stride(2), heads,
        BS=scfg.BM, BD=bd, num_warps=scfg.num_warps, num_stages=scfg.num_stages, maxnreg=C.MAXNREG,
    )  # fmt: skip
    return dq, dk, dv


def _row_dtype(query: Tensor, *operands: Tensor) -> torch.dtype:
    """The backward kernels take the stacked query rows in the query's own dtype (converted per tile)."""
    return query.dtype


@functools.cache
def _grad_kernels() -> streaming.Kernels:
    grad_ops = SimpleNamespace(flash_scan_backward=flash_scan_backward,
                               gather_attention_backward=gather_attention_backward)  # fmt: skip
    return streaming.Kernels(None, _row_dtype, grad_ops)


def kernels(*_tensors: Tensor | None) -> streaming.Kernels:
    """The op-shaped kernels for compositions over stacked rows (``fot_kernels.crossbatch``):
    ``ops.flash_scan`` above (forward), rows in the query's dtype, and the backward launchers.
    Serves what ``unsupported_reasons`` accepts."""
    return _op_kernels()


@functools.cache
def _op_kernels() -> streaming.Kernels:
    return streaming.Kernels(SimpleNamespace(flash_scan=flash_scan), _row_dtype, _grad_kernels().grad_ops)


__all__ = [
    "NAME", "flash_scan", "flash_scan_backward", "gather_attention_backward", "kernels", "knn_topk",
    "memory_attention", "selected_attention", "unsupported_reasons",
]
