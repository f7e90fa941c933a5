"""The cuda backend (csrc/cuda kernels) against the float64 reference, and torch.library.opcheck
of its custom ops. Skipped cleanly without a CUDA device or without the built extension; only
``test_selection_model_matches_reference`` (a Python model of the scan's selection logic: packed
keys, candidate buffer, bitonic sort, merge by rank, split merge) runs everywhere.

The cases every backend shares (odd head dims, GQA, masks, lengths, ties, NaN keys, decode, empty
memory, every dtype pairing) run against the cuda backend in tests/test_backends.py; this module
adds what is specific to these kernels: memory long enough to split across blocks (and merge the
splits), ties across splits, exactness of the fp32 path with bf16 memory, tensor-core head dims,
what is not served, and the custom ops' opcheck / fake kernels / torch.compile. Tolerances: flash-attention's rule
(fot_kernels.testing.assert_close_to_reference) for attention, fot_kernels.testing.check_knn for
kNN (exact top-k against float64 scores, free only among rounding-level near-ties).
"""

from __future__ import annotations

import pytest
import torch

import fot_kernels as fk
from fot_kernels.backends import cuda as CB
from fot_kernels.backends import reference
from fot_kernels.testing import assert_close_to_reference, check_knn
from _inputs import make_case

pytestmark = pytest.mark.usefixtures("poison_cuda_cache")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or CB.extension_status() is not None,
    reason="no CUDA device" if not torch.cuda.is_available() else f"no CUDA extension: {CB.extension_status()}",
)

DEV = "cuda"


@pytest.fixture
def poison_cuda_cache():
    """Leave NaN-filled blocks in the CUDA caching allocator, so that outputs the C++ side
    allocates with at::empty likely start as NaN and an element a kernel forgets to write fails
    (a best effort: the allocator may also hand out fresh memory)."""
    if not torch.cuda.is_available():
        yield
        return
    blocks = [torch.full((n,), float("nan"), device=DEV) for n in [2**18] * 8 + [2**22] * 4]
    del blocks
    yield


def _case(*args, **kwargs):
    return make_case(*args, device=DEV, **kwargs)


def _attention_against_reference(case, dtype_out, **kw):
    out, lse = fk.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values,
                                   return_lse=True, backend="cuda", **case.memory_kwargs(), **kw)  # fmt: skip
    hi = case.to(torch.float64)
    ref_hi, lse_hi = reference.memory_attention(hi.query, hi.key, hi.value, hi.mem_keys, hi.mem_values,
                                                **case.memory_kwargs(), **kw)  # fmt: skip
    ref_lo, lse_lo = reference.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values,
                                                **case.memory_kwargs(), **kw)  # fmt: skip
    assert out.dtype == dtype_out and lse.dtype == torch.float32 and out.device.type == "cuda"
    assert_close_to_reference(out, ref_hi, ref_lo, "out")
    assert_close_to_reference(lse, lse_hi, lse_lo.float(), "lse")
    return out, lse


# ------------------------------------------------------------------------------------ knn_topk


@needs_gpu
def test_knn_topk_fp32_query_bf16_memory_is_the_fp32_dot_of_upcast_values():
    case = _case(1, 2, 1, 40, 1, 3000, 128, dtype=torch.float32, mem_dtype=torch.bfloat16)
    scores, indices = fk.knn_topk(case.query, case.mem_keys, 32, backend="cuda")
    upcast = case.mem_keys.double().repeat_interleave(2, dim=1)  # bf16 -> exact in float64
    exact = (case.query.double() @ upcast.transpose(-1, -2)).gather(-1, indices)
    torch.testing.assert_close(scores.double(), exact, rtol=1e-5, atol=1e-5)  # fp32 rounding only, no TF32
    check_knn(scores, indices, case.query, case.mem_keys, 32)


@needs_gpu
def test_knn_topk_ties_across_splits_keep_lower_index():
    # identical keys spread over a long memory: the split merge must keep the lowest indices
    keys = torch.randn(1, 1, 30_000, 64, device=DEV) * 0.01
    keys[0, 0, ::997] = 1.0  # 31 slots with the same (largest) score
    query = torch.ones(1, 1, 1, 64, device=DEV)
    scores, indices = fk.knn_topk(query, keys, 8, backend="cuda")
    assert indices[0, 0, 0].tolist() == list(range(0, 30_000, 997))[:8]


@needs_gpu
def test_unsupported_inputs_are_reported():
    case = _case(1, 2, 1, 4, 4, 10, 8)
    assert any("k=300" in r for r in CB.unsupported_reasons("knn_topk", case.query, case.mem_keys, topk=300))
    q64 = case.query.double()
    assert any("float64" in r for r in CB.unsupported_reasons("knn_topk", q64, case.mem_keys, topk=3))
    with pytest.raises(fk.BackendUnavailableError, match="k=300"):
        fk.knn_topk(case.query, case.mem_keys, 300, backend="cuda")
    q_grad = case.query.clone().requires_grad_()
    assert any("require grad" in r for r in CB.unsupported_reasons("knn_topk", q_grad, case.mem_keys, topk=3))
    with torch.no_grad():
        assert not CB.unsupported_reasons("knn_topk", q_grad, case.mem_keys, topk=3)


# ----------------------------------------------------------------------------- memory_attention


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_memory_attention_tensor_core_head_dims(dtype, d):
    case = _case(1, 4, 4, 130, 130, 3000, d, dtype=dtype, lengths=True, mask=True)
    for topk in (None, 64):
        _attention_against_reference(case, dtype, topk=topk)


# ------------------------------------------------------------------------------ custom ops


def _op_samples():
    torch.manual_seed(1)
    q = torch.randn(2, 2, 9, 40, device=DEV)
    mk = torch.randn(2, 2, 300, 40, device=DEV, dtype=torch.bfloat16)
    mv = torch.randn_like(mk)
    lengths = torch.tensor([300, 123], device=DEV)
    mask = torch.rand(2, 300, device=DEV) > 0.3
    scores, indices = torch.ops.fot_cuda.knn_scan(q, mk, lengths, mask, 12)
    return {
        "knn_scan": [(q, mk, lengths, mask, 12), (q.bfloat16(), mk, None, None, 5)],
        "flash_scan": [(q, mk, mv, lengths, mask, 0.2, 0), (q.bfloat16(), mk, mv, None, None, 0.2, 3)],
        "gather_attention": [(scores, indices, mv, 0.2)],
    }


@needs_gpu
@pytest.mark.parametrize("name", ["knn_scan", "flash_scan", "gather_attention"])
def test_opcheck(name):
    op = getattr(torch.ops.fot_cuda, name).default
    for args in _op_samples()[name]:
        torch.library.opcheck(op, args)


@needs_gpu
def test_op_input_checks_name_the_tensor():
    q = torch.randn(1, 2, 3, 8, device=DEV)
    mk = torch.randn(1, 2, 10, 8, device=DEV)
    with pytest.raises(RuntimeError, match="mem_keys must have shape"):
        torch.ops.fot_cuda.knn_scan(q, mk[:, :1], None, None, 2)
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.fot_cuda.knn_scan(q, mk, None, None, 1000)
    with pytest.raises(RuntimeError, match="query must be float32 or have mem_keys"):
        torch.ops.fot_cuda.knn_scan(q.half(), mk.bfloat16(), None, None, 2)
    with pytest.raises(RuntimeError, match="mem_mask must have shape"):
        torch.ops.fot_cuda.knn_scan(q, mk, None, torch.ones(1, 9, dtype=torch.bool, device=DEV), 2)
    with pytest.raises(RuntimeError, match="values must have keys' dtype"):
        torch.ops.fot_cuda.flash_scan(q, mk, mk.half(), None, None, 1.0, 0)


@needs_gpu
def test_torch_compile_traces_the_ops():
    case = _case(1, 2, 1, 5, 5, 200, 32)

    def f(q, k, v, mk, mv):
        return fk.memory_attention(q, k, v, mk, mv, topk=8, backend="cuda")

    args = (case.query, case.key, case.value, case.mem_keys, case.mem_values)
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=False)(*args)
    torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------- model of the scan's selection (no GPU)


def _pack(score: float, slot: int) -> int:
    """common.cuh pack_key: ord32(score) << 32 | (0xFFFFFFFF - slot)."""
    import struct

    u = struct.unpack("<I", struct.pack("<f", 0.0 if score == 0 else score))[0]
    u = (~u & 0xFFFFFFFF) if u & 0x80000000 else (u | 0x80000000)
    return (u << 32) | (0xFFFFFFFF - slot)


def _unpack(key: int) -> tuple[float, int]:
    import struct

    if key == 0:
        return float("-inf"), -1
    u = key >> 32
    bits = (u & 0x7FFFFFFF) if u & 0x80000000 else (~u & 0xFFFFFFFF)
    return struct.unpack("<f", struct.pack("<I", bits))[0], 0xFFFFFFFF - (key & 0xFFFFFFFF)


def _count_greater(a, n, x):
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) >> 1
        lo, hi = (mid + 1, hi) if a[mid] > x else (lo, mid)
    return lo


def _bitonic_desc(a):
    size = 2
    while size <= len(a):
        stride = size >> 1
        while stride:
            for t in range(len(a) // 2):
                lo = 2 * stride * (t // stride) + t % stride
                hi = lo + stride
                if (a[lo] < a[hi]) if (lo & size) == 0 else (a[lo] > a[hi]):
                    a[lo], a[hi] = a[hi], a[lo]
            stride >>= 1
        size <<= 1


def _merge_into_top(top, k, other, n):
    moves = [(top[i], i + _count_greater(other, n, top[i])) for i in range(k)]
    moves += [(other[j], j + _count_greater(top, k, other[j])) for j in range(n) if other[j]]
    for value, rank in moves:
        if rank < k:
            top[rank] = value


def _model_scan(scores, valid, k, split_len, bn=64, cb=64):
    """knn.cu step by step: per split a top list + candidate buffer flushed by sort + merge by
    rank, then the splits' lists merged the same way."""
    lists = []
    for m_begin in range(0, max(len(scores), 1), split_len):
        m_end = min(len(scores), m_begin + split_len)
        top, cand, state = [0] * k, [0] * cb, {"cnt": 0, "thr": 0}

        def flush():
            cand[state["cnt"] :] = [0] * (cb - state["cnt"])
            _bitonic_desc(cand)
            _merge_into_top(top, k, cand, state["cnt"])
            state.update(cnt=0, thr=top[k - 1])

        for m0 in range(m_begin, m_end, bn):
            for c0 in range(0, bn, 32):
                if state["cnt"] + 32 > cb:
                    flush()
                for m in range(m0 + c0, min(m0 + c0 + 32, m_end)):
                    key = _pack(scores[m], m)
                    if valid[m] and scores[m] == scores[m] and key > state["thr"]:
                        cand[state["cnt"]] = key
                        state["cnt"] += 1
        if state["cnt"]:
            flush()
        lists.append(top)
    top = lists[0]
    for other in lists[1:]:
        _merge_into_top(top, k, list(other), k)
    return [_unpack(x) for x in top]


def test_selection_model_matches_reference():
    """An executable model of the kernel's selection logic (keep in sync with knn.cu /
    common.cuh) against the reference: ties (also +0/-0), NaN, -inf, masks, splits."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        m = int(torch.randint(0, 700, (1,), generator=gen))
        k = [1, 5, 32, 33, 64, 100, 256][trial % 7]
        s = torch.randn(m, generator=gen)
        if m > 8:
            if trial % 3 == 0:
                s = (s * 2).round() / 2  # many exact ties
            s[torch.randint(0, m, (3,), generator=gen)] = float("nan")
            s[torch.randint(0, m, (2,), generator=gen)] = float("-inf")
            s[:2] = torch.tensor([0.0, -0.0])
        valid = torch.rand(m, generator=gen) > 0.2
        split_len = [64, 128, 576, 10**6][trial % 4]
        got = _model_scan(s.tolist(), valid.tolist(), k, split_len)
        ref_s, ref_i = reference.knn_topk(torch.ones(1, 1, 1, 1), s.reshape(1, 1, m, 1), k,
                                          mem_mask=valid.reshape(1, m))  # fmt: skip
        assert [i for _, i in got] == ref_i[0, 0, 0].tolist(), (trial, m, k, split_len)
        assert [x for x, _ in got] == ref_s[0, 0, 0].tolist(), (trial, m, k, split_len)


@needs_gpu
@pytest.mark.parametrize("k", [32, 256])
def test_knn_topk_long_memory_splits_and_merges(k):
    case = _case(1, 4, 2, 1, None, 40_000, 128, dtype=torch.bfloat16, lengths=True, mask=True)
    scores, indices = fk.knn_topk(case.query, case.mem_keys, k, backend="cuda", **case.memory_kwargs())
    check_knn(scores, indices, case.query, case.mem_keys, k, **case.memory_kwargs())
