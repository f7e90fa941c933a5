"""crossbatch_attention (docs/DESIGN.md 3.5): FoT's CrossBatch memory-layer attention.

The fused composition (``fot_kernels.crossbatch``) on the streaming backend, the cpu backend with
its C++ kernels and with the PyTorch fallback kernels, the cuda backend's kernels built for the
CPU emulator, and the triton backend's launchers under the Triton interpreter, against the float64
reference (which gathers the contexts and materialises the scores), outputs and all four
gradients, with flash-attention's tolerance rule. Plus: the pack rule checked by hand, no
information leak from later rows, gradcheck, the memory bound (no gathered [B, Hkv, d * L, D]
copy, no score block wider than BLOCK), validation, dispatch and torch.compile.
"""

import math

import pytest
import torch
from conftest import _use_cpu_kernels, emulate_cuda_backend
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fot_kernels as fk
from fot_kernels import crossbatch
from fot_kernels.backends import reference, streaming
from fot_kernels.testing import assert_close_to_reference

NAMES = ("query", "key", "value", "mem_keys")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["streaming", "cpu", "cpu-pytorch-kernels"])
def backend(request, monkeypatch):
    """The backend= name; "cpu" runs the C++ kernels, "cpu-pytorch-kernels" the PyTorch fallback.
    (The Triton backend, slow under the interpreter, has its own smaller cases below.)"""
    if request.param.startswith("cpu"):
        _use_cpu_kernels("ext" if request.param == "cpu" else "torch", monkeypatch)
        return "cpu"
    return request.param


def make(batch, q_heads, kv_heads, length, head_dim, dtype=torch.float32):
    """Random query, key, value, mem_keys (never zeros)."""
    shape = lambda h: (batch, h, length, head_dim)  # noqa: E731
    return [torch.randn(shape(h)).to(dtype) for h in (q_heads, kv_heads, kv_heads, kv_heads)]


def run(backend, xs, grad_out, dtype=None, **kw):
    """out and the gradients of out . grad_out w.r.t. the four inputs (cast to dtype first)."""
    leaves = [x.detach().clone().to(dtype or x.dtype).requires_grad_() for x in xs]
    out = fk.crossbatch_attention(*leaves, backend=backend, **kw)
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def check(backend, xs, **kw):
    """Output and every gradient within 2x the low-precision reference's own error of the float64
    reference, in the inputs' dtypes and NaN-free. Returns (out, grads)."""
    grad_out = torch.randn(xs[0].shape)
    out, grads = run(backend, xs, grad_out, **kw)
    out_hi, grads_hi = run("reference", xs, grad_out, torch.float64, **kw)
    out_lo, grads_lo = run("reference", xs, grad_out, **kw)
    assert out.dtype == xs[0].dtype and out.shape == xs[0].shape
    assert_close_to_reference(out, out_hi, out_lo, "out")
    for name, x, g, g_hi, g_lo in zip(NAMES, xs, grads, grads_hi, grads_lo):
        assert g.dtype == x.dtype and g.shape == x.shape, f"d{name}: {g.dtype} {tuple(g.shape)}"
        assert_close_to_reference(g, g_hi, g_lo, f"d{name}")
    return out, grads


# --------------------------------------------------------------------------------------------
# The pack rule, by hand
# --------------------------------------------------------------------------------------------

# pack(b) written out by hand from docs/DESIGN.md 3.5, e.g. B=4, d=3, P=2 with stepping:
# ceil((d + 1) / max(P - 1, 1)) = 4; even rows: 0 * 4 + 1 = 1, odd rows: min(1 * 4 + 1, 4) = 4;
# then min(pack, b + 1): [1, 2, 1, 4]. Row b sees contexts c < pack(b), context c >= 1 = row b - c.
PACKS = {
    (4, 3, 2, False): [1, 2, 3, 4],
    (4, 3, 2, True): [1, 2, 1, 4],
    (4, 3, 1, True): [1, 2, 3, 4],  # P = 1: stepping has no effect
    (8, 5, 4, True): [1, 2, 3, 4, 1, 3, 5, 6],  # step ceil(6 / 3) = 2: 1, 3, 5, min(7, 6)
    (8, 2, 4, True): [1, 2, 3, 3, 1, 2, 3, 3],  # step 1: 1, 2, 3, min(4, 3)
    (6, 9, 3, False): [1, 2, 3, 4, 5, 6],  # d >= B: never wraps
}

# B = 4, d = 3, P = 2: the rows whose mem_keys / value each row sees (besides its own local keys)
SOURCES = {
    False: {0: [], 1: [0], 2: [1, 0], 3: [2, 1, 0]},
    True: {0: [], 1: [0], 2: [], 3: [2, 1, 0]},  # row 2 starts a pack: its own context only
}


@pytest.mark.parametrize("args", list(PACKS))
def test_pack_rule(args):
    assert crossbatch.crossbatch_pack(*args) == PACKS[args]
    assert reference.crossbatch_pack(*args).tolist() == PACKS[args]


def explicit_attention(q, k, v, mk, sources, scale, key_padding_mask=None):
    """Per row, head and query: one softmax over [own keys j <= i (unpadded) | mem_keys of the
    source rows], the values alike. Float64 loops, nothing shared with the code under test."""
    batch, num_q_heads, length, _ = q.shape
    group = num_q_heads // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(num_q_heads):
            kv = h // group
            for i in range(length):
                own = [j for j in range(i + 1) if key_padding_mask is None or key_padding_mask[b, j]]
                keys = [k[b, kv, j] for j in own] + [mk[s, kv, m] for s in sources[b] for m in range(length)]
                vals = [v[b, kv, j] for j in own] + [v[s, kv, m] for s in sources[b] for m in range(length)]
                if not keys:
                    continue
                p = torch.softmax(torch.stack([q[b, h, i] @ key for key in keys]) * scale, 0)
                out[b, h, i] = (p[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("stepping", [False, True])
def test_hand_computed_visibility(backend, stepping):
    xs = make(4, 4, 2, 5, 8, torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 2] = False
    kw = dict(cross_batch_range=3, dataset_packing=2, cross_batch_stepping=stepping, key_padding_mask=mask)
    expected = explicit_attention(*xs, SOURCES[stepping], 8**-0.5, mask)
    ref = fk.crossbatch_attention(*xs, backend="reference", **kw)
    torch.testing.assert_close(ref, expected, rtol=1e-12, atol=1e-12)
    fused = fk.crossbatch_attention(*(x.float() for x in xs), backend=backend, **kw)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-5)
    # the two rules differ exactly at row 2, which sees rows 1 and 0 only without stepping
    other = explicit_attention(*xs, SOURCES[not stepping], 8**-0.5, mask)
    assert not torch.allclose(other[2], expected[2]) and torch.equal(other[[0, 1, 3]], expected[[0, 1, 3]])


# --------------------------------------------------------------------------------------------
# Against the float64 oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stepping", [False, True])
@pytest.mark.parametrize("packing", [1, 2, 4])
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5])
def test_matches_reference_sweep(backend, d, packing, stepping):
    xs = make(8, 4, 2, 5, 8)
    check(backend, xs, cross_batch_range=d, dataset_packing=packing, cross_batch_stepping=stepping)


# name: ((B, Hq, Hkv, L, D), kwargs, key padding)
CASES = {
    "B1": ((1, 2, 1, 6, 16), dict(cross_batch_range=3), False),
    "B2-d5": ((2, 2, 2, 7, 16), dict(cross_batch_range=5, dataset_packing=2, cross_batch_stepping=True), False),
    "B6-gqa3-mask": ((6, 6, 2, 13, 16), dict(cross_batch_range=4, dataset_packing=2, cross_batch_stepping=True), True),
    "D1": ((4, 2, 2, 9, 1), dict(cross_batch_range=2), False),
    "D100": ((4, 2, 1, 9, 100), dict(cross_batch_range=3, dataset_packing=4, cross_batch_stepping=True), True),
    "scale": ((4, 4, 2, 6, 8), dict(cross_batch_range=2, softmax_scale=0.9), True),
    "d-huge": ((4, 2, 1, 5, 8), dict(cross_batch_range=10**9, dataset_packing=2, cross_batch_stepping=True), False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(backend, name, poison_empty):
    shape, kw, masked = CASES[name]
    xs = make(*shape)
    mask = (torch.rand(shape[0], shape[3]) > 0.3) if masked else None
    check(backend, xs, key_padding_mask=mask, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["B6-gqa3-mask", "D100"])
def test_low_precision(backend, name, dtype):
    shape, kw, masked = CASES[name]
    mask = (torch.rand(shape[0], shape[3]) > 0.3) if masked else None
    check(backend, make(*shape, dtype=dtype), key_padding_mask=mask, **kw)


def test_mixed_dtypes(backend):
    # bf16 memory keys with fp32 queries/keys/values: gradients each in its input's dtype
    xs = make(4, 4, 2, 7, 16)
    xs[3] = xs[3].bfloat16()
    _, grads = check(backend, xs, cross_batch_range=2)
    assert grads[3].dtype == torch.bfloat16


def test_strided_inputs(backend):
    # Hugging Face layout: projections [B, L, H, D] transposed to [B, H, L, D] (last dim contiguous)
    xs = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in make(4, 4, 2, 7, 16)]
    assert not any(x.is_contiguous() for x in xs)
    check(backend, xs, cross_batch_range=3, dataset_packing=2, cross_batch_stepping=True)


def test_many_blocks(backend, monkeypatch):
    # keys cross several ragged blocks of the PyTorch kernels (forward and backward)
    monkeypatch.setattr(streaming, "BLOCK", 4)
    mask = torch.rand(4, 11) > 0.2
    check(backend, make(4, 4, 2, 11, 8), cross_batch_range=3, dataset_packing=2, key_padding_mask=mask)


def test_key_padding_edge_rows(backend):
    # row 0: fully padded and no context: nothing to attend to (out 0, no gradient anywhere);
    # row 1: everything padded except position 3 (queries 0..2 see row 0's memory only);
    # row 2: fully padded, sees the memory of rows 1 and 0 only
    xs = make(4, 4, 2, 7, 8)
    mask = torch.rand(4, 7) > 0.3
    mask[0] = False
    mask[1] = False
    mask[1, 3] = True
    mask[2] = False
    out, (dq, dk, dv, dmk) = check(backend, xs, cross_batch_range=2, key_padding_mask=mask)
    assert (out[0] == 0).all() and (dq[0] == 0).all() and (dk[0] == 0).all()
    assert (dk[2] == 0).all() and (dk[1][:, [0, 1, 2, 4, 5, 6]] == 0).all() and dk[1][:, 3].abs().sum() > 0
    assert (dmk[3] == 0).all()  # nobody sees the last row
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv, dmk))


def test_non_finite_entries_are_dropped(backend):
    xs = make(4, 4, 2, 6, 8)
    xs[3][0, 1, 2, 0] = float("nan")  # a memory key of row 0: dropped for rows 1, 2
    xs[1][2, 0, 4, 3] = float("inf")  # a local key of row 2
    xs[0][3, 1, 5, 1] = float("nan")  # a query row: out 0, no gradient
    out, grads = check(backend, xs, cross_batch_range=2)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (out[3, 1, 5] == 0).all() and (grads[0][3, 1, 5] == 0).all()
    assert (grads[3][0, 1, 2] == 0).all() and (grads[1][2, 0, 4] == 0).all()


def test_cuda_emulated(monkeypatch):
    # the cuda backend's kernels, built for the CPU (slow: two small cases)
    emulate_cuda_backend(monkeypatch)
    shape, kw, _ = CASES["B6-gqa3-mask"]
    mask = torch.rand(shape[0], shape[3]) > 0.3
    check("cuda", make(*shape), key_padding_mask=mask, **kw)
    check("cuda", make(4, 2, 1, 9, 100, torch.bfloat16), key_padding_mask=mask[:4, :9], cross_batch_range=3)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in make(4, 4, 2, 7, 16, torch.float16)]
    check("cuda", strided, cross_batch_range=2)


# --------------------------------------------------------------------------------------------
# The triton backend: its op-shaped flash_scan on the fused attention kernel and its backward
# launchers (the Triton interpreter on the CPU; small shapes: the interpreter is slow)
# --------------------------------------------------------------------------------------------

TRITON_CASES = {
    # GQA, a key padding mask (the causal pass with a validity), stepping: contexts with per-row lengths
    "gqa-mask-stepping": ((4, 4, 2, 7, 16), dict(cross_batch_range=3, dataset_packing=2, cross_batch_stepping=True),
                          torch.float32, True),
    # head dim 100 (padded to 128 inside the kernels), bf16 everywhere, default scale
    "D100-bf16-mask": ((3, 2, 1, 5, 100), dict(cross_batch_range=2), torch.bfloat16, True),
    "fp16-scale": ((3, 2, 2, 6, 8), dict(cross_batch_range=2, softmax_scale=0.9), torch.float16, False),
}  # fmt: skip


@pytest.fixture
def triton_backend():
    pytest.importorskip("triton")
    reasons = crossbatch._kernels_or_reasons("triton", *make(2, 2, 1, 3, 8))[1]
    assert not reasons, reasons  # served under the interpreter (conftest sets TRITON_INTERPRET=1)
    return "triton"


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_matches_reference(triton_backend, name, poison_empty):
    shape, kw, dtype, masked = TRITON_CASES[name]
    xs = make(*shape, dtype=dtype)
    mask = (torch.rand(shape[0], shape[3]) > 0.3) if masked else None
    check(triton_backend, xs, key_padding_mask=mask, **kw)
    with torch.no_grad():  # the forward alone (no autograd Function)
        out = fk.crossbatch_attention(*xs, key_padding_mask=mask, backend=triton_backend, **kw)
        out_hi = fk.crossbatch_attention(*(x.double() for x in xs), key_padding_mask=mask, backend="reference", **kw)
        out_lo = fk.crossbatch_attention(*xs, key_padding_mask=mask, backend="reference", **kw)
    assert_close_to_reference(out, out_hi, out_lo, "out (no grad)")


def test_triton_edge_rows_and_non_finite(triton_backend):
    # fully padded rows, a NaN memory key, an inf local key, a NaN query row; bf16 mem_keys
    xs = make(4, 4, 2, 7, 8)
    xs[3] = xs[3].bfloat16()
    xs[3][0, 1, 2, 0] = float("nan")  # a memory key of row 0: dropped for rows 1, 2
    xs[1][2, 0, 4, 3] = float("inf")  # a local key of row 2
    xs[0][3, 1, 5, 1] = float("nan")  # a query row: out 0, no gradient
    mask = torch.rand(4, 7) > 0.3
    mask[0] = False  # row 0: fully padded and no context: nothing to attend to
    mask[2] = False  # row 2: fully padded, sees the memory of rows 1 and 0 only
    mask[2, 4] = True  # ... but key 4 (inf in kv head 0: dropped there)
    out, (dq, dk, dv, dmk) = check(triton_backend, xs, cross_batch_range=2, key_padding_mask=mask)
    assert dmk.dtype == torch.bfloat16
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv, dmk))
    assert (out[0] == 0).all() and (dq[0] == 0).all() and (dk[0] == 0).all()
    assert (out[3, 1, 5] == 0).all() and (dq[3, 1, 5] == 0).all()
    assert (dmk[0, 1, 2] == 0).all() and (dmk[3] == 0).all()  # the NaN key; nobody sees the last row
    assert (dk[2, :, [0, 1, 2, 3, 5, 6]] == 0).all() and (dk[2, 0, 4] == 0).all() and dk[2, 1, 4].abs().sum() > 0


def test_triton_no_information_from_later_rows(triton_backend):
    row, kw = 2, dict(cross_batch_range=3, dataset_packing=2)
    xs = make(4, 2, 1, 5, 8)
    leaves = [x.clone().requires_grad_() for x in xs]
    fk.crossbatch_attention(*leaves, backend=triton_backend, **kw)[: row + 1].sum().backward()
    for x in leaves:
        assert (x.grad[row + 1 :] == 0).all()
    assert all(x.grad[: row + 1].abs().sum() > 0 for x in leaves[:3])
    assert (leaves[3].grad[row] == 0).all() and leaves[3].grad[:row].abs().sum() > 0


def test_triton_only_requested_gradients_and_empty(triton_backend):
    xs = make(3, 2, 1, 4, 8)
    for wanted in range(4):
        leaves = [x.clone().requires_grad_(i == wanted) for i, x in enumerate(xs)]
        fk.crossbatch_attention(*leaves, cross_batch_range=2, backend=triton_backend).sum().backward()
        assert all((x.grad is not None) == (i == wanted) for i, x in enumerate(leaves))
    for batch, length in ((0, 5), (2, 0)):
        leaves = [x.requires_grad_() for x in make(batch, 2, 1, length, 8)]
        out = fk.crossbatch_attention(*leaves, cross_batch_range=2, backend=triton_backend)
        assert out.shape == leaves[0].shape
        out.sum().backward()
        assert all(x.grad is not None and x.grad.shape == x.shape for x in leaves)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", [0, 2, 4])
def test_no_information_from_later_rows(backend, row):
    kw = dict(cross_batch_range=5, dataset_packing=2)
    xs = make(6, 4, 2, 7, 8)
    later = [x.clone() for x in xs]
    for x in later:
        x[row + 1 :] = torch.randn(x[row + 1 :].shape)
    grad_out = torch.randn(xs[0].shape)
    out, grads = run(backend, xs, grad_out, **kw)
    out_p, grads_p = run(backend, later, grad_out, **kw)
    torch.testing.assert_close(out_p[: row + 1], out[: row + 1], rtol=0, atol=0)
    # dq and d key of rows <= row only come from those rows' outputs
    for g, g_p in zip(grads[:2], grads_p[:2]):
        torch.testing.assert_close(g_p[: row + 1], g[: row + 1], rtol=1e-6, atol=1e-6)
    # a loss on rows <= row reaches no later row
    leaves = [x.clone().requires_grad_() for x in xs]
    fk.crossbatch_attention(*leaves, backend=backend, **kw)[: row + 1].sum().backward()
    for x in leaves:
        assert (x.grad[row + 1 :] == 0).all()
    assert all(x.grad[: row + 1].abs().sum() > 0 for x in leaves[:3])
    assert (leaves[3].grad[row] == 0).all()  # mem_keys of a row are seen by later rows only
    assert row == 0 or leaves[3].grad[:row].abs().sum() > 0


def test_gradcheck_float64():
    xs = make(3, 2, 1, 3, 2, torch.float64)
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])

    def f(*leaves):
        return fk.crossbatch_attention(*leaves, cross_batch_range=2, key_padding_mask=mask, backend="streaming")

    assert torch.autograd.gradcheck(f, [x.requires_grad_() for x in xs])


def test_double_backward_is_refused():
    xs = [x.requires_grad_() for x in make(2, 2, 1, 3, 4)]
    out = fk.crossbatch_attention(*xs, cross_batch_range=1, backend="streaming")
    (d_q,) = torch.autograd.grad(out.square().sum(), xs[:1], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        d_q.sum().backward()


def test_only_requested_gradients(backend):
    xs = make(4, 4, 2, 6, 8)
    for wanted in range(4):
        leaves = [x.clone().requires_grad_(i == wanted) for i, x in enumerate(xs)]
        fk.crossbatch_attention(*leaves, cross_batch_range=2, backend=backend).sum().backward()
        assert all((x.grad is not None) == (i == wanted) for i, x in enumerate(leaves))


@pytest.mark.parametrize(("batch", "length"), [(0, 5), (2, 0)])
def test_empty_inputs(backend, batch, length):
    xs = [x.requires_grad_() for x in make(batch, 2, 1, length, 8)]
    out = fk.crossbatch_attention(*xs, cross_batch_range=2, backend=backend)
    assert out.shape == xs[0].shape
    out.sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in xs)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (numel) any op returns."""

    def __init__(self, ignore_dtypes=()):
        super().__init__()
        self.largest, self.op, self.ignore_dtypes = 0, None, ignore_dtypes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.dtype not in self.ignore_dtypes and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return result


@pytest.mark.parametrize("name", ["streaming", "cpu", "cpu-pytorch-kernels", "triton", "reference"])
def test_no_gathered_memory_nor_scores(name, monkeypatch):
    # B=4, Hkv=Hq=1, L=32, D=4, d=3, BLOCK=8: query rows, gradients: 512 elements; score blocks
    # [B, 1, L, BLOCK]: 1024; the gathered memory [B, 1, d * L, D]: 1536; the local scores
    # [B, 1, L, L]: 4096. Forward and backward may hold nothing above 1024 (the reference must).
    if name.startswith("cpu"):
        _use_cpu_kernels("ext" if name == "cpu" else "torch", monkeypatch)
    if name == "triton":
        pytest.importorskip("triton")
    monkeypatch.setattr(streaming, "BLOCK", 8)
    batch, length, head_dim, d = 4, 32, 4, 3
    xs = [x.requires_grad_() for x in make(batch, 1, 1, length, head_dim)]
    bound = batch * length * max(head_dim, streaming.BLOCK)
    assert bound < batch * d * length * head_dim
    # the Triton interpreter moves each kernel argument to and from numpy as uint8 views of its
    # storage (the tensor's own bytes, counted as elements); nothing else of the composition is uint8
    ignore = (torch.uint8,) if name == "triton" else ()
    with _LargestTensor(ignore) as probe:
        out = fk.crossbatch_attention(*xs, cross_batch_range=d, backend=name.split("-")[0])
        torch.autograd.grad(out, xs, torch.randn(out.shape))
    if name == "reference":
        assert probe.largest > bound  # the probe sees what the oracle materialises
    else:
        assert probe.largest <= bound, f"{probe.op} returned {probe.largest} elements (bound {bound})"


# --------------------------------------------------------------------------------------------
# Dispatch, compile, validation
# --------------------------------------------------------------------------------------------


def test_dispatch(monkeypatch):
    xs = make(2, 2, 1, 4, 8)
    assert crossbatch._pick("auto", *xs)[0] == "cpu"
    assert crossbatch._pick("auto", *(x.double() for x in xs))[1] is streaming.TORCH_KERNELS  # C++: no f64
    with pytest.raises(fk.BackendUnavailableError, match="cuda"):
        fk.crossbatch_attention(*xs, cross_batch_range=1, backend="cuda")
    # auto follows backends.auto_order (on GPUs: triton, cuda, streaming)
    seen = []
    monkeypatch.setattr(crossbatch, "auto_order", lambda device_type: seen.append(device_type) or ("streaming",))
    assert crossbatch._pick("auto", *xs)[0] == "streaming" and seen == ["cpu"]


def test_dispatch_triton():
    pytest.importorskip("triton")
    from fot_kernels.backends import triton as triton_backend

    xs = make(2, 2, 1, 4, 8)
    assert crossbatch._pick("triton", *xs) == ("triton", triton_backend.kernels())
    assert triton_backend.kernels().grad_ops.flash_scan_backward is triton_backend.flash_scan_backward
    with pytest.raises(fk.BackendUnavailableError, match="triton: query dtype float64 not served"):
        fk.crossbatch_attention(*(x.double() for x in xs), cross_batch_range=1, backend="triton")
    wide = make(2, 2, 1, 3, 200)
    with pytest.raises(fk.BackendUnavailableError, match="triton: fp32 or mixed-dtype attention with head_dim 200"):
        fk.crossbatch_attention(*wide, cross_batch_range=1, backend="triton")
    # bf16 at head dim 200: the forward is served; gradients (fp32 backward products) are not
    wide = [x.bfloat16() for x in wide]
    assert crossbatch._pick("triton", *wide)[0] == "triton"
    with pytest.raises(fk.BackendUnavailableError, match="triton: gradients: fp32 or mixed-dtype attention"):
        fk.crossbatch_attention(*(x.requires_grad_() for x in wide), cross_batch_range=1, backend="triton")


def test_torch_compile_fullgraph():
    # the C++ custom ops (the streaming backend's PyTorch kernels trace too, 2x slower to compile)
    from fot_kernels.backends import _cpu_ext

    name = "cpu"
    if not _cpu_ext.load():  # loaded outside the traced region
        pytest.skip(f"C++ CPU extension unavailable: {_cpu_ext.unavailable_reason()}")
    xs = make(4, 4, 2, 6, 8)
    mask = torch.rand(4, 6) > 0.2

    def f(q, k, v, mk, m):
        kw = dict(cross_batch_range=2, dataset_packing=2, cross_batch_stepping=True, key_padding_mask=m)
        return fk.crossbatch_attention(q, k, v, mk, backend=name, **kw) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*xs, mask), f(*xs, mask))
    leaves = [x.clone().requires_grad_() for x in xs]
    grads = torch.autograd.grad(compiled(*leaves, mask).sum(), leaves)
    leaves = [x.clone().requires_grad_() for x in xs]
    for g, g_eager in zip(grads, torch.autograd.grad(f(*leaves, mask).sum(), leaves)):
        torch.testing.assert_close(g, g_eager)


def _bad_inputs():
    q, k, v, mk = make(4, 4, 2, 5, 8)
    good = dict(query=q, key=k, value=v, mem_keys=mk, cross_batch_range=2)
    cases = [
        (dict(query=q.numpy()), TypeError, "query"),
        (dict(query=q.int()), TypeError, "query"),
        (dict(key=k[0]), ValueError, "key"),
        (dict(mem_keys=mk[:, :, :4]), ValueError, "mem_keys"),
        (dict(value=v[:2]), ValueError, "value"),
        (dict(query=q[:, :, :, :4]), ValueError, "key"),
        (dict(key=k[:, :1], value=v[:, :1]), ValueError, "mem_keys"),
        (dict(query=q[:, :3]), ValueError, "query heads"),
        (dict(query=q[..., :0], key=k[..., :0], value=v[..., :0], mem_keys=mk[..., :0]), ValueError, "head dim"),
        (dict(key=k.to("meta")), ValueError, "key must be on the same device"),
        (dict(cross_batch_range=0), ValueError, "cross_batch_range"),
        (dict(cross_batch_range=True), TypeError, "cross_batch_range"),
        (dict(cross_batch_range=1.5), TypeError, "cross_batch_range"),
        (dict(dataset_packing=0), ValueError, "dataset_packing"),
        (dict(dataset_packing=3), ValueError, "dataset_packing must divide"),
        (dict(dataset_packing=True), TypeError, "dataset_packing"),
        (dict(cross_batch_stepping=1), TypeError, "cross_batch_stepping"),
        (dict(key_padding_mask=torch.ones(4, 5)), TypeError, "key_padding_mask"),
        (dict(key_padding_mask=torch.ones(4, 6, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (dict(key_padding_mask=[[True] * 5] * 4), TypeError, "key_padding_mask"),
        (dict(key_padding_mask=torch.ones(4, 5, dtype=torch.bool, device="meta")), ValueError, "key_padding_mask"),
        (dict(softmax_scale=math.nan), ValueError, "softmax_scale"),
        (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
        (dict(softmax_scale="1"), TypeError, "softmax_scale"),
        (dict(backend="nope"), ValueError, "backend"),
        (dict(backend=1), TypeError, "backend"),
    ]
    return [({**good, **change}, exc, match) for change, exc, match in cases]


@pytest.mark.parametrize(("kwargs", "exc", "match"), _bad_inputs())
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fk.crossbatch_attention(**kwargs)
