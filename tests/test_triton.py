"""Triton backend against the reference oracle.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, and
the kernels run on the CPU through the Triton interpreter: shapes here are small on purpose. On a
GPU the same tests run the compiled kernels on CUDA tensors.

Tolerances follow flash-attention's rule (fot_kernels.testing.assert_close_to_reference): the
kernel's error against the float64 reference is at most 2x the error of the reference run in the
kernel's own precision, plus a small floor. kNN results are checked with fot_kernels.testing.check_knn
(exact top-k against float64 scores, free only among rounding-level near-ties); where ties are
constructed on purpose the indices must equal the reference's exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from conftest import DEVICE  # noqa: E402

from fot_kernels import ops  # noqa: E402
from fot_kernels.backends import reference as R  # noqa: E402
from fot_kernels.backends import triton as TB  # noqa: E402
from fot_kernels.testing import assert_close_to_reference, check_knn  # noqa: E402

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)

from _inputs import make_case  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _knn(case_or_q, mk, k, *, lengths=None, mask=None, splits=None):
    return TB.knn_topk(case_or_q, mk, k, mem_lengths=lengths, mem_mask=mask, splits=splits)


def _attn(c, *, topk, causal=True, scale=None, local=True, splits=None):
    scale = c.query.shape[-1] ** -0.5 if scale is None else scale
    key, value = (c.key, c.value) if local else (None, None)
    return TB.memory_attention(c.query, key, value, c.mem_keys, c.mem_values, topk=topk, causal=causal,
                               softmax_scale=scale, mem_lengths=c.mem_lengths, mem_mask=c.mem_mask, splits=splits)  # fmt: skip


def _reference_pair(c, *, topk, causal=True, scale=None, local=True):
    """(float64 oracle, reference in the inputs' own precision)."""
    scale = c.query.shape[-1] ** -0.5 if scale is None else scale
    out = []
    for case in (c.to(torch.float64), c):
        key, value = (case.key, case.value) if local else (None, None)
        out.append(R.memory_attention(case.query, key, value, case.mem_keys, case.mem_values, topk=topk, causal=causal,
                                      softmax_scale=scale, mem_lengths=case.mem_lengths, mem_mask=case.mem_mask))  # fmt: skip
    return out


def _check_attention(c, *, topk, causal=True, scale=None, local=True, splits=None):
    out, lse = _attn(c, topk=topk, causal=causal, scale=scale, local=local, splits=splits)
    (o_hi, l_hi), (o_lo, l_lo) = _reference_pair(c, topk=topk, causal=causal, scale=scale, local=local)
    assert out.dtype == c.query.dtype and lse.dtype == torch.float32
    assert_close_to_reference(out.cpu(), o_hi.cpu(), o_lo.cpu(), name="out")
    assert_close_to_reference(lse.cpu(), l_hi.cpu(), l_lo.float().cpu(), name="lse")
    return out, lse


# ----------------------------------------------------------------------------------------- knn_topk


@pytest.mark.parametrize(
    "q_heads,kv_heads,len_q,slots,head_dim,k,dtype,mem_dtype,lengths,mask",
    [
        (2, 2, 5, 150, 64, 8, F32, None, False, False),
        (4, 2, 7, 200, 100, 16, BF16, None, True, True),  # LongLLaMA 3B head dim, GQA
        (4, 1, 1, 130, 128, 40, F16, None, False, True),  # decode, GQA rows packed into one tile
        (2, 1, 9, 97, 17, 1, F32, None, True, False),  # odd head dim, k = 1
        (2, 2, 3, 120, 59, 5, F32, BF16, True, True),  # fp32 query, bf16 memory: no upcast copy
        (3, 3, 4, 70, 33, 100, BF16, None, True, True),  # k > every row's valid slots
    ],
)
def test_knn_topk_matches_reference(poison_empty, q_heads, kv_heads, len_q, slots, head_dim, k, dtype, mem_dtype,
                                    lengths, mask):  # fmt: skip
    c = make_case(q_heads=q_heads, kv_heads=kv_heads, len_q=len_q, len_k=None, slots=slots, head_dim=head_dim,
                  dtype=dtype, mem_dtype=mem_dtype, lengths=lengths, mask=mask, device=DEVICE, strided_memory=True)  # fmt: skip
    scores, indices = _knn(c.query, c.mem_keys, k, lengths=c.mem_lengths, mask=c.mem_mask)
    check_knn(scores, indices, c.query, c.mem_keys, k, mem_lengths=c.mem_lengths, mem_mask=c.mem_mask)


def test_knn_memory_splits_merge_exactly(poison_empty):
    """Splitting the memory across programs (+ the merge kernel) gives bit-identical results."""
    c = make_case(q_heads=4, kv_heads=2, len_q=6, len_k=None, slots=300, head_dim=40, lengths=True, mask=True,
                  device=DEVICE)  # fmt: skip
    one = _knn(c.query, c.mem_keys, 20, lengths=c.mem_lengths, mask=c.mem_mask, splits=1)
    many = _knn(c.query, c.mem_keys, 20, lengths=c.mem_lengths, mask=c.mem_mask, splits=4)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    check_knn(*many, c.query, c.mem_keys, 20, mem_lengths=c.mem_lengths, mem_mask=c.mem_mask)


def test_knn_ties_keep_lower_index(poison_empty):
    """Duplicated keys (also across tiles and splits) tie exactly: the lower index comes first."""
    c = make_case(q_heads=2, kv_heads=1, len_q=4, len_k=None, slots=160, head_dim=16, device=DEVICE)
    mk = c.mem_keys.clone()
    mk[:, :, 100] = mk[:, :, 3]
    mk[:, :, 150] = mk[:, :, 3]
    mk[:, :, 70:80] = mk[:, :, 10:11]  # a run of ten equal keys
    mk[:, :, 5] = 0.0  # scores +0.0 and (for some rows) -0.0 tie too
    mk[:, :, 6] = -0.0
    for splits in (1, 3):
        scores, indices = _knn(c.query, mk, 24, splits=splits)
        ref_s, ref_i = R.knn_topk(c.query, mk, 24)
        assert torch.equal(indices.cpu(), ref_i.cpu())
        torch.testing.assert_close(scores.cpu(), ref_s.cpu(), atol=1e-5, rtol=1e-5)


def test_knn_nan_and_neg_inf_scores(poison_empty):
    """NaN keys are never selected and do not disturb other slots; a valid slot scoring -inf is
    selected after every finite one and before the (-inf, -1) padding."""
    c = make_case(q_heads=2, kv_heads=2, len_q=3, len_k=None, slots=40, head_dim=8, device=DEVICE)
    q = c.query.clone()
    q[..., 0] = q[..., 0].abs() + 0.5  # so that a key (-inf, 0, ...) scores exactly -inf
    mk = c.mem_keys.clone()
    mk[:, :, 7, 2] = float("nan")
    mk[:, 1, 20] = float("nan")
    mk[:, :, 30] = 0.0
    mk[:, :, 30, 0] = float("-inf")
    lengths = torch.tensor([35, 40], device=DEVICE)
    scores, indices = _knn(q, mk, 40, lengths=lengths)
    ref_s, ref_i = R.knn_topk(q, mk, 40, mem_lengths=lengths)
    assert not (indices == 7).any() and not (indices[:, 1] == 20).any()
    assert torch.equal(indices.cpu(), ref_i.cpu())
    torch.testing.assert_close(scores.cpu(), ref_s.cpu(), atol=1e-5, rtol=1e-5)
    n_valid = (indices >= 0).sum(-1)
    last = indices.gather(-1, (n_valid - 1)[..., None])[..., 0]
    assert (last == 30).all()  # the -inf slot is the last selected one


def test_knn_empty_memory_and_zero_lengths(poison_empty):
    q = torch.randn(2, 2, 3, 24, device=DEVICE)
    scores, indices = _knn(q, torch.randn(2, 1, 0, 24, device=DEVICE), 4)
    assert torch.isneginf(scores).all() and (indices == -1).all()
    mk = torch.randn(2, 1, 50, 24, device=DEVICE)
    lengths = torch.tensor([0, 50], device=DEVICE)
    scores, indices = _knn(q, mk, 4, lengths=lengths)
    assert torch.isneginf(scores[0]).all() and (indices[0] == -1).all()
    check_knn(scores, indices, q, mk, 4, mem_lengths=lengths)


# ---------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("topk", [None, 6], ids=["dense", "knn"])
@pytest.mark.parametrize(
    "q_heads,kv_heads,len_q,len_k,slots,head_dim,dtype,mem_dtype,causal",
    [
        (2, 2, 9, 12, 100, 64, F32, None, True),
        (4, 2, 20, 20, 150, 100, BF16, None, True),  # LongLLaMA 3B head dim, GQA
        (2, 1, 1, 30, 90, 128, F16, None, True),  # decode
        (2, 2, 17, 5, 60, 33, F32, BF16, True),  # Lq > Lk: early rows see no local key; bf16 memory
        (2, 1, 6, 11, 80, 24, BF16, None, False),
    ],
)
def test_memory_attention_matches_reference(poison_empty, topk, q_heads, kv_heads, len_q, len_k, slots, head_dim,
                                            dtype, mem_dtype, causal):  # fmt: skip
    c = make_case(q_heads=q_heads, kv_heads=kv_heads, len_q=len_q, len_k=len_k, slots=slots, head_dim=head_dim,
                  dtype=dtype, mem_dtype=mem_dtype, lengths=True, mask=True, device=DEVICE, strided_memory=True)  # fmt: skip
    _check_attention(c, topk=topk, causal=causal)


@pytest.mark.parametrize("topk", [None, 5], ids=["dense", "knn"])
def test_knn_attention_memory_only(poison_empty, topk):
    c = make_case(q_heads=4, kv_heads=2, len_q=5, len_k=None, slots=70, head_dim=48, dtype=BF16, lengths=True,
                  device=DEVICE)  # fmt: skip
    _check_attention(c, topk=topk, local=False, scale=0.3)


def test_rows_without_candidates_give_zero_and_neg_inf(poison_empty):
    """Memory fully masked, and Lq > Lk so that early rows see no local key: out 0, lse -inf."""
    c = make_case(q_heads=2, kv_heads=1, len_q=6, len_k=3, slots=40, head_dim=16, device=DEVICE)
    c.mem_mask = torch.zeros(2, 40, dtype=torch.bool, device=DEVICE)
    for topk in (None, 4):
        out, lse = _check_attention(c, topk=topk)
        assert (out[:, :, :3] == 0).all() and torch.isneginf(lse[:, :, :3]).all()
        out, lse = _attn(c, topk=topk, local=False)
        assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("topk", [None, 8], ids=["dense", "knn"])
def test_nan_memory_key_is_dropped(poison_empty, topk):
    c = make_case(q_heads=2, kv_heads=2, len_q=4, len_k=6, slots=50, head_dim=20, device=DEVICE)
    c.mem_keys[:, :, 11, 3] = float("nan")
    out, lse = _check_attention(c, topk=topk)
    assert not torch.isnan(out).any()


def test_empty_memory(poison_empty):
    c = make_case(q_heads=2, kv_heads=2, len_q=5, len_k=7, slots=0, head_dim=32, device=DEVICE)
    for topk in (None, 3):
        _check_attention(c, topk=topk)


def test_memory_splits_in_attention(poison_empty):
    c = make_case(q_heads=2, kv_heads=1, len_q=4, len_k=4, slots=200, head_dim=32, lengths=True, device=DEVICE)
    a = _attn(c, topk=12, splits=1)
    b = _attn(c, topk=12, splits=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- dispatch, reasons


def test_public_ops_dispatch_to_triton(poison_empty):
    c = make_case(q_heads=2, kv_heads=1, len_q=3, len_k=4, slots=30, head_dim=16, device=DEVICE)
    out, lse = ops.memory_attention(c.query, c.key, c.value, c.mem_keys, c.mem_values, topk=4, return_lse=True,
                                    backend="triton")  # fmt: skip
    ref_out, ref_lse = R.memory_attention(c.query, c.key, c.value, c.mem_keys, c.mem_values, topk=4)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    scores, indices = ops.knn_topk(c.query, c.mem_keys, 5, backend="triton")
    check_knn(scores, indices, c.query, c.mem_keys, 5)


def test_unsupported_reasons(monkeypatch):
    q = torch.randn(1, 2, 3, 16, device=DEVICE)
    mk = torch.randn(1, 2, 10, 16, device=DEVICE)
    assert TB.unsupported_reasons("knn_topk", q, mk, topk=4) == []
    assert any("> 256" in r for r in TB.unsupported_reasons("knn_topk", q, mk, topk=300))
    assert any("float64" in r for r in TB.unsupported_reasons("knn_topk", q.double(), mk))
    # fp32 products keep at most 64 on chip; bf16 at D = 128 up to 128
    assert any("not served on chip" in r for r in TB.unsupported_reasons("knn_topk", q, mk, topk=100))
    q16, mk16 = torch.randn(1, 2, 3, 128, device=DEVICE).bfloat16(), torch.randn(1, 2, 10, 128, device=DEVICE).bfloat16()
    assert TB.unsupported_reasons("memory_attention", q16, mk16, mem_values=mk16, topk=128) == []
    assert TB.unsupported_reasons("memory_attention", q16, mk16, mem_values=mk16, topk=129) != []
    wide = torch.randn(1, 2, 3, 300, device=DEVICE)
    assert any("head_dim 300" in r for r in TB.unsupported_reasons("knn_topk", wide, torch.randn(1, 2, 4, 300, device=DEVICE)))
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        assert any("TRITON_INTERPRET" in r for r in TB.unsupported_reasons("knn_topk", q, mk, topk=4))


@pytest.mark.parametrize("topk", [None, 4])
def test_invalid_slot_with_nan_value_does_not_poison(poison_empty, topk):
    """Unused store capacity may hold anything: an invalid slot (masked, or past mem_lengths)
    whose key and value are NaN contributes exactly nothing."""
    c = make_case(q_heads=2, kv_heads=2, len_q=6, len_k=6, slots=64, head_dim=16, mask=True, lengths=True,
                  device=DEVICE)  # fmt: skip
    c.mem_mask[0, :3] = False
    c.mem_lengths[0] = 50
    run = lambda: ops.memory_attention(c.query, c.key, c.value, c.mem_keys, c.mem_values, topk=topk,  # noqa: E731
                                      backend="triton", **c.memory_kwargs())  # fmt: skip
    clean = run()
    for slot in (1, 55):  # masked; beyond mem_lengths
        c.mem_values[0, :, slot] = float("nan")
        c.mem_keys[0, :, slot] = float("nan")
    out = run()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, rtol=0, atol=0)
