"""fot_kernels.distributed over gloo on the CPU: 2, 3 and 4 ranks started by the test itself.

One spawn of 4 processes runs every case on the process groups of ``PHASES``: the world (4 ranks,
the default ``group=None``), ranks [0, 1, 2] (3 ranks), ranks [1, 3] (2 ranks, a non-contiguous
subgroup) and [0, 2] concurrently with it, then one-rank groups (the single-process fast path).
Every rank checks its result against the single-process op over the concatenated memory (the
float64 oracle, the flash-attention tolerance rule) and that every rank got the same bits. In the
children, torch.empty & co. return NaN-filled tensors (as the ``poison_empty`` fixture of
conftest.py does), so that an element nobody wrote fails. A hang fails: the collectives have a
timeout and the parent kills the children after ``DEADLINE_S``. Child tracebacks are reported per
case and rank. With a GPU, ``test_cuda_tensors_over_gloo`` runs 2 ranks on it with CUDA tensors
(the Triton, CUDA and streaming kernels).
"""

from __future__ import annotations

import importlib.util
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from _dist import poison_empty, run_spawned

# torch builds without torch.distributed (some macOS / Windows wheels) cannot run these tests
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")

WORLD = 4
DEADLINE_S = 300  # the whole spawned run (start-up included); a hang fails here
COLLECTIVE_TIMEOUT_S = 120  # gloo: a collective whose peers never come raises after this
# (group name, member global ranks); groups in the same phase run concurrently. One-rank groups
# run the single-process op itself (fot_kernels.distributed's fast path): SOLO_CASES there.
PHASES = [
    [("world", (0, 1, 2, 3))],
    [("ranks 0-2", (0, 1, 2))],
    [("ranks 0,2", (0, 2)), ("ranks 1,3", (1, 3))],
    [("rank 0 alone", (0,)), ("rank 3 alone", (3,))],
]
GROUP_NAMES = ["world", "ranks 0-2", "ranks 1,3", "ranks 0,2", "rank 0 alone", "rank 3 alone"]

B, HQ, HKV, D, LQ, LK = 2, 4, 2, 20, 5, 7  # GQA, odd head dim and lengths


# --------------------------------------------------------------------------------------------
# Inputs: the full memory (the same on every rank, from a seed) and this rank's shard
# --------------------------------------------------------------------------------------------


def shard_sizes(world: int, seed: int) -> list[int]:
    """Unequal shard sizes, one of them empty (with 3+ ranks), from a seed."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(s) for s in torch.randint(3, 23, (world,), generator=gen)]
    if world >= 3:
        sizes[1] = 0
    return sizes


def full_inputs(sizes: list[int], seed: int, mem_dtype=torch.float32, q_dtype=torch.float32, nan_slots=True,
                shape=(B, HQ, HKV, D, LQ, LK)):  # fmt: skip
    """query/key/value, the concatenated memory and its validity mask (each shard's mem_lengths
    and mem_mask in the concatenation), NaN keys in valid slots and NaN values in invalid ones."""
    batch, hq, hkv, dim, lq, lk = shape
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q = rnd(batch, hq, lq, dim).to(q_dtype)
    k, v = rnd(batch, hkv, lk, dim).to(q_dtype), rnd(batch, hkv, lk, dim).to(q_dtype)
    mk, mv = rnd(batch, hkv, total, dim), rnd(batch, hkv, total, dim)
    lengths = [torch.tensor([m, *torch.randint(0, m + 1, (batch - 1,), generator=gen).tolist()]) for m in sizes]
    masks = [torch.rand(batch, m, generator=gen) > 0.2 for m in sizes]
    valid = torch.cat(
        [(torch.arange(m)[None, :] < ln[:, None]) & mask for m, ln, mask in zip(sizes, lengths, masks)], 1
    )
    if nan_slots and total > 0:
        valid_slots = valid[0].nonzero().flatten()
        if valid_slots.numel() > 1:
            mk[0, -1, valid_slots[1]] = float("nan")  # a NaN key in a valid slot: never selected
        invalid_slots = (~valid[-1]).nonzero().flatten()
        if invalid_slots.numel() > 0:
            mv[-1, :, invalid_slots[0]] = float("nan")  # a NaN value in an invalid slot: never read
    return dict(q=q, k=k, v=v, mk=mk.to(mem_dtype), mv=mv.to(mem_dtype), valid=valid, lengths=lengths, masks=masks)


def shard(inputs: dict, sizes: list[int], rank: int) -> dict:
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    return dict(
        mk=inputs["mk"][:, :, start:stop].clone(), mv=inputs["mv"][:, :, start:stop].clone(),
        mem_lengths=inputs["lengths"][rank], mem_mask=inputs["masks"][rank],
    )  # fmt: skip


def same_on_every_rank(group, *tensors: torch.Tensor) -> None:
    """Every rank of the group holds the same bits (NaN-aware)."""
    for t in tensors:
        flat = t.detach().reshape(-1).cpu()
        flat = flat.to(torch.float64) if flat.is_floating_point() else flat
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, flat, group=group)
        for r, p in enumerate(parts):
            if t.is_floating_point():
                p, flat = p.nan_to_num(1e300), flat.nan_to_num(1e300)
            if not torch.equal(p, flat):
                raise AssertionError(f"result differs between this rank and rank {r}")


# --------------------------------------------------------------------------------------------
# Cases: each runs on every member of a group: case(group, rank, world)
# --------------------------------------------------------------------------------------------


def _check_attention(group, rank, sizes, inputs, topk, backend="auto"):
    """memory_attention (with local part, return_lse) and knn_attention vs the single-process op."""
    import fot_kernels
    from fot_kernels import distributed as fd
    from fot_kernels.testing import assert_close_to_reference

    mine = shard(inputs, sizes, rank)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    full = dict(mem_mask=inputs["valid"], topk=topk)
    for causal in (True, False):
        out, lse = fd.memory_attention(q, k, v, mine["mk"], mine["mv"], topk=topk, causal=causal, return_lse=True,
                                       mem_lengths=mine["mem_lengths"], mem_mask=mine["mem_mask"], backend=backend,
                                       group=group)  # fmt: skip
        hi = fot_kernels.memory_attention(q.double(), k.double(), v.double(), inputs["mk"].double(),
                                          inputs["mv"].double(), causal=causal, return_lse=True, backend="reference",
                                          **full)  # fmt: skip
        lo = fot_kernels.memory_attention(q, k, v, inputs["mk"], inputs["mv"], causal=causal, return_lse=True,
                                          backend="reference", **full)  # fmt: skip
        assert out.dtype == q.dtype and lse.dtype == lo[1].dtype
        assert_close_to_reference(out, hi[0], lo[0], f"out (topk={topk}, causal={causal})")
        assert_close_to_reference(lse, hi[1], lo[1], f"lse (topk={topk}, causal={causal})")
        same_on_every_rank(group, out, lse)
        plain = fd.memory_attention(q, k, v, mine["mk"], mine["mv"], topk=topk, causal=causal,
                                    mem_lengths=mine["mem_lengths"], mem_mask=mine["mem_mask"], backend=backend,
                                    group=group)  # fmt: skip
        assert torch.equal(plain, out), "return_lse=False returns the same output"
    out, lse = fd.knn_attention(q, mine["mk"], mine["mv"], topk=topk, mem_lengths=mine["mem_lengths"],
                                mem_mask=mine["mem_mask"], backend=backend, group=group)  # fmt: skip
    hi = fot_kernels.knn_attention(q.double(), inputs["mk"].double(), inputs["mv"].double(), backend="reference",
                                   **full)  # fmt: skip
    lo = fot_kernels.knn_attention(q, inputs["mk"], inputs["mv"], backend="reference", **full)
    assert_close_to_reference(out, hi[0], lo[0], f"knn_attention out (topk={topk})")
    assert_close_to_reference(lse, hi[1], lo[1], f"knn_attention lse (topk={topk})")
    same_on_every_rank(group, out, lse)


def _check_knn(group, rank, sizes, inputs, k, exact: bool, backend="auto"):
    import fot_kernels
    from fot_kernels import distributed as fd
    from fot_kernels.testing import check_knn

    mine = shard(inputs, sizes, rank)
    scores, indices = fd.knn_topk(inputs["q"], mine["mk"], k, mem_lengths=mine["mem_lengths"],
                                  mem_mask=mine["mem_mask"], backend=backend, group=group)  # fmt: skip
    check_knn(scores, indices, inputs["q"], inputs["mk"], k, mem_mask=inputs["valid"])
    if exact:  # exact fp32 scores (integer-valued inputs): the reference's indices, ties included
        ref_s, ref_i = fot_kernels.knn_topk(inputs["q"], inputs["mk"], k, mem_mask=inputs["valid"],
                                            backend="reference")  # fmt: skip
        assert torch.equal(indices, ref_i), f"indices differ at {int((indices != ref_i).sum())} places"
        assert torch.equal(scores, ref_s)
    same_on_every_rank(group, scores, indices)


def case_fp32_dense_and_knn(group, rank, world):
    sizes = shard_sizes(world, 1)
    inputs = full_inputs(sizes, 2)
    for topk in (None, 1, 6, 10_000):  # 10_000: beyond the whole memory
        _check_attention(group, rank, sizes, inputs, topk)
    for k in (1, 6, sum(sizes) + 3):
        _check_knn(group, rank, sizes, inputs, k, exact=False)


def case_reference_and_streaming_backends(group, rank, world):
    sizes = shard_sizes(world, 3)
    inputs = full_inputs(sizes, 4)
    for backend in ("reference", "streaming"):
        _check_attention(group, rank, sizes, inputs, 5, backend=backend)
        _check_knn(group, rank, sizes, inputs, 5, exact=False, backend=backend)
    _check_attention(group, rank, sizes, inputs, None, backend="streaming")


def case_bf16_memory_and_query(group, rank, world):
    sizes = shard_sizes(world, 5)
    inputs = full_inputs(sizes, 6, mem_dtype=torch.bfloat16)
    for topk in (None, 4):
        _check_attention(group, rank, sizes, inputs, topk)
    _check_knn(group, rank, sizes, inputs, 4, exact=False)
    inputs = full_inputs(sizes, 7, mem_dtype=torch.bfloat16, q_dtype=torch.bfloat16)
    for topk in (None, 4):
        _check_attention(group, rank, sizes, inputs, topk)


def case_ties_across_shard_borders(group, rank, world):
    """Integer-valued keys (exact fp32 scores) with duplicates on several ranks: the lower global
    index (the lower rank) wins, and the cut falls inside a group of equal scores."""
    sizes = [4, 3, 5, 2][:world]
    gen = torch.Generator().manual_seed(8)
    inputs = full_inputs(sizes, 9, nan_slots=False)
    total = sum(sizes)
    small = lambda *s: torch.randint(-2, 3, s, generator=gen).float()  # noqa: E731
    inputs["q"] = small(B, HQ, LQ, D)
    mk = small(B, HKV, total, D)
    dup = small(B, HKV, 1, D)
    for slot in {sizes[0] - 1, min(sizes[0], total - 1), total - 1, 0}:  # last of rank 0, first of rank 1, last
        mk[:, :, slot] = dup[:, :, 0]
    inputs["mk"] = mk
    inputs["lengths"] = [torch.tensor([m, m]) for m in sizes]  # every slot valid
    inputs["masks"] = [torch.ones(B, m, dtype=torch.bool) for m in sizes]
    inputs["valid"] = torch.ones(B, total, dtype=torch.bool)
    for k in (1, 2, 3, 5):
        _check_knn(group, rank, sizes, inputs, k, exact=True)
        _check_knn(group, rank, sizes, inputs, k, exact=True, backend="reference")
        _check_attention(group, rank, sizes, inputs, k)


def case_empty_memory_everywhere(group, rank, world):
    sizes = [0] * world
    inputs = full_inputs(sizes, 10)
    for topk in (None, 3):
        _check_attention(group, rank, sizes, inputs, topk)
    _check_knn(group, rank, sizes, inputs, 3, exact=True)


def case_nan_query_row(group, rank, world):
    from fot_kernels import distributed as fd

    sizes = shard_sizes(world, 11)
    inputs = full_inputs(sizes, 12)
    inputs["q"][0, 1, 2, 3] = float("nan")  # this row drops every candidate: output 0, lse -inf
    for topk in (None, 3):
        _check_attention(group, rank, sizes, inputs, topk)
        mine = shard(inputs, sizes, rank)
        out, lse = fd.knn_attention(inputs["q"], mine["mk"], mine["mv"], topk=topk, group=group)
        assert torch.equal(out[0, 1, 2], torch.zeros(D)) and lse[0, 1, 2] == float("-inf")


def case_communication_does_not_grow_with_memory(group, rank, world):
    """Bytes sent per call are the formula's, whatever the shard sizes."""
    from fot_kernels import distributed as fd

    sent = []
    for seed, scale in ((13, 1), (14, 5)):
        sizes = [s * scale for s in shard_sizes(world, seed)]
        inputs = full_inputs(sizes, seed)
        mine = shard(inputs, sizes, rank)
        before = fd.bytes_sent()
        fd.knn_attention(inputs["q"], mine["mk"], mine["mv"], topk=3, mem_lengths=mine["mem_lengths"],
                         mem_mask=mine["mem_mask"], group=group)  # fmt: skip
        sent.append(fd.bytes_sent() - before)
    rows = B * HQ * LQ
    meta = 8 * (2 + len(fd._FINGERPRINT))
    expected = meta + 8 * (2 * rows * 3 + 1) + 4 * (rows * (D + 1) + 1)
    assert sent == [expected, expected], (sent, expected)


def _grad_check(group, rank, sizes, inputs, topk, mem_dtype, local=True, causal=True, backend="streaming"):
    """d query/key/value on every rank and d shard = the slice of the single-process gradients
    (``backend``: the kernels of the forward and of the backward)."""
    import fot_kernels
    from fot_kernels import distributed as fd
    from fot_kernels.testing import assert_close_to_reference

    gen = torch.Generator().manual_seed(99)
    w_out = torch.randn(inputs["q"].shape, generator=gen).to(inputs["q"].device)
    w_lse = torch.randn(inputs["q"].shape[:3], generator=gen).to(inputs["q"].device)

    def loss_of(out, lse):
        return (out.double() * w_out).sum() + (torch.where(torch.isinf(lse), 0, lse).double() * w_lse).sum()

    def grads(dtype, dist_run: bool):
        leaf = lambda t, dt: t.detach().clone().to(dt).requires_grad_()  # noqa: E731
        q, k, v = (leaf(inputs[n], dtype) for n in ("q", "k", "v"))
        if dist_run:
            mine = shard(inputs, sizes, rank)
            mk, mv = leaf(mine["mk"], mem_dtype or dtype), leaf(mine["mv"], mem_dtype or dtype)
            if local:
                out, lse = fd.memory_attention(q, k, v, mk, mv, topk=topk, causal=causal, return_lse=True,
                                               backend=backend, mem_lengths=mine["mem_lengths"],
                                               mem_mask=mine["mem_mask"], group=group)  # fmt: skip
            else:
                out, lse = fd.knn_attention(q, mk, mv, topk=topk, mem_lengths=mine["mem_lengths"],
                                            mem_mask=mine["mem_mask"], backend=backend, group=group)  # fmt: skip
        else:
            mk, mv = leaf(inputs["mk"], mem_dtype or dtype), leaf(inputs["mv"], mem_dtype or dtype)
            out, lse = fot_kernels.memory_attention(q, k if local else None, v if local else None, mk, mv, topk=topk,
                                                    causal=causal, return_lse=True, backend="reference",
                                                    mem_mask=inputs["valid"])  # fmt: skip
        loss_of(out, lse).backward()
        grads = [t.grad for t in (q, k, v, mk, mv)]
        if not local:
            assert grads[1] is None and grads[2] is None
            grads[1], grads[2] = torch.zeros_like(k), torch.zeros_like(v)
        return grads

    got = grads(torch.float32, True)
    hi = grads(torch.float64, False)
    lo = grads(torch.float32, False)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for name, g, h, lw in zip(("dq", "dk", "dv", "d mem_keys", "d mem_values"), got, hi, lo):
        if name.startswith("d mem"):
            h, lw = h[:, :, start:stop], lw[:, :, start:stop]
            assert g.dtype == (mem_dtype or torch.float32), name
        assert_close_to_reference(g, h, lw, f"{name} (topk={topk})")
    same_on_every_rank(group, *got[:3])


def case_gradients(group, rank, world):
    sizes = shard_sizes(world, 15)
    inputs = full_inputs(sizes, 16)
    for topk in (None, 4):
        _grad_check(group, rank, sizes, inputs, topk, None)
        _grad_check(group, rank, sizes, inputs, topk, None, local=False, backend="auto")  # the C++ kernels
    _grad_check(group, rank, sizes, inputs, 3, None, causal=False, backend="auto")
    inputs = full_inputs(sizes, 17, mem_dtype=torch.bfloat16)
    _grad_check(group, rank, sizes, inputs, 4, torch.bfloat16)
    _grad_check(group, rank, sizes, inputs, 4, torch.bfloat16, backend="cpu")
    inputs = full_inputs(sizes, 18, shape=(1, 3, 3, 100, 4, 6))  # MHA, the 3B model's head dim
    _grad_check(group, rank, sizes, inputs, 5, None)


def case_triton_backend(group, rank, world):
    """backend="triton" (the Triton interpreter on the CPU, TRITON_INTERPRET=1 from conftest.py):
    the shard's top-k, the partial attention over the selected slots (the fused kernel with the
    selection given) and the backward kernels; fp32 and bf16 memory with a bf16 query."""
    sizes = shard_sizes(world, 29)
    inputs = full_inputs(sizes, 30)
    for topk in (None, 5):
        _check_attention(group, rank, sizes, inputs, topk, backend="triton")
        _grad_check(group, rank, sizes, inputs, topk, None, backend="triton")
    _check_knn(group, rank, sizes, inputs, 5, exact=False, backend="triton")
    _grad_check(group, rank, sizes, inputs, 4, None, local=False, backend="triton")
    inputs = full_inputs(sizes, 31, mem_dtype=torch.bfloat16, q_dtype=torch.bfloat16)
    _check_attention(group, rank, sizes, inputs, 5, backend="triton")


def case_other_shapes_and_float64(group, rank, world):
    sizes = shard_sizes(world, 22)
    for shape in ((1, 3, 3, 100, 4, 6), (3, 6, 2, 7, 1, 9), (2, 4, 1, 16, 9, 3)):  # MHA D=100; decode; MQA
        inputs = full_inputs(sizes, 23, shape=shape)
        for topk in (None, 7):
            _check_attention(group, rank, sizes, inputs, topk)
        _check_knn(group, rank, sizes, inputs, 7, exact=False)
    inputs = full_inputs(sizes, 24)
    inputs = {n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for n, t in inputs.items()}
    for topk in (None, 3):
        _check_attention(group, rank, sizes, inputs, topk)
    _check_knn(group, rank, sizes, inputs, 3, exact=False)


def case_no_queries_and_bad_group(group, rank, world):
    from fot_kernels import distributed as fd

    sizes = shard_sizes(world, 25)
    inputs = full_inputs(sizes, 26, shape=(B, HQ, HKV, D, 0, LK))  # Lq = 0
    mine = shard(inputs, sizes, rank)
    out, lse = fd.memory_attention(inputs["q"], inputs["k"], inputs["v"], mine["mk"], mine["mv"], topk=2,
                                   return_lse=True, group=group)  # fmt: skip
    assert out.shape == (B, HQ, 0, D) and lse.shape == (B, HQ, 0)
    scores, indices = fd.knn_topk(inputs["q"], mine["mk"], 2, group=group)
    assert scores.shape == indices.shape == (B, HQ, 0, 2)
    _expect_error(lambda: fd.knn_topk(inputs["q"], mine["mk"], 2, group="world"), TypeError, "group")


def case_gradient_of_memory_only(group, rank, world):
    """Only the shards require grad (no collective in the backward); and a shard that requires
    grad on one rank only."""
    from fot_kernels import distributed as fd

    sizes = shard_sizes(world, 18)
    inputs = full_inputs(sizes, 19, nan_slots=False)
    mine = shard(inputs, sizes, rank)
    mk = mine["mk"].requires_grad_(rank == 0)
    mv = mine["mv"].requires_grad_(rank == 0)
    out, _ = fd.knn_attention(inputs["q"], mk, mv, topk=3, group=group)
    assert out.requires_grad == (rank == 0)
    if rank == 0:
        out.sum().backward()
        assert mk.grad is not None and mv.grad is not None and torch.isfinite(mv.grad).all()


def case_memory_layer_attention(group, rank, world):
    """fot_kernels.distributed.memory_layer_attention (this rank's MemoryView, None for an empty
    shard; shards in different float dtypes) vs fot_kernels.nn.memory_layer_attention over the
    concatenation, with and without local left padding; gradients of query/key/value."""
    from fot_kernels import distributed as fd
    from fot_kernels import nn as fnn
    from fot_kernels.memory import MemoryView
    from fot_kernels.testing import assert_close_to_reference

    sizes = shard_sizes(world, 27)
    inputs = full_inputs(sizes, 28)
    # even ranks store their shard in bf16: the concatenation holds the bf16-rounded values
    starts = [sum(sizes[:r]) for r in range(world)]
    for r in range(0, world, 2):
        for name in ("mk", "mv"):
            part = inputs[name][:, :, starts[r] : starts[r] + sizes[r]]
            part.copy_(part.bfloat16().float())
    mine = shard(inputs, sizes, rank)
    if rank % 2 == 0:
        mine["mk"], mine["mv"] = mine["mk"].bfloat16(), mine["mv"].bfloat16()
    view = MemoryView(mine["mk"], mine["mv"], mine["mem_lengths"], mine["mem_mask"])
    if sizes[rank] == 0:
        view = None
    total = sum(sizes)
    full_lengths = torch.full((B,), total)
    padding = torch.ones(B, LK, dtype=torch.bool)
    padding[1, :2] = False  # left padding of row 1
    for kpm in (None, padding):
        for topk in (None, 4):
            q, k, v = (inputs[n].clone().requires_grad_() for n in ("q", "k", "v"))
            out = fd.memory_layer_attention(q, k, v, view, key_padding_mask=kpm, topk=topk, group=group)
            results = []
            for dtype in (torch.float64, torch.float32):
                leaves = [inputs[n].detach().clone().to(dtype).requires_grad_() for n in ("q", "k", "v")]
                full = MemoryView(inputs["mk"].to(dtype), inputs["mv"].to(dtype), full_lengths, inputs["valid"])
                ref = fnn.memory_layer_attention(*leaves, full, key_padding_mask=kpm, topk=topk, backend="reference")
                (ref * inputs["q"].to(dtype)).sum().backward()
                results.append((ref, [t.grad for t in leaves]))
            (out * inputs["q"]).sum().backward()
            what = f"memory_layer_attention (topk={topk}, padding={kpm is not None})"
            assert_close_to_reference(out, results[0][0], results[1][0], what)
            for name, g, hi, lo in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), results[0][1], results[1][1]):
                assert_close_to_reference(g, hi, lo, f"{name} of {what}")
            same_on_every_rank(group, out, q.grad, k.grad, v.grad)
    last = world - 1
    bad = "not a view" if rank == last else view
    _expect_error(lambda: fd.memory_layer_attention(inputs["q"], inputs["k"], inputs["v"], bad, group=group),
                  TypeError, f"rank {last}", "MemoryView")  # fmt: skip


def _expect_error(fn, cls, *fragments):
    try:
        fn()
    except cls as exc:
        for fragment in fragments:
            assert fragment in str(exc), f"{fragment!r} not in {exc}"
        return
    raise AssertionError(f"expected {cls.__name__}")


def case_error_on_one_rank_raises_everywhere(group, rank, world):
    from fot_kernels import distributed as fd
    from fot_kernels import ops
    from fot_kernels.backends import streaming

    sizes = shard_sizes(world, 20)
    inputs = full_inputs(sizes, 21)
    mine = shard(inputs, sizes, rank)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    last = world - 1
    bad_lengths = mine["mem_lengths"] + (100 if rank == last else 0)
    for topk in (None, 3):
        _expect_error(lambda t=topk: fd.memory_attention(q, k, v, mine["mk"], mine["mv"], topk=t,
                                                         mem_lengths=bad_lengths, group=group),
                      ValueError, f"rank {last}", "mem_lengths")  # fmt: skip
    _expect_error(lambda: fd.knn_topk(q, mine["mk"], 0 if rank == last else 2, group=group), ValueError,
                  f"rank {last}", "k must be")  # fmt: skip
    wrong_type = mine["mk"].to(torch.int32) if rank == 0 else mine["mk"]
    _expect_error(lambda: fd.knn_attention(q, wrong_type, mine["mv"], topk=2, group=group), TypeError,
                  "rank 0", "mem_keys")  # fmt: skip
    # arguments that must agree but do not
    _expect_error(lambda: fd.knn_attention(q, mine["mk"], mine["mv"], topk=2 + rank, group=group), ValueError,
                  "k/topk", "same on every rank")  # fmt: skip
    _expect_error(lambda: fd.memory_attention(q, k, v, mine["mk"], mine["mv"], causal=rank == 0, group=group),
                  ValueError, "causal")  # fmt: skip
    q_other = q[:, :, : LQ - 1] if rank == last else q
    _expect_error(lambda: fd.knn_topk(q_other, mine["mk"], 2, group=group), ValueError, "queries")
    # a kernel that fails on one rank, in each phase
    real_topk, real_attention = ops.knn_topk, ops.knn_attention
    real_selected = fd._selected_attention

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    try:
        if rank == last:
            ops.knn_topk = broken
        _expect_error(lambda: fd.knn_topk(q, mine["mk"], 2, group=group), RuntimeError, f"rank {last}", "simulated")
        _expect_error(lambda: fd.knn_attention(q, mine["mk"], mine["mv"], topk=2, group=group), RuntimeError,
                      "simulated")  # fmt: skip
        ops.knn_topk = real_topk
        if rank == last:  # after the candidates' all_gather, before the partial attentions' one
            fd._selected_attention = broken
        _expect_error(lambda: fd.knn_attention(q, mine["mk"], mine["mv"], topk=2, group=group), RuntimeError,
                      f"rank {last}", "simulated")  # fmt: skip
        fd._selected_attention = real_selected
        if rank == last:
            ops.knn_attention = broken
        _expect_error(lambda: fd.memory_attention(q, k, v, mine["mk"], mine["mv"], group=group), RuntimeError,
                      f"rank {last}", "simulated")  # fmt: skip
    finally:
        ops.knn_topk, ops.knn_attention = real_topk, real_attention
        fd._selected_attention = real_selected
    # a backward that fails on one rank
    real_backward = streaming.memory_attention_backward
    try:
        if rank == last:
            streaming.memory_attention_backward = broken
        qg = q.clone().requires_grad_()
        out = fd.memory_attention(qg, k, v, mine["mk"], mine["mv"], topk=2, group=group)
        _expect_error(lambda: out.sum().backward(), RuntimeError, f"rank {last}", "simulated")
    finally:
        streaming.memory_attention_backward = real_backward
    # the group still works after all of that
    _check_attention(group, rank, sizes, inputs, 3)


def on_device(inputs: dict, device) -> dict:
    """``full_inputs`` moved to ``device`` (the per-shard lists of lengths and masks too)."""
    move = lambda x: [t.to(device) for t in x] if isinstance(x, list) else x.to(device)  # noqa: E731
    return {name: move(x) for name, x in inputs.items()}


def cuda_case(group, rank, world, backend):
    """CUDA tensors (gloo stages them through host buffers; several ranks share one GPU, which
    NCCL refuses): outputs and gradients vs the single-process op, for one backend."""
    sizes = shard_sizes(world, 40)
    inputs = on_device(full_inputs(sizes, 41), "cuda")
    for topk in (None, 5):
        _check_attention(group, rank, sizes, inputs, topk, backend=backend)
        _grad_check(group, rank, sizes, inputs, topk, None, backend=backend)
    _check_knn(group, rank, sizes, inputs, 5, exact=False, backend=backend)
    inputs = on_device(full_inputs(sizes, 42, mem_dtype=torch.bfloat16, q_dtype=torch.bfloat16), "cuda")
    _check_attention(group, rank, sizes, inputs, 5, backend=backend)
    _grad_check(group, rank, sizes, inputs, 5, torch.bfloat16, backend=backend)


# Triton serves CPU tensors only through its interpreter (conftest.py sets TRITON_INTERPRET=1
# where there is no GPU; the children inherit it); on a GPU, test_cuda_tensors_over_gloo runs it
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None

SOLO_CASES = [
    case_fp32_dense_and_knn,
    case_bf16_memory_and_query,
    case_ties_across_shard_borders,
    case_gradients,
]
CASES = [
    case_fp32_dense_and_knn,
    case_reference_and_streaming_backends,
    case_bf16_memory_and_query,
    case_ties_across_shard_borders,
    case_empty_memory_everywhere,
    case_nan_query_row,
    case_communication_does_not_grow_with_memory,
    case_gradients,
    case_gradient_of_memory_only,
    *([case_triton_backend] if TRITON_ON_CPU else []),
    case_other_shapes_and_float64,
    case_no_queries_and_bad_group,
    case_memory_layer_attention,
    case_error_on_one_rank_raises_everywhere,
]


# --------------------------------------------------------------------------------------------
# The spawned group
# --------------------------------------------------------------------------------------------


def _worker(rank: int, init_file: str, results) -> None:
    report = {}
    try:
        torch.set_num_threads(1)
        poison_empty()
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # fmt: skip
        groups = {}
        for phase in PHASES:
            for name, members in phase:
                groups[name] = None if len(members) == WORLD else dist.new_group(list(members))
        for phase in PHASES:
            for name, members in phase:
                if rank not in members:
                    continue
                group, group_rank = groups[name], members.index(rank)
                for case in CASES if len(members) > 1 else SOLO_CASES:
                    started = time.perf_counter()
                    try:
                        case(group, group_rank, len(members))
                        report[(case.__name__, name)] = (None, time.perf_counter() - started)
                    except Exception:
                        report[(case.__name__, name)] = (traceback.format_exc(), time.perf_counter() - started)
        dist.destroy_process_group()
    except BaseException:
        report[("worker", "")] = (traceback.format_exc(), 0.0)
    results.put((rank, report))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """{rank: {(case, group): (traceback | None, seconds)}} from one spawned group of WORLD ranks."""
    from fot_kernels.backends import _cpu_ext

    _cpu_ext.load()  # build (or find) the C++ CPU kernels once here, not in WORLD children at once
    init_file = str(tmp_path_factory.mktemp("dist") / "init")
    reports = run_spawned(_worker, WORLD, init_file, DEADLINE_S)
    slowest = sorted(((t, key) for report in reports.values() for key, (_, t) in report.items()), reverse=True)
    print("slowest distributed cases (s):", [(round(t, 1), key) for t, key in slowest[:8]])
    return reports


MEMBERS = {name: members for phase in PHASES for name, members in phase}
RUNS = [(c.__name__, g) for g in GROUP_NAMES for c in (CASES if len(MEMBERS[g]) > 1 else SOLO_CASES)]


@pytest.mark.parametrize(("case", "group_name"), RUNS)
def test_distributed(spawned, case, group_name):
    members = MEMBERS[group_name]
    failures = []
    for rank in members:
        outcome = spawned[rank].get((case, group_name))
        if outcome is None:
            failures.append(f"--- rank {rank}: case did not run")
        elif outcome[0] is not None:
            failures.append(f"--- rank {rank} (global) of group {group_name}:\n{outcome[0]}")
    if failures:
        pytest.fail("\n".join(failures))


def test_needs_an_initialised_group():
    from fot_kernels import distributed as fd

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="initialised"):
        fd.knn_topk(q, torch.randn(1, 1, 3, 4), 2)


def _cuda_worker(rank: int, init_file: str, results, world: int, backends: tuple[str, ...]) -> None:
    report = {}
    try:
        torch.set_num_threads(1)
        torch.cuda.set_device(0)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # fmt: skip
        for backend in backends:
            started = time.perf_counter()
            try:
                cuda_case(None, rank, world, backend)
                report[backend] = (None, time.perf_counter() - started)
            except Exception:
                report[backend] = (traceback.format_exc(), time.perf_counter() - started)
        dist.destroy_process_group()
    except BaseException:
        report[("worker", "")] = (traceback.format_exc(), 0.0)
    results.put((rank, report))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_over_gloo(tmp_path):
    """2 ranks on one GPU: backends auto, triton, cuda (when its extension is built) and
    streaming, CUDA tensors, outputs and gradients (the GPU check runs this)."""
    from fot_kernels.backends import cuda

    backends = ("auto", "triton", "streaming") + (("cuda",) if cuda.extension_status() is None else ())
    reports = run_spawned(_cuda_worker, 2, str(tmp_path / "init"), DEADLINE_S, (2, backends))
    failures = [f"--- rank {rank}, backend {b}:\n{tb}" for rank, rep in reports.items() for b, (tb, _) in rep.items()
                if tb is not None]  # fmt: skip
    missing = [(rank, b) for rank in range(2) for b in backends if b not in reports[rank]]
    assert not missing, f"cases that did not run: {missing}"
    if failures:
        pytest.fail("\n".join(failures))
