"""Tests of the C++ CPU kernels of the ``torch.ops.fot.*`` ops (csrc/cpu) against straightforward float64 torch
code."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import fot_kernels as fk
from fot_kernels import _library, testing
from fot_kernels.backends import _cpu_ext, reference, streaming

from _inputs import make_case

if not _cpu_ext.load():
    pytest.skip(f"C++ CPU extension unavailable: {_cpu_ext.unavailable_reason()}", allow_module_level=True)

ops = _library.ops()
NEG_INF = float("-inf")
INF, NAN = float("inf"), float("nan")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """The ops fill their outputs with NaN / -7777 before the kernels run (FOT_KERNELS_CPU_POISON=1),
    so that an element a kernel forgets to write fails the test."""
    monkeypatch.setenv("FOT_KERNELS_CPU_POISON", "1")


# ---------------------------------------------------------------------------------------------
# helpers


def make_memory(B, H, M, D, dtype, *, strided=False, gen=None, values=None):
    """[B, H, M, D] memory with stride(-1) == 1; `strided` makes it a slice of a larger store with
    permuted batch/head strides (like a preallocated memory store)."""
    if values is None:
        values = torch.randn(B, H, M, D, generator=gen)
    values = values.to(dtype)
    if not strided:
        return values.contiguous()
    store = torch.randn(H, B, M + 9, D + 5, generator=gen).to(dtype)
    store[:, :, :M, :D] = values.transpose(0, 1)
    mem = store.transpose(0, 1)[:, :, :M, :D]
    assert mem.stride(-1) == 1
    return mem


def validity(B, M, mem_lengths, mem_mask):
    return reference.valid_slots(B, M, mem_lengths, mem_mask, "cpu")


def ref_scores(query, keys):
    """float64 scores of the exactly upcast keys, [B, H, N, M]."""
    return query.double() @ keys.float().double().transpose(-1, -2)


def kept_scores(query, keys):
    """float64 scores [B, H, N, M] and whether each is kept: its fp32 value is finite (docs/DESIGN.md 3.2:
    a NaN or +-inf unscaled score, from a non-finite query or key element or an fp32 overflow, is
    dropped). Test inputs keep finite scores far from the fp32 overflow threshold."""
    s = ref_scores(query, keys)
    return s, torch.isfinite(s.float())


def finite_keys(keys):
    """Bool [B, H, M]: key rows without a NaN/inf element."""
    return torch.isfinite(keys.float()).all(-1)


def ref_knn(query, keys, mem_lengths, mem_mask, k):
    """Exact top-k by float64 scores, non-finite (fp32) scores dropped, ties to the lower index."""
    B, _, _, M = *query.shape[:3], keys.shape[2]
    s, keep = kept_scores(query, keys)
    keep &= validity(B, M, mem_lengths, mem_mask)[:, None, None, :]
    ranked = s.masked_fill(~keep, NEG_INF)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :k]
    top_s, top_i = ranked.gather(-1, order), order.masked_fill(~keep.gather(-1, order), -1)
    pad = (*top_s.shape[:3], k - top_s.shape[-1])
    return torch.cat([top_s, top_s.new_full(pad, NEG_INF)], -1), torch.cat([top_i, top_i.new_full(pad, -1)], -1)


def random_mask(B, M, gen, p=0.8):
    m = torch.rand(B, M + 3, generator=gen) < p
    return m[:, 1 : M + 1]  # non-contiguous-offset view


def check_knn(query, keys, mem_lengths, mem_mask, k, scores, indices, *, exact=False):
    """The package's kNN checker (fot_kernels.testing.check_knn); with exact=True (inputs whose fp32
    products and sums are exact) the selection must also be the reference's, ties included."""
    testing.check_knn(scores, indices, query, keys, k, mem_lengths=mem_lengths, mem_mask=mem_mask)
    if exact:
        ref_s, ref_i = reference.knn_topk(query.double(), keys.double(), k, mem_lengths=mem_lengths, mem_mask=mem_mask)
        assert torch.equal(indices, ref_i), "selection differs from the exact reference"
        assert torch.equal(scores.double(), ref_s), "scores differ from the exact reference"


def ref_attention(query, keys, values, valid, scale, causal_lq):
    """float64 dense attention over candidates (valid, causally allowed, finite fp32 score); the
    values of invalid slots and of keys with a non-finite element are never read. (out, lse)."""
    s, keep = kept_scores(query, keys)
    s = s * scale
    B, H, N, _ = query.shape
    M = keys.shape[2]
    cand = valid[:, None, None, :].expand(B, H, N, M) & keep
    if causal_lq:
        pos = torch.arange(N) % causal_lq
        cand &= torch.arange(M)[None, :] <= (pos[:, None] + M - causal_lq)
    s = s.masked_fill(~cand, NEG_INF)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    unread = ~valid[:, None, :] | ~finite_keys(keys)
    v = values.float().double().masked_fill(unread[..., None], 0.0)
    out = p @ v
    out[lse == NEG_INF] = 0.0
    return out, lse


def check_attention(out, lse, ref_out, ref_lse, atol=2e-5):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    dead = ref_lse == NEG_INF
    assert (lse[dead] == NEG_INF).all() and (out[dead] == 0).all()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=1e-4)
    torch.testing.assert_close(lse.double()[~dead], ref_lse[~dead], atol=atol, rtol=1e-5)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------------------------
# knn_scan

KNN_CASES = [
    # B, H, N, M, D, k, dtype
    (1, 1, 1, 1, 1, 1, torch.float32),
    (2, 1, 3, 7, 3, 5, torch.float32),  # k < M
    (1, 2, 5, 7, 64, 32, torch.float32),  # k > M
    (2, 2, 17, 1000, 100, 32, torch.bfloat16),
    (1, 3, 15, 1000, 128, 100, torch.float16),
    (1, 1, 29, 3001, 256, 256, torch.float32),
    (2, 1, 9, 3001, 128, 5, torch.bfloat16),
    (1, 1, 4, 1000, 1, 1, torch.float16),
]


@pytest.mark.parametrize("B,H,N,M,D,k,dtype", KNN_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_knn_scan(B, H, N, M, D, k, dtype, masked, gen):
    query = torch.randn(B, H, N, D, generator=gen)
    keys = make_memory(B, H, M, D, dtype, strided=masked, gen=gen)
    lengths = mask = None
    if masked:
        lengths = torch.randint(0, M + 1, (B,), generator=gen)
        lengths[0] = M  # one full row, one random
        mask = random_mask(B, M, gen)
    scores, indices = ops.knn_scan(query, keys, lengths, mask, k)
    check_knn(query, keys, lengths, mask, k, scores, indices)


@pytest.mark.parametrize("D", [3, 64, 100])
def test_knn_scan_exact_ties(D, gen):
    # Small integers: fp32 sums are exact, so ties are exact and the selection is unique.
    B, H, N, M, k = 2, 2, 21, 777, 40
    query = torch.randint(-2, 3, (B, H, N, D), generator=gen).float()
    keys = torch.randint(-1, 2, (B, H, M, D), generator=gen).float()
    keys[:, :, 500:600] = keys[:, :, 100:200]  # duplicated rows: equal scores, lower index wins
    mask = random_mask(B, M, gen, p=0.9)
    lengths = torch.tensor([M, 650])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        scores, indices = ops.knn_scan(query, keys.to(dtype), lengths, mask, k)
        check_knn(query, keys.to(dtype), lengths, mask, k, scores, indices, exact=True)


def test_knn_scan_all_equal_keys(gen):
    M, k = 300, 37
    query = torch.randn(1, 1, 4, 16, generator=gen)
    keys = torch.randn(1, 1, 1, 16, generator=gen).expand(1, 1, M, 16)  # stride 0 rows
    scores, indices = ops.knn_scan(query, keys, None, None, k)
    assert (indices == torch.arange(k)).all()
    assert (scores == scores[..., :1]).all()


def test_knn_scan_nan_and_inf(gen):
    B, H, N, M, D, k = 1, 2, 6, 500, 32, 20
    query = torch.randn(B, H, N, D, generator=gen)
    keys = torch.randn(B, H, M, D, generator=gen)
    keys[0, :, 3, 5] = float("nan")  # NaN key: never selected, poisons nothing else
    keys[0, :, 10:400:7] = float("nan")
    keys[0, 1, 450] = 1e30  # +-inf scores depending on the query sign
    query[0, 0, 0] = float("nan")  # NaN query row: nothing selectable
    scores, indices = ops.knn_scan(query, keys, None, None, k)
    assert (indices[0, 0, 0] == -1).all() and (scores[0, 0, 0] == NEG_INF).all()
    check_knn(query, keys, None, None, k, scores, indices)


@pytest.mark.parametrize("N", [1, 12, 70])  # direct, stream, packed paths
def test_knn_scan_nonfinite_never_selected(N, gen):
    # Fewer finite candidates than k: slots whose score is -inf (overflow), +inf (overflow or an
    # inf key element) or NaN are padding, never selected after the finite ones.
    D = 8
    query = torch.ones(1, 1, N, D)
    keys = torch.randn(1, 1, 7, D, generator=gen)
    keys[0, 0, 1] = -1e38  # score -8e38: -inf in fp32
    keys[0, 0, 2] = 1e38  # +inf
    keys[0, 0, 3, 4] = NAN
    keys[0, 0, 4, 0] = INF
    keys[0, 0, 5, 6] = -INF
    scores, indices = ops.knn_scan(query, keys, None, None, 9)
    assert indices[0, 0, :, :2].sort(-1).values.tolist() == [[0, 6]] * N
    assert (indices[0, 0, :, 2:] == -1).all() and (scores[0, 0, :, 2:] == NEG_INF).all()
    assert torch.isfinite(scores[..., :2]).all()


def test_knn_scan_nothing_valid(gen):
    query = torch.randn(2, 1, 3, 10, generator=gen)
    keys = torch.randn(2, 1, 50, 10, generator=gen)
    lengths = torch.tensor([0, 50])
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1] = False
    scores, indices = ops.knn_scan(query, keys, lengths, mask, 4)
    assert (indices == -1).all() and (scores == NEG_INF).all()


# Row-count paths per work item: direct (N <= 8), stream (9 <= N <= 64: queries packed with rows in
# lanes, keys streamed; 1-4 groups of 16 rows), packed panels (N > 64). Cover their boundaries.
STREAM_NS = [3, 8, 9, 16, 17, 32, 33, 48, 49, 64, 65]


@pytest.mark.parametrize("N", STREAM_NS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_knn_scan_row_paths(N, dtype, gen):
    B, H, M, D, k = 2, 1, 1500, 100, 24  # B*H even: whole rows per work item
    query = torch.randn(B, H, N, D, generator=gen)
    keys = make_memory(B, H, M, D, dtype, strided=True, gen=gen)
    keys[0, :, 7, 3] = float("nan")  # NaN keys: never selected
    keys[1, :, 600:700:3] = float("nan")
    lengths = torch.tensor([M - 37, 1001])
    mask = random_mask(B, M, gen, p=0.85)
    scores, indices = ops.knn_scan(query, keys, lengths, mask, k)
    check_knn(query, keys, lengths, mask, k, scores, indices)


@pytest.mark.parametrize("N", [9, 17, 33, 64])
@pytest.mark.parametrize("D", [3, 128])
def test_knn_scan_row_paths_exact_ties(N, D, gen):
    B, H, M, k = 1, 2, 1300, 33
    query = torch.randint(-2, 3, (B, H, N, D), generator=gen).float()
    keys = torch.randint(-1, 2, (B, H, M, D), generator=gen).float()
    keys[:, :, 900:1000] = keys[:, :, 100:200]  # duplicated rows: equal scores, lower index wins
    mask = random_mask(B, M, gen, p=0.9)
    lengths = torch.tensor([M - 5])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        scores, indices = ops.knn_scan(query, keys.to(dtype), lengths, mask, k)
        check_knn(query, keys.to(dtype), lengths, mask, k, scores, indices, exact=True)


@pytest.mark.parametrize(
    "N,M,dtype",
    [(1, 40000, torch.bfloat16), (3, 40000, torch.bfloat16), (8, 40000, torch.bfloat16),
     (9, 20000, torch.float16), (40, 20000, torch.float16), (64, 20000, torch.float16)],
)  # fmt: skip
def test_knn_scan_memory_split(N, M, dtype, gen):
    # B*H = 1 with 2 threads: rows are chunked and/or the memory is split across threads and the
    # partial lists merged (direct path N <= 8, stream path 9..64).
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        D, k = 64, 50 if N <= 8 else 40
        query = torch.randn(1, 1, N, D, generator=gen)
        keys = torch.randn(1, 1, M, D, generator=gen).to(dtype)
        keys[0, 0, M - 5000 : M - 4900] = keys[0, 0, 100:200]  # cross-split ties
        query[0, 0, 0] = keys[0, 0, 150].float()
        mask = random_mask(1, M, gen, p=0.95)
        scores, indices = ops.knn_scan(query, keys, torch.tensor([M - 3]), mask, k)
        check_knn(query, keys, torch.tensor([M - 3]), mask, k, scores, indices)
    finally:
        torch.set_num_threads(old)


def test_knn_scan_row_paths_nan_query_rows(gen):
    # NaN query rows inside a 16-row lane group must not disturb their neighbours.
    B, H, N, M, D, k = 1, 2, 20, 700, 32, 10
    query = torch.randn(B, H, N, D, generator=gen)
    query[0, 0, 5] = float("nan")
    query[0, 1, 17] = float("nan")
    keys = torch.randn(B, H, M, D, generator=gen).bfloat16()
    keys[0, 1, 450] = 1e30  # +-inf scores
    scores, indices = ops.knn_scan(query, keys, None, None, k)
    assert (indices[0, 0, 5] == -1).all() and (indices[0, 1, 17] == -1).all()
    check_knn(query, keys, None, None, k, scores, indices)


# ---------------------------------------------------------------------------------------------
# flash_scan

FLASH_CASES = [
    # B, H, N, M, D, kdtype, vdtype
    (1, 1, 1, 1, 1, torch.float32, torch.float32),
    (2, 1, 7, 7, 3, torch.float32, torch.bfloat16),
    (1, 2, 33, 1000, 64, torch.bfloat16, torch.bfloat16),
    (2, 1, 20, 1000, 100, torch.float16, torch.float32),
    (1, 1, 29, 3001, 128, torch.float32, torch.float32),
    (1, 2, 5, 3001, 256, torch.bfloat16, torch.float16),
]


@pytest.mark.parametrize("B,H,N,M,D,kdtype,vdtype", FLASH_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_flash_scan_dense(B, H, N, M, D, kdtype, vdtype, masked, gen):
    query = torch.randn(B, H, N, D, generator=gen)
    keys = make_memory(B, H, M, D, kdtype, strided=masked, gen=gen)
    values = make_memory(B, H, M, D, vdtype, strided=masked, gen=gen)
    lengths = mask = None
    if masked:
        lengths = torch.randint(0, M + 1, (B,), generator=gen)
        lengths[-1] = M
        mask = random_mask(B, M, gen)
        # garbage in invalid slots must not leak into the output
        invalid = ~validity(B, M, lengths, mask)
        values.masked_fill_(invalid[:, None, :, None], float("nan"))
    scale = 1.0 / math.sqrt(D)
    out, lse = ops.flash_scan(query, keys, values, lengths, mask, scale, 0)
    ref_out, ref_lse = ref_attention(query, keys, values, validity(B, M, lengths, mask), scale, 0)
    check_attention(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("G,Lq,M,D", [(1, 1, 1, 8), (2, 7, 7, 3), (4, 37, 37, 64), (2, 100, 300, 100), (3, 50, 20, 32)])
def test_flash_scan_causal(G, Lq, M, D, gen):
    # bottom-right aligned: position i sees j <= i + M - Lq (rows with i < Lq - M see nothing)
    B, H = 2, 1
    N = G * Lq
    query = torch.randn(B, H, N, D, generator=gen)
    keys = make_memory(B, H, M, D, torch.float32, gen=gen)
    values = make_memory(B, H, M, D, torch.bfloat16, strided=True, gen=gen)
    scale = 0.3
    out, lse = ops.flash_scan(query, keys, values, None, None, scale, Lq)
    valid = torch.ones(B, M, dtype=torch.bool)
    ref_out, ref_lse = ref_attention(query, keys, values, valid, scale, Lq)
    check_attention(out, lse, ref_out, ref_lse)


def test_flash_scan_nan_keys_and_empty_rows(gen):
    B, H, N, M, D = 2, 1, 9, 600, 48
    query = torch.randn(B, H, N, D, generator=gen)
    keys = torch.randn(B, H, M, D, generator=gen)
    values = torch.randn(B, H, M, D, generator=gen)
    keys[:, :, 5, 0] = float("nan")  # NaN score: dropped like a masked slot
    keys[:, :, 300:320] = float("nan")
    values[:, :, 590:] = float("nan")  # invalid slots (beyond length) hold garbage
    lengths = torch.tensor([590, 0])  # batch 1: no valid slot at all
    out, lse = ops.flash_scan(query, keys, values, lengths, None, 0.125, 0)
    ref_out, ref_lse = ref_attention(query, keys, values.nan_to_num(0.0), validity(B, M, lengths, None), 0.125, 0)
    check_attention(out, lse, ref_out, ref_lse)
    assert (out[1] == 0).all() and (lse[1] == NEG_INF).all()


def test_flash_scan_exp_accuracy():
    # out[1] = e^a / (1 + e^a): for a << 0 this is exp(a) itself; compare to float64.
    a = torch.linspace(-85.0, 60.0, 2001)
    query = torch.stack([a, torch.zeros_like(a)], -1)[None, None]  # [1, 1, N, 2]
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0]])[None, None]
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]
    out, lse = ops.flash_scan(query, keys, values, None, None, 1.0, 0)
    a64 = a.double()
    ref1 = torch.sigmoid(a64)
    rel = ((out[0, 0, :, 1].double() - ref1).abs() / ref1).max().item()
    assert rel < 1e-6, rel
    ref_lse = torch.logaddexp(torch.zeros_like(a64), a64)
    assert (lse[0, 0].double() - ref_lse).abs().max().item() < 1e-5
    # and the fast exp against torch.exp directly on raw scores (one key, one value)
    x = torch.linspace(-87.0, 0.0, 4097)
    q2 = torch.stack([x, torch.ones_like(x)], -1)[None, None]
    k2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]  # scores x and 1
    v2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]
    o2, _ = ops.flash_scan(q2, k2, v2, None, None, 1.0, 0)
    # weights: [e^x, e^1] / (e^x + e) -> o2[...,0] / o2[...,1] = e^(x-1)
    ratio = (o2[0, 0, :, 0] / o2[0, 0, :, 1]).double()
    ref = torch.exp(x.double() - 1.0)
    mask = ref > 1e-37
    assert ((ratio[mask] - ref[mask]).abs() / ref[mask]).max().item() < 1e-6
    torch.testing.assert_close(ratio[mask].float(), torch.exp(x - 1.0)[mask], rtol=1e-6, atol=0)


@pytest.mark.parametrize("N,causal_lq", [(1, 0), (4, 0), (8, 8)])
def test_flash_scan_memory_split(N, causal_lq, gen):
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        M, D = 30000, 64
        query = torch.randn(1, 1, N, D, generator=gen)
        keys = torch.randn(1, 1, M, D, generator=gen).bfloat16()
        values = torch.randn(1, 1, M, D, generator=gen).half()
        mask = random_mask(1, M, gen, p=0.9)
        lengths = torch.tensor([M - 11])
        out, lse = ops.flash_scan(query, keys, values, lengths, mask, 0.2, causal_lq)
        ref_out, ref_lse = ref_attention(query, keys, values, validity(1, M, lengths, mask), 0.2, causal_lq)
        check_attention(out, lse, ref_out, ref_lse)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("N", STREAM_NS)
@pytest.mark.parametrize("kdtype,vdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                                           (torch.float16, torch.bfloat16)])
def test_flash_scan_row_paths(N, kdtype, vdtype, gen):
    B, H, M, D = 2, 1, 1100, 100
    query = torch.randn(B, H, N, D, generator=gen)
    keys = make_memory(B, H, M, D, kdtype, strided=True, gen=gen)
    values = make_memory(B, H, M, D, vdtype, gen=gen)
    keys[0, :, 9, 2] = float("nan")  # NaN score: dropped like a masked slot
    keys[1, :, 500:530] = float("nan")
    lengths = torch.tensor([M, 777])
    mask = random_mask(B, M, gen, p=0.85)
    valid = validity(B, M, lengths, mask)
    values.masked_fill_(~valid[:, None, :, None], float("nan"))  # garbage in invalid slots
    out, lse = ops.flash_scan(query, keys, values, lengths, mask, 0.1, 0)
    ref_out, ref_lse = ref_attention(query, keys, values.nan_to_num(0.0), valid, 0.1, 0)
    check_attention(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("G,Lq,M", [(3, 3, 600), (3, 11, 20), (4, 8, 300), (2, 32, 40), (1, 64, 513), (5, 13, 700)])
def test_flash_scan_row_paths_causal(G, Lq, M, gen):
    B, H, D = 1, 2, 48
    N = G * Lq
    query = torch.randn(B, H, N, D, generator=gen)
    keys = make_memory(B, H, M, D, torch.bfloat16, strided=True, gen=gen)
    values = make_memory(B, H, M, D, torch.float32, gen=gen)
    mask = random_mask(B, M, gen, p=0.9)
    valid = validity(B, M, None, mask)
    out, lse = ops.flash_scan(query, keys, values, None, mask, 0.2, Lq)
    ref_out, ref_lse = ref_attention(query, keys, values, valid, 0.2, Lq)
    check_attention(out, lse, ref_out, ref_lse)


# ---------------------------------------------------------------------------------------------
# gather_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,k", [(1, 1), (3, 5), (100, 32), (128, 100), (256, 7)])
def test_gather_attention(dtype, D, k, gen):
    B, H, N, M = 2, 2, 11, 300
    values = make_memory(B, H, M, D, dtype, strided=True, gen=gen)
    scores = torch.randn(B, H, N, k, generator=gen) * 3
    indices = torch.randint(0, M, (B, H, N, k), generator=gen)
    # padding tails (-inf, -1), a fully padded row, and a -inf score on a real slot
    scores[0, 0, 1, k // 2 :] = NEG_INF
    indices[0, 0, 1, k // 2 :] = -1
    scores[1, 1, 2] = NEG_INF
    indices[1, 1, 2] = -1
    scores[1, 0, 3, 0] = NEG_INF
    scale = 0.7
    out, lse = ops.gather_attention(scores, indices, values, scale)
    v = values.float().double()
    valid = indices >= 0
    x = (scores.double() * scale).masked_fill(~valid, NEG_INF)
    ref_lse = torch.logsumexp(x, -1)
    p = torch.exp(x - ref_lse[..., None]).nan_to_num(0.0)
    gathered = torch.stack(
        [torch.stack([v[b, h][indices[b, h].clamp(min=0)] for h in range(H)]) for b in range(B)]
    )  # [B, H, N, k, D]
    ref_out = (p[..., None] * gathered).sum(-2)
    ref_out[ref_lse == NEG_INF] = 0.0
    check_attention(out, lse, ref_out, ref_lse)
    assert (lse[1, 1, 2] == NEG_INF) and (out[1, 1, 2] == 0).all()


def test_knn_then_gather_matches_topk_attention(gen):
    B, H, N, M, D, k = 1, 2, 13, 2000, 100, 32
    query = torch.randn(B, H, N, D, generator=gen)
    keys = make_memory(B, H, M, D, torch.bfloat16, strided=True, gen=gen)
    values = make_memory(B, H, M, D, torch.bfloat16, gen=gen)
    scores, indices = ops.knn_scan(query, keys, None, None, k)
    out, lse = ops.gather_attention(scores, indices, values, 0.1)
    s = ref_scores(query, keys) * 0.1
    top, idx = s.topk(k, -1)
    ref_lse = torch.logsumexp(top, -1)
    p = torch.softmax(top, -1)
    v = values.float().double()
    ref_out = torch.stack([(p[0, h][..., None] * v[0, h][idx[0, h]]).sum(-2) for h in range(H)])[None]
    check_attention(out, lse, ref_out, ref_lse)


# ---------------------------------------------------------------------------------------------
# non-finite scores (docs/DESIGN.md 3.2): a slot whose unscaled fp32 score is NaN or +-inf is dropped;
# the value of a key with a non-finite element is never read (fp16 overflow upstream makes both the
# key and the value inf); a row without candidates gets (0, -inf).

# A key [BIG, 0, ...] scores BIG * q[0]: finite for |q[0]| <= 1, +-inf (fp32 overflow) for
# |q[0]| = 2. float16 cannot hold BIG: there it is inf, a non-finite key element.
BIG = 3e38
Q0 = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5, 0.0])  # q[0] of row n is Q0[n % 6]


def nonfinite_memory(B, H, M, D, dtype, gen, *, integer=False):
    """keys, values [B, H, M, D] with keys holding NaN / +inf / -inf elements and an overflowing
    key, whose values are NaN / inf (the key-dropped ones) or finite (the overflowing one)."""
    if integer:  # exact fp32 scores: exact ties and exact comparisons
        keys = torch.randint(-1, 2, (B, H, M, D), generator=gen).float()
    else:
        keys = torch.randn(B, H, M, D, generator=gen)
    values = torch.randn(B, H, M, D, generator=gen)
    for slot, d, x in ((5, 3, NAN), (17 % M, 1, INF), (33 % M, 2, -INF), (M - 2, 0, INF)):
        keys[:, :, slot, d] = x
        values[:, :, slot] = x  # never read
    big = max(M - 10, 0)
    keys[:, :, big] = 0.0
    keys[:, :, big, 0] = BIG
    keys[:, :, M // 2 : M // 2 + 40 : 3, -1] = NAN  # more, in other blocks / chunks
    values[:, :, M // 2 : M // 2 + 40 : 3] = -INF
    return keys.to(dtype), values


def nonfinite_queries(B, H, N, D, gen, *, integer=False, nan_row=True):
    """Query rows with q[0] = Q0[n % 6] and a NaN row (the last one of head 0)."""
    if integer:
        query = torch.randint(-2, 3, (B, H, N, D), generator=gen).float()
    else:
        query = torch.randn(B, H, N, D, generator=gen)
    query[..., 0] = Q0.repeat(N // 6 + 1)[:N]
    if nan_row:
        query[:, 0, N - 1, D // 2] = NAN
    return query


@pytest.mark.parametrize("N", [3, 20, 100])  # direct, stream, packed paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_knn_scan_nonfinite_scores(N, dtype, gen):
    B, H, M, D, k = 2, 1, 700, 40, 37
    query = nonfinite_queries(B, H, N, D, gen, integer=True)
    keys, _ = nonfinite_memory(B, H, M, D, dtype, gen, integer=True)
    lengths = torch.tensor([M, 690])
    mask = random_mask(B, M, gen, p=0.9)
    mask[:, M - 10] = True
    scores, indices = ops.knn_scan(query, keys, lengths, mask, k)
    ref_s, ref_i = ref_knn(query, keys, lengths, mask, k)
    assert torch.equal(indices, ref_i), "selection differs from the exact reference"
    assert torch.equal(scores.double(), ref_s), "scores differ from the exact reference"
    assert (indices[:, 0, N - 1] == -1).all(), "a NaN query row selects nothing"
    if dtype != torch.float16:  # rows with q[0] = 1 pick the finite huge score first
        assert (indices[0, 0, 2 : N - 1 : 6, 0] == M - 10).all()


@pytest.mark.parametrize("N,causal_lq,M", [(3, 0, 700), (3, 3, 700), (20, 0, 700), (20, 10, 700),
                                           (100, 0, 700), (100, 50, 700), (100, 50, 50), (20, 20, 20)])
@pytest.mark.parametrize("kdtype,vdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16), (torch.float16, torch.float32)])
def test_flash_scan_nonfinite_scores(N, causal_lq, M, kdtype, vdtype, gen):
    # Dense memory (causal_lq = 0) and local causal parts (M = Lk), every row path; batch row 1
    # holds only keys with a non-finite element (and inf values): every row gets (0, -inf).
    B, H, D = 2, 1, 40
    query = nonfinite_queries(B, H, N, D, gen)
    keys, values = nonfinite_memory(B, H, M, D, kdtype, gen)
    keys[1, :, :, 7] = INF
    values[1] = INF
    values = values.to(vdtype)
    scale = 0.125
    out, lse = ops.flash_scan(query, keys, values, None, None, scale, causal_lq)
    valid = torch.ones(B, M, dtype=torch.bool)
    ref_out, ref_lse = ref_attention(query, keys, values, valid, scale, causal_lq)
    check_attention(out, lse, ref_out, ref_lse)
    assert (lse[1] == NEG_INF).all() and (out[1] == 0).all()
    assert lse[0, 0, N - 1] == NEG_INF and (out[0, 0, N - 1] == 0).all(), "NaN query row"


@pytest.mark.parametrize("N,causal_lq", [(1, 0), (4, 0), (20, 0), (8, 8)])
def test_nonfinite_scores_memory_split(N, causal_lq, gen):
    # B*H = 1 with 2 threads: the memory is split across threads; dropped slots in every split.
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        M, D, k = 30000, 64, 40
        query = nonfinite_queries(1, 1, N, D, gen, nan_row=N > 1)
        keys, values = nonfinite_memory(1, 1, M, D, torch.bfloat16, gen)
        for slot in (100, 7000, 15100, 22000, 29000):
            keys[0, 0, slot : slot + 30 : 2, 9] = INF
            values[0, 0, slot : slot + 30 : 2] = NAN
        mask = random_mask(1, M, gen, p=0.9)
        lengths = torch.tensor([M - 1])
        valid = validity(1, M, lengths, mask)
        out, lse = ops.flash_scan(query, keys, values, lengths, mask, 0.2, causal_lq)
        ref_out, ref_lse = ref_attention(query, keys, values, valid, 0.2, causal_lq)
        check_attention(out, lse, ref_out, ref_lse)
        if causal_lq == 0:
            # the float64 checker sees no fp32 overflow: no overflowing key here (other tests have
            # it); keys with a non-finite element are masked for the checker (and zeroed)
            keys[0, 0, M - 10] = keys[0, 0, 0]
            scores, indices = ops.knn_scan(query, keys, lengths, mask, k)
            ok = finite_keys(keys)[:, 0]
            assert (ok[0][indices.clamp_min(0)] | (indices < 0)).all(), "a key with a non-finite element was selected"
            check_knn(query, keys.masked_fill(~ok[:, None, :, None], 0), lengths, mask & ok, k, scores, indices)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_attention_nonfinite_scores(dtype, gen):
    # Scores handed in by the caller: NaN / +-inf entries on real slots are dropped (their values
    # are inf / NaN and never read); an all-NaN row gets (0, -inf).
    B, H, N, M, D, k = 1, 2, 6, 50, 24, 9
    values = torch.randn(B, H, M, D, generator=gen)
    scores = torch.randn(B, H, N, k, generator=gen) * 3
    indices = torch.randint(0, M - 3, (B, H, N, k), generator=gen)
    for j, (x, slot) in enumerate(((INF, M - 1), (NAN, M - 2), (NEG_INF, M - 3))):
        scores[:, :, : N - 1, j] = x
        indices[:, :, : N - 1, j] = slot
        values[:, :, slot] = INF if j != 1 else NAN
    scores[0, 1, N - 1] = NAN
    values = values.to(dtype)
    out, lse = ops.gather_attention(scores, indices, values, 0.5)
    keep = torch.isfinite(scores) & (indices >= 0)
    x = (scores.double() * 0.5).masked_fill(~keep, NEG_INF)
    ref_lse = torch.logsumexp(x, -1)
    p = torch.exp(x - ref_lse[..., None]).nan_to_num(0.0)
    v = values.double()
    gathered = torch.stack([v[0, h][indices[0, h]] for h in range(H)])[None]  # [B, H, N, k, D]
    ref_out = (p[..., None] * gathered.masked_fill(~keep[..., None], 0.0)).sum(-2)
    ref_out[ref_lse == NEG_INF] = 0.0
    check_attention(out, lse, ref_out, ref_lse)
    assert lse[0, 1, N - 1] == NEG_INF and (out[0, 1, N - 1] == 0).all()


@pytest.mark.parametrize("N", [1, 5, 40, 300])  # direct, stream and packed paths
@pytest.mark.parametrize("B,H", [(1, 1), (1, 3), (2, 4)])
def test_results_do_not_depend_on_thread_count(B, H, N, gen):
    # The work plan (row chunks, memory splits) depends on the shapes only: bit-identical results.
    M, D, k = 9000, 64, 20
    query = torch.randn(B, H, N, D, generator=gen)
    keys = torch.randn(B, H, M, D, generator=gen).bfloat16()
    values = torch.randn(B, H, M, D, generator=gen)
    mask = random_mask(B, M, gen, p=0.9)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            s, i = ops.knn_scan(query, keys, None, mask, k)
            o, lse = ops.flash_scan(query, keys, values, None, mask, 0.1, 0)
            oc, lsec = ops.flash_scan(query, keys[:, :, :N], values[:, :, :N], None, None, 0.1, N)
            g, glse = ops.gather_attention(s, i, values, 0.1)
            results.append((s, i, o, lse, oc, lsec, g, glse))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def test_bad_inputs_raise(gen):
    q = torch.randn(1, 1, 2, 8)
    keys = torch.randn(1, 1, 10, 8)
    with pytest.raises(RuntimeError, match="mem_keys"):
        ops.knn_scan(q, keys[..., :4], None, None, 2)
    with pytest.raises(RuntimeError, match="k must be"):
        ops.knn_scan(q, keys, None, None, 0)
    with pytest.raises(RuntimeError, match="mem_mask"):
        ops.knn_scan(q, keys, None, torch.ones(1, 9, dtype=torch.bool), 2)
    with pytest.raises(RuntimeError, match="stride"):
        ops.knn_scan(q, torch.randn(1, 1, 8, 10).transpose(-1, -2), None, None, 2)
    with pytest.raises(RuntimeError, match="indices"):
        ops.gather_attention(torch.randn(1, 1, 2, 3), torch.full((1, 1, 2, 3), 10), keys, 1.0)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 16)
        kv = torch.empty(2, 3, 40, 16, dtype=torch.bfloat16)
        s, i = ops.knn_scan(q, kv, None, None, 7)
        o, lse = ops.flash_scan(q, kv, kv, None, None, 0.5, 0)
        go, gl = ops.gather_attention(s, i, kv, 0.5)
    assert s.shape == (2, 3, 5, 7) and i.dtype == torch.int64
    assert o.shape == (2, 3, 5, 16) and lse.shape == (2, 3, 5)
    assert go.shape == (2, 3, 5, 16) and gl.shape == (2, 3, 5)


def test_opcheck(gen):
    q = torch.randn(1, 2, 5, 16, generator=gen)
    kv = torch.randn(1, 2, 40, 16, generator=gen).bfloat16()
    lengths = torch.tensor([33])
    mask = torch.rand(1, 40, generator=gen) < 0.8
    torch.library.opcheck(ops.knn_scan.default, (q, kv, lengths, mask, 7))
    torch.library.opcheck(ops.flash_scan.default, (q, kv, kv, lengths, mask, 0.5, 0))
    s, i = ops.knn_scan(q, kv, lengths, mask, 7)
    torch.library.opcheck(ops.gather_attention.default, (s, i, kv, 0.5))


def test_registration():
    # One namespace: the C++ library registers CPU kernels for the schemas of fot_kernels._library
    # (no schema of its own besides the utility op cpu_simd_level).
    for name in _library.SCHEMAS:  # the backward ops included
        assert _library.has_kernel(name, "CPU")
    assert not hasattr(torch.ops, "fot_cpu") or not hasattr(torch.ops.fot_cpu, "knn_scan")
    assert torch.ops.fot.cpu_simd_level() in (0, 512)


# ---------------------------------------------------------------------------------------------
# backward ops: fot::flash_scan_backward, fot::gather_attention_backward
#
# The op computes the gradients of L = sum(dO * out) + sum(dlse * lse) of ONE part w.r.t. the query
# rows, the keys and the values, given delta = rowsum(dO * out) - dlse (here the part is the whole
# softmax, so its lse is the merged one). The float64 oracle is torch autograd of the dense softmax
# over the candidates; the float32 one (same code) sets the tolerance (flash-attention rule).


def grad_inputs(out, lse, gen):
    """d_out, d_lse and delta of the backward contract: d_out and delta zeroed on rows whose lse is
    -inf (the caller's guarantee)."""
    dead = lse == NEG_INF
    d_out = torch.randn(out.shape, generator=gen).masked_fill(dead[..., None], 0.0)
    d_lse = torch.randn(lse.shape, generator=gen).masked_fill(dead, 0.0)
    delta = ((d_out * out).sum(-1) - d_lse).masked_fill(dead, 0.0)
    return d_out, d_lse, delta


def softmax_part(q, k, v, cand, scale):
    """Differentiable (out, lse) of the softmax over the candidates cand [B, H, N, M] (rows without
    one: out 0, lse -inf)."""
    s = (q @ k.transpose(-1, -2)) * scale
    alive = cand.any(-1)
    s = s.masked_fill(~cand, NEG_INF).masked_fill(~alive[..., None], 0.0)
    lse = torch.logsumexp(s, -1)
    out = torch.exp(s - lse[..., None]) @ v
    return out.masked_fill(~alive[..., None], 0.0), lse.masked_fill(~alive, NEG_INF)


def autograd_grads(query, keys, values, cand, scale, d_out, d_lse, dtype, *, gather_idx=None):
    """(dq, dk, dv) in `dtype` arithmetic, dk / dv rounded to the memory dtypes. Keys with a non-finite
    element and unread slots enter as zeros (no gradient). gather_idx [B, H, N, k]: the kNN part,
    scores of the selected slots only (cand [B, H, N, k])."""
    leaves = [query.to(dtype).requires_grad_(), keys.to(dtype).requires_grad_(), values.to(dtype).requires_grad_()]
    q, k, v = leaves
    ok = finite_keys(keys)[..., None]
    k = torch.where(ok, k, 0.0)
    v = torch.where(ok, v, 0.0)
    if gather_idx is None:
        out, lse = softmax_part(q, k, v, cand, scale)
    else:
        B, H, N, kk = gather_idx.shape
        at = gather_idx.clamp_min(0).reshape(B, H, N * kk, 1).expand(-1, -1, -1, q.shape[-1])
        k_sel = k.gather(2, at).view(B, H, N, kk, -1)
        v_sel = v.gather(2, at).view(B, H, N, kk, -1)
        s = (k_sel @ q[..., None]).squeeze(-1) * scale
        alive = cand.any(-1)
        s = s.masked_fill(~cand, NEG_INF).masked_fill(~alive[..., None], 0.0)
        lse = torch.logsumexp(s, -1)
        out = (torch.exp(s - lse[..., None])[..., None] * v_sel).sum(-2).masked_fill(~alive[..., None], 0.0)
        lse = lse.masked_fill(~alive, NEG_INF)
    loss = (out * d_out.to(dtype)).sum() + (lse.masked_fill(lse == NEG_INF, 0.0) * d_lse.to(dtype)).sum()
    dq, dk, dv = torch.autograd.grad(loss, leaves)
    return dq, dk.to(keys.dtype), dv.to(values.dtype)


def flash_candidates(query, keys, valid, causal_lq):
    _, keep = kept_scores(query, keys)
    N, M = keep.shape[2:]
    cand = keep & valid[:, None, None, :]
    if causal_lq:
        cand &= torch.arange(M)[None, :] <= (torch.arange(N) % causal_lq)[:, None] + M - causal_lq
    return cand


def check_grads(got, query, keys, values, cand, scale, d_out, d_lse, **kw):
    hi = autograd_grads(query, keys, values, cand, scale, d_out, d_lse, torch.float64, **kw)
    lo = autograd_grads(query, keys, values, cand, scale, d_out, d_lse, torch.float32, **kw)
    for name, g, g_hi, g_lo in zip(("dq", "dk", "dv"), got, hi, lo):
        assert g.dtype == g_lo.dtype and g.shape == g_hi.shape, name
        testing.assert_close_to_reference(g, g_hi, g_lo, name)


def check_same(got, want):
    """The C++ op against the PyTorch version (same semantics, other summation order)."""
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert not torch.isnan(g).any(), name
        tol = 1e-5 if g.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol, msg=name)


def flash_backward_case(B, H, N, M, D, causal_lq, kdtype, vdtype, masked, gen, *, strided=False):
    query = torch.randn(B, H, N, D, generator=gen)
    keys = make_memory(B, H, M, D, kdtype, strided=strided, gen=gen)
    values = make_memory(B, H, M, D, vdtype, strided=strided, gen=gen)
    lengths = torch.randint(M // 2, M + 1, (B,), generator=gen) if masked else None
    mask = random_mask(B, M, gen) if masked else None
    scale = D**-0.5
    out, lse = ops.flash_scan(query, keys, values, lengths, mask, scale, causal_lq)
    return query, keys, values, lengths, mask, scale, out, lse


FLASH_BWD_CASES = [
    # B, H, N, M, D, causal_lq, kdtype, vdtype, masked
    (1, 1, 1, 1, 1, 0, torch.float32, torch.float32, False),
    (2, 1, 17, 50, 1, 0, torch.float32, torch.float32, True),  # D = 1
    (2, 2, 37, 300, 100, 0, torch.float32, torch.float32, True),  # D = 100, lengths + mask, several row tiles
    (1, 2, 60, 200, 128, 20, torch.bfloat16, torch.float16, False),  # causal, Lq < Lk, G = 3
    (1, 1, 100, 40, 64, 50, torch.float32, torch.float32, False),  # causal, Lq > Lk: rows that see nothing
    (1, 2, 130, 130, 32, 130, torch.float32, torch.float32, False),  # square causal, 2 row blocks
    (1, 1, 30, 260, 256, 0, torch.float16, torch.bfloat16, True),  # D = 256
    (1, 1, 20, 2500, 16, 0, torch.float32, torch.float32, True),  # memory splits (dq partials merged)
]


@pytest.mark.parametrize("B,H,N,M,D,causal_lq,kdtype,vdtype,masked", FLASH_BWD_CASES)
def test_flash_scan_backward(B, H, N, M, D, causal_lq, kdtype, vdtype, masked, gen):
    query, keys, values, lengths, mask, scale, out, lse = flash_backward_case(
        B, H, N, M, D, causal_lq, kdtype, vdtype, masked, gen, strided=masked
    )
    d_out, d_lse, delta = grad_inputs(out, lse, gen)
    args = (query, keys, values, d_out, lse, delta, lengths, mask, scale, causal_lq)
    got = ops.flash_scan_backward(*args, True)
    assert got[0].dtype == torch.float32 and got[1].dtype == kdtype and got[2].dtype == vdtype
    check_same(got, streaming.flash_scan_backward_torch(*args, True))
    cand = flash_candidates(query, keys, validity(B, M, lengths, mask), causal_lq)
    check_grads(got, query, keys, values, cand, scale, d_out, d_lse)
    dq, dk, dv = ops.flash_scan_backward(*args, False)  # need_dkv=False: the same dq, no dk / dv
    assert torch.equal(dq, got[0]) and dk.numel() == 0 and dv.numel() == 0


@pytest.mark.parametrize("causal_lq", [0, 8])
def test_flash_scan_backward_nonfinite(causal_lq, gen):
    # Keys with NaN / inf elements (their NaN / inf values never read), a key whose score overflows
    # to +-inf for rows with q[0] = +-2 (dropped), a NaN query row (zeroed by the caller, lse -inf),
    # a batch row with every slot masked (lse -inf everywhere).
    B, H, N, M, D = 2, 2, 48, 700, 16
    keys, values = nonfinite_memory(B, H, M, D, torch.float32, gen)
    query = nonfinite_queries(B, H, N, D, gen)
    query[..., 0] = torch.tensor([2.0, -2.0, -1.0, 0.0]).repeat(N // 4)  # the overflowing key: +-inf, -3e38, 0
    mask = random_mask(B, M, gen)
    mask[1] = False
    out, lse = ops.flash_scan(query, keys, values, None, mask, 0.25, causal_lq)
    rows = query.masked_fill(~torch.isfinite(query).all(-1, keepdim=True), 0.0)
    assert (lse[1] == NEG_INF).all() and lse[0, 0, N - 1] == NEG_INF
    d_out, _, delta = grad_inputs(out, lse, gen)
    args = (rows, keys, values, d_out, lse, delta, None, mask, 0.25, causal_lq, True)
    got = ops.flash_scan_backward(*args)
    check_same(got, streaming.flash_scan_backward_torch(*args))
    dq, dk, dv = got
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all() and (dq[0, 0, N - 1] == 0).all()
    dropped = ~finite_keys(keys)
    assert (dk[dropped] == 0).all() and (dv[dropped] == 0).all()


def test_flash_scan_backward_lse_rows(gen):
    # Rows whose (merged) lse is -inf get P = 0 whatever their scores: dq 0 and nothing to dk / dv;
    # a finite lse above every score (another part dominated) scales P down.
    B, H, N, M, D = 1, 1, 40, 100, 32
    query, keys, values, _, _, scale, out, lse = flash_backward_case(B, H, N, M, D, 0, torch.float32,
                                                                     torch.float32, False, gen)  # fmt: skip
    lse = lse.clone()
    lse[0, 0, ::3] = NEG_INF
    lse[0, 0, 1::3] += 2.0
    d_out, _, delta = grad_inputs(out, lse, gen)
    args = (query, keys, values, d_out, lse, delta, None, None, scale, 0, True)
    got = ops.flash_scan_backward(*args)
    check_same(got, streaming.flash_scan_backward_torch(*args))
    assert (got[0][0, 0, ::3] == 0).all()
    keep = torch.ones(N, dtype=torch.bool)
    keep[::3] = False
    rest = ops.flash_scan_backward(query[:, :, keep], keys, values, d_out[:, :, keep], lse[:, :, keep],
                                   delta[:, :, keep], None, None, scale, 0, True)  # fmt: skip
    torch.testing.assert_close(got[1], rest[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[2], rest[2], atol=1e-6, rtol=1e-5)


def random_selection(B, H, N, M, k, gen, *, pad=0.1):
    """Indices [B, H, N, k]: k distinct slots per row (many rows share slots when M is small), a
    fraction of -1 padding at the tail."""
    idx = torch.rand(B, H, N, M, generator=gen).argsort(-1)[..., :k]
    pads = torch.rand(B, H, N, k, generator=gen) < pad
    return idx.masked_fill(pads.cumsum(-1) > 0, -1)


def gather_backward_case(B, H, N, M, D, k, kdtype, vdtype, gen, *, idx=None, strided=False):
    query = torch.randn(B, H, N, D, generator=gen)
    keys = make_memory(B, H, M, D, kdtype, strided=strided, gen=gen)
    values = make_memory(B, H, M, D, vdtype, strided=strided, gen=gen)
    scale = D**-0.5
    if idx is None:
        scores, idx = ops.knn_scan(query, keys, None, None, k)
    else:  # the forward's scores of a given selection
        scores = ref_scores(query, keys).float()
        scores = scores.gather(-1, idx.clamp_min(0)).masked_fill(idx < 0, NEG_INF)
    out, lse = ops.gather_attention(scores, idx, values, scale)
    return query, keys, values, idx, scale, out, lse


GATHER_BWD_CASES = [
    # B, H, N, M, D, k, kdtype, vdtype, selection
    (1, 1, 1, 1, 1, 1, torch.float32, torch.float32, "knn"),
    (2, 2, 37, 300, 100, 32, torch.float32, torch.float32, "knn"),  # D = 100
    (1, 2, 50, 80, 128, 16, torch.bfloat16, torch.float16, "knn"),
    (1, 1, 20, 60, 256, 7, torch.float16, torch.bfloat16, "random"),  # D = 256, padding
    (2, 1, 200, 10, 8, 8, torch.float32, torch.float32, "random"),  # heavy sharing: every slot in ~150 rows
    (1, 2, 300, 6, 1, 5, torch.bfloat16, torch.bfloat16, "random"),  # D = 1, heavy sharing
]


@pytest.mark.parametrize("B,H,N,M,D,k,kdtype,vdtype,selection", GATHER_BWD_CASES)
def test_gather_attention_backward(B, H, N, M, D, k, kdtype, vdtype, selection, gen):
    idx = random_selection(B, H, N, M, k, gen) if selection == "random" else None
    query, keys, values, idx, scale, out, lse = gather_backward_case(B, H, N, M, D, k, kdtype, vdtype, gen, idx=idx,
                                                                     strided=selection == "random")  # fmt: skip
    d_out, d_lse, delta = grad_inputs(out, lse, gen)
    args = (query, idx, keys, values, d_out, lse, delta, scale)
    got = ops.gather_attention_backward(*args, True)
    assert got[0].dtype == torch.float32 and got[1].dtype == kdtype and got[2].dtype == vdtype
    check_same(got, streaming.gather_attention_backward_torch(*args, True))
    check_grads(got, query, keys, values, idx >= 0, scale, d_out, d_lse, gather_idx=idx)
    dq, dk, dv = ops.gather_attention_backward(*args, False)
    assert torch.equal(dq, got[0]) and dk.numel() == 0 and dv.numel() == 0


def test_gather_attention_backward_duplicates_and_nonfinite(gen):
    # A slot repeated within a row counts once per entry (as in the forward); a selected key with a
    # non-finite element scores non-finite: dropped (P = 0, its row never read: no NaN reaches dq);
    # rows with lse -inf get nothing.
    B, H, N, M, D, k = 1, 2, 30, 40, 16, 6
    idx = random_selection(B, H, N, M, k, gen, pad=0.0)
    idx[0, 0, 3, 1] = idx[0, 0, 3, 0]
    idx[0, 1, 5, 2:4] = idx[0, 1, 5, 4]
    query, keys, values, idx, scale, out, lse = gather_backward_case(B, H, N, M, D, k, torch.float32, torch.float32,
                                                                     gen, idx=idx)  # fmt: skip
    d_out, d_lse, delta = grad_inputs(out, lse, gen)
    args = (query, idx, keys, values, d_out, lse, delta, scale, True)
    got = ops.gather_attention_backward(*args)
    check_same(got, streaming.gather_attention_backward_torch(*args))
    check_grads(got, query, keys, values, idx >= 0, scale, d_out, d_lse, gather_idx=idx)
    # non-finite keys at selected slots, and dead rows
    bad = idx[0, 0, 7, 2].item()
    keys2 = keys.clone()
    keys2[0, 0, bad, 3] = NAN
    values2 = values.clone()
    values2[0, 0, bad] = INF
    lse2 = lse.clone()
    lse2[0, 1, ::4] = NEG_INF
    d_out2 = d_out.masked_fill((lse2 == NEG_INF)[..., None], 0.0)
    delta2 = delta.masked_fill(lse2 == NEG_INF, 0.0)
    got = ops.gather_attention_backward(query, idx, keys2, values2, d_out2, lse2, delta2, scale, True)
    assert not any(torch.isnan(g).any() for g in got)
    # the same as if the bad slot had not been selected (its entries are exactly 0)
    idx3 = idx.clone()
    idx3[0, 0][idx3[0, 0] == bad] = -1
    want = streaming.gather_attention_backward_torch(query, idx3, keys, values, d_out2, lse2, delta2, scale, True)
    check_same(got, want)
    assert (got[1][0, 0, bad] == 0).all() and (got[2][0, 0, bad] == 0).all() and (got[0][0, 1, ::4] == 0).all()


def test_backward_empty_and_bad_inputs(gen):
    q = torch.randn(1, 2, 5, 8, generator=gen)
    mem = torch.randn(1, 2, 10, 8, generator=gen)
    lse, delta, d_out = torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.randn(1, 2, 5, 8, generator=gen)
    idx = torch.zeros(1, 2, 5, 3, dtype=torch.long)
    # empty memory, no rows
    empty = mem[:, :, :0]
    dq, dk, dv = ops.flash_scan_backward(q, empty, empty, d_out, lse, delta, None, None, 1.0, 0, True)
    assert (dq == 0).all() and dk.shape == (1, 2, 0, 8) and dv.shape == (1, 2, 0, 8)
    dq, dk, dv = ops.gather_attention_backward(q, idx.fill_(-1), empty, empty, d_out, lse, delta, 1.0, True)
    assert (dq == 0).all() and dk.shape == (1, 2, 0, 8)
    q0, d0, l0, i0 = q[:, :, :0], d_out[:, :, :0], lse[:, :, :0], idx[:, :, :0]
    dq, dk, dv = ops.flash_scan_backward(q0, mem, mem, d0, l0, l0, None, None, 1.0, 0, True)
    assert dq.shape == (1, 2, 0, 8) and (dk == 0).all() and (dv == 0).all()
    dq, dk, dv = ops.gather_attention_backward(q0, i0, mem, mem, d0, l0, l0, 1.0, True)
    assert dq.shape == (1, 2, 0, 8) and (dk == 0).all() and (dv == 0).all()
    # messages name the argument
    fb, gb = ops.flash_scan_backward, ops.gather_attention_backward
    with pytest.raises(RuntimeError, match="d_out"):
        fb(q, mem, mem, d_out[:, :, :4], lse, delta, None, None, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="lse"):
        fb(q, mem, mem, d_out, lse.double(), delta, None, None, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="delta"):
        fb(q, mem, mem, d_out, lse, delta[..., :2], None, None, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="values"):
        fb(q, mem, mem[:, :, :9], d_out, lse, delta, None, None, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="keys"):
        fb(q, mem[..., :4], mem, d_out, lse, delta, None, None, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="causal_lq"):
        fb(q, mem, mem, d_out, lse, delta, None, None, 1.0, 3, True)
    with pytest.raises(RuntimeError, match="mem_mask"):
        fb(q, mem, mem, d_out, lse, delta, None, torch.ones(1, 9, dtype=torch.bool), 1.0, 0, True)
    with pytest.raises(RuntimeError, match="stride"):
        fb(q, torch.randn(1, 2, 8, 10).transpose(-1, -2), mem, d_out, lse, delta, None, None, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="indices"):
        gb(q, idx.fill_(10), mem, mem, d_out, lse, delta, 1.0, True)
    with pytest.raises(RuntimeError, match="indices"):
        gb(q, idx[..., :2, :], mem, mem, d_out, lse, delta, 1.0, True)
    with pytest.raises(RuntimeError, match="mem_values"):
        gb(q, idx.fill_(0), mem, mem.half()[:, :, :3], d_out, lse, delta, 1.0, True)
    with pytest.raises(RuntimeError, match="query"):
        gb(q.double(), idx, mem, mem, d_out, lse, delta, 1.0, True)


@pytest.mark.parametrize("B,H,N,M", [(1, 1, 40, 3000), (1, 3, 70, 500), (2, 4, 9, 300)])
def test_backward_results_do_not_depend_on_thread_count(B, H, N, M, gen):
    # Fixed plan and fixed summation orders (dk / dv per key block over all rows; kNN slots in CSR
    # order): bit-identical gradients on 1, 2 and 3 threads.
    D, k = 32, 12
    query = torch.randn(B, H, N, D, generator=gen)
    keys = torch.randn(B, H, M, D, generator=gen).bfloat16()
    values = torch.randn(B, H, M, D, generator=gen)
    mask = random_mask(B, M, gen, p=0.9)
    out, lse = ops.flash_scan(query, keys, values, None, mask, 0.1, 0)
    d_out, _, delta = grad_inputs(out, lse, gen)
    idx = random_selection(B, H, N, 20, k, gen)  # heavy sharing of 20 slots
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.flash_scan_backward(query, keys, values, d_out, lse, delta, None, mask, 0.1, 0, True)
                           + ops.gather_attention_backward(query, idx, keys, values, d_out, lse, delta, 0.1, True))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def test_backward_opcheck(gen):
    q = torch.randn(1, 2, 5, 16, generator=gen)
    kv = torch.randn(1, 2, 40, 16, generator=gen).bfloat16()
    lengths = torch.tensor([33])
    mask = torch.rand(1, 40, generator=gen) < 0.8
    out, lse = ops.flash_scan(q, kv, kv, lengths, mask, 0.5, 0)
    d_out, _, delta = grad_inputs(out, lse, gen)
    for need in (True, False):
        torch.library.opcheck(ops.flash_scan_backward.default, (q, kv, kv, d_out, lse, delta, lengths, mask, 0.5, 0,
                                                                need))  # fmt: skip
        _, i = ops.knn_scan(q, kv, lengths, mask, 7)
        torch.library.opcheck(ops.gather_attention_backward.default, (q, i, kv, kv, d_out, lse, delta, 0.5, need))


@pytest.mark.parametrize("topk", [None, 8])
def test_cpu_backend_gradients_run_the_cpp_backward(topk, monkeypatch):
    # The cpu backend's gradients come from the C++ backward ops (the PyTorch ones would raise).
    def refuse(*_, **__):
        raise AssertionError("the PyTorch backward ran")

    monkeypatch.setattr(streaming, "TORCH_GRAD_KERNELS", SimpleNamespace(flash_scan_backward=refuse,
                                                                         gather_attention_backward=refuse))  # fmt: skip
    case = make_case(1, 4, 2, 20, 20, 150, 32, lengths=True, mask=True)
    leaves = [t.clone().requires_grad_() for t in (case.query, case.key, case.value, case.mem_keys, case.mem_values)]
    grad_out = torch.randn_like(case.query)
    call = lambda *xs, backend: fk.memory_attention(*xs, topk=topk, backend=backend, **case.memory_kwargs())  # noqa: E731
    grads = torch.autograd.grad(call(*leaves, backend="cpu"), leaves, grad_out)
    hi = [t.detach().double().requires_grad_() for t in leaves]
    ref = torch.autograd.grad(call(*hi, backend="reference"), hi, grad_out.double())
    lo = [t.detach().clone().requires_grad_() for t in leaves]
    ref_lo = torch.autograd.grad(call(*lo, backend="reference"), lo, grad_out)
    for name, g, g_hi, g_lo in zip(("query", "key", "value", "mem_keys", "mem_values"), grads, ref, ref_lo):
        testing.assert_close_to_reference(g, g_hi, g_lo, f"d{name}")
