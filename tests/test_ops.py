"""The public ops' own behaviour, independent of the backend: argument normalisation (numpy
scalars, huge k, meta tensors), the gradient policy of ``backend="auto"``, the log-sum-exp merge's
treatment of empty parts, and dispatch under torch.compile."""

import numpy as np
import pytest
import torch

import fot_kernels as fk
from fot_kernels.backends import reference
from fot_kernels.testing import assert_close_to_reference, on_linux, peak_memory

from _inputs import make_case


def _args(case):
    return case.query, case.key, case.value, case.mem_keys, case.mem_values


def test_merge_attention_empty_part_with_nan_output_contributes_nothing():
    # a fully masked softmax row elsewhere gives (NaN, -inf): it must not poison the merge
    out_a, lse_a = torch.randn(2, 3, 4), torch.randn(2, 3)
    out_b = torch.full((2, 3, 4), float("nan"))
    lse_b = torch.full((2, 3), float("-inf"))
    lse_b[1, 2] = 0.5
    out_b[1, 2] = torch.randn(4)
    out_a.requires_grad_()
    merged, lse = fk.merge_attention([out_a, out_b], [lse_a, lse_b])
    torch.testing.assert_close(merged[0], out_a[0])
    torch.testing.assert_close(lse[0], lse_a[0])
    w = torch.softmax(torch.stack([lse_a[1, 2], lse_b[1, 2]]), 0)
    torch.testing.assert_close(merged[1, 2], w[0] * out_a[1, 2] + w[1] * out_b[1, 2])
    merged.sum().backward()
    assert torch.isfinite(out_a.grad).all()
    both_empty, lse_empty = fk.merge_attention([out_b[:1], out_b[:1]], [lse_b[:1], lse_b[:1]])
    assert (both_empty == 0).all() and torch.isneginf(lse_empty).all()


def test_numpy_scalars_are_accepted():
    case = make_case(1, 2, 1, 3, 4, 20, 8)
    want = fk.memory_attention(*_args(case), topk=3, causal=False, softmax_scale=0.25)
    got = fk.memory_attention(*_args(case), topk=np.int32(3), causal=np.bool_(False), softmax_scale=np.float32(0.25))
    torch.testing.assert_close(got, want)
    s, i = fk.knn_topk(case.query, case.mem_keys, np.int64(4))
    assert s.shape[-1] == i.shape[-1] == 4


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(softmax_scale=10**400), ValueError, "softmax_scale must be a finite float"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite float"),
        (dict(topk=2**64), ValueError, r"topk must be in \[1, 2147483647\]"),
        (dict(topk=np.bool_(True)), TypeError, "topk must be an int"),
        (dict(causal=1), TypeError, "causal must be a bool"),
    ],
)
def test_out_of_range_scalars_are_named(kwargs, exc, msg):
    case = make_case(1, 2, 1, 3, 4, 20, 8)
    with pytest.raises(exc, match=msg):
        fk.memory_attention(*_args(case), **kwargs)


def test_knn_topk_k_far_above_memory_size_does_not_allocate_k_sized_work():
    case = make_case(1, 1, 1, 1, 1, 10, 8)
    k = 10_000_000  # the result alone is 120 MB (fp32 scores + int64 indices)
    (scores, indices), peak = peak_memory(lambda: fk.knn_topk(case.query, case.mem_keys, k))
    assert scores.shape[-1] == k and (indices[..., 10:] == -1).all() and torch.isneginf(scores[..., 10:]).all()
    _, ref_i = reference.knn_topk(case.query, case.mem_keys, 10)
    assert torch.equal(indices[..., :10], ref_i)
    if on_linux():
        assert peak <= 1.25 * k * 12, f"peak {peak / 2**20:.0f} MiB for a {k * 12 / 2**20:.0f} MiB result"
    with pytest.raises(ValueError, match=r"k must be in \[1, 2147483647\]"):
        fk.knn_topk(case.query, case.mem_keys, 2**64)


def test_meta_tensors_give_shapes():
    case = make_case(2, 4, 2, 5, 6, 30, 16, lengths=True, mask=True)
    meta = [t.to("meta") for t in _args(case)]
    out, lse = fk.memory_attention(*meta, mem_lengths=case.mem_lengths.to("meta"), mem_mask=case.mem_mask.to("meta"),
                                   return_lse=True)  # fmt: skip
    assert out.device.type == "meta" and out.shape == case.query.shape and lse.shape == case.query.shape[:3]


def test_explicit_backend_error_says_cannot():
    case = make_case(1, 2, 1, 3, 4, 20, 8)
    with pytest.raises(fk.BackendUnavailableError, match="backend 'cuda' cannot serve memory_attention"):
        fk.memory_attention(*_args(case), backend="cuda")


@pytest.mark.parametrize("topk", [None, 4])
def test_auto_backend_keeps_the_graph_when_inputs_require_grad(topk):
    # auto picks the cpu backend (C++ forward, block-recomputing backward) and must never hand back
    # a detached output or one whose backward leaves .grad unset.
    case = make_case(2, 4, 2, 7, 9, 40, 16, lengths=True)
    leaves = [t.clone().requires_grad_() for t in _args(case)]
    out = fk.memory_attention(*leaves, topk=topk, **case.memory_kwargs())
    assert out.requires_grad and out.grad_fn is not None
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    hi = [t.detach().double().requires_grad_() for t in leaves]
    reference.memory_attention(*hi, topk=topk, **case.memory_kwargs())[0].backward(grad_out.double())
    lo = [t.detach().clone().requires_grad_() for t in leaves]
    reference.memory_attention(*lo, topk=topk, **case.memory_kwargs())[0].backward(grad_out)
    for name, t, t_hi, t_lo in zip(("query", "key", "value", "mem_keys", "mem_values"), leaves, hi, lo):
        assert t.grad is not None, f"{name}.grad left unset"
        assert_close_to_reference(t.grad, t_hi.grad, t_lo.grad, f"d{name}")
    with torch.no_grad():  # no autograd: the fast kernels serve again
        assert not fk.memory_attention(*leaves, topk=topk).requires_grad


@pytest.mark.parametrize("backend", ["cpu", "streaming"])
def test_torch_compile_fullgraph(backend):
    from fot_kernels.backends import _cpu_ext

    if backend == "cpu" and not _cpu_ext.load():
        pytest.skip(f"C++ CPU extension unavailable: {_cpu_ext.unavailable_reason()}")
    case = make_case(1, 4, 2, 6, 8, 50, 16, lengths=True)

    def f(q, k, v, mk, mv, lengths):
        return fk.memory_attention(q, k, v, mk, mv, topk=4, mem_lengths=lengths, backend=backend) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*_args(case), case.mem_lengths), f(*_args(case), case.mem_lengths))
        with pytest.raises(RuntimeError, match="mem_lengths values must be in"):  # checked in the graph
            compiled(*_args(case), torch.tensor([51]))
