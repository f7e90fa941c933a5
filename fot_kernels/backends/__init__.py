"""Backends: each module offers the same functions with the same signatures, so that dispatch in
``fot_kernels.ops`` is a table lookup and a new backend is one new module.

Every backend module defines::

    NAME: str
    unsupported_reasons(op, query, mem_keys, *, key=None, value=None, mem_values=None, topk=None,
                        needs_grad=False) -> list[str]
    knn_topk(query, mem_keys, k, *, mem_lengths, mem_mask) -> (scores, indices)
    memory_attention(query, key, value, mem_keys, mem_values, *, topk, causal, softmax_scale,
                     mem_lengths, mem_mask) -> (out, lse)

and every backend but the reference also ``kernels(*tensors) -> backends.streaming.Kernels``: its
op-shaped kernels (stacked query rows, forward and backward) for those tensors, which
compositions such as ``fot_kernels.crossbatch`` run.

``op`` is "knn_topk", "memory_attention" or "crossbatch_attention"; an empty list means the
backend can serve the inputs.
``needs_grad`` is True when grad mode is on and an input requires grad: a backend that cannot
differentiate the op for these inputs must say so (docs/DESIGN.md 3.4), never return an output detached
from the graph.
``key``/``value`` may be None in ``memory_attention``: no local part (``knn_attention``).
Inputs arrive validated and normalised by ``fot_kernels._validate``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: every backend name, in the order ``python -m fot_kernels`` lists them
NAMES = ("reference", "streaming", "cpu", "triton", "cuda")

_MODULES = {
    "reference": "fot_kernels.backends.reference",
    "streaming": "fot_kernels.backends.streaming",
    "cpu": "fot_kernels.backends.cpu",
    "triton": "fot_kernels.backends.triton",
    "cuda": "fot_kernels.backends.cuda",
}


def auto_order(device_type: str) -> tuple[str, ...]:
    """Backends tried by ``backend="auto"``, fastest first. The reference is never picked
    automatically (it materialises Lq x M), nor is the Triton interpreter on the CPU; on GPUs the
    device-agnostic block-streaming PyTorch backend serves what the fused kernels do not. Triton
    comes before the CUDA C++ kernels until those have been run and timed on a GPU (they have only
    been compiled so far); pass ``backend="cuda"`` to use them. On the CPU, the block-streaming
    PyTorch backend follows the C++ one, for whatever the latter refuses."""
    if device_type == "cpu":
        return ("cpu", "streaming")
    return ("triton", "cuda", "streaming")


def dtype_reasons(allowed: tuple, **tensors) -> list[str]:
    """One reason per given tensor whose dtype a backend's kernels do not serve."""
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    return [f"{name} dtype {str(t.dtype).replace('torch.', '')} not served ({names} only)"
            for name, t in tensors.items() if t is not None and t.dtype not in allowed]  # fmt: skip


def capability_reasons(backend: str, device, minimum: tuple[int, int] = (8, 0)) -> list[str]:
    """A reason when ``device`` is a CUDA GPU below the compute capability ``backend``'s kernels
    need (both GPU backends: sm_80 and newer)."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return []
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= minimum:
        return []
    return [f"{backend} backend needs compute capability >= {minimum[0]}.{minimum[1]} (got {major}.{minor})"]


_LOADED: dict[str, tuple[ModuleType | None, str | None]] = {}


def load(name: str) -> tuple[ModuleType | None, str | None]:
    """Import a backend module lazily: (module, None), or (None, why it cannot be imported).
    Cached, so that code traced by torch.compile finds it without calling importlib."""
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(_MODULES[name]), None
        except ImportError as exc:  # e.g. triton not installed
            _LOADED[name] = None, f"cannot import {_MODULES[name]}: {exc}"
    return _LOADED[name]


def load_all() -> None:
    """Import every backend module (``fot_kernels.ops`` does so before its first dispatch, outside
    any traced region)."""
    for name in NAMES:
        load(name)
