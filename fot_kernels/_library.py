"""The package's custom ops: ONE torch.library namespace, ``fot``.

The schemas and the fake (meta) kernels live here and nowhere else; the C++ sources only register
implementations for them (``TORCH_LIBRARY_IMPL(fot, CPU, m)`` in csrc/cpu,
``TORCH_LIBRARY_IMPL(fot, CUDA, m)`` in csrc/cuda), so the CPU and CUDA kernels of an op share one
schema and one fake, and torch's dispatcher picks the implementation by the tensors' device.
Gradients: the forward ops are differentiable on their own (``torch.library.register_autograd``
below: ``flash_scan`` through ``flash_scan_backward``; ``knn_scan`` w.r.t. query and mem_keys at
the selected slots; ``gather_attention`` w.r.t. scores and values, in PyTorch over the k selected
rows). The package's ops do not chain these: ``fot_kernels.autograd`` is one Function over the
whole composition, whose backward runs the ``*_backward`` ops with the lse merged over all parts
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


# --------------------------------------------------------------------------------------------
# Autograd of the forward ops (each op on its own; the package's composition has its own Function
# in fot_kernels.autograd, which runs the *_backward ops with the lse merged over all parts).
# --------------------------------------------------------------------------------------------


def _gather_rows(x, indices):
    """x [B, H, M, D], indices [B, H, N, k] (-1 = none) -> [B, H, N, k, D] float32, zero at -1."""
    b, h, n, k = indices.shape
    at = indices.clamp_min(0).reshape(b, h, n * k, 1).expand(-1, -1, -1, x.shape[-1])
    rows = x.gather(2, at).reshape(b, h, n, k, x.shape[-1]).float()
    return rows.masked_fill((indices < 0)[..., None], 0)


def _scatter_rows(like, indices, contrib):
    """Sum contrib [B, H, N, k, D] into a zero tensor like [B, H, M, D] at indices (-1 skipped),
    in float32 (deterministic on the CPU), returned in like's dtype."""
    b, h, m, d = like.shape
    base = torch.arange(b * h, device=indices.device).view(b, h, 1, 1) * m
    ids = (indices.clamp_min(0) + base).flatten()
    acc = torch.zeros(b * h * m, d, dtype=torch.float32, device=like.device)
    acc.index_add_(0, ids, contrib.masked_fill((indices < 0)[..., None], 0).reshape(-1, d))
    return acc.view(like.shape).to(like.dtype)


def _delta(out, lse, d_out, d_lse):
    """(dO, delta = rowsum(dO * O) - dlse) in float32, zeroed on rows with lse -inf (they dropped
    every key: no gradient flows through them, even a NaN one)."""
    dead = torch.isneginf(lse)
    d_out = torch.zeros_like(out) if d_out is None else d_out.float()
    delta = (d_out * out).sum(-1)
    if d_lse is not None:
        delta = delta - d_lse.float()
    return d_out.masked_fill(dead[..., None], 0), delta.masked_fill(dead, 0)


def _knn_scan_setup(ctx, inputs, output):
    query, mem_keys = inputs[0], inputs[1]
    ctx.save_for_backward(query, mem_keys, output[1])


def _knn_scan_backward(ctx, d_scores, _d_indices):
    """scores_ij = q_i . k_{idx_ij} (fp32) for the selected slots; padding and the selection carry
    no gradient."""
    query, mem_keys, indices = ctx.saved_tensors
    d_scores = torch.zeros(indices.shape, device=query.device) if d_scores is None else d_scores.float()
    d_scores = d_scores.masked_fill(indices < 0, 0)
    d_query = d_mem_keys = None
    if ctx.needs_input_grad[0]:
        d_query = (d_scores[..., None, :] @ _gather_rows(mem_keys, indices)).squeeze(-2).to(query.dtype)
    if ctx.needs_input_grad[1]:
        d_mem_keys = _scatter_rows(mem_keys, indices, d_scores[..., None] * query.float()[..., None, :])
    return d_query, d_mem_keys, None, None, None


def _flash_scan_setup(ctx, inputs, output):
    query, keys, values, mem_lengths, mem_mask, scale, causal_lq = inputs
    ctx.scale, ctx.causal_lq = scale, causal_lq
    ctx.save_for_backward(query, keys, values, mem_lengths, mem_mask, *output)


def _flash_scan_backward_formula(ctx, d_out, d_lse):
    """Through the backward op of the same namespace (FlashAttention-2 recomputation)."""
    query, keys, values, mem_lengths, mem_mask, out, lse = ctx.saved_tensors
    d_out, delta = _delta(out, lse, d_out, d_lse)
    rows = query.masked_fill(~torch.isfinite(query).all(-1, keepdim=True), 0)
    namespace = ctx.namespace
    need_dkv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dq, dk, dv = getattr(torch.ops, namespace).flash_scan_backward(
        rows, keys, values, d_out, lse, delta, mem_lengths, mem_mask, ctx.scale, ctx.causal_lq, need_dkv
    )
    return (dq.to(query.dtype) if ctx.needs_input_grad[0] else None,
            dk if ctx.needs_input_grad[1] else None, dv if ctx.needs_input_grad[2] else None,
            None, None, None, None)  # fmt: skip


def _gather_attention_setup(ctx, inputs, output):
    scores, indices, values, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(scores, indices, values, *output)


def _gather_attention_backward_formula(ctx, d_out, d_lse):
    """P_ij = exp(scale * s_ij - lse_i) over the kept selected slots; d s_ij = scale * P_ij (dO_i .
    v_j - delta_i), d v_j += P_ij dO_i."""
    scores, indices, values, out, lse = ctx.saved_tensors
    d_out, delta = _delta(out, lse, d_out, d_lse)
    kept = (indices >= 0) & torch.isfinite(scores)
    safe_lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    p = torch.exp((scores.float() * ctx.scale).masked_fill(~kept, float("-inf")) - safe_lse[..., None])
    v_sel = _gather_rows(values, indices.masked_fill(~kept, -1))
    ds = p * ((v_sel @ d_out[..., None]).squeeze(-1) - delta[..., None])
    d_scores = (ds * ctx.scale).to(scores.dtype) if ctx.needs_input_grad[0] else None
    d_values = None
    if ctx.needs_input_grad[2]:
        d_values = _scatter_rows(values, indices.masked_fill(~kept, -1), p[..., None] * d_out[..., None, :])
    return d_scores, None, d_values, None


_AUTOGRAD = {
    "knn_scan": (_knn_scan_backward, _knn_scan_setup),
    "flash_scan": (_flash_scan_backward_formula, _flash_scan_setup),
    "gather_attention": (_gather_attention_backward_formula, _gather_attention_setup),
}


def _register_autograd(namespace: str, lib) -> None:
    for name, (backward, setup) in _AUTOGRAD.items():

        def setup_context(ctx, inputs, output, setup=setup):
            ctx.namespace = namespace
            setup(ctx, inputs, output)

        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup_context, lib=lib)


def ops(namespace: str = NAMESPACE):
    """``torch.ops.<namespace>``, with the schemas and fake kernels above defined (once)."""
    if namespace not in _libraries:
        with _lock:
            if namespace not in _libraries:
                lib = torch.library.Library(namespace, "FRAGMENT")
                for name, schema in SCHEMAS.items():
                    lib.define(name + schema)
                    torch.library.register_fake(f"{namespace}::{name}", _FAKES[name], lib=lib)
                _register_autograd(namespace, lib)
                _libraries[namespace] = lib
    return getattr(torch.ops, namespace)


def has_kernel(name: str, dispatch_key: str, namespace: str = NAMESPACE) -> bool:
    """True when an implementation of ``namespace::name`` is registered for ``dispatch_key``
    ("CPU", "CUDA"), i.e. the C++ library that provides it is loaded."""
    ops(namespace)
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", dispatch_key)
