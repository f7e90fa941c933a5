"""Argument checks for the public ops (docs/DESIGN.md section 6).

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
device, value) whose message names the argument, what was expected and what was given. They run
before any kernel, in the public op, so that every backend sees normalised inputs:
``mem_lengths`` int64 on the query's device, ``mem_mask`` bool, ``softmax_scale`` a float.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
MAX_K = 2**31 - 1  # k beyond this cannot even index a tensor dimension


def _tensor(name: str, x: object, ndim: int, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(x.shape)}")
    return x


def _same_device(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def _is_bool(x: object) -> bool:
    return isinstance(x, (bool, np.bool_))


def check_k(name: str, k: object) -> int:
    """An int (Python or numpy, not bool) in [1, 2**31 - 1]."""
    if _is_bool(k) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= MAX_K:
        raise ValueError(f"{name} must be in [1, {MAX_K}], got {k}")
    return k


def check_query_and_memory(query: object, mem_keys: object, mem_values: object | None = None) -> tuple[Tensor, Tensor]:
    """query [B, Hq, Lq, D], mem_keys (and mem_values) [B, Hkv, M, D]."""
    q = _tensor("query", query, 4)
    mk = _tensor("mem_keys", mem_keys, 4)
    batch, num_q_heads, _, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"query head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if mk.shape[0] != batch:
        raise ValueError(f"mem_keys batch size must equal query's ({batch}), got shape {tuple(mk.shape)}")
    if mk.shape[3] != head_dim:
        raise ValueError(f"mem_keys head dim must equal query's ({head_dim}), got shape {tuple(mk.shape)}")
    if mk.shape[1] < 1 or num_q_heads % mk.shape[1] != 0:
        raise ValueError(
            f"query heads ({num_q_heads}) must be a multiple of mem_keys heads (grouped-query attention), "
            f"got mem_keys shape {tuple(mk.shape)}"
        )
    if mk.numel() > 0 and mk.stride(-1) != 1:
        raise ValueError(f"mem_keys must be contiguous in its last dim (stride(-1) == 1), got strides {mk.stride()}")
    _same_device("query", q, mem_keys=mk)
    if mem_values is not None:
        mv = _tensor("mem_values", mem_values, 4)
        if mv.shape != mk.shape:
            raise ValueError(f"mem_values must have the shape of mem_keys {tuple(mk.shape)}, got {tuple(mv.shape)}")
        if mv.numel() > 0 and mv.stride(-1) != 1:
            raise ValueError(
                f"mem_values must be contiguous in its last dim (stride(-1) == 1), got strides {mv.stride()}"
            )
        _same_device("query", q, mem_values=mv)
    return q, mk


def check_local(query: Tensor, key: object, value: object, mem_keys: Tensor | None = None) -> None:
    """key/value [B, Hkv, Lk, D], both given or both None, with mem_keys' Hkv (docs/DESIGN.md 3.2).
    Any strides (the local context is small; a backend copies it where its kernels need to)."""
    if (key is None) != (value is None):
        raise ValueError("key and value must both be given or both be None")
    if key is None:
        return
    k = _tensor("key", key, 4)
    v = _tensor("value", value, 4)
    batch, num_q_heads, _, head_dim = query.shape
    if k.shape != v.shape:
        raise ValueError(f"value must have the shape of key {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"key must be [B={batch}, Hkv, Lk, D={head_dim}], got shape {tuple(k.shape)}")
    if k.shape[1] < 1 or num_q_heads % k.shape[1] != 0:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key heads, got key shape {tuple(k.shape)}")
    if mem_keys is not None and k.shape[1] != mem_keys.shape[1]:
        raise ValueError(
            f"key and mem_keys must have the same number of kv heads, got key shape {tuple(k.shape)} and "
            f"mem_keys shape {tuple(mem_keys.shape)}"
        )
    _same_device("query", query, key=k, value=v)


def check_memory_validity(
    query: Tensor, mem_keys: Tensor, mem_lengths: object, mem_mask: object
) -> tuple[Tensor | None, Tensor | None]:
    """mem_lengths: integer tensor [B] with values in [0, M]; mem_mask: bool [B, M]."""
    batch, num_slots = mem_keys.shape[0], mem_keys.shape[2]
    lengths = mask = None
    if mem_lengths is not None:
        if not isinstance(mem_lengths, Tensor):
            raise TypeError(f"mem_lengths must be a torch.Tensor or None, got {type(mem_lengths).__name__}")
        if mem_lengths.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            got = str(mem_lengths.dtype).replace("torch.", "")
            raise TypeError(f"mem_lengths must have an integer dtype, got {got}")
        if mem_lengths.shape != (batch,):
            raise ValueError(f"mem_lengths must have shape [B] = ({batch},), got {tuple(mem_lengths.shape)}")
        _same_device("query", query, mem_lengths=mem_lengths)
        lengths = mem_lengths.to(torch.int64)
        if batch > 0 and lengths.device.type != "meta":  # meta tensors have no values to check
            if torch.compiler.is_compiling():  # no data-dependent branch in a graph: checked when it runs
                in_range = ((lengths >= 0) & (lengths <= num_slots)).all()
                torch._assert_async(in_range, f"mem_lengths values must be in [0, M={num_slots}]")
            else:
                lo, hi = int(lengths.min()), int(lengths.max())
                if lo < 0 or hi > num_slots:
                    raise ValueError(f"mem_lengths values must be in [0, M={num_slots}], got min {lo}, max {hi}")
    if mem_mask is not None:
        if not isinstance(mem_mask, Tensor):
            raise TypeError(f"mem_mask must be a torch.Tensor or None, got {type(mem_mask).__name__}")
        if mem_mask.dtype != torch.bool:
            raise TypeError(f"mem_mask must have dtype bool, got {str(mem_mask.dtype).replace('torch.', '')}")
        if mem_mask.shape != (batch, num_slots):
            raise ValueError(f"mem_mask must have shape [B, M] = ({batch}, {num_slots}), got {tuple(mem_mask.shape)}")
        _same_device("query", query, mem_mask=mem_mask)
        mask = mem_mask.contiguous()
    return lengths, mask


def check_scale(softmax_scale: object, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if _is_bool(softmax_scale) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    try:
        scale = float(softmax_scale)
    except OverflowError:  # e.g. 10**400
        scale = math.inf
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r:.60}")
    return scale


def check_topk(topk: object) -> int | None:
    return None if topk is None else check_k("topk", topk)


def check_flag(name: str, value: object) -> bool:
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_backend(backend: object, known: Sequence[str]) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in known:
        raise ValueError(f"backend must be 'auto' or one of {list(known)}, got {backend!r}")
    return backend


def check_merge_inputs(outs: object, lses: object) -> tuple[list[Tensor], list[Tensor]]:
    if not isinstance(outs, Sequence) or not isinstance(lses, Sequence) or isinstance(outs, Tensor):
        raise TypeError("outs and lses must be sequences (list/tuple) of tensors")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty and of equal length, got {len(outs)} and {len(lses)}")
    outs_t = [_tensor(f"outs[{i}]", o, o.dim() if isinstance(o, Tensor) else 1) for i, o in enumerate(outs)]
    lses_t = [_tensor(f"lses[{i}]", x, x.dim() if isinstance(x, Tensor) else 1) for i, x in enumerate(lses)]
    for i, (o, x) in enumerate(zip(outs_t, lses_t)):
        if o.dim() < 1 or o.shape[:-1] != x.shape:
            want = tuple(o.shape[:-1])
            raise ValueError(f"lses[{i}] must have shape outs[{i}].shape[:-1] = {want}, got {tuple(x.shape)}")
        if o.shape != outs_t[0].shape:
            raise ValueError(f"outs[{i}] must have the shape of outs[0] {tuple(outs_t[0].shape)}, got {tuple(o.shape)}")
        _same_device("outs[0]", outs_t[0], **{f"outs[{i}]": o, f"lses[{i}]": x})
    return outs_t, lses_t


def check_crossbatch(
    query: object,
    key: object,
    value: object,
    mem_keys: object,
    cross_batch_range: object,
    dataset_packing: object,
    cross_batch_stepping: object,
    key_padding_mask: object,
    softmax_scale: object,
) -> tuple[int, int, bool, Tensor | None, float]:
    """The arguments of ``crossbatch_attention`` (docs/DESIGN.md 3.5): query [B, Hq, L, D]; key,
    value, mem_keys [B, Hkv, L, D] (one shape); Hq % Hkv == 0; d >= 1; P >= 1 dividing B; a bool
    stepping flag; key_padding_mask bool [B, L]; softmax_scale finite and > 0. Returns
    (d, P, stepping, key_padding_mask contiguous or None, scale)."""
    q = _tensor("query", query, 4)
    k = _tensor("key", key, 4)
    v = _tensor("value", value, 4)
    mk = _tensor("mem_keys", mem_keys, 4)
    batch, num_q_heads, length, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"query head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    for name, t in (("key", k), ("value", v), ("mem_keys", mk)):
        if t.shape[0] != batch or t.shape[2] != length or t.shape[3] != head_dim:
            raise ValueError(f"{name} must be [B={batch}, Hkv, L={length}, D={head_dim}] like query, "
                             f"got shape {tuple(t.shape)}")  # fmt: skip
    if k.shape[1] < 1 or num_q_heads % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({num_q_heads}) must be a multiple of key heads (grouped-query attention), "
            f"got key shape {tuple(k.shape)}"
        )
    for name, t in (("value", v), ("mem_keys", mk)):
        if t.shape != k.shape:
            raise ValueError(f"{name} must have the shape of key {tuple(k.shape)}, got {tuple(t.shape)}")
    _same_device("query", q, key=k, value=v, mem_keys=mk)
    d = check_k("cross_batch_range", cross_batch_range)
    packing = check_k("dataset_packing", dataset_packing)
    if batch % packing != 0:
        raise ValueError(f"dataset_packing must divide the batch size ({batch}), got {packing}")
    stepping = check_flag("cross_batch_stepping", cross_batch_stepping)
    mask = None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            got = str(key_padding_mask.dtype).replace("torch.", "")
            raise TypeError(f"key_padding_mask must have dtype bool, got {got}")
        if key_padding_mask.shape != (batch, length):
            raise ValueError(
                f"key_padding_mask must have shape [B, L] = ({batch}, {length}), got {tuple(key_padding_mask.shape)}"
            )
        _same_device("query", q, key_padding_mask=key_padding_mask)
        mask = key_padding_mask.contiguous()
    scale = check_scale(softmax_scale, head_dim)
    if not scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale!r:.60}")
    return d, packing, stepping, mask, scale
