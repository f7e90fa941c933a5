"""CPU production backend: the block-streaming composition of ``backends.streaming`` run with the
C++ kernels of csrc/cpu (the CPU implementations of the ``torch.ops.fot.*`` ops of
``fot_kernels._library``, JIT-compiled with ninja on first use).

The C++ kNN scan fuses the score product with the selection: each score tile is checked against
every row's current k-th best while it is still in registers, and only the rare winners are
inserted (about k ln(M / k) per row). The flash scan runs QK^T and PV with the same AVX-512
micro-kernel around a vectorised online softmax. Where the extension cannot be built (no
compiler), and for float64 inputs, the PyTorch kernels of ``backends.streaming`` serve instead,
with the same semantics, slower. Gradients: when autograd records the call, the composition runs
through ``fot_kernels.autograd`` (``streaming.memory_attention`` does so): the C++ forward kernels
give out, lse and the kNN selection, and the C++ backward kernels (``fot::flash_scan_backward``,
``fot::gather_attention_backward``: FlashAttention-2 recomputation of P block by block, dk / dv
summed in a fixed order, deterministic) give the gradients within the forward's memory bound
(docs/DESIGN.md 3.4); the PyTorch fallback uses the PyTorch backward of ``backends.streaming``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _library
from . import _cpu_ext, streaming

NAME = "cpu"
_EXT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reasons(op: str, query: Tensor, mem_keys: Tensor, *, needs_grad: bool = False, **_: object):
    """Serves every validated CPU input, with or without gradients (``needs_grad``)."""
    if query.device.type != "cpu":
        return [f"cpu backend needs CPU tensors, got {query.device.type}"]
    return []


def extension_status() -> str | None:
    """None when the C++ kernels are in use, else why the PyTorch fallback serves instead."""
    return None if _cpu_ext.load() else _cpu_ext.unavailable_reason()


def kernels(*tensors: Tensor | None) -> streaming.Kernels:
    """The op-shaped kernels for these tensors: the C++ kernels when they are built and serve
    these dtypes, else the PyTorch ones."""
    if all(t is None or t.dtype in _EXT_DTYPES for t in tensors) and _cpu_ext.load():
        ops = _library.ops()  # load() is True only with the backward ops registered too
        return streaming.Kernels(ops, _float32_rows, grad_ops=ops)
    return streaming.TORCH_KERNELS


def _float32_rows(*_: Tensor | None) -> torch.dtype:
    return torch.float32  # the C++ kernels take fp32 query rows (memory in fp32/bf16/fp16)


def knn_topk(query: Tensor, mem_keys: Tensor, k: int, *, mem_lengths: Tensor | None, mem_mask: Tensor | None):
    return streaming.knn_topk(query, mem_keys, k, mem_lengths=mem_lengths, mem_mask=mem_mask,
                              kernels=kernels(query, mem_keys))  # fmt: skip


def memory_attention(
    query, key, value, mem_keys, mem_values, *, topk, causal, softmax_scale, mem_lengths, mem_mask
) -> tuple[Tensor, Tensor]:
    return streaming.memory_attention(
        query, key, value, mem_keys, mem_values, topk=topk, causal=causal, softmax_scale=softmax_scale,
        mem_lengths=mem_lengths, mem_mask=mem_mask, kernels=kernels(query, key, value, mem_keys, mem_values),
    )  # fmt: skip
