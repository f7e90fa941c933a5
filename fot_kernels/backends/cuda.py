"""CUDA C++ backend (csrc/): the compiled extension registers torch custom ops.

The kernels are the subject of a later issue; until the extension is built, this backend reports
why it cannot serve, and ``backend="auto"`` moves on to the next backend.
"""

from __future__ import annotations

import importlib

from torch import Tensor

NAME = "cuda"


def _extension_reason() -> str | None:
    try:
        importlib.import_module("fot_kernels._C")
    except ImportError:
        return "the CUDA extension fot_kernels._C is not built (install with CUDA present, or FOT_KERNELS_BUILD_CUDA=1)"
    return None


def unsupported_reasons(op: str, query: Tensor, mem_keys: Tensor, **_: object) -> list[str]:
    reasons = []
    if query.device.type != "cuda":
        reasons.append(f"cuda backend needs CUDA tensors, got {query.device.type}")
    reason = _extension_reason()
    if reason:
        reasons.append(reason)
    elif op:
        reasons.append(f"the CUDA extension has no {op} kernel yet")
    return reasons


def knn_topk(query, mem_keys, k, *, mem_lengths, mem_mask):  # pragma: no cover - slot
    raise NotImplementedError(unsupported_reasons("knn_topk", query, mem_keys))


def memory_attention(query, key, value, mem_keys, mem_values, **_):  # pragma: no cover - slot
    raise NotImplementedError(unsupported_reasons("memory_attention", query, mem_keys))
