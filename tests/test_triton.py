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

from conftest import DEVICE

from fot_kernels import ops
from fot_kernels.backends import reference as R
from fot_kernels.backends import triton as TB
from fot_kernels.testing import assert_close_to_reference, check_knn

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)

from _inputs import make_case

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _knn(case_or_q, mk, k, *, lengths=None, mask=None, splits=None):
    return TB.knn_topk(case_or_q, mk, k, mem_lengths=lengths, mem_mask=mask, splits=splits)


def _attn(c, *, topk, causal=True, scale=None, local=True, splits=None):
    scale = c.query.shape[-1] ** -0.5 if scale is None else scale
    key, value = (c.key, c.value) if local else (None, None)
    return TB.memory_attention(c.query, key, value, c.mem_keys, c.mem_values, topk=topk, causal=causal,
                               softmax_scale=scale, mem_lengths=c.mem_lengths, mem_mask=c.mem_mask,
                               splits=splits)  # fmt: skip


def _reference_pair(c, *, topk, causal=True, scale=None, local=True):
    """(float64 oracle, reference in the inputs' own precision)."""
    scale = c.query.shape[-1] ** -0.5 if scale is None else scale
    out = []
    for case in (c.to(torch.float64), c):
        key, value = (case.key, case.value) if local else (None, None)
        out.append(R.memory_attention(case.query, key, value, case.mem_keys, case.mem_values, topk=topk,
                                      causal=causal, softmax_scale=scale, mem_lengths=case.mem_lengths,
                                      mem_mask=case.mem_mask))  # fmt: skip
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
                  dtype=dtype, mem_dtype=mem_dtype, lengths=lengths, mask=mask, device=DEVICE,
                  strided_memory=True)  # fmt: skip
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
    """NaN keys are never selected and do not disturb other slots; a valid slot scoring exactly
    -inf is not selected either (docs/DESIGN.md 3.2), even with k above the number of finite candidates:
    the tail is (-inf, -1) padding."""
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
    assert not (indices == 7).any() and not (indices[:, 1] == 20).any() and not (indices == 30).any()
    assert torch.equal(indices.cpu(), ref_i.cpu())
    torch.testing.assert_close(scores.cpu(), ref_s.cpu(), atol=1e-5, rtol=1e-5)
    n_finite = torch.tensor([[33, 32], [38, 37]], device=DEVICE)[..., None]  # valid minus NaN and -inf slots
    assert torch.equal((indices >= 0).sum(-1), n_finite.expand(-1, -1, 3))


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
                  dtype=dtype, mem_dtype=mem_dtype, lengths=True, mask=True, device=DEVICE,
                  strided_memory=True)  # fmt: skip
    _check_attention(c, topk=topk, causal=causal)


@pytest.mark.parametrize("topk", [None, 5], ids=["dense", "knn"])
def test_knn_attention_memory_only(poison_empty, topk):
    c = make_case(q_heads=4, kv_heads=2, len_q=5, len_k=None, slots=70, head_dim=48, dtype=BF16, lengths=True,
                  device=DEVICE)  # fmt: skip
    _check_attention(c, topk=topk, local=False, scale=0.3)


@pytest.mark.parametrize(
    "q_heads,kv_heads,head_dim,dtype,mem_dtype",
    [(4, 2, 100, F32, F32), (4, 1, 48, BF16, BF16), (2, 2, 33, F32, BF16)],
)  # fmt: skip
def test_selected_attention_over_given_slots(poison_empty, q_heads, kv_heads, head_dim, dtype, mem_dtype):
    """``selected_attention`` (the distributed op's per-rank kNN partial attention): the softmax over
    slots chosen elsewhere, with holes (-1, and slot numbers past M: another rank's), a NaN key in a
    selected slot (dropped) and a row whose every slot is a hole (0, -inf), against the PyTorch
    gather over exact scores in float64 and in the inputs' precision."""
    from fot_kernels.backends import streaming

    c = make_case(q_heads=q_heads, kv_heads=kv_heads, len_q=7, len_k=None, slots=40, head_dim=head_dim, dtype=dtype,
                  mem_dtype=mem_dtype, device=DEVICE, strided_memory=True)  # fmt: skip
    batch, k, rows = 2, 6, (q_heads // kv_heads) * 7
    gen = torch.Generator().manual_seed(5)
    selection = torch.stack([torch.randperm(40, generator=gen)[:k] for _ in range(batch * kv_heads * rows)])
    selection = selection.view(batch, kv_heads, rows, k)
    selection[torch.rand(selection.shape, generator=gen) < 0.3] = -1
    selection[0, 0, 1, 0] = 45  # past M: not this shard's
    selection[1, -1, 2] = -1  # a row with no slot
    c.mem_keys[0, 0, int(selection[0, 0, 3, 1].clamp_min(0))] = float("nan")
    selection = selection.to(DEVICE)
    scale = head_dim**-0.5
    out, lse = TB.selected_attention(c.query, c.mem_keys, c.mem_values, selection, softmax_scale=scale)
    expected = []
    for dt in (torch.float64, torch.float32):
        q_rows = c.query.to(dt).reshape(batch, kv_heads, rows, head_dim)
        ok = (selection >= 0) & (selection < 40)
        keys = c.mem_keys.to(dt).gather(2, selection.clamp(0, 39).flatten(2)[..., None].expand(-1, -1, -1, head_dim))
        scores = (keys.view(batch, kv_heads, rows, k, head_dim) * q_rows[:, :, :, None]).sum(-1)
        scores = scores.masked_fill(~ok | ~torch.isfinite(scores), float("-inf"))
        sel = selection.masked_fill(~ok, -1)
        o, lse_ref = streaming.gather_attention_torch(scores, sel, c.mem_values.to(dt), scale)
        expected.append((o.reshape(out.shape), lse_ref.reshape(lse.shape)))
    assert out.dtype == lse.dtype == torch.float32
    assert_close_to_reference(out.cpu(), expected[0][0].cpu(), expected[1][0].cpu(), name="out")
    assert_close_to_reference(lse.cpu(), expected[0][1].cpu(), expected[1][1].cpu(), name="lse")
    dead = lse.reshape(batch, kv_heads, rows)[1, -1, 2]
    assert torch.isneginf(dead) and (out.reshape(batch, kv_heads, rows, -1)[1, -1, 2] == 0).all()
    empty_out, empty_lse = TB.selected_attention(c.query, c.mem_keys[:, :, :0], c.mem_values[:, :, :0], selection,
                                                 softmax_scale=scale)  # fmt: skip
    assert (empty_out == 0).all() and torch.isneginf(empty_lse).all()
    with pytest.raises(ValueError, match="selection must be int64"):
        TB.selected_attention(c.query, c.mem_keys, c.mem_values, selection[:, :, :-1], softmax_scale=scale)


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
    out, _ = _check_attention(c, topk=topk)
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
    q16 = torch.randn(1, 2, 3, 128, device=DEVICE).bfloat16()
    mk16 = torch.randn(1, 2, 10, 128, device=DEVICE).bfloat16()
    assert TB.unsupported_reasons("memory_attention", q16, mk16, mem_values=mk16, topk=128) == []
    assert TB.unsupported_reasons("memory_attention", q16, mk16, mem_values=mk16, topk=129) != []
    wide = torch.randn(1, 2, 3, 300, device=DEVICE)
    wide_mk = torch.randn(1, 2, 4, 300, device=DEVICE)
    assert any("head_dim 300" in r for r in TB.unsupported_reasons("knn_topk", wide, wide_mk))
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


# ------------------------------------------------------------ non-finite scores (docs/DESIGN.md 3.2)

INF, NAN = float("inf"), float("nan")


def _fp32_keep(q, keys):
    """Whether each unscaled score of q [B, Hq, Lq, D] against keys [B, Hkv, N, D] is finite, decided
    in fp32 as the kernels score -> bool [B, Hq, Lq, N]. A row with a NaN/inf element scores
    non-finite against every partner (inf * 0 is NaN), so it is dropped outright; finite rows are
    multiplied, and a product that overflows fp32 is dropped too."""
    k = keys.float().repeat_interleave(q.shape[1] // keys.shape[1], 1)
    q_ok, k_ok = torch.isfinite(q).all(-1), torch.isfinite(k).all(-1)
    s = torch.where(q_ok[..., None], q.float(), 0.0) @ torch.where(k_ok[..., None], k, 0.0).transpose(-1, -2)
    return torch.isfinite(s) & q_ok[..., :, None] & k_ok[..., None, :]


def _expected_attention(c, *, topk, causal=True, dtype=torch.float64):
    """The contract's output from first principles: one softmax, computed in ``dtype``, over the
    candidates kept under the fp32 drop rule (kNN: the reference's fp32 selection). Non-finite
    values only sit at non-finite keys in these tests, and those value rows are never read.
    Returns (out in the query's dtype, lse fp32/fp64)."""
    batch, heads, len_q, head_dim = c.query.shape
    rep = heads // c.mem_keys.shape[1]
    q = c.query.to(dtype)
    parts = []  # (keep [B, Hq, Lq, N], keys, values)
    if c.key is not None:
        keep = _fp32_keep(c.query, c.key)
        if causal:
            keep &= R.causal_allowed(len_q, c.key.shape[2], c.query.device)
        parts.append((keep, c.key, c.value))
    keep = _fp32_keep(c.query, c.mem_keys)
    keep &= R.valid_slots(batch, c.mem_keys.shape[2], c.mem_lengths, c.mem_mask, c.query.device)[:, None, None, :]
    if topk is not None:
        _, idx = R.knn_topk(c.query, c.mem_keys, topk, mem_lengths=c.mem_lengths, mem_mask=c.mem_mask)
        chosen = torch.zeros_like(keep)
        chosen.scatter_(-1, idx.clamp_min(0), idx >= 0)
        keep &= chosen
    parts.append((keep, c.mem_keys, c.mem_values))
    logits, weighted = [], []
    for keep, keys, values in parts:
        k = torch.nan_to_num(keys.to(dtype), 0.0, 0.0, 0.0).repeat_interleave(rep, 1)
        v = torch.nan_to_num(values.to(dtype), 0.0, 0.0, 0.0).repeat_interleave(rep, 1)
        s = torch.nan_to_num(q, 0.0, 0.0, 0.0) @ k.transpose(-1, -2) * head_dim**-0.5
        logits.append(torch.where(keep, s, -INF))
        weighted.append((keep, v))
    all_logits = torch.cat(logits, -1)
    lse = torch.logsumexp(all_logits, -1)
    p = torch.exp(all_logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out, start = 0.0, 0
    for keep, v in weighted:
        out = out + torch.where(keep, p[..., start : start + keep.shape[-1]], 0.0) @ v
        start += keep.shape[-1]
    return out.to(c.query.dtype), lse


def _check_nonfinite(c, *, topk, causal=True, splits=None, reference=True):
    """Kernel against the first-principles expectation (2x rule, float64 vs fp32), NaN-free; and
    against the reference pair when its float64 run drops the same candidates (``reference``)."""
    out, lse = _attn(c, topk=topk, causal=causal, splits=splits)
    pairs = [(_expected_attention(c, topk=topk, causal=causal),
              _expected_attention(c, topk=topk, causal=causal, dtype=torch.float32))]  # fmt: skip
    if reference:
        pairs.append(_reference_pair(c, topk=topk, causal=causal))
    for (o_hi, l_hi), (o_lo, l_lo) in pairs:
        assert_close_to_reference(out.cpu(), o_hi.cpu(), o_lo.cpu(), name="out")
        assert_close_to_reference(lse.cpu(), l_hi.cpu(), l_lo.float().cpu(), name="lse")
    return out, lse


def _poison(keys, values, slots):
    """Non-finite keys at ``slots`` (4 of them), with non-finite values (an fp16 overflow upstream
    makes both): +inf element, -inf element (the rest zero: the score is exactly +-inf), a NaN
    element, and an inf element among finite ones."""
    a, b, n, m = slots
    keys[:, :, a] = 0.0
    keys[:, :, a, 0] = INF
    keys[:, :, b] = 0.0
    keys[:, :, b, 1] = -INF
    keys[:, :, n, 3] = NAN
    keys[:, :, m, 2] = INF
    values[:, :, a] = INF
    values[:, :, b] = -INF
    values[:, :, n] = NAN
    values[:, :, m, 5] = INF


def _poison_queries(q):
    """A NaN query row and an inf query row (batch row 0): every score of both is non-finite."""
    q[0, 1, 2, 4] = NAN
    q[0, -1, -1, 0] = INF


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
def test_knn_non_finite_scores_are_never_selected(poison_empty, dtype, splits):
    """+inf, -inf and NaN scores (non-finite keys in several tiles and splits, NaN/inf query rows,
    a finite key whose score overflows fp32 for some queries only) are never selected; the -inf
    ones not even when a row has fewer than k finite candidates."""
    c = make_case(q_heads=4, kv_heads=2, len_q=5, len_k=None, slots=150, head_dim=16, dtype=dtype, device=DEVICE)
    q, mk, mv = c.query.clone(), c.mem_keys.clone(), c.mem_values.clone()
    _poison(mk, mv, (3, 70, 100, 140))
    mk[:, :, 120, 0] = 1e30  # finite (in fp32/bf16): scores ~1e30, +-inf for the 1e9 queries below
    q[:, :, 1, 0] = 1e9
    q[:, :, 3, 0] = -1e9
    _poison_queries(q)
    lengths = torch.tensor([150, 20], device=DEVICE)  # batch row 1: 19 finite candidates < k (slot 3 is +-inf)
    scores, indices = _knn(q, mk, 24, lengths=lengths, splits=splits)
    ref_s, ref_i = R.knn_topk(q, mk, 24, mem_lengths=lengths)
    keep = _fp32_keep(q, mk)
    picked = indices >= 0
    assert keep.gather(-1, indices.clamp_min(0))[picked].all(), "a non-finite score was selected"
    assert torch.isfinite(scores[picked]).all() and torch.isneginf(scores[~picked]).all()
    assert not picked[0, 1, 2].any() and not picked[0, -1, -1].any()  # NaN / inf query rows
    # batch row 1: every finite candidate and nothing else (fp16: the 1e9 queries are inf rows)
    assert torch.equal(picked[1].sum(-1), torch.where(torch.isfinite(q[1]).all(-1), 19, 0))
    assert torch.equal(indices.cpu(), ref_i.cpu())
    torch.testing.assert_close(scores.cpu(), ref_s.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "topk,splits,dtype",
    [(None, None, F32), (None, None, BF16), (None, None, F16), (6, 1, F32), (6, 3, BF16), (6, 3, F16), (6, 1, F16)],
    ids=["dense-fp32", "dense-bf16", "dense-fp16", "knn-fp32", "knn-bf16-splits3", "knn-fp16-splits3", "knn-fp16"],
)
def test_non_finite_keys_are_dropped_in_attention(poison_empty, topk, splits, dtype):
    """Local and memory keys scoring +inf, -inf or NaN contribute nothing, their inf/NaN values
    included; NaN/inf query rows and rows whose every candidate is dropped give out 0, lse -inf."""
    c = make_case(q_heads=4, kv_heads=2, len_q=6, len_k=10, slots=150, head_dim=16, dtype=dtype, lengths=True,
                  mask=True, device=DEVICE)  # fmt: skip
    _poison(c.mem_keys, c.mem_values, (3, 70, 100, 140))
    _poison(c.key, c.value, (1, 4, 6, 9))  # row i sees local keys j <= i + 4
    _poison_queries(c.query)
    c.mem_keys[1, :, :, 7] = INF  # batch row 1: every memory key non-finite ...
    c.mem_values[1, :, ::2] = NAN
    c.key[1, :, :, 0] = NAN  # ... and every local key: nothing to attend to
    out, lse = _check_nonfinite(c, topk=topk, splits=splits)
    empty = torch.zeros_like(lse, dtype=torch.bool)
    empty[0, 1, 2] = empty[0, -1, -1] = empty[1] = True
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[~empty]).all()


@pytest.mark.parametrize(
    "topk,dtype", [(None, F32), (None, BF16), (5, F32), (5, BF16)],
    ids=["dense-fp32", "dense-bf16", "knn-fp32", "knn-bf16"],
)  # fmt: skip
def test_score_overflowing_for_some_queries_only(poison_empty, topk, dtype):
    """A finite key with a 1e30 element (memory and local) scores about 1 for ordinary queries
    (whose element there is 1e-30) and overflows fp32 to +-inf for queries with a 1e9 element
    there: dropped for those rows only. The drop is decided on the fp32 score, so the expectation
    is computed from first principles (the float64 reference does not overflow)."""
    c = make_case(q_heads=2, kv_heads=1, len_q=6, len_k=10, slots=90, head_dim=16, dtype=dtype, device=DEVICE)
    c.mem_keys[..., :2] = 0.0
    c.key[..., :2] = 0.0
    c.mem_keys[:, :, 40, 0] = 1e30
    c.key[:, :, 9, 1] = 1e30  # row i sees local keys j <= i + 4: only row 5 sees key 9
    c.query[..., :2] = 1e-30
    c.query[:, :, 1, 0] = 1e9  # memory slot 40 scores +inf
    c.query[:, :, 3, 0] = -1e9  # -inf
    c.query[:, 0, 5, 1] = 1e9  # local key 9 scores +inf (query head 0), -inf (head 1)
    c.query[:, 1, 5, 1] = -1e9
    out, lse = _check_nonfinite(c, topk=topk, reference=False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("topk", [None, 4], ids=["dense", "knn"])
def test_row_without_candidates_reads_no_value(poison_empty, topk):
    """An inf value at a finite key reaches every row that attends to it (inf out, never a silent
    finite one), but not a row of the same tile with no candidate at all (a NaN query): 0, -inf."""
    c = make_case(q_heads=2, kv_heads=1, len_q=4, len_k=8, slots=20, head_dim=16, device=DEVICE)
    c.value[:, :, 3] = INF
    c.query[0, 0, 1, 2] = NAN
    out, lse = _attn(c, topk=topk, causal=False)
    empty = torch.zeros_like(lse, dtype=torch.bool)
    empty[0, 0, 1] = True
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    assert torch.isposinf(out[~empty]).all() and torch.isfinite(lse[~empty]).all()


# ------------------------------------------------------------------------------ launcher guards


def test_local_and_memory_kv_heads_must_match(poison_empty):
    """The kernels index local keys with the memory's kv head: the launcher refuses other shapes
    even when called directly (the public ops' validation rejects them first)."""
    c = make_case(q_heads=4, kv_heads=2, len_q=3, len_k=5, slots=20, head_dim=16, device=DEVICE)
    key, value = c.key[:, :1], c.value[:, :1]
    with pytest.raises(ValueError, match=r"\(2, 1, 5, 16\).*\(2, 2, 20, 16\)"):
        TB.memory_attention(c.query, key, value, c.mem_keys, c.mem_values, topk=None, causal=True, softmax_scale=0.25,
                            mem_lengths=None, mem_mask=None)  # fmt: skip
    with pytest.raises(ValueError, match="kv heads"):
        ops.memory_attention(c.query, key, value, c.mem_keys, c.mem_values, backend="triton")


@pytest.mark.parametrize("topk", [None, 4], ids=["dense", "knn"])
def test_inputs_requiring_grad_get_fused_gradients(poison_empty, topk, monkeypatch):
    """Inputs that require grad are served through fot_kernels.autograd with the fused backward
    kernels (docs/DESIGN.md 3.4), never with an output detached from the graph: the PyTorch backward
    ops are not called, and the gradients match the float64 reference (tests/test_gradients.py and
    tests/test_triton_backward.py check them in depth)."""
    from fot_kernels.backends import streaming

    for name in ("flash_scan_backward_torch", "gather_attention_backward_torch"):
        monkeypatch.setattr(streaming.TORCH_GRAD_KERNELS, name.removesuffix("_torch"), None)
    c = make_case(q_heads=2, kv_heads=1, len_q=3, len_k=4, slots=30, head_dim=16, device=DEVICE)
    assert TB.unsupported_reasons("memory_attention", c.query, c.mem_keys, topk=topk, needs_grad=True) == []
    leaves = [t.clone().requires_grad_() for t in (c.query, c.key, c.value, c.mem_keys, c.mem_values)]
    out = ops.memory_attention(*leaves, topk=topk, backend="triton")
    assert out.grad_fn is not None
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    hi = [t.detach().double().requires_grad_() for t in leaves]
    ref = torch.autograd.grad(R.memory_attention(*hi, topk=topk)[0], hi, torch.ones_like(hi[0]))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r.float(), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert not ops.memory_attention(*leaves, topk=topk, backend="triton").requires_grad


# ------------------------------------------------------ flash_scan: the op-shaped forward launcher


def _scan_inputs(batch, heads, n_rows, slots, head_dim, dtype, mem_dtype, lengths, mask):
    """Stacked rows [B, Hkv, N, D], keys/values [B, Hkv, M, D] (fresh random), optional lengths
    (one row with none, one past M) and a mask."""
    rows = torch.randn(batch, heads, n_rows, head_dim, device=DEVICE).to(dtype)
    keys, values = (torch.randn(batch, heads, slots, head_dim, device=DEVICE).to(mem_dtype) for _ in range(2))
    lens = None
    if lengths:
        lens = torch.randint(1, slots + 1, (batch,), device=DEVICE)
        lens[0], lens[-1] = 0, slots + 5
    valid = (torch.rand(batch, slots, device=DEVICE) > 0.3) if mask else None
    return rows, keys, values, lens, valid


def _check_flash_scan(rows, keys, values, lens, valid, scale, causal_lq):
    """The launcher against ``flash_scan_torch`` in float64 (the oracle) and in the kernels' own
    precision (fp32 products; rounded to the operands' dtype where every operand is fp16/bf16, the
    precision of the native path's P)."""
    from fot_kernels.backends.streaming import flash_scan_torch

    out, lse = TB.flash_scan(rows, keys, values, lens, valid, scale, causal_lq)
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == rows.shape and lse.shape == rows.shape[:3]
    o_hi, l_hi = flash_scan_torch(rows.double(), keys.double(), values.double(), lens, valid, scale, causal_lq)
    o_lo, l_lo = flash_scan_torch(rows, keys, values, lens, valid, scale, causal_lq)
    if rows.dtype == keys.dtype == values.dtype and rows.dtype in (F16, BF16):
        o_lo = o_lo.to(rows.dtype)
    assert_close_to_reference(out.cpu(), o_hi.cpu(), o_lo.cpu(), name="out")
    assert_close_to_reference(lse.cpu(), l_hi.cpu(), l_lo.cpu(), name="lse")
    return out, lse


@pytest.mark.parametrize(
    "batch,heads,group,len_q,slots,head_dim,causal,dtype,mem_dtype,lengths,mask",
    [
        (2, 2, 3, 5, 37, 16, False, F32, F32, True, True),  # dense, GQA-stacked rows, lengths + mask
        (2, 1, 2, 4, 70, 100, False, F32, BF16, True, False),  # D 100, bf16 memory with fp32 rows
        (3, 2, 1, 9, 21, 16, False, BF16, BF16, False, True),  # native bf16 path
        (2, 2, 2, 6, 6, 16, True, F32, F32, False, False),  # causal, M = causal_lq (crossbatch's local part)
        (2, 1, 3, 5, 9, 16, True, F16, F16, False, True),  # causal, M > causal_lq (bottom-right), mask
        (2, 2, 2, 7, 4, 100, True, F32, F32, True, True),  # causal, M < causal_lq (rows with no key), D 100
        (3, 1, 2, 8, 8, 100, True, F32, BF16, True, True),  # causal, bf16 keys with fp32 rows, lengths + mask
    ],
)  # fmt: skip
def test_flash_scan_matches_reference(poison_empty, batch, heads, group, len_q, slots, head_dim, causal, dtype,
                                      mem_dtype, lengths, mask):  # fmt: skip
    inputs = _scan_inputs(batch, heads, group * len_q, slots, head_dim, dtype, mem_dtype, lengths, mask)
    _check_flash_scan(*inputs, 0.7 / head_dim**0.5, len_q if causal else 0)


def test_flash_scan_strided_views(poison_empty):
    """Batch-slice views of keys/values (crossbatch's memory parts: no copy) and rows that are not
    contiguous in (head, row) (the causal path's [B, Hkv * G, Lq, D] view needs a copy of them)."""
    rows, keys, values, _, valid = _scan_inputs(4, 2, 2 * 5, 5, 16, F32, F32, False, True)
    _check_flash_scan(rows[1:], keys[:3], values[:3], None, valid[:3], 0.3, 0)
    strided = rows.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, Hkv, D] memory
    assert not strided.is_contiguous()
    _check_flash_scan(strided, keys, values, None, valid, 0.3, 5)
    _check_flash_scan(strided[2:], keys[:2], values[:2], torch.tensor([5, 2], device=DEVICE), None, 0.3, 0)


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_flash_scan_non_finite_keys_and_rows(poison_empty, causal, dtype):
    """Keys scoring +-inf or NaN are dropped with their inf/NaN values; invalid slots' NaN values
    are never read; NaN/inf rows and rows left with nothing give (0, -inf)."""
    len_q = 6
    rows, keys, values, _, valid = _scan_inputs(2, 2, 2 * len_q, 8, 16, dtype, dtype, False, True)
    _poison(keys, values, (0, 3, 5, 7))
    valid[:, 1] = False
    values[:, :, 1] = NAN  # an invalid slot's value: never read
    rows[0, 1, 2, 4] = NAN
    rows[0, 0, 7, 0] = INF
    valid[1] = False  # batch row 1: nothing valid
    out, lse = _check_flash_scan(rows, keys, values, None, valid, 0.25, len_q if causal else 0)
    empty = torch.zeros_like(lse, dtype=torch.bool)
    empty[0, 1, 2] = empty[0, 0, 7] = True
    empty[1] = True
    if causal:  # query i sees keys j <= i + 2: query 0 (rows 0 and len_q) keeps key 2 alone, if valid
        assert (torch.isfinite(lse[0, :, [0, len_q]]) == valid[0, 2]).all()
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    assert torch.isfinite(out).all()


def test_flash_scan_edges_and_kernels(poison_empty):
    """Empty memory and empty rows; causal_lq must divide the rows; ``kernels()`` serves the
    launchers (forward and backward) with rows in the query's dtype."""
    rows, keys, values, _, _ = _scan_inputs(2, 1, 6, 4, 16, F32, F32, False, False)
    out, lse = TB.flash_scan(rows, keys[:, :, :0], values[:, :, :0], None, None, 0.5, 0)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out, lse = TB.flash_scan(rows[:, :, :0], keys, values, None, None, 0.5, 3)
    assert out.shape == (2, 1, 0, 16) and lse.shape == (2, 1, 0)
    with pytest.raises(ValueError, match="causal_lq 4 must be 0 or divide the 6 rows"):
        TB.flash_scan(rows, keys, values, None, None, 0.5, 4)
    with pytest.raises(ValueError, match="keys"):
        TB.flash_scan(rows, keys[:, :, :, :8], values[:, :, :, :8], None, None, 0.5, 0)
    kernels = TB.kernels()
    assert kernels.ops.flash_scan is TB.flash_scan
    assert kernels.grad_ops.flash_scan_backward is TB.flash_scan_backward
    assert kernels.grad_ops.gather_attention_backward is TB.gather_attention_backward
    assert kernels.row_dtype(rows.bfloat16(), keys) == BF16
