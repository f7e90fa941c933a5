"""CPU production backend: the block-streaming composition of ``backends.streaming`` run with the
C++ kernels of csrc/cpu (``torch.ops.fot_cpu.*``, JIT-compiled with ninja on first use).

The C++ kNN scan fuses the score product with the selection: each score tile is checked against
every row's current k-th best while it is still in registers, and only the rare winners are
inserted (about k ln(M / k) per row). The flash scan runs QK^T and PV with the same AVX-512
micro-kernel around a vectorised online softmax. Where the extension cannot be built (no
compiler), and for float64 inputs, the PyTorch kernels of ``backends.streaming`` serve instead,
with the same semantics, slower.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from . import _cpu_ext, streaming

NAME = "cpu"
_EXT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reasons(op: str, query: Tensor, mem_keys: Tensor, **_: object) -> list[str]:
    if query.device.type != "cpu":
        return [f"cpu backend needs CPU tensors, got {query.device.type}"]
    return []


def extension_status() -> str | None:
    """None when the C++ kernels are in use, else why the PyTorch fallback serves instead."""
    return None if _cpu_ext.load() else _cpu_ext.unavailable_reason()


def _kernels(*tensors: Tensor | None) -> SimpleNamespace:
    """The C++ kernels when they are built and serve these dtypes, else the PyTorch ones."""
    if all(t is None or t.dtype in _EXT_DTYPES for t in tensors) and _cpu_ext.load():
        return streaming.kernel_set(torch.ops.fot_cpu, _float32_rows)
    return streaming.TORCH_KERNELS


def _float32_rows(*_: Tensor | None) -> torch.dtype:
    return torch.float32  # the C++ kernels take fp32 query rows (memory in fp32/bf16/fp16)


def knn_topk(query: Tensor, mem_keys: Tensor, k: int, *, mem_lengths: Tensor | None, mem_mask: Tensor | None):
    return streaming.knn_topk(query, mem_keys, k, mem_lengths=mem_lengths, mem_mask=mem_mask,
                              kernels=_kernels(query, mem_keys))  # fmt: skip


def memory_attention(
    query, key, value, mem_keys, mem_values, *, topk, causal, softmax_scale, mem_lengths, mem_mask
) -> tuple[Tensor, Tensor]:
    return streaming.memory_attention(
        query, key, value, mem_keys, mem_values, topk=topk, causal=causal, softmax_scale=softmax_scale,
        mem_lengths=mem_lengths, mem_mask=mem_mask, kernels=_kernels(query, key, value, mem_keys, mem_values),
    )  # fmt: skip
