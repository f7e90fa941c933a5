"""The oracle itself, against brute force written with Python loops on tiny inputs."""

import math

import pytest
import torch

from fot_kernels.backends import reference

from _inputs import make_case


def _brute_force(case, topk, causal, scale):
    """Loop over (b, h, i): gather candidates as (score, value) pairs, one softmax."""
    q, k, v, mk, mv = (t.double() if t is not None else None for t in
                       (case.query, case.key, case.value, case.mem_keys, case.mem_values))  # fmt: skip
    batch, hq, lq, d = q.shape
    rep = hq // mk.shape[1]
    out = torch.zeros(batch, hq, lq, d, dtype=torch.float64)
    lse = torch.full((batch, hq, lq), -math.inf, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            for i in range(lq):
                cands = []
                lk = 0 if k is None else k.shape[2]
                for j in range(lk):
                    s = float(q[b, h, i] @ k[b, h // rep, j])
                    if (not causal or j <= i + lk - lq) and math.isfinite(s):
                        cands.append((s * scale, v[b, h // rep, j]))
                mem = []
                for m in range(mk.shape[2]):
                    ok = case.mem_lengths is None or m < case.mem_lengths[b]
                    ok = ok and (case.mem_mask is None or bool(case.mem_mask[b, m]))
                    s = float(q[b, h, i] @ mk[b, h // rep, m])
                    if ok and math.isfinite(s):
                        mem.append((s, m))
                if topk is not None:
                    mem = sorted(mem, key=lambda t: (-t[0], t[1]))[:topk]
                cands += [(s * scale, mv[b, h // rep, m]) for s, m in mem]
                if cands:
                    mx = max(s for s, _ in cands)
                    z = sum(math.exp(s - mx) for s, _ in cands)
                    out[b, h, i] = sum(math.exp(s - mx) / z * val for s, val in cands)
                    lse[b, h, i] = mx + math.log(z)
    return out, lse


@pytest.mark.parametrize("topk", [None, 1, 3, 50])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("len_q,len_k", [(3, 5), (5, 3), (4, 0)])
def test_memory_attention_matches_brute_force(topk, causal, len_q, len_k):
    case = make_case(2, 4, 2, len_q, len_k, 11, 5, lengths=True, mask=True)
    case.mem_keys[1, 0, 2] = float("nan")
    case.mem_keys[0, 1, 4, 3] = float("inf")  # non-finite scores are dropped, values never read
    case.mem_values[0, 1, 4] = float("inf")
    case.mem_keys[1, 1, 6, 0] = float("-inf")
    if len_k > 1:
        case.key[0, 0, 1, 2] = float("-inf")
        case.value[0, 0, 1] = float("nan")
    scale = 0.3
    out, lse = reference.memory_attention(case.query.double(), case.key.double(), case.value.double(),
                                          case.mem_keys.double(), case.mem_values.double(), topk=topk,
                                          causal=causal, softmax_scale=scale, **case.memory_kwargs())  # fmt: skip
    want, want_lse = _brute_force(case, topk, causal, scale)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)


def test_knn_order_ties_and_nonfinite_scores():
    # D = 1 keys make the scores exact: ties keep the lower index; +-inf and NaN are never selected
    inf, nan = float("inf"), float("nan")
    keys = torch.tensor([1.0, -inf, 3.0, 3.0, nan, 2.0, inf, 3.0]).view(1, 1, 8, 1)
    mask = torch.tensor([[True, True, True, True, True, True, True, False]])
    s, i = reference.knn_topk(torch.ones(1, 1, 1, 1), keys, 9, mem_mask=mask)
    assert i.flatten().tolist() == [2, 3, 5, 0, -1, -1, -1, -1, -1]
    assert s.flatten().tolist() == [3.0, 3.0, 2.0, 1.0] + [-inf] * 5


def test_select_topk_merge_order_and_padding():
    from fot_kernels._merge import select_topk

    scores = torch.tensor([[1.0, 5.0, 3.0, 3.0, 7.0, 2.0]])
    selectable = torch.tensor([[True, True, True, True, False, False]])
    s, i = select_topk(scores, torch.arange(6)[None], selectable, 6)
    assert i.tolist() == [[1, 2, 3, 0, -1, -1]]  # ties by position, non-selectable last as (-inf, -1)
    assert s.tolist() == [[5.0, 3.0, 3.0, 1.0, float("-inf"), float("-inf")]]


def test_reference_runs_in_float64():
    case = make_case(1, 2, 1, 4, 4, 8, 6, dtype=torch.float64)
    out, lse = reference.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values, topk=3)
    scores, _ = reference.knn_topk(case.query, case.mem_keys, 3)
    assert out.dtype == lse.dtype == scores.dtype == torch.float64


@pytest.mark.parametrize("topk", [None, 2])
def test_no_local_key_and_no_memory_slot(topk):
    case = make_case(1, 2, 1, 3, 0, 0, 4)
    out, lse = reference.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values, topk=topk)
    assert (out == 0).all() and torch.isneginf(lse).all() and out.shape == case.query.shape
