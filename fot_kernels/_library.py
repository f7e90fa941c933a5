"""The package's custom ops: ONE torch.library namespace, ``fot``.

The schemas and the fake (meta) kernels live here and nowhere else; the C++ sources only register
implementations for them (``TORCH_LIBRARY_IMPL(fot, CPU, m)`` in csrc/cpu,
``TORCH_LIBRARY_IMPL(fot, CUDA, m)`` in csrc/cuda), so the CPU and CUDA kernels of an op share one
schema and one fake, and torch's dispatcher picks the implementation by the tensors' device.
The ops themselves have no autograd formula: gradients come from ``fot_kernels.autograd``, one
Function over the composition of these kernels, whose backward runs the ``*_backward`` ops below
(or the PyTorch versions of them in ``backends.streaming``).

The kernels work on stacked query rows: the G = Hq / Hkv query heads that share a kv head are
stacked into ``[B, Hkv, N = G * Lq, D]`` so that every memory tile is read once per kv head.

- ``knn_scan(query, mem_keys, mem_lengths?, mem_mask?, k) -> (scores [B,Hkv,N,k] f32, indices i64)``:
  the exact top-k valid memory slots of each row by inner product, scores descending, ties to the
  lower index, tail padded with (-inf, -1); slots with a non-finite score are never selected.
- ``flash_scan(query, keys, values, mem_lengths?, mem_mask?, scale, causal_lq) -> (out f32, lse f32)``:
  online-softmax attention of each row over the valid keys (``causal_lq > 0``: rows are G blocks of
  ``causal_lq`` queries with the bottom-right causal mask); keys whose score is non-finite are
  dropped; a row with no key left gets (0, -inf).
- ``gather_attention(scores, indices, values, scale) -> (out f32, lse f32)``: softmax over the
  selected slots of a ``knn_scan``.
- ``flash_scan_backward(query, keys, values, d_out, lse, delta, mem_lengths?, mem_mask?, scale,
  causal_lq, need_dkv) -> (dq f32, dk, dv)`` and ``gather_attention_backward(query, indices,
  mem_keys, mem_values, d_out, lse, delta, scale, need_dkv) -> (dq f32, dk, dv)``: FlashAttention-2
  backward of one part. ``query`` are the forward's rows with non-finite rows zeroed; ``d_out``
  [B,Hkv,N,D], ``lse`` (the merged lse of all parts, -inf for a row that dropped everything) and
  ``delta = rowsum(dO * O) - dlse`` [B,Hkv,N] are float32, with dO and delta zeroed on rows whose
  lse is -inf. P is recomputed as exp(scale * q.k - lse) with the forward's drop rules; dq is this
  part's contribution (float32); dk/dv have the keys'/values' dtypes (accumulated in fp32, summed
  over the stacked query heads), or are empty (numel 0) when ``need_dkv`` is false. The kNN
  backward scatter-adds into the selected slots deterministically (the same bits on every run and
  thread count).

Nothing happens at import: :func:`ops` defines the namespace on first use (the C++ libraries may
be loaded before or after; the dispatcher pairs implementations with schemas whenever both exist).
The CUDA emulator of the tests defines the same schemas under its own namespace
(``ops("fot_cuda_emu")``) for its CPU build of csrc/cuda.
"""

from __future__ import annotations

import threading

import torch

NAMESPACE = "fot"

SCHEMAS = {
    "knn_scan": "(Tensor query, Tensor mem_keys, Tensor? mem_lengths, Tensor? mem_mask, int k) -> (Tensor, Tensor)",
    "flash_scan": (
        "(Tensor query, Tensor keys, Tensor values, Tensor? mem_lengths, Tensor? mem_mask, float scale, "
        "int causal_lq) -> (Tensor, Tensor)"
    ),
    "gather_attention": "(Tensor scores, Tensor indices, Tensor values, float scale) -> (Tensor, Tensor)",
    "flash_scan_backward": (
        "(Tensor query, Tensor keys, Tensor values, Tensor d_out, Tensor lse, Tensor delta, Tensor? mem_lengths, "
        "Tensor? mem_mask, float scale, int causal_lq, bool need_dkv) -> (Tensor, Tensor, Tensor)"
    ),
    "gather_attention_backward": (
        "(Tensor query, Tensor indices, Tensor mem_keys, Tensor mem_values, Tensor d_out, Tensor lse, "
        "Tensor delta, float scale, bool need_dkv) -> (Tensor, Tensor, Tensor)"
    ),
}

FORWARD_OPS = ("knn_scan", "flash_scan", "gather_attention")
BACKWARD_OPS = ("flash_scan_backward", "gather_attention_backward")

_lock = threading.Lock()
_libraries: dict[str, torch.library.Library] = {}  # kept alive: dropping one unregisters its ops


def _knn_scan_fake(query, mem_keys, mem_lengths, mem_mask, k):
    shape = (*query.shape[:3], k)
    return query.new_empty(shape, dtype=torch.float32), query.new_empty(shape, dtype=torch.int64)


def _flash_scan_fake(query, keys, values, mem_lengths, mem_mask, scale, causal_lq):
    return query.new_empty(query.shape, dtype=torch.float32), query.new_empty(query.shape[:3], dtype=torch.float32)


def _gather_attention_fake(scores, indices, values, scale):
    out = scores.new_empty((*scores.shape[:3], values.shape[3]), dtype=torch.float32)
    return out, scores.new_empty(scores.shape[:3], dtype=torch.float32)


def _dkv_fakes(keys, values, need_dkv):
    if not need_dkv:
        return keys.new_empty(0), values.new_empty(0)
    return keys.new_empty(keys.shape), values.new_empty(values.shape)


def _flash_scan_backward_fake(query, keys, values, d_out, lse, delta, mem_lengths, mem_mask, scale, causal_lq,
                              need_dkv):  # fmt: skip
    return (d_out.new_empty(d_out.shape), *_dkv_fakes(keys, values, need_dkv))


def _gather_attention_backward_fake(query, indices, mem_keys, mem_values, d_out, lse, delta, scale, need_dkv):
    return (d_out.new_empty(d_out.shape), *_dkv_fakes(mem_keys, mem_values, need_dkv))


_FAKES = {
    "knn_scan": _knn_scan_fake,
    "flash_scan": _flash_scan_fake,
    "gather_attention": _gather_attention_fake,
    "flash_scan_backward": _flash_scan_backward_fake,
    "gather_attention_backward": _gather_attention_backward_fake,
}


def ops(namespace: str = NAMESPACE):
    """``torch.ops.<namespace>``, with the schemas and fake kernels above defined (once)."""
    if namespace not in _libraries:
        with _lock:
            if namespace not in _libraries:
                lib = torch.library.Library(namespace, "FRAGMENT")
                for name, schema in SCHEMAS.items():
                    lib.define(name + schema)
                    torch.library.register_fake(f"{namespace}::{name}", _FAKES[name], lib=lib)
                _libraries[namespace] = lib
    return getattr(torch.ops, namespace)


def has_kernel(name: str, dispatch_key: str, namespace: str = NAMESPACE) -> bool:
    """True when an implementation of ``namespace::name`` is registered for ``dispatch_key``
    ("CPU", "CUDA"), i.e. the C++ library that provides it is loaded."""
    ops(namespace)
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", dispatch_key)
