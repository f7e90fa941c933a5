"""Bad inputs raise TypeError/ValueError naming the argument, before any kernel runs; dispatch errors
list every backend and why it was rejected."""

import re

import pytest
import torch

import fot_kernels as fk

from _inputs import make_case


def _args(**over):
    c = make_case(2, 4, 2, 5, 6, 30, 16)
    a = dict(query=c.query, key=c.key, value=c.value, mem_keys=c.mem_keys, mem_values=c.mem_values)
    a.update(over)
    return a


def _attn(**over):
    a = _args(**over)
    extra = {k: a.pop(k) for k in list(a) if k not in ("query", "key", "value", "mem_keys", "mem_values")}
    return fk.memory_attention(a["query"], a["key"], a["value"], a["mem_keys"], a["mem_values"], **extra)


BAD = [
    (dict(query=[[1.0]]), TypeError, "query must be a torch.Tensor"),
    (dict(query=torch.randn(2, 4, 5)), ValueError, "query must be a 4-D tensor"),
    (dict(query=torch.randint(0, 3, (2, 4, 5, 16))), TypeError, "query must have dtype"),
    (dict(mem_keys=torch.randn(3, 2, 30, 16)), ValueError, "mem_keys batch size"),
    (dict(mem_keys=torch.randn(2, 2, 30, 8)), ValueError, "mem_keys head dim"),
    (dict(mem_keys=torch.randn(2, 3, 30, 16), mem_values=torch.randn(2, 3, 30, 16)), ValueError,
     "multiple of mem_keys heads"),
    (dict(mem_values=torch.randn(2, 2, 31, 16)), ValueError, "mem_values must have the shape of mem_keys"),
    (dict(mem_keys=torch.randn(2, 2, 16, 30).transpose(-1, -2)), ValueError,
     "mem_keys must be contiguous in its last dim"),
    (dict(key=torch.randn(2, 2, 6, 8)), ValueError, "value must have the shape of key"),
    (dict(key=None), ValueError, "key and value must both be given"),
    (dict(key=torch.randn(2, 3, 6, 16), value=torch.randn(2, 3, 6, 16)), ValueError, "multiple of key heads"),
    # local keys with 1 kv head, memory with 2: each divides Hq = 4, but they must be equal
    (dict(key=torch.randn(2, 1, 6, 16), value=torch.randn(2, 1, 6, 16)), ValueError,
     re.escape("same number of kv heads, got key shape (2, 1, 6, 16) and mem_keys shape (2, 2, 30, 16)")),
    (dict(topk=0), ValueError, r"topk must be in \[1, "),
    (dict(topk=2.5), TypeError, "topk must be an int"),
    (dict(topk=True), TypeError, "topk must be an int"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(softmax_scale="a"), TypeError, "softmax_scale must be a float"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite float"),
    (dict(mem_lengths=[30, 30]), TypeError, "mem_lengths must be a torch.Tensor"),
    (dict(mem_lengths=torch.tensor([30.0, 1.0])), TypeError, "mem_lengths must have an integer dtype"),
    (dict(mem_lengths=torch.tensor([30])), ValueError, r"mem_lengths must have shape \[B\]"),
    (dict(mem_lengths=torch.tensor([31, 0])), ValueError, r"mem_lengths values must be in \[0, M=30\]"),
    (dict(mem_lengths=torch.tensor([-1, 0])), ValueError, r"mem_lengths values must be in \[0, M=30\]"),
    (dict(mem_mask=torch.ones(2, 30, dtype=torch.int32)), TypeError, "mem_mask must have dtype bool"),
    (dict(mem_mask=torch.ones(2, 29, dtype=torch.bool)), ValueError, r"mem_mask must have shape \[B, M\]"),
    (dict(backend="gpu"), ValueError, "backend must be 'auto' or one of"),
    (dict(backend=3), TypeError, "backend must be a str"),
    (dict(query=torch.randn(2, 4, 5, 300), key=torch.randn(2, 2, 6, 300), value=torch.randn(2, 2, 6, 300),
          mem_keys=torch.randn(2, 2, 30, 300), mem_values=torch.randn(2, 2, 30, 300)), ValueError,
     "head dim must be in"),
]


@pytest.mark.parametrize("over,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_memory_attention_rejects(over, exc, msg):
    with pytest.raises(exc, match=msg):
        _attn(**over)


@pytest.mark.parametrize("k,exc", [(0, ValueError), (-3, ValueError), (1.0, TypeError), (None, TypeError)])
def test_knn_topk_rejects_k(k, exc):
    c = make_case(1, 2, 1, 3, 1, 10, 8)
    with pytest.raises(exc, match="k must"):
        fk.knn_topk(c.query, c.mem_keys, k)


def test_merge_attention_rejects():
    out, lse = torch.randn(2, 3, 4), torch.randn(2, 3)
    with pytest.raises(ValueError, match="non-empty and of equal length"):
        fk.merge_attention([out], [lse, lse])
    with pytest.raises(ValueError, match=re.escape("lses[1] must have shape")):
        fk.merge_attention([out, out], [lse, torch.randn(2, 4)])
    with pytest.raises(TypeError, match="sequences"):
        fk.merge_attention(out, lse)


def test_explicit_backend_that_cannot_serve_lists_reasons():
    c = make_case(1, 2, 1, 3, 3, 10, 8)
    want = r"backend 'cuda' cannot serve knn_topk[\s\S]*cuda: .*CUDA tensors"
    with pytest.raises(fk.BackendUnavailableError, match=want):
        fk.knn_topk(c.query, c.mem_keys, 2, backend="cuda")
    assert issubclass(fk.BackendUnavailableError, ValueError)


def test_auto_backend_on_cpu_and_reference_backend_agree():
    c = make_case(1, 2, 1, 3, 3, 10, 8)
    a = fk.memory_attention(c.query, c.key, c.value, c.mem_keys, c.mem_values, topk=4)
    b = fk.memory_attention(c.query, c.key, c.value, c.mem_keys, c.mem_values, topk=4, backend="reference")
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_validation_runs_before_any_kernel(monkeypatch):
    from fot_kernels.backends import cpu

    monkeypatch.setattr(cpu, "memory_attention", lambda *a, **k: pytest.fail("kernel ran on bad input"))
    with pytest.raises(ValueError):
        _attn(mem_lengths=torch.tensor([99, 0]))


def test_streaming_backend_serves_any_device_and_matches_cpu():
    c = make_case(2, 4, 2, 7, 9, 40, 12, lengths=True)
    for topk in (None, 5):
        a = fk.memory_attention(c.query, c.key, c.value, c.mem_keys, c.mem_values, topk=topk,
                                mem_lengths=c.mem_lengths, backend="streaming")  # fmt: skip
        b = fk.memory_attention(c.query, c.key, c.value, c.mem_keys, c.mem_values, topk=topk,
                                mem_lengths=c.mem_lengths, backend="reference")  # fmt: skip
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    from fot_kernels.backends import auto_order

    assert auto_order("cuda")[-1] == "streaming" and auto_order("cpu") == ("cpu", "streaming")
