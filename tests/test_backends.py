"""Every production backend against the float64 reference, on the same cases: the cpu backend with
its C++ kernels and with its PyTorch fallback kernels, the device-agnostic streaming backend, and
the cuda backend where a GPU and the built extension are present (the ``impl`` fixture of
conftest.py). The Triton backend has its own module (tests/test_triton.py: interpreter-sized
shapes)."""

import pytest
import torch

import fot_kernels as fk
from fot_kernels.backends import reference
from fot_kernels.testing import assert_close_to_reference, check_knn, peak_memory

from _inputs import make_case

pytestmark = pytest.mark.usefixtures("poison_empty")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (B, Hq, Hkv, Lq, Lk, M, D): odd sizes, GQA 32/8, decode, D=100, Lq > Lk and Lq < Lk
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (2, 4, 2, 37, 50, 1025, 100),
    (1, 32, 8, 3, 5, 300, 128),
    (1, 2, 2, 1, 17, 2049, 64),
    (2, 3, 1, 29, 11, 97, 3),
    (1, 2, 1, 70, 70, 1500, 256),
]


def _skip_float64_on_gpu_kernels(impl, dtype):
    if dtype == torch.float64 and impl.name == "cuda":
        pytest.skip("float64 is not served by the CUDA kernels (unsupported_reasons says so)")


def _attention_against_reference(impl, case, dtype_out, **kw):
    out, lse = fk.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values,
                                   return_lse=True, backend=impl.name, **case.memory_kwargs(), **kw)  # fmt: skip
    hi = case.to(torch.float64)
    ref_hi, lse_hi = reference.memory_attention(hi.query, hi.key, hi.value, hi.mem_keys, hi.mem_values,
                                                **case.memory_kwargs(), **kw)  # fmt: skip
    ref_lo, lse_lo = reference.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values,
                                                **case.memory_kwargs(), **kw)  # fmt: skip
    assert out.dtype == dtype_out and lse.dtype == torch.float32
    assert_close_to_reference(out, ref_hi, ref_lo, "out")
    assert_close_to_reference(lse, lse_hi, lse_lo.float(), "lse")
    return out, lse


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 32, 100, 256])
def test_knn_topk(shape, k, impl):
    b, hq, hkv, lq, lk, m, d = shape
    case = make_case(b, hq, hkv, lq, lk, m, d, lengths=True, mask=True, device=impl.device)
    scores, indices = fk.knn_topk(case.query, case.mem_keys, k, backend=impl.name, **case.memory_kwargs())
    check_knn(scores, indices, case.query, case.mem_keys, k, **case.memory_kwargs())


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("mem_dtype", DTYPES)
def test_knn_topk_dtypes(dtype, mem_dtype, impl):
    _skip_float64_on_gpu_kernels(impl, dtype)
    case = make_case(2, 4, 2, 19, 3, 777, 100, dtype=dtype, mem_dtype=mem_dtype, strided_memory=True,
                     device=impl.device)  # fmt: skip
    scores, indices = fk.knn_topk(case.query, case.mem_keys, 16, backend=impl.name)
    check_knn(scores, indices, case.query, case.mem_keys, 16)


def test_knn_topk_ties_keep_lower_index(impl):
    keys = torch.nn.functional.normalize(torch.randn(1, 1, 50, 8, device=impl.device), dim=-1)  # own key wins
    keys[0, 0, [9, 23, 41]] = keys[0, 0, 4].clone()  # four identical keys
    query = keys[:, :, 4:5].clone()
    scores, indices = fk.knn_topk(query, keys, 3, backend=impl.name)
    assert indices.tolist() == [[[[4, 9, 23]]]]
    assert scores[0, 0, 0, 0] == scores[0, 0, 0, 2]


def test_knn_topk_nan_key_and_k_above_valid(impl):
    case = make_case(2, 2, 2, 5, 1, 40, 16, lengths=False, mask=False, device=impl.device)
    case.mem_keys[0, 1, 7] = float("nan")
    lengths = torch.tensor([10, 0], device=impl.device)
    scores, indices = fk.knn_topk(case.query, case.mem_keys, 12, mem_lengths=lengths, backend=impl.name)
    check_knn(scores, indices, case.query, case.mem_keys, 12, mem_lengths=lengths)
    assert (indices[0, 1] != 7).all() and (indices[0, 1, :, -3:] == -1).all()  # 9 candidates left
    assert (indices[1] == -1).all() and torch.isneginf(scores[1]).all()


def test_knn_topk_empty_memory(impl):
    case = make_case(1, 2, 1, 4, 1, 0, 32, device=impl.device)
    scores, indices = fk.knn_topk(case.query, case.mem_keys, 5, backend=impl.name)
    assert scores.shape == (1, 2, 4, 5) and (indices == -1).all() and torch.isneginf(scores).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("topk", [None, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_memory_attention(shape, topk, causal, impl):
    b, hq, hkv, lq, lk, m, d = shape
    case = make_case(b, hq, hkv, lq, lk, m, d, lengths=True, mask=True, device=impl.device)
    _attention_against_reference(impl, case, torch.float32, topk=topk, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mem_dtype", DTYPES)
@pytest.mark.parametrize("topk", [None, 16])
def test_memory_attention_dtypes(dtype, mem_dtype, topk, impl):
    case = make_case(2, 4, 2, 33, 40, 555, 100, dtype=dtype, mem_dtype=mem_dtype, lengths=True, strided_memory=True,
                     device=impl.device)  # fmt: skip
    _attention_against_reference(impl, case, dtype, topk=topk, softmax_scale=0.07)


def test_memory_attention_float64_runs_in_float64(impl):
    _skip_float64_on_gpu_kernels(impl, torch.float64)
    case = make_case(1, 2, 1, 9, 9, 100, 20, dtype=torch.float64, device=impl.device)
    for topk in (None, 5):
        out, lse = fk.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values,
                                       topk=topk, return_lse=True, backend=impl.name)  # fmt: skip
        ref, ref_lse = reference.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values,
                                                  topk=topk)  # fmt: skip
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("topk", [None, 4])
def test_nan_memory_key_does_not_poison(topk, impl):
    case = make_case(1, 2, 2, 6, 6, 64, 16, device=impl.device)
    case.mem_keys[0, 0, 10] = float("nan")
    out = _attention_against_reference(impl, case, torch.float32, topk=topk)[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("topk", [None, 4])
def test_rows_with_nothing_to_attend(topk, impl):
    # Lq > Lk with causal masking: the first Lq - Lk queries see no local key; memory row 1 is empty
    case = make_case(2, 2, 1, 8, 3, 20, 16, device=impl.device)
    case.mem_lengths = torch.tensor([20, 0], device=impl.device)
    out, lse = _attention_against_reference(impl, case, torch.float32, topk=topk)
    assert (out[1, :, :5] == 0).all() and torch.isneginf(lse[1, :, :5]).all()


@pytest.mark.parametrize("topk", [None, 3])
def test_empty_memory_and_memory_only(topk, impl):
    case = make_case(1, 4, 2, 10, 12, 0, 24, device=impl.device)
    _attention_against_reference(impl, case, torch.float32, topk=topk)
    case = make_case(2, 4, 2, 10, None, 50, 24, lengths=True, device=impl.device)
    out, lse = fk.knn_attention(case.query, case.mem_keys, case.mem_values, topk=topk, backend=impl.name,
                                **case.memory_kwargs())  # fmt: skip
    hi = case.to(torch.float64)
    ref, ref_lse = reference.memory_attention(hi.query, None, None, hi.mem_keys, hi.mem_values, topk=topk,
                                              **case.memory_kwargs())  # fmt: skip
    ref_lo, ref_lse_lo = reference.memory_attention(case.query, None, None, case.mem_keys, case.mem_values,
                                                    topk=topk, **case.memory_kwargs())  # fmt: skip
    assert_close_to_reference(out, ref, ref_lo, "out")
    assert_close_to_reference(lse, ref_lse, ref_lse_lo, "lse")


@pytest.mark.parametrize("topk", [None, 3])
def test_no_local_key_and_no_memory_slot(topk, impl):
    case = make_case(1, 4, 2, 5, 0, 0, 24, device=impl.device)
    out, lse = _attention_against_reference(impl, case, torch.float32, topk=topk)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_topk_at_least_memory_size_equals_dense(impl):
    case = make_case(2, 4, 2, 16, 16, 40, 32, lengths=True, mask=True, device=impl.device)
    args = (case.query, case.key, case.value, case.mem_keys, case.mem_values)
    dense = fk.memory_attention(*args, backend=impl.name, **case.memory_kwargs())
    knn = fk.memory_attention(*args, topk=64, backend=impl.name, **case.memory_kwargs())
    torch.testing.assert_close(knn, dense, atol=2e-6, rtol=1e-5)


def test_merge_attention_recovers_joint_softmax(impl):
    case = make_case(2, 4, 2, 16, 16, 200, 32, lengths=True, device=impl.device)
    out_l, lse_l = fk.memory_attention(case.query, case.key, case.value, case.mem_keys[:, :, :0],
                                       case.mem_values[:, :, :0], return_lse=True, backend=impl.name)  # fmt: skip
    out_m, lse_m = fk.knn_attention(case.query, case.mem_keys, case.mem_values, topk=None, backend=impl.name,
                                    **case.memory_kwargs())  # fmt: skip
    merged, lse = fk.merge_attention([out_l, out_m], [lse_l, lse_m])
    joint, joint_lse = fk.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values,
                                           return_lse=True, backend=impl.name, **case.memory_kwargs())  # fmt: skip
    torch.testing.assert_close(merged, joint, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, joint_lse, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("topk", [None, 4])
def test_invalid_slot_with_nan_value_does_not_poison(topk, impl):
    # unused store capacity may hold anything: an invalid slot must contribute exactly nothing
    case = make_case(1, 2, 2, 6, 6, 64, 16, mask=True, device=impl.device)
    case.mem_mask[0, :3] = False
    clean = _attention_against_reference(impl, case, torch.float32, topk=topk)[0]
    case.mem_values[0, :, 1] = float("nan")
    case.mem_keys[0, :, 1] = float("nan")
    out = _attention_against_reference(impl, case, torch.float32, topk=topk)[0]
    torch.testing.assert_close(out, clean, rtol=0, atol=0)


@pytest.mark.parametrize("topk", [None, 32])
@pytest.mark.parametrize("mem_dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_does_not_grow_with_lq_times_m(topk, mem_dtype, impl):
    # Lq x M scores in fp32 would be 256 MiB, an fp32 copy of bf16 memory 64 MiB: the streaming
    # backends must stay far below both.
    if impl.kind in ("cpu-pytorch-kernels", "streaming") and impl.device == "cpu" and topk is not None:
        pytest.skip("the PyTorch kernels' kNN merge sorts every block: slow on the CPU, covered at smaller sizes")
    case = make_case(1, 1, 1, 256, 64, 262_144, 32, mem_dtype=mem_dtype, device=impl.device)
    _, peak = peak_memory(lambda: fk.memory_attention(case.query, case.key, case.value, case.mem_keys,
                                                      case.mem_values, topk=topk, backend=impl.name),
                          device=impl.device)  # fmt: skip
    if peak < 0:
        pytest.skip("no /proc/self/clear_refs on this system")
    lq_times_m = 256 * 262_144 * 4
    assert peak < lq_times_m / 10, f"peak extra memory {peak / 2**20:.1f} MiB"
    if mem_dtype != torch.float32:
        upcast_keys = case.mem_keys.numel() * 4
        assert peak < upcast_keys / 4, f"peak extra memory {peak / 2**20:.1f} MiB: an upcast copy of the memory?"


# --- Non-finite scores (docs/DESIGN.md 3.2): dropped, never poisoning a row -----------------------

NONFINITE = {"+inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def _masked_out(case, slot):
    """The same case with memory slot ``slot`` of batch row 0 made invalid by mem_mask."""
    mask = torch.ones(case.mem_keys.shape[0], case.mem_keys.shape[2], dtype=torch.bool, device=case.query.device)
    if case.mem_mask is not None:
        mask &= case.mem_mask
    mask[0, slot] = False
    return mask


@pytest.mark.parametrize("bad", NONFINITE.values(), ids=NONFINITE.keys())
@pytest.mark.parametrize("topk", [None, 4])
@pytest.mark.parametrize("mem_dtype", [torch.float32, torch.float16])
def test_nonfinite_memory_key_is_dropped(bad, topk, mem_dtype, impl):
    # An fp16 overflow upstream: one element of a memory key and the slot's whole value non-finite.
    # The slot must contribute exactly what an invalid slot contributes: nothing.
    case = make_case(2, 4, 2, 7, 9, 70, 24, mem_dtype=mem_dtype, device=impl.device)
    case.mem_keys[0, :, 10, 3] = bad
    case.mem_values[0, :, 10] = bad
    out = _attention_against_reference(impl, case, torch.float32, topk=topk)[0]
    masked = fk.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values, topk=topk,
                                 mem_mask=_masked_out(case, 10), backend=impl.name)  # fmt: skip
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, masked, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad", NONFINITE.values(), ids=NONFINITE.keys())
@pytest.mark.parametrize("topk", [None, 4])
def test_nonfinite_local_key_is_dropped(bad, topk, impl):
    case = make_case(1, 4, 2, 6, 11, 40, 20, device=impl.device)
    case.key[0, 1, 3, 5] = bad
    case.value[0, 1, 3] = bad
    out = _attention_against_reference(impl, case, torch.float32, topk=topk, causal=True)[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", NONFINITE.values(), ids=NONFINITE.keys())
def test_nonfinite_memory_key_is_never_selected(bad, impl):
    case = make_case(1, 2, 1, 5, 1, 30, 16, device=impl.device)
    case.mem_keys[0, 0, [4, 17], 2] = bad  # +inf would win every query's top-1 if it were selected
    scores, indices = fk.knn_topk(case.query, case.mem_keys, 30, backend=impl.name)
    check_knn(scores, indices, case.query, case.mem_keys, 30)
    assert not ((indices == 4) | (indices == 17)).any()
    assert (indices[..., -2:] == -1).all() and torch.isfinite(scores[..., :-2]).all()


@pytest.mark.parametrize("topk", [None, 4])
def test_score_overflow_drops_the_slot_for_those_queries_only(topk, impl):
    # A finite fp32 key whose score overflows for some queries only: dropped there, kept elsewhere.
    case = make_case(1, 2, 2, 6, 6, 50, 16, device=impl.device)
    case.mem_keys[0, :, 7] = 0.0
    case.mem_keys[0, :, 7, 0] = 1e30
    case.query[0, :, 1, 0] = 1e10  # 1e40 overflows fp32: slot 7 dropped for query 1
    case.query[0, :, 2, 0] = 2.0  # 2e30: slot 7 takes every weight for query 2
    out = fk.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values, topk=topk,
                              backend=impl.name)  # fmt: skip
    ref = reference.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values, topk=topk)[0]
    masked = fk.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values, topk=topk,
                                 mem_mask=_masked_out(case, 7), backend=impl.name)  # fmt: skip
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, :, 1], masked[0, :, 1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[0, :, 2], case.mem_values[0, :, 7].float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("topk", [None, 4])
def test_nan_query_row_gets_zero_and_minus_inf(topk, impl):
    case = make_case(1, 2, 2, 5, 5, 40, 16, device=impl.device)
    case.query[0, 1, 2, 4] = float("nan")
    case.mem_values[0, 0, 3] = float("nan")  # a NaN value at a slot every other query drops
    case.mem_keys[0, 0, 3] = float("nan")
    out, lse = _attention_against_reference(impl, case, torch.float32, topk=topk)
    assert (out[0, 1, 2] == 0).all() and torch.isneginf(lse[0, 1, 2])
    assert torch.isfinite(out).all()


def test_local_key_and_value_with_strided_last_dim(impl):
    case = make_case(1, 4, 2, 9, 12, 40, 20, device=impl.device)
    case.key = case.key.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) == Lk
    case.value = case.value.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert case.key.stride(-1) != 1
    _attention_against_reference(impl, case, torch.float32, topk=None)


# --- Gradients (docs/DESIGN.md 3.4): computed or refused, never silently detached ----------------


@pytest.mark.parametrize("topk", [None, 4])
def test_gradients_are_computed(topk, impl):
    """Every production backend differentiates memory_attention (its own backward kernels)."""
    case = make_case(1, 4, 2, 6, 8, 30, 16, lengths=True, device=impl.device)
    leaves = [t.clone().requires_grad_() for t in (case.query, case.key, case.value, case.mem_keys, case.mem_values)]
    call = lambda *xs, backend: fk.memory_attention(*xs, topk=topk, backend=backend, **case.memory_kwargs())  # noqa: E731
    grad_out = torch.randn_like(case.query)
    grads = torch.autograd.grad(call(*leaves, backend=impl.name), leaves, grad_out)
    hi = [t.detach().double().requires_grad_() for t in leaves]
    ref = torch.autograd.grad(call(*hi, backend="reference"), hi, grad_out.double())
    lo = [t.detach().clone().requires_grad_() for t in leaves]
    ref_lo = torch.autograd.grad(call(*lo, backend="reference"), lo, grad_out)
    for name, g, g_hi, g_lo in zip(("query", "key", "value", "mem_keys", "mem_values"), grads, ref, ref_lo):
        assert g.dtype == g_lo.dtype
        assert_close_to_reference(g, g_hi, g_lo, f"d{name}")
