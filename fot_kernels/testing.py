"""Helpers shared by the tests and the benchmarks: dtype-aware tolerances, a robust kNN checker,
and a peak-memory probe.

Tolerance rule (flash-attention's): run the reference twice, once upcast to float64 and once in the
kernel's own precision; the kernel's error against the upcast reference must be at most
``factor`` (2) times the low-precision reference's own error, plus a small floor. This needs no
hand-tuned atol per case and cannot be loosened silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

#: absolute floor added to the 2x rule, per output dtype (covers outputs where the low-precision
#: reference happens to be exact, e.g. a single candidate)
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close_to_reference(
    actual: Tensor, ref_hi: Tensor, ref_lo: Tensor, name: str = "output", factor: float = 2.0
) -> None:
    """|actual - ref_hi| <= factor * |ref_lo - ref_hi| + floor, elementwise maxima; infs must match."""
    if actual.shape != ref_hi.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref_hi.shape)}")
    a, hi, lo = actual.double(), ref_hi.double(), ref_lo.double()
    if torch.isnan(a).any():
        nans, ref_nans = int(torch.isnan(a).sum()), int(torch.isnan(hi).sum())
        raise AssertionError(f"{name}: {nans} NaN values (reference has {ref_nans})")
    inf_mismatch = torch.isinf(a) != torch.isinf(hi)
    if inf_mismatch.any() or (a[torch.isinf(a)] != hi[torch.isinf(hi)]).any():
        raise AssertionError(f"{name}: infinities differ from the reference at {int(inf_mismatch.sum())} places")
    finite = torch.isfinite(hi)
    err = (a - hi)[finite].abs().max().item() if finite.any() else 0.0
    ref_err = (lo - hi)[finite].abs().max().item() if finite.any() else 0.0
    bound = factor * ref_err + FLOOR[actual.dtype if actual.dtype in FLOOR else torch.float32]
    if not err <= bound:
        raise AssertionError(
            f"{name}: max error {err:.3g} > {factor} x reference error {ref_err:.3g} + floor = {bound:.3g}"
        )


def exact_scores(query: Tensor, mem_keys: Tensor) -> Tensor:
    """float64 inner products [B, Hq, Lq, M] (GQA-expanded)."""
    n_rep = query.shape[1] // mem_keys.shape[1]
    keys = mem_keys.double().repeat_interleave(n_rep, dim=1)
    return query.double() @ keys.transpose(-1, -2)


def check_knn(
    scores: Tensor,
    indices: Tensor,
    query: Tensor,
    mem_keys: Tensor,
    k: int,
    *,
    mem_lengths: Tensor | None = None,
    mem_mask: Tensor | None = None,
    rtol: float = 1e-5,
) -> None:
    """Check a kNN result against float64 ground truth, robust to rounding-level near-ties.

    Holds every backend to: the selection's exact scores equal the true top-k scores (within the
    score rounding ``tol``), returned scores equal the exact scores of the returned slots, order is
    descending, indices are distinct valid slots with finite scores, padding (-inf, -1) exactly where fewer
    than k candidates exist, and indices equal the reference wherever the true scores are
    separated by more than ``tol`` (so ties and near-ties are the only freedom).
    """
    from ._merge import select_topk
    from .backends.reference import valid_slots

    if scores.shape != indices.shape or scores.shape[-1] != k:
        raise AssertionError(f"knn: shapes {tuple(scores.shape)} / {tuple(indices.shape)}, expected last dim k={k}")
    score_dtype = torch.float64 if torch.float64 in (query.dtype, mem_keys.dtype) else torch.float32
    if scores.dtype != score_dtype or indices.dtype != torch.int64:
        raise AssertionError(f"knn: dtypes {scores.dtype} / {indices.dtype}, expected {score_dtype} / int64")
    scores, indices = scores.cpu(), indices.cpu()
    true = exact_scores(query.cpu(), mem_keys.cpu())  # [B, Hq, Lq, M]
    num_slots = true.shape[-1]
    valid = valid_slots(true.shape[0], num_slots, mem_lengths, mem_mask, "cpu")[:, None, None, :]
    # non-finite scores are dropped (docs/DESIGN.md 3.2): the score of a non-float64 op is an fp32 inner
    # product, so one beyond the fp32 range overflows to inf and is dropped too
    cand = valid & torch.isfinite(true)
    if score_dtype != torch.float64:
        cand &= true.abs() <= torch.finfo(torch.float32).max
    ref_s, ref_i = select_topk(true, torch.arange(num_slots).expand_as(true), cand, k)
    # magnitude of rounding in an fp32 dot product: |q| |k| * eps-ish
    key_norm = mem_keys.double().norm(dim=-1).amax().item() if mem_keys.numel() else 1.0
    norms = query.double().norm(dim=-1, keepdim=True).cpu() * max(key_norm, 1.0)
    tol = rtol * norms  # [B, Hq, Lq, 1]
    pad = indices < 0
    if not torch.equal(pad, ref_i < 0):
        raise AssertionError(f"knn: padding differs from the reference at {int((pad != (ref_i < 0)).sum())} places")
    if not torch.isneginf(scores[pad]).all():
        raise AssertionError("knn: padded entries must have score -inf")
    if num_slots == 0:
        return
    idx = indices.clamp_min(0)
    if (indices >= num_slots).any():
        raise AssertionError("knn: index out of range")
    picked_cand = cand.expand_as(true).gather(-1, idx) | pad
    if not picked_cand.all():
        raise AssertionError(f"knn: {int((~picked_cand).sum())} selected slots are invalid or score non-finite")
    srt = indices.sort(-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if dup.any():
        raise AssertionError("knn: a slot was selected twice in one row")
    picked_true = true.gather(-1, idx).masked_fill(pad, float("-inf"))
    fin = ~pad & torch.isfinite(picked_true)
    if ((scores.double() - picked_true).abs() > tol)[fin].any():
        raise AssertionError("knn: returned scores differ from the exact scores of the returned slots")
    if ((picked_true - ref_s) .abs() > tol)[fin & torch.isfinite(ref_s)].any():
        raise AssertionError("knn: the selected slots' exact scores differ from the true top-k scores")
    if (scores[..., 1:] > scores[..., :-1]).any():
        raise AssertionError("knn: scores are not in descending order")
    equal = (scores[..., 1:] == scores[..., :-1]) & ~pad[..., 1:]
    if (indices[..., 1:] <= indices[..., :-1])[equal].any():
        raise AssertionError("knn: equal scores must be ordered by ascending index")
    # outside near-ties the indices must be exactly the reference's
    gap_prev = torch.cat([torch.full_like(ref_s[..., :1], float("inf")), (ref_s[..., :-1] - ref_s[..., 1:]).abs()], -1)
    gap_next = torch.cat([(ref_s[..., :-1] - ref_s[..., 1:]).abs(), torch.full_like(ref_s[..., :1], float("inf"))], -1)
    # the k-th entry may also tie with the (k+1)-th true score, just outside the list
    if num_slots > k:
        kth_next = select_topk(true, torch.arange(num_slots).expand_as(true), cand, k + 1)[0][..., k:]
        gap_next[..., -1:] = (ref_s[..., -1:] - kth_next).abs().nan_to_num(float("inf"))
    separated = (gap_prev.nan_to_num(float("inf")) > 2 * tol) & (gap_next.nan_to_num(float("inf")) > 2 * tol) & ~pad
    if not torch.equal(indices[separated], ref_i[separated]):
        wrong = int((indices != ref_i)[separated].sum())
        raise AssertionError(f"knn: {wrong} indices differ where scores are well separated")


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[object, int]:
    """Run fn and return (its result, peak memory growth in bytes during the call).

    CUDA: peak of torch's caching allocator above what was allocated before. CPU (Linux only):
    resets the process's high-water mark through /proc/self/clear_refs (value 5) and reads VmHWM
    afterwards. Returns -1 for the growth where that is not possible.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(torch.cuda.max_memory_allocated(device) - before, 0)

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(field)

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
    except OSError:
        return fn(), -1
    result = fn()
    return result, max(status("VmHWM") - before, 0)


def on_linux() -> bool:
    return os.path.exists("/proc/self/clear_refs")
