"""The cuda backend (csrc/cuda kernels) against the float64 reference, torch.library.opcheck of
its custom ops, and the CUDA emulator's own checks.

Every test runs twice: "emulated" runs the kernels on the CPU through tests/cuda_emu (the same
sources compiled as host C++ with threads as fibers; runs in CI, which has no GPU), "gpu" on a
CUDA device with the built extension (skipped without one). The emulated runs also check that the
results do not depend on the order in which threads and blocks run (a race detector) and that the
emulator catches the bugs it claims to.

The cases every backend shares (odd head dims, GQA, masks, lengths, ties, NaN keys, decode, empty
memory, every dtype pairing) run against the cuda backend in tests/test_backends.py (the `impl`
fixture's "cuda-emulated" and "cuda"); this module adds what is specific to these kernels: memory
long enough to split across blocks (and merge the splits), ties across splits, exactness of the
fp32 path with bf16 memory, tensor-core head dims, smaller shared-memory budgets, non-finite scores
in every kernel and dtype path (+-inf / NaN keys with inf / NaN values, whole tiles of them, scores
that overflow for some queries only, non-finite query rows, with splits), the backward ops (against
their PyTorch versions and float64, drop rules, padding, heavy slot sharing, need_dkv, empty
memory, determinism; gradients end to end), what is not served, and the custom ops (one
namespace, opcheck, fake kernels, torch.compile). Tolerances: flash-attention's
rule (fot_kernels.testing.assert_close_to_reference) for attention, fot_kernels.testing.check_knn
for kNN (exact top-k against float64 scores, free only among rounding-level near-ties).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import emulate_cuda_backend

import fot_kernels as fk
from fot_kernels import _library
from fot_kernels.backends import cuda as CB
from fot_kernels.backends import reference, streaming
from fot_kernels.testing import assert_close_to_reference, check_knn

from _inputs import make_case


@pytest.fixture(params=["emulated", "gpu"])
def env(request, monkeypatch):
    """Where the kernels run: ``env.dev`` (the inputs' device), ``env.ops`` (the op namespace),
    ``env.emulated``."""
    if request.param == "emulated":
        ops = emulate_cuda_backend(monkeypatch)
        return SimpleNamespace(dev="cpu", ops=ops, emulated=True)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if CB.extension_status() is not None:
        pytest.skip(f"no CUDA extension: {CB.extension_status()}")
    # Leave NaN-filled blocks in the caching allocator so that outputs allocated with at::empty
    # likely start as NaN (the emulated build poisons its outputs itself).
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in [2**18] * 8 + [2**22] * 4]
    del blocks
    return SimpleNamespace(dev="cuda", ops=_library.ops(), emulated=False)


@pytest.fixture
def emulated(env):
    if not env.emulated:
        pytest.skip("checks of the CUDA emulator")
    return env


def _reference_hi_lo(case, **kw):
    """The reference's (out, lse) on float64 inputs (the oracle) and in the case's own precision
    (whose error against the oracle sets the tolerance)."""
    results = []
    for c in (case.to(torch.float64), case):
        results.append(reference.memory_attention(c.query, c.key, c.value, c.mem_keys, c.mem_values,
                                                  **case.memory_kwargs(), **kw))  # fmt: skip
    return results


def _attention_against_reference(env, case, dtype_out, expected=None, **kw):
    """memory_attention on the cuda backend against `expected` (default: _reference_hi_lo)."""
    out, lse = fk.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values,
                                   return_lse=True, backend="cuda", **case.memory_kwargs(), **kw)  # fmt: skip
    (ref_hi, lse_hi), (ref_lo, lse_lo) = expected or _reference_hi_lo(case, **kw)
    assert out.dtype == dtype_out and lse.dtype == torch.float32 and out.device.type == env.dev
    assert_close_to_reference(out, ref_hi, ref_lo, "out")
    assert_close_to_reference(lse, lse_hi, lse_lo.float(), "lse")
    return out, lse


# ------------------------------------------------------------------------------------ knn_topk


def _launches(env) -> int | None:
    import cuda_emu

    return cuda_emu.stats()["launches"] if env.emulated else None


def test_knn_topk_fp32_query_bf16_memory_is_the_fp32_dot_of_upcast_values(env):
    case = make_case(1, 2, 1, 40, 1, 3000, 128, dtype=torch.float32, mem_dtype=torch.bfloat16, device=env.dev)
    scores, indices = fk.knn_topk(case.query, case.mem_keys, 32, backend="cuda")
    upcast = case.mem_keys.double().repeat_interleave(2, dim=1)  # bf16 -> exact in float64
    exact = (case.query.double() @ upcast.transpose(-1, -2)).gather(-1, indices)
    torch.testing.assert_close(scores.double(), exact, rtol=1e-5, atol=1e-5)  # fp32 rounding only, no TF32
    check_knn(scores, indices, case.query, case.mem_keys, 32)


def test_knn_topk_ties_across_splits_keep_lower_index(env):
    # identical keys spread over a long memory: the split merge must keep the lowest indices
    keys = torch.randn(1, 1, 30_000, 64, device=env.dev) * 0.01
    keys[0, 0, ::997] = 1.0  # 31 slots with the same (largest) score
    query = torch.ones(1, 1, 1, 64, device=env.dev)
    before = _launches(env)
    _, indices = fk.knn_topk(query, keys, 8, backend="cuda")
    assert indices[0, 0, 0].tolist() == list(range(0, 30_000, 997))[:8]
    if env.emulated:
        assert _launches(env) - before == 2, "the memory was not split (scan + merge)"


@pytest.mark.parametrize("num_sms", [1, 8, 132])
def test_knn_scan_selection_edge_cases(env, num_sms):
    """The scan's selection (packed keys, candidate buffer, sort, merge by rank, split merge) on
    exact scores (D = 1, query 1): many ties (also +0 / -0), NaN, +-inf (never selected), masks,
    lengths, k from 1 to 256, as many splits as the emulated SM count gives."""
    if not env.emulated and num_sms != 132:
        pytest.skip("the SM count is the device's")
    if env.emulated:
        import cuda_emu

        cuda_emu.configure(num_sms=num_sms)
    gen = torch.Generator().manual_seed(num_sms)
    for trial in range(14):
        m = int(torch.randint(0, 3000, (1,), generator=gen))
        k = [1, 5, 32, 33, 64, 100, 256][trial % 7]
        s = torch.randn(2, m, generator=gen)
        if m > 8:
            if trial % 2 == 0:
                s = (s * 2).round() / 2  # many exact ties
            s[:, torch.randint(0, m, (3,), generator=gen)] = float("nan")
            s[:, torch.randint(0, m, (2,), generator=gen)] = float("-inf")
            s[:, torch.randint(0, m, (2,), generator=gen)] = float("inf")  # non-finite: never selected
            s[:, :2] = torch.tensor([0.0, -0.0])
        keys = s.reshape(2, 1, m, 1).to(env.dev)
        mask = (torch.rand(2, m, generator=gen) > 0.2).to(env.dev)
        lengths = torch.tensor([m, m // 2], device=env.dev)
        query = torch.ones(2, 1, 1, 1, device=env.dev)
        got_s, got_i = env.ops.knn_scan(query, keys, lengths, mask, k)
        ref_s, ref_i = reference.knn_topk(query.cpu(), keys.cpu(), k, mem_lengths=lengths.cpu(), mem_mask=mask.cpu())
        assert got_i.cpu().tolist() == ref_i.tolist(), (trial, m, k)
        assert got_s.cpu().tolist() == ref_s.tolist(), (trial, m, k)


@pytest.mark.parametrize("k", [32, 256])
def test_knn_topk_long_memory_splits_and_merges(env, k):
    m = 12_000 if env.emulated else 40_000
    case = make_case(1, 4, 2, 1, None, m, 128, dtype=torch.bfloat16, lengths=True, mask=True, device=env.dev)
    scores, indices = fk.knn_topk(case.query, case.mem_keys, k, backend="cuda", **case.memory_kwargs())
    check_knn(scores, indices, case.query, case.mem_keys, k, **case.memory_kwargs())


def test_unsupported_inputs_are_reported(env, monkeypatch):
    case = make_case(1, 2, 1, 4, 4, 400, 8, device=env.dev)  # M > 300: k = 300 is not capped to M
    assert any("k=300" in r for r in CB.unsupported_reasons("knn_topk", case.query, case.mem_keys, topk=300))
    q64 = case.query.double()
    assert any("float64" in r for r in CB.unsupported_reasons("knn_topk", q64, case.mem_keys, topk=3))
    with pytest.raises(fk.BackendUnavailableError, match="k=300"):
        fk.knn_topk(case.query, case.mem_keys, 300, backend="cuda")
    # gradients are served by the backward kernels ...
    assert not CB.unsupported_reasons("memory_attention", case.query, case.mem_keys, topk=3, needs_grad=True)
    assert CB.kernels().grad_ops is CB._ops()
    q_grad = case.query.clone().requires_grad_()
    args = (q_grad, case.key, case.value, case.mem_keys, case.mem_values)
    out = fk.memory_attention(*args, topk=3, backend="cuda")
    assert out.grad_fn is not None
    # ... unless the loaded extension predates them
    monkeypatch.setattr(CB, "_registered", lambda *_: False)
    assert any("no backward kernels" in r for r in CB.unsupported_reasons("memory_attention", case.query,
                                                                          case.mem_keys, needs_grad=True))  # fmt: skip
    with pytest.raises(fk.BackendUnavailableError, match="no backward kernels"):
        fk.memory_attention(*args, topk=3, backend="cuda")
    with torch.no_grad():
        fk.memory_attention(*args, topk=3, backend="cuda")


# ----------------------------------------------------------------------------- memory_attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_memory_attention_tensor_core_head_dims(env, dtype, d):
    m = 700 if env.emulated else 3000
    case = make_case(1, 4, 4, 130, 130, m, d, dtype=dtype, lengths=True, mask=True, device=env.dev)
    for topk in (None, 64):
        _attention_against_reference(env, case, dtype, topk=topk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lq", "lk"), [(1, 3000), (3, 2500), (700, 1100)])
def test_long_local_context_splits_the_causal_part(env, dtype, lq, lk):
    """Decoding (or short chunks) over a long local cache: the causal flash pass is split across
    blocks like the memory; splits that start past a row's last visible key add nothing."""
    case = make_case(1, 4, 2, lq, lk, 300, 64, dtype=dtype, lengths=True, device=env.dev)
    before = _launches(env)
    _attention_against_reference(env, case, dtype, topk=None, causal=True)
    if env.emulated and lq < 700:  # the local scan and its split merge, the (short: unsplit) memory scan
        assert _launches(env) - before == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_shared_memory_budget_picks_smaller_tiles(emulated, dtype):
    """A device with 99 KB of shared memory per block (sm_86 / 89 / 120, e.g. an RTX 4090, against an
    H100's 227 KB): the plans fall back to smaller tiles, down to 16-slot attention tiles and 32-slot
    kNN tiles for D=256, k=256 (tests/test_cuda_compile.py tabulates every plan); with 48 KB an
    fp32 D=256 k=256 scan no longer fits and is refused with a message."""
    import cuda_emu

    cuda_emu.configure(smem_optin=99 * 1024)
    case = make_case(1, 4, 2, 70, 70, 1500, 128, dtype=dtype, lengths=True, mask=True, device="cpu")
    for topk in (None, 16):
        _attention_against_reference(emulated, case, dtype, topk=topk)
    case = make_case(1, 2, 1, 6, 6, 700, 256, dtype=dtype, lengths=True, mask=True, device="cpu")
    _attention_against_reference(emulated, case, dtype, topk=256)
    _attention_against_reference(emulated, case, dtype, topk=None)
    assert 0 < cuda_emu.stats()["max_dynamic_smem"] <= 99 * 1024
    cuda_emu.configure(smem_optin=48 * 1024)
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(RuntimeError, match="shared memory does not fit"):
        emulated.ops.knn_scan(q, torch.randn(1, 1, 100, 256), None, None, 256)


# -------------------------------------------------- non-finite scores (docs/DESIGN.md 3.2)
# A local key or memory slot whose fp32 score is NaN, +inf or -inf is dropped: never selected,
# no weight, and its value never meets a zero weight (0 * inf = NaN) either. The cases cover every
# kernel (knn_scan and its split merge, flash_scan over memory and over the causal local part and
# its split merge, gather_attention), both product paths (fp32 SIMT, fp16/bf16 tensor cores with
# cp.async) and whole tiles of dropped keys.

BAD = (float("inf"), float("-inf"), float("nan"))
# (query dtype, memory dtype): fp32 SIMT, tensor cores, fp32 rows over converted bf16 tiles
NONFINITE_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                    (torch.float32, torch.bfloat16)]  # fmt: skip
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp32-bf16mem"]
# (Lq, Lk, M): a prefill chunk over a memory split across blocks; decoding over a long local cache
# (the causal part split across blocks)
NONFINITE_SHAPES = {"prefill": (37, 45, 1500), "decode": (2, 1100, 200)}


def _poison_rows(keys, values, slots, gen, *, element=None):
    """keys[:, :, slots] get one non-finite element (cycling +inf, -inf, NaN), values[:, :, slots]
    a non-finite row: an fp16 overflow upstream."""
    for n, slot in enumerate(slots):
        d = int(torch.randint(0, keys.shape[-1], (1,), generator=gen)) if element is None else element
        keys[:, :, slot, d] = BAD[n % 3]
        values[:, :, slot] = BAD[(n + 1) % 3]


@pytest.mark.parametrize("topk", [None, 8])
@pytest.mark.parametrize(("dtype", "mem_dtype"), NONFINITE_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", NONFINITE_SHAPES.values(), ids=NONFINITE_SHAPES.keys())
def test_nonfinite_keys_and_their_values_are_dropped(env, shape, dtype, mem_dtype, topk):
    lq, lk, m = shape
    case = make_case(2, 4, 2, lq, lk, m, 40, dtype=dtype, mem_dtype=mem_dtype, lengths=True, mask=True,
                     device=env.dev)  # fmt: skip
    case.mem_lengths[1] = m - 20
    gen = torch.Generator().manual_seed(lq)
    _poison_rows(case.mem_keys, case.mem_values, [s for s in (0, 5, 63, 64, 130, 700, m - 21, m - 1) if s < m], gen)
    _poison_rows(case.mem_keys, case.mem_values, range(min(256, m // 2), min(384, m)), gen)  # whole tiles
    _poison_rows(case.key, case.value, [0, 3, 17, lk - 1], gen)
    _poison_rows(case.key, case.value, range(min(512, lk // 2), min(640, lk)), gen, element=39)
    before = _launches(env)
    for causal in (True, False):
        out, lse = _attention_against_reference(env, case, dtype, topk=topk, causal=causal)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    if env.emulated and topk is None:
        # per call: prefill = local scan + memory scan split across blocks and its merge; decode =
        # local scan split across blocks and its merge + memory scan
        assert _launches(env) - before == 2 * 3


@pytest.mark.parametrize("topk", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_score_overflow_drops_slots_for_those_queries_only(env, dtype, topk):
    """Finite keys whose score overflows fp32 for some queries only (1e30 x 1e10 = 1e40 -> +-inf):
    dropped for those queries, kept (with their values) for the others, also within one tile."""
    lq, lk, m = 37, 45, 1500
    case = make_case(2, 4, 2, lq, lk, m, 40, dtype=dtype, lengths=True, device=env.dev)
    for t in (case.query, case.key, case.mem_keys):
        t[..., 0] = 0  # column 0 carries the overflow alone: every other product stays exact
    big_local, big_mem = [1, 20, lk - 1], [3, 64, 65, 400, 1000, m - 1]
    case.key[:, :, big_local, 0] = torch.tensor([1e30, -1e30, 1e30], dtype=dtype, device=env.dev)
    case.mem_keys[:, :, big_mem, 0] = torch.tensor([1e30, -1e30] * 3, dtype=dtype, device=env.dev)
    huge = torch.zeros(2, 4, lq, dtype=torch.bool, device=env.dev)  # the queries that overflow
    huge[:, :, 5:30:3] = True
    huge[1, 3] = True  # every row of a query head (one row tile holds G = 2 heads)
    huge[0, :, -1] = True
    sign = torch.where(torch.rand(huge.shape, device=env.dev) > 0.5, 1e10, -1e10).to(dtype)
    case.query[..., 0] = torch.where(huge, sign, torch.zeros_like(sign))
    # Expected: the huge queries' rows of the same case with those keys made NaN (dropped for
    # every query, in the reference's float64 oracle too, where 1e40 would not overflow).
    dropped = dataclasses.replace(case, key=case.key.clone(), mem_keys=case.mem_keys.clone())
    dropped.key[:, :, big_local, 5] = float("nan")
    dropped.mem_keys[:, :, big_mem, 5] = float("nan")
    for causal in (True, False):
        expected = []
        for (o_keep, l_keep), (o_drop, l_drop) in zip(_reference_hi_lo(case, topk=topk, causal=causal),
                                                      _reference_hi_lo(dropped, topk=topk, causal=causal)):  # fmt: skip
            expected.append((torch.where(huge[..., None], o_drop, o_keep), torch.where(huge, l_drop, l_keep)))
        out, _ = _attention_against_reference(env, case, dtype, expected=expected, topk=topk, causal=causal)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("topk", [None, 8])
@pytest.mark.parametrize(("dtype", "mem_dtype"), NONFINITE_DTYPES[:3], ids=DTYPE_IDS[:3])
def test_nonfinite_query_rows_get_zero_and_minus_inf(env, dtype, mem_dtype, topk):
    """A query row with a NaN or +-inf element has no finite score: out 0, lse -inf; the other
    rows of its tile are unaffected (NaN / inf values at dropped keys included)."""
    lq, lk, m = 37, 45, 700
    case = make_case(2, 4, 2, lq, lk, m, 40, dtype=dtype, mem_dtype=mem_dtype, mask=True, device=env.dev)
    bad_rows = torch.zeros(2, 4, lq, dtype=torch.bool, device=env.dev)
    bad_rows[0, 1, [0, 7, 36]] = True
    bad_rows[1, 2] = True  # a whole query head
    for n, (b, h, i) in enumerate(bad_rows.nonzero().tolist()):
        case.query[b, h, i, n % 40] = BAD[n % 3]
    _poison_rows(case.mem_keys, case.mem_values, [2, 64, 500], torch.Generator().manual_seed(0))
    _poison_rows(case.key, case.value, [4, 30], torch.Generator().manual_seed(1))
    out, lse = _attention_against_reference(env, case, dtype, topk=topk)
    assert (out[bad_rows] == 0).all() and torch.isneginf(lse[bad_rows]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[~bad_rows]).all()
    scores, indices = fk.knn_topk(case.query, case.mem_keys, 8, backend="cuda", mem_mask=case.mem_mask)
    assert torch.isneginf(scores[bad_rows]).all() and (indices[bad_rows] == -1).all()


@pytest.mark.parametrize("k", [1, 32, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_knn_never_selects_nonfinite_scores(env, dtype, k):
    """Exact selection on integer-valued inputs (every fp32 score exact, so the kernel must equal
    the reference bit for bit, ties to the lower index): +-inf / NaN keys, scores that overflow
    for some queries only (fp32 / bf16), a memory split across blocks; rows with fewer than k
    finite candidates are padded with (-inf, -1)."""
    m = 3000 if env.emulated else 20_000
    gen = torch.Generator().manual_seed(k)
    query = torch.randint(-3, 4, (2, 4, 9, 24), generator=gen).to(dtype)
    mem_keys = torch.randint(-3, 4, (2, 2, m, 24), generator=gen).to(dtype)
    lengths = torch.tensor([m, 300])  # batch row 1: few slots, mostly non-finite below
    mask = torch.rand(2, m, generator=gen) > 0.1
    bad = torch.randint(0, m, (200,), generator=gen)
    mem_keys[:, :, bad, 7] = torch.tensor(BAD).repeat(67)[:200].to(dtype)
    mem_keys[1, :, 20:260, 3] = float("inf")
    mem_keys[:, :, :128, 11] = float("-inf")  # the first tiles of every split-0 block
    query[:, :, :, 0] = 0
    if dtype != torch.float16:  # fp16 cannot hold 1e30: its overflow is an inf element, above
        mem_keys[..., 0] = 0
        mem_keys[:, :, 1:m:5, 0] = 1e30  # overflows for the queries below only
        query[:, :, ::2, 0] = 1e10
    query[0, 1, 4, 2] = float("nan")  # nothing finite at all
    query, mem_keys, lengths, mask = (t.to(env.dev) for t in (query, mem_keys, lengths, mask))
    before = _launches(env)
    scores, indices = fk.knn_topk(query, mem_keys, k, backend="cuda", mem_lengths=lengths, mem_mask=mask)
    if env.emulated:
        assert _launches(env) - before == 2, "the memory was not split (scan + merge)"
    ref_s, ref_i = reference.knn_topk(query.cpu(), mem_keys.cpu(), k, mem_lengths=lengths.cpu(), mem_mask=mask.cpu())
    assert torch.equal(indices.cpu(), ref_i) and torch.equal(scores.cpu(), ref_s)
    assert (indices[0, 1, 4] == -1).all() and (k < 256 or (indices[1] == -1).any())  # padding is exercised
    assert torch.isfinite(scores[indices >= 0]).all()


@pytest.mark.parametrize("topk", [None, 4])
def test_large_finite_logits_are_kept(env, topk):
    """A finite logit near the fp32 limit (2^127 * 1.5 = 2.6e38, which overflows once multiplied
    by log2(e)) is kept like any other (the kernels keep logits in natural-log units), never
    turned into a silent (0, -inf) row; one beyond the fp32 range is reported as NaN, as by the
    reference, not as (0, -inf) either."""
    case = make_case(1, 2, 1, 5, 6, 300, 4, device=env.dev)
    for t in (case.query, case.key, case.mem_keys):
        t[..., 0] = 0
    case.query[0, 0, 2] = torch.tensor([2.0**63, 0, 0, 0])
    case.mem_keys[0, 0, 7, 0] = 2.0**64  # score 2^127 for query (0, 0, 2), 0 for every other one
    out, lse = _attention_against_reference(env, case, torch.float32, topk=topk, softmax_scale=1.5)
    assert torch.equal(out[0, 0, 2], case.mem_values[0, 0, 7]) and lse[0, 0, 2].item() == 1.5 * 2.0**127
    out = fk.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values, topk=topk,
                              softmax_scale=3.0, backend="cuda")  # fmt: skip
    assert torch.isnan(out[0, 0, 2]).all() and torch.isfinite(out[0, 1]).all()


def test_gather_attention_drops_nonfinite_scores(env):
    """gather_attention on its own: selected entries whose score is NaN / +-inf get no weight and
    their (inf / NaN) values are never read; a row left with nothing gets (0, -inf)."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 2, 6, 10, generator=gen)
    indices = torch.randperm(40, generator=gen)[:10].repeat(1, 2, 6, 1)
    values = torch.randn(1, 2, 40, 24, generator=gen)
    for n, j in enumerate([0, 3, 9]):
        scores[:, :, :, j] = BAD[n]
        values[:, :, indices[0, 0, 0, j]] = BAD[(n + 2) % 3]
    scores[0, 1, 5] = torch.tensor(BAD).repeat(4)[:10]  # nothing finite in this row
    keep = torch.isfinite(scores)
    w = torch.softmax((scores.double() * 0.3).masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    v = values.double().gather(2, indices.flatten(2)[..., None].expand(-1, -1, -1, 24)).view(1, 2, 6, 10, 24)
    expected = (w[..., None] * v.masked_fill(~keep[..., None], 0)).sum(-2)
    expected_lse = torch.logsumexp((scores.double() * 0.3).masked_fill(~keep, float("-inf")), -1)
    out, lse = env.ops.gather_attention(scores.to(env.dev), indices.to(env.dev), values.to(env.dev), 0.3)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, rtol=1e-5, atol=1e-6)
    assert (out[0, 1, 5] == 0).all() and torch.isneginf(lse[0, 1, 5])


# ------------------------------------------------------------------------------------ backward
# The backward ops against their PyTorch versions (fot_kernels.backends.streaming's
# *_backward_torch, the ops' contract) run in the kernels' own precision and in float64 (the
# oracle), with flash-attention's tolerance rule; end to end against the reference's autograd;
# drop rules (invalid / masked slots, causal rows, keys and query rows with a non-finite element,
# rows whose lse is -inf, padding), determinism and the emulator's schedule permutation.

BWD_DTYPES = NONFINITE_DTYPES
# name: (B, Hkv, G, Lq, M, D, causal, lengths and mask)
FLASH_BWD_CASES = {
    "causal-lq<lk": (2, 2, 2, 7, 19, 16, True, False),
    "causal-lq>lk": (1, 1, 2, 20, 9, 8, True, False),  # rows that see no key at all
    "memory-d100": (2, 2, 3, 5, 150, 100, False, True),
    "memory-d1": (1, 2, 2, 9, 70, 1, False, True),
    "memory-d128": (1, 1, 4, 9, 100, 128, False, True),
    "causal-d256": (1, 1, 2, 6, 40, 256, True, False),
}
# name: (B, Hkv, G, Lq, M, D, k)
GATHER_BWD_CASES = {
    "d100": (2, 2, 2, 6, 300, 100, 16),
    "shared-slots": (2, 1, 4, 40, 12, 16, 8),  # 160 rows over 12 slots: every slot in many rows
    "d1": (1, 2, 2, 5, 50, 1, 5),
    "d256": (1, 1, 2, 5, 60, 256, 33),
}


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _merged_lse(part_lse, gen, dead):
    """The lse of all parts: this part's merged with another part's (random logits), -inf on the
    `dead` rows (rows that dropped everything)."""
    return torch.logaddexp(part_lse, _randn(gen, *part_lse.shape)).masked_fill(dead, float("-inf"))


def _on(env, *tensors):
    return [None if t is None else t.to(env.dev) for t in tensors]


def _check_backward(env, got, lo, hi, need_dkv=True):
    """(dq, dk, dv) of a backward op against the PyTorch version in the kernels' precision (lo)
    and in float64 (hi): dtypes, shapes, no NaN / inf, the tolerance rule."""
    for name, g, g_lo, g_hi in zip(("dq", "dk", "dv"), got, lo, hi):
        assert g.device.type == env.dev and g.dtype == g_lo.dtype, (name, g.dtype, g_lo.dtype)
        if name != "dq" and not need_dkv:
            assert g.numel() == 0, name
            continue
        assert g.shape == g_lo.shape and torch.isfinite(g).all(), name
        assert_close_to_reference(g.cpu(), g_hi, g_lo, name)


def _flash_bwd_inputs(name, dtype, mem_dtype, seed=0):
    """Rows, keys, values (dropped keys with a non-finite element and value), d_out, the merged lse
    (a dead row, a non-finite query row), delta, validity, scale, causal_lq; and the rows the
    caller passes (non-finite rows zeroed, as memory_attention_backward does)."""
    b, hkv, g, lq, m, d, causal, validity = FLASH_BWD_CASES[name]
    n, causal_lq, scale = g * lq, (lq if causal else 0), d**-0.5
    gen = torch.Generator().manual_seed(seed)
    rows = _randn(gen, b, hkv, n, d, dtype=dtype)
    keys, values = _randn(gen, b, hkv, m, d, dtype=mem_dtype), _randn(gen, b, hkv, m, d, dtype=mem_dtype)
    lengths = mask = None
    if validity:
        lengths = torch.tensor([m] + [m // 2] * (b - 1))
        mask = torch.rand(b, m, generator=gen) > 0.2
    for i, slot in enumerate(s for s in (0, 3, m - 1, m // 2) if s < m):  # dropped everywhere
        keys[0, -1, slot, (5 * i) % d] = BAD[i % 3]
        values[0, -1, slot] = BAD[(i + 1) % 3]
    _, part = streaming.flash_scan_torch(rows.float(), keys, values, lengths, mask, scale, causal_lq)
    dead = torch.zeros(b, hkv, n, dtype=torch.bool)
    dead[0, 0, n // 2] = dead[-1, -1, n - 1] = True
    rows[-1, -1, n - 1, d // 2] = float("nan")  # a non-finite query row: dropped by the kernels themselves
    lse = _merged_lse(part, gen, dead)
    d_out, delta = _randn(gen, b, hkv, n, d), _randn(gen, b, hkv, n)
    zeroed = rows.masked_fill(dead[..., None], 0)
    return dict(rows=rows, keys=keys, values=values, d_out=d_out, lse=lse, delta=delta, lengths=lengths, mask=mask,
                scale=scale, causal_lq=causal_lq, zeroed=zeroed)  # fmt: skip


def _flash_bwd_references(x):
    args = (x["lengths"], x["mask"], x["scale"], x["causal_lq"], True)
    lo = streaming.flash_scan_backward_torch(x["zeroed"], x["keys"], x["values"], x["d_out"], x["lse"], x["delta"],
                                             *args)  # fmt: skip
    hi = streaming.flash_scan_backward_torch(*(x[k].double() for k in ("zeroed", "keys", "values", "d_out", "lse",
                                                                       "delta")), *args)  # fmt: skip
    return lo, hi


def _flash_bwd_run(env, x, need_dkv=True):
    rows, keys, values, d_out, lse, delta, lengths, mask = _on(env, *(x[k] for k in (
        "rows", "keys", "values", "d_out", "lse", "delta", "lengths", "mask")))  # fmt: skip
    return env.ops.flash_scan_backward(rows, keys, values, d_out, lse, delta, lengths, mask, x["scale"],
                                       x["causal_lq"], need_dkv)  # fmt: skip


@pytest.mark.parametrize(("dtype", "mem_dtype"), BWD_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(FLASH_BWD_CASES))
def test_flash_scan_backward_matches_pytorch_and_float64(env, name, dtype, mem_dtype):
    x = _flash_bwd_inputs(name, dtype, mem_dtype)
    lo, hi = _flash_bwd_references(x)
    got = _flash_bwd_run(env, x)
    _check_backward(env, got, lo, hi)
    dq, dk, dv = (t.cpu() for t in got)
    m = x["keys"].shape[2]
    bad = [s for s in (0, 3, m - 1, m // 2) if s < m]
    assert (dk[0, -1, bad] == 0).all() and (dv[0, -1, bad] == 0).all()  # dropped keys: exactly 0
    if x["lengths"] is not None:
        assert (dk[1:, :, m // 2:] == 0).all() and (dv[1:, :, m // 2:] == 0).all()
        masked = ~x["mask"][:, None, :].expand(dk.shape[:3])
        assert (dk[masked] == 0).all() and (dv[masked] == 0).all()
    assert (dq[0, 0, x["rows"].shape[2] // 2] == 0).all() and (dq[-1, -1, -1] == 0).all()  # dead rows
    # need_dkv false: the same dq, bit for bit, and no dk / dv; a second run: the same bits
    dq2, dk2, dv2 = _flash_bwd_run(env, x, need_dkv=False)
    assert torch.equal(dq2, got[0]) and dk2.numel() == dv2.numel() == 0
    assert dk2.dtype == dv2.dtype == mem_dtype
    assert all(torch.equal(a, b) for a, b in zip(got, _flash_bwd_run(env, x)))


def _gather_bwd_inputs(env, name, dtype, mem_dtype, seed=0):
    """The forward's selection (knn_scan with lengths and a mask: -1 padding in batch row 1), plus
    entries the kernel must skip like padding: an index past M, and a slot whose key has a
    non-finite element (masked, so the scan never selected it); `ref_indices` has -1 there."""
    b, hkv, g, lq, m, d, k = GATHER_BWD_CASES[name]
    n, scale = g * lq, d**-0.5
    gen = torch.Generator().manual_seed(seed)
    rows = _randn(gen, b, hkv, n, d, dtype=dtype)
    keys, values = _randn(gen, b, hkv, m, d, dtype=mem_dtype), _randn(gen, b, hkv, m, d, dtype=mem_dtype)
    lengths = torch.tensor([m] + [max(1, k // 2)] * (b - 1))
    mask = torch.rand(b, m, generator=gen) > 0.2
    mask[0, 1] = False
    scores, indices = (t.cpu() for t in env.ops.knn_scan(*_on(env, rows, keys, lengths, mask), k))
    keys[0, 0, 1, 0] = float("inf")
    values[0, 0, 1] = float("nan")
    indices[0, 0, 3, -2:] = -1  # a padded tail (as rows with fewer valid slots than k get)
    indices[0, 0, 0, -1] = m + 7
    indices[0, 0, 1, 0] = 1
    ref_indices = indices.clone()
    ref_indices[0, 0, 0, -1] = ref_indices[0, 0, 1, 0] = -1
    _, part = streaming.gather_attention_torch(scores, ref_indices, values, scale)
    dead = torch.zeros(b, hkv, n, dtype=torch.bool)
    dead[0, 0, 2] = True
    rows[0, 0, 2, 0] = float("nan")
    lse = _merged_lse(part, gen, dead)
    d_out, delta = _randn(gen, b, hkv, n, d), _randn(gen, b, hkv, n)
    zeroed = rows.masked_fill(dead[..., None], 0)
    return dict(rows=rows, indices=indices, ref_indices=ref_indices, keys=keys, values=values, d_out=d_out, lse=lse,
                delta=delta, scale=scale, zeroed=zeroed)  # fmt: skip


def _gather_bwd_run(env, x, need_dkv=True):
    rows, indices, keys, values, d_out, lse, delta = _on(env, *(x[k] for k in (
        "rows", "indices", "keys", "values", "d_out", "lse", "delta")))  # fmt: skip
    return env.ops.gather_attention_backward(rows, indices, keys, values, d_out, lse, delta, x["scale"], need_dkv)


@pytest.mark.parametrize(("dtype", "mem_dtype"), BWD_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(GATHER_BWD_CASES))
def test_gather_attention_backward_matches_pytorch_and_float64(env, name, dtype, mem_dtype):
    x = _gather_bwd_inputs(env, name, dtype, mem_dtype)
    assert (x["indices"] == -1).any()  # padding is exercised
    lo = streaming.gather_attention_backward_torch(x["zeroed"], x["ref_indices"], x["keys"], x["values"], x["d_out"],
                                                   x["lse"], x["delta"], x["scale"], True)  # fmt: skip
    hi = streaming.gather_attention_backward_torch(x["zeroed"].double(), x["ref_indices"], x["keys"].double(),
                                                   x["values"].double(), x["d_out"].double(), x["lse"].double(),
                                                   x["delta"].double(), x["scale"], True)  # fmt: skip
    got = _gather_bwd_run(env, x)
    _check_backward(env, got, lo, hi)
    dq, dk, dv = (t.cpu() for t in got)
    assert (dk[0, 0, 1] == 0).all() and (dv[0, 0, 1] == 0).all() and (dq[0, 0, 2] == 0).all()
    idx = x["ref_indices"]
    uses = torch.zeros(dk.shape[:3], dtype=torch.long).scatter_add_(2, idx.clamp_min(0).flatten(2),
                                                                    (idx >= 0).long().flatten(2))  # fmt: skip
    selected = uses > 0
    if name == "shared-slots":
        assert uses.max() >= 50  # heavy sharing is exercised
    assert (dk[~selected] == 0).all() and (dv[~selected] == 0).all() and dv[selected].abs().sum() > 0
    dq2, dk2, dv2 = _gather_bwd_run(env, x, need_dkv=False)
    assert torch.equal(dq2, got[0]) and dk2.numel() == dv2.numel() == 0
    assert all(torch.equal(a, b) for a, b in zip(got, _gather_bwd_run(env, x)))


def test_backward_ops_with_empty_memory_or_no_rows(env):
    """M = 0: dq 0 and empty dk / dv; no rows (N = 0): dk / dv all 0 (every element written)."""
    gen = torch.Generator().manual_seed(0)
    for n, m in ((6, 0), (0, 30)):
        q, kv = _randn(gen, 1, 2, n, 24), _randn(gen, 1, 2, m, 24)
        d_out, lse, delta = _randn(gen, 1, 2, n, 24), _randn(gen, 1, 2, n), _randn(gen, 1, 2, n)
        indices = torch.full((1, 2, n, 4), -1)
        for dq, dk, dv in (
            env.ops.flash_scan_backward(*_on(env, q, kv, kv, d_out, lse, delta), None, None, 0.2, 0, True),
            env.ops.gather_attention_backward(*_on(env, q, indices, kv, kv, d_out, lse, delta), 0.2, True),
        ):
            assert dq.shape == q.shape and (dq == 0).all()
            assert dk.shape == dv.shape == kv.shape and (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize(
    ("dtype", "mem_dtype", "topk"),
    [(torch.float32, torch.float32, 16), (torch.bfloat16, torch.bfloat16, None), (torch.bfloat16, torch.bfloat16, 16),
     (torch.float32, torch.bfloat16, None)],
    ids=["fp32-knn", "bf16-dense", "bf16-knn", "fp32-bf16mem-dense"],
)  # fmt: skip
def test_memory_attention_gradients_long_memory(env, dtype, mem_dtype, topk):
    """End to end through autograd on the cuda backend: a memory long enough to split the forward
    across blocks, GQA, lengths and mask, causal local part with Lq < Lk, against the float64
    reference's autograd (flash-attention's rule), in the inputs' dtypes."""
    case = make_case(2, 4, 2, 9, 21, 1500, 64, dtype=dtype, mem_dtype=mem_dtype, lengths=True, mask=True)
    gen = torch.Generator().manual_seed(3)
    grad_out, grad_lse = _randn(gen, *case.query.shape), _randn(gen, *case.query.shape[:3])
    names = ("query", "key", "value", "mem_keys", "mem_values")

    def grads(backend, dtype_or_none, device):
        xs = [getattr(case, nm).detach().to(device, dtype_or_none or getattr(case, nm).dtype).requires_grad_()
              for nm in names]  # fmt: skip
        out, lse = fk.memory_attention(*xs, topk=topk, causal=True, return_lse=True, backend=backend,
                                       mem_lengths=case.mem_lengths.to(device), mem_mask=case.mem_mask.to(device))
        before = _launches(env)
        found = torch.autograd.grad([out, lse], xs, [grad_out.to(device, out.dtype), grad_lse.to(device)])
        if env.emulated and backend == "cuda":  # the backward kernels ran: local dq + dk/dv, memory ditto
            assert _launches(env) - before == 4
        return found

    got = grads("cuda", None, env.dev)
    hi, lo = grads("reference", torch.float64, "cpu"), grads("reference", None, "cpu")
    for nm, x, g, h, lw in zip(names, (getattr(case, n) for n in names), got, hi, lo):
        assert g.dtype == x.dtype and g.device.type == env.dev, nm
        assert_close_to_reference(g.cpu(), h, lw, f"d{nm}")


@pytest.mark.parametrize(("dtype", "mem_dtype"), BWD_DTYPES[:2], ids=DTYPE_IDS[:2])
def test_backward_small_shared_memory_budget(emulated, dtype, mem_dtype):
    """A 99 KB device: D = 256 takes 16 x 16 dq tiles and 8 x 16 dk/dv tiles (the smallest plans,
    several partial row tiles), with the same results."""
    import cuda_emu

    cuda_emu.configure(smem_optin=99 * 1024)
    assert cuda_emu.plan("flash_bwd_dkv", rows=12, head_dim=256, tensor_cores=False, smem_optin=99 * 1024)["bm"] == 8
    x = _flash_bwd_inputs("causal-d256", dtype, mem_dtype, seed=1)
    _check_backward(emulated, _flash_bwd_run(emulated, x), *_flash_bwd_references(x))
    assert 0 < cuda_emu.stats()["max_dynamic_smem"] <= 99 * 1024


def test_backward_results_do_not_depend_on_thread_or_block_order(emulated):
    """The backward kernels under the forward, reverse and shuffled schedules: bit-identical
    (no race between the tile loads, the score tiles, P / dS and the accumulations)."""
    import cuda_emu

    def run():
        outs = []
        for dtype, mem_dtype in BWD_DTYPES[:2]:
            outs += _flash_bwd_run(emulated, _flash_bwd_inputs("memory-d100", dtype, mem_dtype))
            outs += _flash_bwd_run(emulated, _flash_bwd_inputs("causal-lq<lk", dtype, mem_dtype))
            outs += _gather_bwd_run(emulated, _gather_bwd_inputs(emulated, "shared-slots", dtype, mem_dtype))
        return outs

    cuda_emu.configure(schedule="forward")
    base = run()
    assert all(torch.isfinite(x).all() for x in base)
    for schedule, seed in (("reverse", 0), ("shuffle", 1)):
        cuda_emu.configure(schedule=schedule, seed=seed)
        for a, b in zip(base, run()):
            assert torch.equal(a, b), schedule


# ------------------------------------------------------------------------------ custom ops


def _op_samples(env):
    torch.manual_seed(1)
    q = torch.randn(2, 2, 9, 40, device=env.dev)
    mk = torch.randn(2, 2, 300, 40, device=env.dev, dtype=torch.bfloat16)
    mv = torch.randn_like(mk)
    lengths = torch.tensor([300, 123], device=env.dev)
    mask = torch.rand(2, 300, device=env.dev) > 0.3
    scores, indices = env.ops.knn_scan(q, mk, lengths, mask, 12)
    _, lse = env.ops.flash_scan(q, mk, mv, lengths, mask, 0.2, 0)
    d_out, delta = torch.randn_like(q), torch.randn_like(lse)
    return {
        "knn_scan": [(q, mk, lengths, mask, 12), (q.bfloat16(), mk, None, None, 5)],
        "flash_scan": [(q, mk, mv, lengths, mask, 0.2, 0), (q.bfloat16(), mk, mv, None, None, 0.2, 3)],
        "gather_attention": [(scores, indices, mv, 0.2)],
        "flash_scan_backward": [(q, mk, mv, d_out, lse, delta, lengths, mask, 0.2, 0, True),
                                (q.bfloat16(), mk, mv, d_out, lse, delta, None, None, 0.2, 3, False)],
        "gather_attention_backward": [(q, indices, mk, mv, d_out, lse, delta, 0.2, True),
                                      (q.bfloat16(), indices, mk, mv, d_out, lse, delta, 0.2, False)],
    }


def test_ops_implement_the_package_schemas(env):
    """One namespace: csrc/cuda registers implementations only (TORCH_LIBRARY_IMPL), for the
    schemas fot_kernels._library defines (torch.ops.fot; the emulator's build: the same schemas
    under fot_cuda_emu, for CPU tensors). No schema is written in the C++ sources."""
    namespace, key = ("fot_cuda_emu", "CPU") if env.emulated else ("fot", "CUDA")
    for name, schema in _library.SCHEMAS.items():
        assert str(getattr(env.ops, name).default._schema) == f"{namespace}::{name}{schema}"
        assert _library.has_kernel(name, key, namespace), (name, key)
    src = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    for path in sorted(p for p in src.iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h")):
        text = path.read_text()
        assert "TORCH_LIBRARY(" not in text and "TORCH_LIBRARY_FRAGMENT(" not in text and ".def(" not in text, path


@pytest.mark.parametrize("name", list(_library.SCHEMAS))
def test_opcheck(env, name):
    op = getattr(env.ops, name).default
    for args in _op_samples(env)[name]:
        torch.library.opcheck(op, args)


def test_op_input_checks_name_the_tensor(env):
    q = torch.randn(1, 2, 3, 8, device=env.dev)
    mk = torch.randn(1, 2, 10, 8, device=env.dev)
    with pytest.raises(RuntimeError, match="mem_keys must have shape"):
        env.ops.knn_scan(q, mk[:, :1], None, None, 2)
    with pytest.raises(RuntimeError, match="k must be in"):
        env.ops.knn_scan(q, mk, None, None, 1000)
    with pytest.raises(RuntimeError, match="query must be float32 or have mem_keys"):
        env.ops.knn_scan(q.half(), mk.bfloat16(), None, None, 2)
    with pytest.raises(RuntimeError, match="mem_mask must have shape"):
        env.ops.knn_scan(q, mk, None, torch.ones(1, 9, dtype=torch.bool, device=env.dev), 2)
    with pytest.raises(RuntimeError, match="values must have keys' dtype"):
        env.ops.flash_scan(q, mk, mk.half(), None, None, 1.0, 0)
    d_out, lse = torch.randn(1, 2, 3, 8, device=env.dev), torch.randn(1, 2, 3, device=env.dev)
    with pytest.raises(RuntimeError, match="d_out must be float32"):
        env.ops.flash_scan_backward(q, mk, mk, d_out.half(), lse, lse, None, None, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        env.ops.flash_scan_backward(q, mk, mk, d_out, lse[:, :, :2], lse, None, None, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="delta must have shape"):
        env.ops.gather_attention_backward(q, torch.zeros(1, 2, 3, 4, dtype=torch.long, device=env.dev), mk, mk,
                                          d_out, lse, lse[:, :1], 1.0, True)  # fmt: skip
    with pytest.raises(RuntimeError, match="indices must be int64"):
        env.ops.gather_attention_backward(q, torch.zeros(1, 2, 3, 4, dtype=torch.int32, device=env.dev), mk, mk,
                                          d_out, lse, lse, 1.0, True)  # fmt: skip
    with pytest.raises(RuntimeError, match="mem_values must have mem_keys' dtype"):
        env.ops.gather_attention_backward(q, torch.zeros(1, 2, 3, 4, dtype=torch.long, device=env.dev), mk,
                                          mk.bfloat16(), d_out, lse, lse, 1.0, True)  # fmt: skip


def test_torch_compile_traces_the_ops(env):
    case = make_case(1, 2, 1, 5, 5, 200, 32, device=env.dev)

    def f(q, k, v, mk, mv):
        return fk.memory_attention(q, k, v, mk, mv, topk=8, backend="cuda")

    args = (case.query, case.key, case.value, case.mem_keys, case.mem_values)
    eager = f(*args)
    # the emulated ops are CPU ops: aot_eager traces them through their fakes without inductor's
    # C++ code generation
    compiled = torch.compile(f, fullgraph=False, backend="aot_eager" if env.emulated else "inductor")(*args)
    torch.testing.assert_close(compiled, eager)


# ------------------------------------------------------------------ the emulator's own checks


def test_results_do_not_depend_on_thread_or_block_order(emulated):
    """A race (a missing barrier, a read of another lane's write without __syncwarp) makes the
    result depend on the order threads run between barriers: forward, reverse and shuffled
    schedules must agree bit for bit."""
    import cuda_emu

    ops = emulated.ops
    q = torch.randn(1, 2, 70, 100)
    keys, values = torch.randn(1, 2, 4200, 100), torch.randn(1, 2, 4200, 100)
    lengths = torch.tensor([4000])
    mask = torch.rand(1, 4200) > 0.1
    # dropped keys (non-finite, with inf / NaN values that must be zeroed before P @ V), a whole
    # tile of them, overflowing scores, and a NaN query row
    keys[:, :, [5, 40, 2000], 7] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    keys[:, :, 1024:1100, 3] = float("inf")
    keys[:, :, 60, 0] = 1e30
    q[:, :, ::3, 0] = 1e10
    values[:, :, [5, 40, 60, 2000]] = torch.tensor([float("nan"), float("inf"), 1.0, float("-inf")])[:, None]
    values[:, :, 1024:1100] = float("inf")
    q[0, 1, 9] = float("nan")

    def run():
        outs = []
        for dt in (torch.float32, torch.bfloat16):
            qd, kd, vd = (q if dt == torch.float32 else q.to(dt)), keys.to(dt), values.to(dt)
            s, i = ops.knn_scan(qd, kd, lengths, mask, 40)
            outs += [s, i, *ops.flash_scan(qd, kd, vd, lengths, mask, 0.1, 0)]
            outs += [*ops.flash_scan(qd, kd[:, :, :70], vd[:, :, :70], None, None, 0.1, 35)]
            outs += [*ops.gather_attention(s, i, vd, 0.1)]
        return outs

    cuda_emu.configure(schedule="forward")
    base = run()
    assert not any(torch.isnan(x).any() for x in base if x.is_floating_point())
    for schedule, seed in (("reverse", 0), ("shuffle", 1), ("shuffle", 2)):
        cuda_emu.configure(schedule=schedule, seed=seed)
        for a, b in zip(base, run()):
            assert torch.equal(a, b), schedule


@pytest.mark.parametrize(
    ("which", "message"),
    [
        (1, "__syncthreads reached by 128 threads while 128 have exited"),
        (2, "__shfl_xor_sync reached by a warp some of whose lanes have exited"),
        (4, "wmma pointer not 256-bit aligned"),
        (5, "write outside the block's dynamic shared memory"),
        (6, "more than the 49152 allowed"),
        (8, "thread exited with cp.async copies it never waited for"),
    ],
)
def test_emulator_reports_device_bugs(emulated, which, message):
    import cuda_emu

    assert cuda_emu.selftest(0) == ("", sum(3 * i + 1 for i in range(256)))  # a correct kernel passes
    error, _ = cuda_emu.selftest(which)
    assert message in error


def test_emulator_shared_memory_starts_as_garbage(emulated):
    """Static __shared__ arrays start every block 0xFF-filled (-1 ints), not zeroed or left over
    from the previous block, so a read of unwritten shared memory shows in the results."""
    import cuda_emu

    assert cuda_emu.selftest(9) == ("", -32)


def test_emulator_schedules_expose_a_missing_barrier(emulated):
    import cuda_emu

    checksums = set()
    for schedule in ("forward", "reverse", "shuffle"):
        cuda_emu.configure(schedule=schedule)
        error, checksum = cuda_emu.selftest(3)
        assert error == ""
        checksums.add(checksum)
    assert len(checksums) == 3


def test_no_out_of_bounds_access_under_asan(emulated):
    """The emulated backend suite again, with the kernels built with AddressSanitizer: a read or
    write past any tensor's storage aborts it (the emulator's own checks cover shared memory).
    Self-test 7 shows an out-of-bounds global read being reported."""
    import subprocess
    import sys

    import cuda_emu

    env = cuda_emu.asan_environment()
    if env is None:
        if os.environ.get("FOT_KERNELS_REQUIRE_CPU_EXT") == "1":
            pytest.fail("libasan not found")
        pytest.skip("libasan not found")
    tests = Path(__file__).resolve().parent
    probe = "import cuda_emu; print(cuda_emu.selftest(7))"
    bad = subprocess.run([sys.executable, "-c", probe], cwd=tests, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "heap-buffer-overflow" in bad.stderr, bad.stderr[-3000:]
    run = subprocess.run(
        # -s: an AddressSanitizer report goes to the subprocess' stderr, not into pytest's capture
        [sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider", "test_backends.py", "test_cuda.py",
         "-k", "emulated and not peak_memory and not asan and not thread_or_block_order and not long_memory"],
        cwd=tests, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, (run.stdout[-3000:], run.stderr[-3000:])
