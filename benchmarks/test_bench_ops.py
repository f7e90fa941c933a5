"""pytest-benchmark suite: the forward pass of the public ops on a small CPU grid, against the
baselines of baselines.py (about 1-2 minutes on 2 cores). Commands in benchmarks/README.md::

    pytest benchmarks --benchmark-only                        # time, one table per group
    pytest benchmarks --benchmark-only --benchmark-autosave   # ... and save .benchmarks/<machine>/NNNN_<commit>.json
    pytest-benchmark compare 0001 0002 --group-by=group       # two saved runs (e.g. two commits) side by side

One group per (op, shape), so that the providers of a shape sit side by side (and `compare` keeps
them together); each benchmark's name says its provider. Before timing, every benchmark checks its
provider's output (its last 32 query rows per head) against the float64 reference (the 2x rule of
``fot_kernels.testing.assert_close_to_reference``; kNN selections with ``check_knn``): a wrong
result fails the test and is never timed. That first call is also the warm-up.

Not collected by ``pytest`` / ``pytest tests`` (the project's testpaths is tests/).
"""

from __future__ import annotations

from functools import lru_cache

import baselines as B
import pytest
import torch

import fot_kernels as fk
from fot_kernels.testing import assert_close_to_reference, check_knn

#: (Lq, M): a local causal context of Lk = Lq keys; B=1, Hq=Hkv=8, D=128, fp32, k=32
SHAPES = [(256, 4096), (256, 16384)]
HEADS, DIM, TOPK, CHUNK = 8, 128, 32, 4096
#: query rows per head checked against the float64 reference before timing (the last ones)
CHECK_ROWS = 32


@lru_cache(maxsize=1)
def inputs(len_q: int, mem: int) -> tuple[torch.Tensor, ...]:
    """(q, k, v, mem_k, mem_v) of one shape, made once (the last shape's only)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, len_q, DIM, generator=gen) for _ in range(3))
    mem_k, mem_v = (torch.randn(1, HEADS, mem, DIM, generator=gen) for _ in range(2))
    return q, k, v, mem_k, mem_v


@lru_cache(maxsize=2)
def reference(len_q: int, mem: int, topk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """memory_attention of the last CHECK_ROWS queries by the reference backend: (float64, float32),
    made once per shape and mode. The causal mask is bottom-right aligned, so the last queries alone
    see the same keys as they do among all Lq queries."""
    q, k, v, mem_k, mem_v = inputs(len_q, mem)
    q = q[:, :, -CHECK_ROWS:]
    hi = fk.memory_attention(*(t.double() for t in (q, k, v, mem_k, mem_v)), topk=topk, backend="reference")
    return hi, fk.memory_attention(q, k, v, mem_k, mem_v, topk=topk, backend="reference")


def ties_by_index(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal scores reordered by ascending index (the package's order; ``torch.topk`` keeps none)."""
    order = indices.argsort(-1)
    scores, indices = scores.gather(-1, order), indices.gather(-1, order)
    scores, pos = scores.sort(dim=-1, descending=True, stable=True)
    return scores, indices.gather(-1, pos)


def _sdpa_call_only(q, k, v, mk, mv):
    kc, vc, mask = B.sdpa_concat_inputs(q, k, v, mk, mv)  # outside the timing
    return lambda: B.sdpa(q, kc, vc, mask)


def _chunked_knn_attention(q, k, v, mk, mv):
    scores, indices = B.chunked_topk(q, mk, TOPK, CHUNK)
    return B.attend_selected(q, k, v, mv, scores, indices, scale=DIM**-0.5)


#: op -> provider -> f(q, k, v, mem_k, mem_v) -> the timed callable (its setup, if any, done by f)
CALLS = {
    "dense_attention": {
        "fot_kernels": lambda q, k, v, mk, mv: lambda: fk.memory_attention(q, k, v, mk, mv, backend="cpu"),
        "sdpa_concat": lambda q, k, v, mk, mv: lambda: B.sdpa_concat(q, k, v, mk, mv),
        "sdpa_call_only": _sdpa_call_only,
    },
    "knn_attention": {
        "fot_kernels": lambda q, k, v, mk, mv: lambda: fk.memory_attention(q, k, v, mk, mv, topk=TOPK, backend="cpu"),
        "chunked_loop": lambda q, k, v, mk, mv: lambda: _chunked_knn_attention(q, k, v, mk, mv),
    },
    "knn_topk": {
        "fot_kernels": lambda q, k, v, mk, mv: lambda: fk.knn_topk(q, mk, TOPK, backend="cpu"),
        "chunked_loop": lambda q, k, v, mk, mv: lambda: B.chunked_topk(q, mk, TOPK, CHUNK),
    },
}
CASES = [
    pytest.param(op, provider, lq, m, id=f"{op}-Lq{lq}-M{m}-{provider}")
    for lq, m in SHAPES
    for op, providers in CALLS.items()
    for provider in providers
]


def check(op: str, provider: str, out, len_q: int, mem: int) -> None:
    """Refuse to time a wrong result: the last CHECK_ROWS query rows against the float64 reference
    (kNN selections: exact, up to near-ties; a baseline's equal scores may come in any order)."""
    q, _, _, mem_k, _ = inputs(len_q, mem)
    if op == "knn_topk":
        scores, indices = (t[:, :, -CHECK_ROWS:] for t in out)
        if provider != "fot_kernels":
            scores, indices = ties_by_index(scores, indices)
        check_knn(scores, indices, q[:, :, -CHECK_ROWS:], mem_k, TOPK)
    else:
        ref = reference(len_q, mem, TOPK if op == "knn_attention" else None)
        assert_close_to_reference(out[:, :, -CHECK_ROWS:], *ref, name=f"{op} {provider}")


@pytest.mark.parametrize(("op", "provider", "len_q", "mem"), CASES)
def test_forward(benchmark, op: str, provider: str, len_q: int, mem: int) -> None:
    call = CALLS[op][provider](*inputs(len_q, mem))
    check(op, provider, call(), len_q, mem)
    benchmark.group = f"{op} B=1 Hq=Hkv={HEADS} Lq=Lk={len_q} M={mem} D={DIM} fp32" + (
        f" k={TOPK}" if op != "dense_attention" else ""
    )
    benchmark.extra_info.update(op=op, provider=provider, mode="forward", B=1, Hq=HEADS, Hkv=HEADS, Lq=len_q,
                                Lk=len_q, M=mem, D=DIM, k=TOPK if op != "dense_attention" else None)  # fmt: skip
    benchmark(call)
