"""Property-based tests (hypothesis): random shapes, masks and k against the reference, for the
cpu backend (C++ kernels and PyTorch fallback kernels) and the cuda backend's kernels run by the
CPU emulator (tests/cuda_emu)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fot_kernels as fk
from fot_kernels.backends import reference
from fot_kernels.testing import assert_close_to_reference, check_knn

from _inputs import make_case

shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 2),
        "kv_heads": st.integers(1, 3),
        "group": st.sampled_from([1, 2, 4]),
        "len_q": st.integers(1, 40),
        "len_k": st.integers(0, 40),
        "slots": st.integers(0, 700),
        "head_dim": st.sampled_from([1, 7, 16, 64, 100, 129]),
        "k": st.integers(1, 70),
        "lengths": st.booleans(),
        "mask": st.booleans(),
        "mem_dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        "query_dtype": st.sampled_from(["memory's", torch.float32]),  # fp16/bf16 pairs: tensor cores
        "strided": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    }
)
SETTINGS = settings(
    max_examples=int(os.environ.get("FOT_KERNELS_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _case(p):
    torch.manual_seed(p["seed"])
    return make_case(p["batch"], p["kv_heads"] * p["group"], p["kv_heads"], p["len_q"], p["len_k"], p["slots"],
                     p["head_dim"], lengths=p["lengths"], mask=p["mask"], mem_dtype=p["mem_dtype"],
                     dtype=p["mem_dtype"] if p["query_dtype"] == "memory's" else p["query_dtype"],
                     strided_memory=p["strided"])  # fmt: skip


backends = pytest.mark.parametrize("impl", ["cpu", "cpu-pytorch-kernels", "cuda-emulated"], indirect=True)


@backends
@SETTINGS
@given(p=shapes)
def test_knn_topk_property(p, impl):
    case = _case(p)
    scores, indices = fk.knn_topk(case.query, case.mem_keys, p["k"], backend=impl.name, **case.memory_kwargs())
    check_knn(scores, indices, case.query, case.mem_keys, p["k"], **case.memory_kwargs())


@backends
@SETTINGS
@given(p=shapes, dense=st.booleans(), causal=st.booleans())
def test_memory_attention_property(p, dense, causal, impl):
    case = _case(p)
    topk = None if dense else p["k"]
    kw = dict(topk=topk, causal=causal, **case.memory_kwargs())
    out, lse = fk.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values,
                                   return_lse=True, backend=impl.name, **kw)  # fmt: skip
    hi = case.to(torch.float64)
    ref, ref_lse = reference.memory_attention(hi.query, hi.key, hi.value, hi.mem_keys, hi.mem_values, **kw)
    lo, lo_lse = reference.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values, **kw)
    assert_close_to_reference(out, ref, lo, "out")
    assert_close_to_reference(lse, ref_lse, lo_lse, "lse")
