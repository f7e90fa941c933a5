"""CUDA C++ backend: the kernels in csrc/cuda, compiled by setup.py into ``fot_kernels._C``.

Importing ``fot_kernels._C`` registers the CUDA implementations of the package's custom ops
``torch.ops.fot.{knn_scan, flash_scan, gather_attention}`` and of their backward ops
``flash_scan_backward`` / ``gather_attention_backward`` (schemas and fake kernels in
``fot_kernels._library``, shared with the C++ CPU kernels). Their query is a block of rows
``[B, Hkv, G * Lq, D]``: the G query heads that share a kv head are stacked so that every memory
tile is read once per kv head (grouped-query attention without repeating keys). This module maps
the backend interface onto them:

- ``knn_topk``: ``knn_scan`` (fused score tile + exact on-chip top-k, memory split across blocks,
  split lists merged on the GPU);
- ``memory_attention``, kNN mode: ``knn_scan`` then ``gather_attention`` (softmax over the k
  selected slots, using the scan's fp32 scores); dense mode: ``flash_scan`` over the memory with
  its validity mask; the local part: ``flash_scan`` with the bottom-right causal mask. The parts
  are combined by an exact log-sum-exp merge. The composition is ``backends.streaming``'s, run
  with these kernels.

Precision: fp16/bf16 query with memory (and local keys/values) of the same dtype runs on the
tensor cores (exact products, fp32 accumulation; attention probabilities are rounded to that dtype
for P @ V, as in FlashAttention). Any other combination (fp32 query, mixed dtypes) upcasts the
query rows to fp32 and computes exact fp32 products of the upcast values on the CUDA cores; the
memory is converted tile by tile on chip, never copied.

Gradients: when autograd records the call, the composition runs through ``fot_kernels.autograd``
with the backward kernels ``torch.ops.fot.{flash_scan_backward, gather_attention_backward}``
(``Kernels.grad_ops``): FlashAttention-2 recomputation of the probabilities from the saved lse, a
dq kernel per row tile and a dk/dv kernel per key tile for the dense and local parts, and for the
kNN part dq per row and d mem_keys / d mem_values per memory slot over the selected entries sorted
by slot. No atomics: the gradients are the same bits on every run. They serve every input the
forward serves; an extension built before them (no backward kernels registered) refuses inputs
that require grad.

Not served (``unsupported_reasons`` says so and ``backend="auto"`` moves on): CPU tensors,
float64, k > 256, mem_values / value with a dtype other than mem_keys' / key's, more than
2^31 - 1 memory slots, B * Hkv > 65535, and inputs that require grad when the loaded extension has
no backward kernels.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from .. import _library
from . import capability_reasons, dtype_reasons, streaming

NAME = "cuda"
MAX_K = 256  # csrc/cuda/fot_cuda.h kMaxK
MAX_SLOTS = 2**31 - 1
_TC_DTYPES = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _load_extension() -> str | None:
    """Import fot_kernels._C (which registers the CUDA kernels of torch.ops.fot); None, or why not."""
    try:
        importlib.import_module("fot_kernels._C")
    except (ImportError, OSError) as exc:
        return (f"the CUDA extension fot_kernels._C is not built or does not load ({exc}); "
                "install with CUDA present, or FOT_KERNELS_BUILD_CUDA=1")
    return None


_EXTENSION_REASON = _load_extension()

# Where the kernels' tensors live and which op namespace runs them; tests/cuda_emu swaps in "cpu"
# and torch.ops.fot_cuda_emu (the same sources built for the CPU) to run the backend without a GPU.
_DEVICE_TYPE = "cuda"


def _ops():
    return _library.ops()


_BACKWARD_REGISTERED: dict[tuple[str, str], bool] = {}  # the libraries load at import and never unload


def _has_backward() -> bool:
    """Whether the loaded kernels include the backward ops (an extension built before them has
    only the forward ones)."""
    return _registered(_ops().name, "CUDA" if _DEVICE_TYPE == "cuda" else "CPU")


def _registered(namespace: str, dispatch_key: str) -> bool:
    key = (namespace, dispatch_key)
    if key not in _BACKWARD_REGISTERED:  # a plain dict: torch.compile traces the cached lookup
        _BACKWARD_REGISTERED[key] = all(_library.has_kernel(n, dispatch_key, namespace) for n in _library.BACKWARD_OPS)
    return _BACKWARD_REGISTERED[key]


def extension_status() -> str | None:
    """None when the CUDA kernels are importable, else why not."""
    return _EXTENSION_REASON


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
    reasons = []
    if query.device.type != _DEVICE_TYPE:
        reasons.append(f"cuda backend needs {_DEVICE_TYPE.upper()} tensors, got {query.device.type}")
    if _EXTENSION_REASON is not None:
        reasons.append(_EXTENSION_REASON)
    else:  # the extension holds sm_80 / sm_90 code (+ PTX for newer GPUs) only
        reasons += capability_reasons("cuda", query.device)
        if needs_grad and not _has_backward():
            reasons.append("inputs require grad and the loaded CUDA extension has no backward kernels (built before "
                           "them: rebuild it); backend 'streaming' computes gradients")  # fmt: skip
    tensors = {"query": query, "mem_keys": mem_keys, "mem_values": mem_values, "key": key, "value": value}
    reasons += dtype_reasons(_DTYPES, **tensors)
    if mem_values is not None and mem_values.dtype != mem_keys.dtype:
        reasons.append(f"mem_values dtype {mem_values.dtype} differs from mem_keys dtype {mem_keys.dtype}")
    if key is not None and value is not None and key.dtype != value.dtype:
        reasons.append(f"value dtype {value.dtype} differs from key dtype {key.dtype}")
    if topk is not None and topk > MAX_K:
        reasons.append(f"k={topk} > {MAX_K} is not served on chip")
    if mem_keys.shape[2] > MAX_SLOTS:
        reasons.append(f"more than {MAX_SLOTS} memory slots ({mem_keys.shape[2]})")
    for name, t in (("mem_keys", mem_keys), ("key", key)):
        if t is not None and t.shape[0] * t.shape[1] > 65535:
            reasons.append(f"B * Hkv of {name} must be <= 65535, got shape {tuple(t.shape)}")
    return reasons


def _row_dtype(query: Tensor, *others: Tensor) -> torch.dtype:
    """The dtype the kernels take the query rows in: the shared fp16/bf16 dtype (tensor cores),
    else float32 (exact fp32 products of upcast values)."""
    if query.dtype in _TC_DTYPES and all(t.dtype == query.dtype for t in others):
        return query.dtype
    return torch.float32


def kernels(*_tensors: Tensor | None) -> streaming.Kernels:
    """The op-shaped kernels: the forward ops, the row dtype, and the backward ops when they are registered (else the
    PyTorch backward, which unsupported_reasons keeps from running on inputs that need grad)."""
    ops = _ops()
    return streaming.Kernels(ops, _row_dtype, ops if _has_backward() else None)


def knn_topk(query: Tensor, mem_keys: Tensor, k: int, *, mem_lengths: Tensor | None, mem_mask: Tensor | None):
    return streaming.knn_topk(query, mem_keys, k, mem_lengths=mem_lengths, mem_mask=mem_mask, kernels=kernels())


def memory_attention(
    query, key, value, mem_keys, mem_values, *, topk, causal, softmax_scale, mem_lengths, mem_mask
) -> tuple[Tensor, Tensor]:
    return streaming.memory_attention(
        query, key, value, mem_keys, mem_values, topk=topk, causal=causal, softmax_scale=softmax_scale,
        mem_lengths=mem_lengths, mem_mask=mem_mask, kernels=kernels(),
    )  # fmt: skip
