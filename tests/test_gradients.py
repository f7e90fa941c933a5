"""Gradients of memory_attention (docs/DESIGN.md 3.4) on the CPU: the block-recomputing backward of
``fot_kernels.autograd`` behind the ``streaming`` and ``cpu`` backends (the cpu backend with its C++
forward and backward kernels and with the PyTorch fallback kernels), against the float64 reference's autograd,
with flash-attention's tolerance rule; plus gradcheck, the memory bound, determinism and dispatch."""

import pytest
import torch
from conftest import _use_cpu_kernels, emulate_cuda_backend

import fot_kernels as fk
from fot_kernels.backends import cpu, streaming
from fot_kernels.testing import assert_close_to_reference, on_linux, peak_memory

from _inputs import make_case

NAMES = ("query", "key", "value", "mem_keys", "mem_values")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small shapes: one intra-op thread is as fast, and immune to oversubscribed CI machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["streaming", "cpu", "cpu-pytorch-kernels", "triton", "cuda-emulated"])
def backend(request, monkeypatch):
    """The backend= name; "cpu" runs the C++ kernels, "cpu-pytorch-kernels" the PyTorch fallback
    kernels, "triton" the Triton kernels under the interpreter, "cuda-emulated" csrc/cuda's kernels
    built for the CPU (tests/cuda_emu)."""
    if request.param.startswith("cpu"):
        _use_cpu_kernels("ext" if request.param == "cpu" else "torch", monkeypatch)
        return "cpu"
    if request.param == "cuda-emulated":
        emulate_cuda_backend(monkeypatch)
        return "cuda"
    return request.param


def _leaf(t, dtype=None):
    return None if t is None else t.detach().clone().to(dtype or t.dtype).requires_grad_()


def _inputs(case):
    return case.query, case.key, case.value, case.mem_keys, case.mem_values


def _run(backend, xs, case, grad_out, grad_lse, **kw):
    """out, lse and the gradients of (out, lse) . (grad_out, grad_lse) w.r.t. the given inputs."""
    out, lse = fk.memory_attention(*xs, return_lse=True, backend=backend, **case.memory_kwargs(), **kw)
    outputs, grads = [out], [grad_out.to(out.dtype)]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse.to(lse.dtype))
    leaves = [x for x in xs if x is not None]
    found = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)  # the reference skips empty parts
    return out, lse, [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, found)]


def check_gradients(backend, case, *, lse_grad=True, **kw):
    """Every input's gradient within 2x the low-precision reference's own error of the float64
    reference, in the input's dtype and NaN-free. Returns (leaves, out, lse, grads)."""
    grad_out = torch.randn(case.query.shape)
    grad_lse = torch.randn(case.query.shape[:3]) if lse_grad else None
    xs = [_leaf(t) for t in _inputs(case)]
    out, lse, grads = _run(backend, xs, case, grad_out, grad_lse, **kw)
    _, _, ref_hi = _run("reference", [_leaf(t, torch.float64) for t in _inputs(case)], case, grad_out, grad_lse, **kw)
    _, _, ref_lo = _run("reference", [_leaf(t) for t in _inputs(case)], case, grad_out, grad_lse, **kw)
    names = [n for n, x in zip(NAMES, xs) if x is not None]
    leaves = [x for x in xs if x is not None]
    for name, x, g, g_hi, g_lo in zip(names, leaves, grads, ref_hi, ref_lo):
        assert g.dtype == x.dtype and g.shape == x.shape, f"d{name}: {g.dtype} {tuple(g.shape)}"
        assert_close_to_reference(g, g_hi, g_lo, f"d{name}")
    return dict(zip(names, leaves)), out, lse, dict(zip(names, grads))


CASES = {
    "gqa-causal-lq<lk": (dict(batch=2, q_heads=4, kv_heads=2, len_q=7, len_k=19, slots=50, head_dim=16), True),
    "causal-lq>lk": (dict(batch=1, q_heads=2, kv_heads=1, len_q=20, len_k=9, slots=40, head_dim=8), True),
    "non-causal": (dict(batch=1, q_heads=4, kv_heads=1, len_q=9, len_k=13, slots=45, head_dim=16), False),
    "d1": (dict(batch=1, q_heads=2, kv_heads=2, len_q=5, len_k=6, slots=30, head_dim=1), True),
    "d100": (dict(batch=1, q_heads=2, kv_heads=1, len_q=6, len_k=7, slots=40, head_dim=100), True),
    "d128": (dict(batch=1, q_heads=2, kv_heads=2, len_q=5, len_k=8, slots=33, head_dim=128), True),
    "d256": (dict(batch=1, q_heads=2, kv_heads=1, len_q=3, len_k=4, slots=21, head_dim=256), True),
    "lengths-mask": (dict(batch=3, q_heads=4, kv_heads=2, len_q=6, len_k=8, slots=60, head_dim=16,
                          lengths=True, mask=True), True),
    "strided-memory": (dict(batch=1, q_heads=2, kv_heads=1, len_q=5, len_k=5, slots=40, head_dim=24,
                            strided_memory=True), True),
}


@pytest.mark.parametrize("topk", [None, 5])
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_reference(backend, name, topk):
    shape, causal = CASES[name]
    if backend == "triton" and shape["head_dim"] > 128:  # Triton serves D > 128 in fp16/bf16 only
        shape = {**shape, "dtype": torch.bfloat16}
    check_gradients(backend, make_case(**shape), topk=topk, causal=causal)


@pytest.mark.parametrize("topk", [None, 5])
def test_gradients_without_lse_gradient(backend, topk):
    check_gradients(backend, make_case(1, 4, 2, 6, 9, 40, 16, lengths=True), topk=topk, lse_grad=False)


@pytest.mark.parametrize("topk", [None, 7])
def test_gradients_over_many_blocks(backend, topk, monkeypatch):
    # several key blocks (local and memory) and several kNN row blocks, with a ragged last block
    monkeypatch.setattr(streaming, "BLOCK", 16)
    monkeypatch.setattr(streaming, "GATHER_ENTRIES", 2 * 7 * 3)  # B * Hkv * k * 3 rows: 22 rows in 8 steps
    check_gradients(backend, make_case(1, 4, 2, 11, 37, 101, 8, lengths=True, mask=True), topk=topk)


@pytest.mark.parametrize("topk", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_memory_gets_bf16_gradients(backend, topk, dtype):
    case = make_case(1, 4, 2, 6, 8, 50, 32, dtype=dtype, mem_dtype=torch.bfloat16)
    _, _, _, grads = check_gradients(backend, case, topk=topk)
    assert grads["mem_keys"].dtype == grads["mem_values"].dtype == torch.bfloat16
    assert grads["query"].dtype == grads["key"].dtype == dtype


def test_double_backward_is_refused():
    case = make_case(1, 2, 1, 3, 4, 10, 8)
    xs = [_leaf(t) for t in _inputs(case)]
    out = fk.memory_attention(*xs, backend="streaming")
    (d_q,) = torch.autograd.grad(out.square().sum(), xs[:1], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        d_q.sum().backward()


def test_fewer_valid_slots_than_k(backend):
    # the selection's tail is padding (-1): it must pass no gradient to any slot (e.g. slot 0)
    case = make_case(2, 4, 2, 6, 8, 12, 16, lengths=True, mask=True)
    case.mem_lengths = torch.tensor([12, 4])
    case.mem_mask[:, 0] = True
    _, _, _, grads = check_gradients(backend, case, topk=8)
    assert (grads["mem_keys"][1, :, 4:] == 0).all() and (grads["mem_values"][1, :, 4:] == 0).all()


@pytest.mark.parametrize("topk", [None, 5])
def test_empty_memory(backend, topk):
    _, _, _, grads = check_gradients(backend, make_case(1, 4, 2, 6, 8, 0, 16), topk=topk)
    assert grads["mem_keys"].shape == (1, 2, 0, 16)


@pytest.mark.parametrize("topk", [None, 5])
def test_all_masked_rows_get_zero_gradients(backend, topk):
    # memory only (knn_attention's composition): batch row 0 has no valid slot, so its rows are
    # empty (out 0, lse -inf) even though dO and dlse there are non-zero
    case = make_case(2, 4, 2, 6, None, 30, 16, mask=True)
    case.mem_mask[0] = False
    _, out, lse, grads = check_gradients(backend, case, topk=topk)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert (grads["query"][0] == 0).all()
    assert (grads["mem_keys"][0] == 0).all() and (grads["mem_values"][0] == 0).all()
    assert grads["query"][1].abs().sum() > 0


@pytest.mark.parametrize("topk", [None, 5])
def test_non_finite_keys_and_queries_get_zero_gradients(backend, topk):
    case = make_case(1, 4, 2, 6, 8, 40, 16)
    case.mem_keys[0, 0, 3] = float("nan")
    case.mem_values[0, 0, 3] = float("nan")  # never read: its key is dropped everywhere
    case.mem_keys[0, 1, 5, 2] = float("inf")
    case.mem_keys[0, 1, 6, 0] = float("-inf")
    case.key[0, 0, 2, 1] = float("nan")
    case.value[0, 0, 2] = float("inf")
    case.query[0, 3, 4, 0] = float("nan")
    _, _, _, grads = check_gradients(backend, case, topk=topk)
    for g in grads.values():
        assert torch.isfinite(g).all()
    assert (grads["mem_keys"][0, 0, 3] == 0).all() and (grads["mem_values"][0, 0, 3] == 0).all()
    assert (grads["mem_keys"][0, 1, 5:7] == 0).all() and (grads["mem_values"][0, 1, 5:7] == 0).all()
    assert (grads["key"][0, 0, 2] == 0).all() and (grads["value"][0, 0, 2] == 0).all()
    assert (grads["query"][0, 3, 4] == 0).all()


@pytest.mark.parametrize("topk", [None, 3])
def test_gradcheck_float64(topk):
    case = make_case(1, 4, 2, 3, 5, 9, 3, dtype=torch.float64, lengths=True)
    case.mem_lengths[0] = 7

    def f(q, k, v, mk, mv):
        return fk.memory_attention(q, k, v, mk, mv, topk=topk, return_lse=True, backend="streaming",
                                   mem_lengths=case.mem_lengths)  # fmt: skip

    assert torch.autograd.gradcheck(f, [_leaf(t) for t in _inputs(case)])


def test_knn_gradients_are_deterministic_and_selection_not_recomputed(backend, monkeypatch):
    # many queries pick the same few slots: the scatter-add order must not change the sums
    case = make_case(1, 4, 1, 40, 8, 12, 16)
    calls = []
    real = streaming.TORCH_KERNELS.ops.knn_scan
    monkeypatch.setattr(streaming.TORCH_KERNELS.ops, "knn_scan", lambda *a: calls.append(1) or real(*a))
    grad_out = torch.randn(case.query.shape)
    runs = []
    for _ in range(2):
        xs = [_leaf(t) for t in _inputs(case)]
        out = fk.memory_attention(*xs, topk=6, backend=backend)
        scans = len(calls)
        runs.append(torch.autograd.grad(out, xs, grad_out))
        assert len(calls) == scans, "the backward ran a kNN scan"
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


def test_only_requested_gradients_are_computed(backend):
    case = make_case(1, 4, 2, 6, 8, 40, 16)
    q = _leaf(case.query)
    out, lse = fk.memory_attention(q, case.key, case.value, case.mem_keys, case.mem_values, topk=4, return_lse=True,
                                   backend=backend)  # fmt: skip
    (d_q,) = torch.autograd.grad(out.sum() + lse.sum(), [q])
    q_hi = _leaf(case.query, torch.float64)
    ref = fk.memory_attention(q_hi, *(t.double() for t in _inputs(case)[1:]), topk=4, return_lse=True,
                              backend="reference")  # fmt: skip
    (d_hi,) = torch.autograd.grad(ref[0].sum() + ref[1].sum(), [q_hi])
    q_lo = _leaf(case.query)
    ref = fk.memory_attention(q_lo, *_inputs(case)[1:], topk=4, return_lse=True, backend="reference")
    (d_lo,) = torch.autograd.grad(ref[0].sum() + ref[1].sum(), [q_lo])
    assert_close_to_reference(d_q, d_hi, d_lo, "dquery")


def test_auto_on_cpu_with_grads_runs_the_cpu_backend(monkeypatch):
    case = make_case(1, 4, 2, 5, 6, 30, 16)
    xs = [_leaf(t) for t in _inputs(case)]
    assert cpu.unsupported_reasons("memory_attention", xs[0], xs[3], needs_grad=True) == []
    served = []
    real = cpu.memory_attention
    monkeypatch.setattr(cpu, "memory_attention", lambda *a, **k: served.append(1) or real(*a, **k))
    out = fk.memory_attention(*xs, topk=4)
    assert served == [1] and out.grad_fn is not None
    out.sum().backward()
    assert all(x.grad is not None for x in xs)


@pytest.mark.skipif(not on_linux(), reason="peak memory is read from /proc")
@pytest.mark.parametrize(("name", "topk"), [("streaming", None), ("cpu", None), ("cpu", 32)])
def test_backward_memory_does_not_grow_with_lq_times_m(name, topk):
    # Lq x M in fp32 is 64 MiB here. The old autograd-through-blocks backward kept every block's
    # probabilities: 150-360 MiB at this shape (measured). The recomputing backward needs the
    # memory's gradients (2 x 8 MiB) and a few [Lq, BLOCK] blocks: about 30 MiB measured.
    def step(len_q, slots):
        case = make_case(1, 1, 1, len_q, 64, slots, 32)
        xs = [_leaf(t) for t in _inputs(case)]
        out = fk.memory_attention(*xs, topk=topk, backend=name)
        return torch.autograd.grad(out, xs, torch.ones_like(out))

    step(16, 2048)  # warm-up on a small shape: code pages, the extension (freed memory would hide growth)
    len_q, slots = 256, 65536
    grads, growth = peak_memory(lambda: step(len_q, slots))
    assert all(torch.isfinite(g).all() for g in grads) and grads[3].abs().sum() > 0
    lq_by_m = len_q * slots * 4
    assert growth < lq_by_m, f"forward+backward grew by {growth / 2**20:.1f} MiB (Lq x M: {lq_by_m / 2**20:.0f} MiB)"


@pytest.mark.parametrize("topk", [None, 5])
def test_torch_compile_training_step(topk):
    """A training step whose forward and loss are compiled with fullgraph=True (AOTAutograd then
    compiles the backward) takes the same SGD step as eager: the composition's Function and the
    custom ops trace without a graph break."""
    case = make_case(1, 4, 2, 6, 8, 40, 16, lengths=True)
    weight = torch.randn(16, 16) / 4

    def loss_fn(w, q, k, v, mk, mv, lengths):
        out = fk.memory_attention(q @ w, k, v, mk, mv, topk=topk, mem_lengths=lengths, backend="cpu")
        return out.sin().sum()

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager", fullgraph=True)):
        w, q, k, v, mk, mv = [_leaf(weight), *(_leaf(t) for t in _inputs(case))]
        opt = torch.optim.SGD([w, k, v, mk, mv], lr=0.1)
        loss = fn(w, q, k, v, mk, mv, case.mem_lengths)
        loss.backward()
        opt.step()
        results.append((loss.detach(), [x.detach() for x in (w, q.grad, k, v, mk, mv)]))
    (loss_e, new_e), (loss_c, new_c) = results
    torch.testing.assert_close(loss_c, loss_e)
    for c, e in zip(new_c, new_e):
        torch.testing.assert_close(c, e)
    assert not torch.equal(new_e[0], weight) and not torch.equal(new_e[4], case.mem_keys)  # the step moved them
