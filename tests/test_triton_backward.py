"""The Triton backward kernels (fot_kernels/backends/triton/_backward.py) called through their
op-shaped launchers ``flash_scan_backward`` and ``gather_attention_backward``.

Each launcher is checked against (1) the float64 autograd of the reference backend over the same
part (its own lse as the merged lse, delta = rowsum(dO * O) - dlse), and (2) the PyTorch versions in
``backends.streaming`` (same signatures and drop rules). Tolerances follow flash-attention's rule
(``assert_close_to_reference``): within 2x the error of the PyTorch version run in the inputs' own
precision, plus a small floor. Outputs are allocated NaN-poisoned (``poison_empty``), so an element a
kernel forgets to write fails. Without CUDA the kernels run under TRITON_INTERPRET=1 (small shapes).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from conftest import DEVICE

from fot_kernels.backends import reference as R
from fot_kernels.backends import streaming as S
from fot_kernels.backends import triton as TB
from fot_kernels.testing import assert_close_to_reference

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
INF, NAN = float("inf"), float("nan")


def _rnd(*shape, dtype=F32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _stack(x, kv_heads):
    """[B, Hq, Lq, ...] -> stacked rows [B, Hkv, G * Lq, ...] (what the composition passes)."""
    return x.reshape(x.shape[0], kv_heads, -1, *x.shape[3:])


def _unstack(x, q_heads):
    return x.reshape(x.shape[0], q_heads, -1, *x.shape[3:])


def _part_grads(query, keys, values, *, topk=None, causal=False, scale, lengths=None, mask=None):
    """Float64 autograd of the reference over ONE part: the memory part (dense or kNN) or, with
    ``causal``, the local part alone. Returns the launcher's inputs (stacked d_out, lse, delta and
    the selection) and the float64 gradients (dq [B, Hq, Lq, D], dk, dv)."""
    batch, head_dim, kv_heads = query.shape[0], query.shape[3], keys.shape[1]
    leaves = [t.detach().to(F64).requires_grad_() for t in (query, keys, values)]
    q, k, v = leaves
    if causal:
        empty = k.new_zeros(batch, kv_heads, 0, head_dim)
        out, lse = R.memory_attention(q, k, v, empty, empty, causal=True, softmax_scale=scale)
    else:
        out, lse = R.memory_attention(q, None, None, k, v, topk=topk, softmax_scale=scale, mem_lengths=lengths,
                                      mem_mask=mask)  # fmt: skip
    d_out, d_lse = _rnd(*out.shape).to(F64), _rnd(*lse.shape).to(F64)
    dead = torch.isneginf(lse)
    grads = torch.autograd.grad([out, lse.masked_fill(dead, 0)], leaves, [d_out, d_lse])
    delta = ((d_out * out).sum(-1) - d_lse).masked_fill(dead, 0)  # the composition zeroes dead rows
    d_out = d_out.masked_fill(dead[..., None], 0)
    indices = None
    if topk is not None:
        indices = _stack(R.knn_topk(q.detach(), k.detach(), topk, mem_lengths=lengths, mem_mask=mask)[1], kv_heads)
    args = {"d_out": _stack(d_out, kv_heads).float(), "lse": _stack(lse.detach(), kv_heads).float(),
            "delta": _stack(delta.detach(), kv_heads).float(), "indices": indices}  # fmt: skip
    return args, grads


def _flash(rows, keys, values, a, *, scale, causal_lq=0, lengths=None, mask=None, need_dkv=True, torch_version=False):
    fn = S.flash_scan_backward_torch if torch_version else TB.flash_scan_backward
    return fn(rows, keys, values, a["d_out"], a["lse"], a["delta"], lengths, mask, scale, causal_lq, need_dkv)


def _gather(rows, keys, values, a, *, scale, need_dkv=True, torch_version=False):
    fn = S.gather_attention_backward_torch if torch_version else TB.gather_attention_backward
    return fn(rows, a["indices"], keys, values, a["d_out"], a["lse"], a["delta"], scale, need_dkv)


def _check(mine, ref64, lo, query, keys, values, *, low_products):
    """mine/lo: the launcher's and the PyTorch version's (dq stacked, dk, dv); ref64: float64 (dq
    [B, Hq, ...], dk, dv). dq is compared in the query's dtype when the products run natively in
    fp16/bf16 (the composition casts it to the query dtype)."""
    q_heads = query.shape[1]
    dq, dk, dv = mine
    assert dq.dtype == F32 and dk.dtype == keys.dtype and dv.dtype == values.dtype
    assert dq.shape == (*_stack(query, keys.shape[1]).shape,) and dk.shape == keys.shape and dv.shape == values.shape
    out_dtype = query.dtype if low_products else F32
    assert_close_to_reference(_unstack(dq, q_heads).to(out_dtype).cpu(), ref64[0].cpu(),
                              _unstack(lo[0], q_heads).to(out_dtype).cpu(), "dq")  # fmt: skip
    assert_close_to_reference(dk.cpu(), ref64[1].cpu(), lo[1].cpu(), "dk")
    assert_close_to_reference(dv.cpu(), ref64[2].cpu(), lo[2].cpu(), "dv")


DENSE = {
    # id: (B, Hq, Hkv, Lq, M, D, query dtype, memory dtype, lengths/mask, causal)
    "d16-gqa-lengths-mask": (2, 4, 2, 5, 45, 16, F32, F32, True, False),
    "d1": (1, 2, 1, 6, 21, 1, F32, F32, False, False),
    "d100-causal-lq<lk": (1, 2, 1, 7, 19, 100, F32, F32, False, True),
    "d128-causal-lq>lk": (1, 2, 2, 20, 9, 128, F32, F32, False, True),
    "fp32q-bf16mem-d64": (1, 4, 2, 6, 40, 64, F32, BF16, True, False),
    "fp32q-fp16mem-d24": (2, 2, 1, 5, 33, 24, F32, F16, True, False),
    "bf16-d64-causal": (1, 4, 2, 9, 37, 64, BF16, BF16, False, True),
    "fp16-d100": (1, 2, 1, 6, 50, 100, F16, F16, True, False),
    "bf16-d256-causal": (1, 2, 1, 5, 21, 256, BF16, BF16, False, True),
}


@pytest.mark.parametrize("name", list(DENSE))
def test_flash_scan_backward_matches_reference_autograd(poison_empty, name):
    batch, q_heads, kv_heads, len_q, slots, head_dim, dtype, mem_dtype, validity, causal = DENSE[name]
    query = _rnd(batch, q_heads, len_q, head_dim, dtype=dtype)
    keys, values = (_rnd(batch, kv_heads, slots, head_dim, dtype=mem_dtype) for _ in range(2))
    lengths = mask = None
    if validity:
        lengths = torch.randint(slots // 2, slots + 1, (batch,), device=DEVICE)
        lengths[0] = slots - 3  # unused capacity after the last valid slot
        mask = torch.rand(batch, slots, device=DEVICE) > 0.25
        values[:, :, slots - 2] = NAN  # never read: beyond every length
        keys[:, :, slots - 1, 0] = INF
    scale = 0.7 / head_dim**0.5
    a, ref64 = _part_grads(query, keys, values, causal=causal, scale=scale, lengths=lengths, mask=mask)
    rows = _stack(query, kv_heads)
    kw = dict(scale=scale, causal_lq=len_q if causal else 0, lengths=lengths, mask=mask)
    mine = _flash(rows, keys, values, a, **kw)
    lo = _flash(rows, keys, values, a, **kw, torch_version=True)
    low = dtype == mem_dtype and dtype in (F16, BF16)
    _check(mine, ref64, lo, query, keys, values, low_products=low)
    # and against the PyTorch version evaluated in float64 (same drop rules, same merged-lse inputs)
    hi = _flash(rows.to(F64), keys.to(F64), values.to(F64), {k: v.to(F64) for k, v in a.items() if v is not None},
                **kw, torch_version=True)  # fmt: skip
    _check(mine, (_unstack(hi[0], q_heads), hi[1], hi[2]), lo, query, keys, values, low_products=low)


KNN = {
    # id: (B, Hq, Hkv, Lq, M, D, k, query dtype, memory dtype, lengths/mask)
    "d16-gqa-padding": (2, 4, 2, 5, 30, 16, 6, F32, F32, True),
    "d1-shared-slots": (1, 4, 1, 9, 5, 1, 4, F32, F32, False),
    "d100": (1, 2, 1, 6, 40, 100, 5, F32, F32, True),
    "d128-heavy-sharing": (1, 4, 2, 12, 7, 128, 5, F32, F32, False),
    "fp32q-bf16mem-d64": (1, 4, 2, 6, 30, 64, 4, F32, BF16, True),
    "bf16-d64": (2, 2, 1, 5, 25, 64, 3, BF16, BF16, True),
    "fp16-d256": (1, 2, 1, 4, 20, 256, 4, F16, F16, False),
}


@pytest.mark.parametrize("name", list(KNN))
def test_gather_attention_backward_matches_reference_autograd(poison_empty, name):
    batch, q_heads, kv_heads, len_q, slots, head_dim, k, dtype, mem_dtype, validity = KNN[name]
    query = _rnd(batch, q_heads, len_q, head_dim, dtype=dtype)
    keys, values = (_rnd(batch, kv_heads, slots, head_dim, dtype=mem_dtype) for _ in range(2))
    lengths = mask = None
    if validity:  # batch row 1 has fewer valid slots than k: its selection ends in -1 padding
        lengths = torch.tensor([slots] + [k - 2] * (batch - 1), device=DEVICE)
        mask = torch.rand(batch, slots, device=DEVICE) > 0.2
        mask[:, : k - 2] = True
    scale = head_dim**-0.5
    a, ref64 = _part_grads(query, keys, values, topk=k, scale=scale, lengths=lengths, mask=mask)
    if validity and batch > 1:
        assert (a["indices"][1] < 0).any(), "the case must exercise -1 padding"
    rows = _stack(query, kv_heads)
    mine = _gather(rows, keys, values, a, scale=scale)
    lo = _gather(rows, keys, values, a, scale=scale, torch_version=True)
    _check(mine, ref64, lo, query, keys, values, low_products=False)  # fp32 products for every dtype
    dk, dv = mine[1:]
    sel = a["indices"].flatten(2)
    hits = torch.zeros(batch, kv_heads, slots, dtype=torch.int64, device=DEVICE)
    selected = hits.scatter_add_(2, sel.clamp_min(0), (sel >= 0).long()) > 0  # padding adds 0
    assert (dk[~selected] == 0).all() and (dv[~selected] == 0).all()


def test_launchers_without_dkv_and_empty_inputs(poison_empty):
    query = _rnd(1, 2, 4, 16)
    keys, values = _rnd(1, 1, 12, 16), _rnd(1, 1, 12, 16)
    a, _ = _part_grads(query, keys, values, scale=0.25)
    rows = _stack(query, 1)
    dq, dk, dv = _flash(rows, keys, values, a, scale=0.25, need_dkv=False)
    assert dk.numel() == 0 and dv.numel() == 0
    full = _flash(rows, keys, values, a, scale=0.25)
    assert torch.equal(dq, full[0])
    a_knn, _ = _part_grads(query, keys, values, topk=3, scale=0.25)
    dq, dk, dv = _gather(rows, keys, values, a_knn, scale=0.25, need_dkv=False)
    assert dk.numel() == 0 and dv.numel() == 0 and torch.isfinite(dq).all()
    # no keys: dq is exactly zero, dk/dv are empty like the keys
    none = keys[:, :, :0]
    dq, dk, dv = _flash(rows, none, none, a, scale=0.25)
    assert (dq == 0).all() and dk.shape == none.shape and dv.shape == none.shape
    # k = 0 selected slots
    a_knn["indices"] = a_knn["indices"][..., :0]
    dq, dk, dv = _gather(rows, keys, values, a_knn, scale=0.25)
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def _non_finite_inputs(dtype):
    """Rows with a zeroed (formerly non-finite) query and rows with lse -inf, keys with NaN/inf
    elements and NaN/inf values at dropped keys and at invalid slots."""
    batch, kv_heads, n_rows, slots, head_dim = 2, 2, 10, 40, 16
    rows = _rnd(batch, kv_heads, n_rows, head_dim, dtype=dtype)
    keys, values = (_rnd(batch, kv_heads, slots, head_dim, dtype=dtype) for _ in range(2))
    keys[0, 0, 3] = NAN
    values[0, 0, 3] = NAN
    keys[0, 1, 5, 2] = INF
    keys[1, 0, 6, 0] = -INF
    values[1, 0, 6] = INF
    values[:, :, 35:] = NAN  # invalid slots (lengths 35)
    keys[:, :, 35:] = INF
    keys[1, 1, 9, :2] = 1e30  # finite key whose score overflows fp32 for rows with a 1e9 element
    rows[1, 1, :, :2] = 1e-30
    rows[1, 1, 4, 0] = 1e9
    rows[0, 0, 2] = 0  # a non-finite query row, zeroed by the composition
    lengths = torch.tensor([35, 35], device=DEVICE)
    lse = S.flash_scan_torch(rows, keys, values, lengths, None, 0.3, 0)[1]  # P <= 1, as from a forward
    lse[0, 0, 2] = lse[1, 0, 7] = -INF
    d_out = torch.randn(batch, kv_heads, n_rows, head_dim, device=DEVICE)
    delta = torch.randn(batch, kv_heads, n_rows, device=DEVICE)
    d_out[0, 0, 2] = d_out[1, 0, 7] = 0
    delta[0, 0, 2] = delta[1, 0, 7] = 0
    return rows, keys, values, {"d_out": d_out, "lse": lse, "delta": delta}, lengths


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy on inf/NaN
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_non_finite_inputs_follow_the_pytorch_versions(poison_empty, dtype):
    rows, keys, values, a, lengths = _non_finite_inputs(dtype)
    kw = dict(scale=0.3, lengths=lengths)
    mine = _flash(rows, keys, values, a, **kw)
    lo = _flash(rows, keys, values, a, **kw, torch_version=True)
    hi = _flash(rows.to(F64), keys.to(F64), values.to(F64), {k: v.to(F64) for k, v in a.items()}, **kw,
                torch_version=True)  # fmt: skip
    for name, m, h, lo_ in zip(("dq", "dk", "dv"), mine, hi, lo):
        assert torch.isfinite(m).all(), name
        out_dtype = dtype if name == "dq" else m.dtype
        assert_close_to_reference(m.to(out_dtype).cpu(), h.cpu(), lo_.to(out_dtype).cpu(), name)
    dq, dk, dv = mine
    assert (dq[0, 0, 2] == 0).all() and (dq[1, 0, 7] == 0).all()  # dead rows
    for b, h, j in ((0, 0, 3), (0, 1, 5), (1, 0, 6)):
        assert (dk[b, h, j] == 0).all() and (dv[b, h, j] == 0).all()
    assert (dk[:, :, 35:] == 0).all() and (dv[:, :, 35:] == 0).all()
    # kNN: a selection pointing at dropped keys (possible only through this direct call) gives them
    # P = 0 and zero gradients, like the PyTorch version
    n = rows.shape[2]
    sel = torch.randint(0, 35, (2, 2, n, 6), device=DEVICE)
    sel[0, 0, :, 0], sel[0, 1, :, 1], sel[1, 0, :, 2], sel[1, 1, :, 3] = 3, 5, 6, 9
    sel[..., 5] = -1
    a["indices"] = sel
    mine = _gather(rows, keys, values, a, scale=0.3)
    lo = _gather(rows, keys, values, a, scale=0.3, torch_version=True)
    a64 = {k: v.to(F64) if v.is_floating_point() else v for k, v in a.items()}
    hi = _gather(rows.to(F64), keys.to(F64), values.to(F64), a64, scale=0.3, torch_version=True)
    for name, m, h, lo_ in zip(("dq", "dk", "dv"), mine, hi, lo):
        assert torch.isfinite(m).all(), name
        ok = torch.isfinite(h)  # the PyTorch version lets 0 * inf of a dropped key reach dq as NaN
        out_dtype = dtype if name == "dq" else m.dtype
        assert_close_to_reference(m.to(out_dtype)[ok].cpu(), h[ok].cpu(), lo_.to(out_dtype)[ok].cpu(), name)
    dq, dk, dv = mine
    for b, h, j in ((0, 0, 3), (0, 1, 5), (1, 0, 6)):
        assert (dk[b, h, j] == 0).all() and (dv[b, h, j] == 0).all()


def test_nan_value_at_a_kept_key_is_loud(poison_empty):
    """A NaN value at a finite, kept key reaches dq of the rows that keep it (never a silent finite
    gradient), but not the rows that do not see it (causal) nor dead rows."""
    query = _rnd(1, 2, 6, 16)
    keys, values = _rnd(1, 1, 6, 16), _rnd(1, 1, 6, 16)
    a, _ = _part_grads(query, keys, values, causal=True, scale=0.25)
    values[0, 0, 4] = NAN
    dq, dk, dv = _flash(_stack(query, 1), keys, values, a, scale=0.25, causal_lq=6)
    dq = _unstack(dq, 2)
    assert torch.isnan(dq[0, :, 4:]).all() and torch.isfinite(dq[0, :, :4]).all()
    assert torch.isfinite(dv).all() and torch.isfinite(dk[0, 0, 5]).all()


def test_backward_is_deterministic(poison_empty):
    """Two runs give the same bits: dense (no atomics) and kNN with every row sharing a few slots."""
    query = _rnd(1, 4, 24, 16)
    keys, values = _rnd(1, 2, 6, 16), _rnd(1, 2, 6, 16)
    rows = _stack(query, 2)
    a, _ = _part_grads(query, keys, values, topk=5, scale=0.25)
    runs = [_gather(rows, keys, values, a, scale=0.25) for _ in range(2)]
    runs += [_flash(rows, keys, values, a, scale=0.25) for _ in range(2)]
    for first, second in (runs[:2], runs[2:]):
        for x, y in zip(first, second):
            assert torch.equal(x, y)
    # the scatter sums exactly what the PyTorch version's index_add_ sums (up to fp32 rounding)
    lo = _gather(rows, keys, values, a, scale=0.25, torch_version=True)
    for x, y in zip(runs[0][1:], lo[1:]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_bad_accumulator_dtype_is_refused():
    rows, keys, values = _rnd(1, 1, 3, 16), _rnd(1, 1, 5, 16), _rnd(1, 1, 5, 16)
    d_out, lse, delta = _rnd(1, 1, 3, 16, dtype=F64), _rnd(1, 1, 3), _rnd(1, 1, 3)
    with pytest.raises(TypeError, match="d_out must be float32"):
        TB.flash_scan_backward(rows, keys, values, d_out, lse, delta, None, None, 0.25, 0, True)
    idx = torch.zeros(1, 1, 3, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError, match="lse must be float32"):
        TB.gather_attention_backward(rows, idx, keys, values, d_out.float(), lse.half(), delta, 0.25, True)
