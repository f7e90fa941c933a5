"""Autograd of the custom ops themselves (``fot_kernels._library``: ``register_autograd`` on
``fot::knn_scan``, ``fot::flash_scan``, ``fot::gather_attention``), on their CPU kernels (csrc/cpu):
gradients against float64 autograd of the PyTorch versions of the same ops
(``backends.streaming``), and ``torch.library.opcheck`` with inputs that require grad (which
includes the check of the autograd registration)."""

import pytest
import torch

from fot_kernels import _library
from fot_kernels.backends import _cpu_ext, streaming

ops = _library.ops()


@pytest.fixture(autouse=True)
def _cpu_ext_required():
    from conftest import _use_cpu_kernels

    mp = pytest.MonkeyPatch()
    _use_cpu_kernels("ext", mp)  # skipped without a compiler, a failure in CI
    yield
    mp.undo()


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _grads(outputs, leaves, cotangents):
    found = torch.autograd.grad(list(outputs), leaves, [c.to(o.dtype) for o, c in zip(outputs, cotangents)],
                                allow_unused=True)  # fmt: skip
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, found)]


def _close(got, want, name, rtol=2e-3, atol=2e-3):
    assert torch.isfinite(got).all(), name
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _inputs(gen, rows=7, slots=45, head_dim=16, dtype=torch.float32):
    q = torch.randn(2, 2, rows, head_dim, generator=gen)
    keys = torch.randn(2, 2, slots, head_dim, generator=gen).to(dtype)
    values = torch.randn(2, 2, slots, head_dim, generator=gen).to(dtype)
    lengths = torch.tensor([slots, slots - 9])
    mask = torch.rand(2, slots, generator=gen) < 0.8
    return q, keys, values, lengths, mask


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1)


@pytest.mark.parametrize("causal_lq", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_scan_gradients(gen, causal_lq, dtype):
    q, keys, values, lengths, mask = _inputs(gen, rows=8, dtype=dtype)
    keys[1, 0, 3, 2] = float("inf")  # a dropped key: zero gradient, no NaN
    args = (None, None, 0.3, causal_lq) if causal_lq else (lengths, mask, 0.3, 0)
    d_out, d_lse = torch.randn(q.shape, generator=gen), torch.randn(q.shape[:3], generator=gen)
    xs = _leaves(q, keys, values)
    got = _grads(ops.flash_scan(*xs, *args), xs, (d_out, d_lse))
    hi = _leaves(q.double(), keys.double(), values.double())
    want = _grads(streaming.flash_scan_torch(*hi, *args), hi, (d_out, d_lse))
    for name, g, w, x in zip(("query", "keys", "values"), got, want, xs):
        assert g.dtype == x.dtype
        _close(g, w, name, *((2e-2, 2e-2) if dtype == torch.bfloat16 else ()))
    assert (got[1][1, 0, 3] == 0).all() and (got[2][1, 0, 3] == 0).all()


def test_knn_scan_and_gather_attention_gradients(gen):
    q, keys, values, lengths, mask = _inputs(gen, rows=9)
    d_out, d_lse = torch.randn(q.shape, generator=gen), torch.randn(q.shape[:3], generator=gen)
    k = 6
    xs = _leaves(q, keys, values)
    scores, indices = ops.knn_scan(xs[0], xs[1], lengths, mask, k)
    got = _grads(ops.gather_attention(scores, indices, xs[2], 0.4), xs, (d_out, d_lse))
    hi = _leaves(q.double(), keys.double(), values.double())
    s_hi, i_hi = streaming.knn_scan_torch(hi[0], hi[1], lengths, mask, k)
    assert torch.equal(i_hi, indices)
    want = _grads(streaming.gather_attention_torch(s_hi, i_hi, hi[2], 0.4), hi, (d_out, d_lse))
    for name, g, w in zip(("query", "mem_keys", "mem_values"), got, want):
        _close(g, w, name)


def test_knn_scan_padding_gets_no_gradient(gen):
    q, keys, _, _, _ = _inputs(gen, rows=3, slots=5)
    xs = _leaves(q, keys)
    scores, indices = ops.knn_scan(xs[0], xs[1], torch.tensor([5, 2]), None, 4)
    assert (indices[1, ..., 2:] == -1).all()
    (scores.masked_fill(indices < 0, 0) * 1.5).sum().backward()
    assert torch.isfinite(xs[0].grad).all() and (xs[1].grad[1, :, 2:] == 0).all()


def test_opcheck_with_gradients(gen):
    q, keys, values, lengths, mask = _inputs(gen, rows=5, slots=40, dtype=torch.bfloat16)
    q, keys, values = _leaves(q, keys, values)
    torch.library.opcheck(ops.knn_scan.default, (q, keys, lengths, mask, 7))
    torch.library.opcheck(ops.flash_scan.default, (q, keys, values, lengths, mask, 0.5, 0))
    torch.library.opcheck(ops.flash_scan.default, (q, keys, values, None, None, 0.5, 5))
    scores, indices = ops.knn_scan(q.detach(), keys.detach(), lengths, mask, 7)
    torch.library.opcheck(ops.gather_attention.default, (scores.requires_grad_(), indices, values, 0.5))


def test_backward_ops_opcheck(gen):
    q, keys, values, lengths, mask = _inputs(gen, rows=6, slots=40, dtype=torch.bfloat16)
    out, lse = ops.flash_scan(q, keys, values, lengths, mask, 0.5, 0)
    d_out = torch.randn(q.shape, generator=gen)
    delta = (d_out * out).sum(-1)
    for need in (True, False):
        torch.library.opcheck(ops.flash_scan_backward.default,
                              (q, keys, values, d_out, lse, delta, lengths, mask, 0.5, 0, need))  # fmt: skip
    scores, indices = ops.knn_scan(q, keys, lengths, mask, 5)
    out, lse = ops.gather_attention(scores, indices, values, 0.5)
    delta = (d_out * out).sum(-1)
    for need in (True, False):
        torch.library.opcheck(ops.gather_attention_backward.default,
                              (q, indices, keys, values, d_out, lse, delta, 0.5, need))  # fmt: skip


def test_cpu_ext_is_the_kernel_under_test():
    assert _cpu_ext.load() and _library.has_kernel("flash_scan", "CPU")
