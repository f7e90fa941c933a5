"""CPU benchmark of fot-kernels: kNN memory attention, dense memory attention and knn_topk.

Run (from the repository root, after ``pip install -e .[bench]``)::

    python benchmarks/bench_cpu.py            # default grid (see --help), ~7-8 minutes on 2 quiet cores
    python benchmarks/bench_cpu.py --quick    # ~1 minute smoke run on small shapes
    python benchmarks/bench_cpu.py --m 64k 256k --lq 1024 --ops knn_attention --providers fot_kernels faiss

What is measured (B=1, fp32 query; memory fp32, plus one bf16-memory point):

- ``knn_attention``: ``memory_attention(q, k, v, mem_k, mem_v, topk=K)`` with a local causal
  context of Lk = Lq keys; ``dense_attention``: the same with ``topk=None``; ``knn_topk`` alone.
- Providers: ``fot_kernels`` (backend="cpu", the production path); ``reference`` (backend=
  "reference": materialises the Lq x M scores; skipped where its calibrated memory or time estimate
  exceeds ``--ref-max-gib`` / ``--ref-max-seconds``); ``faiss`` (IndexFlatIP exact search per kv
  head, then the attention over the found slots in torch), with ``faiss_search_only`` the search
  lap of the same calls; ``chunked_loop`` (per memory chunk: torch matmul, torch.topk, merge with
  the running top-k; + the same torch attention); ``torch_qk`` / ``numpy_qk``: the score product
  q @ K^T alone (MKL / OpenBLAS), the speed reference of dense mode.
- Median, p20 and p80 of the timed calls after one warm-up call (a first call longer than
  ``--max-seconds``/4 counts as a sample instead); the first call's result is checked for
  correctness and its peak extra resident memory is reported (``fot_kernels.testing.peak_memory``).
  GFLOP/s counts the score product only, 2 * B * Hq * Lq * M * D flops, for every op and
  provider, so that rates are comparable.
- Correctness of fot_kernels at every point: knn_topk's selection against faiss's (exact float64
  scores of both selections must agree, so only near-ties may differ); the attention outputs of the
  last ``--check-rows`` queries against a float64 recomputation (dense: over all slots; kNN: over
  fot's knn_topk selection), with the 2x rule of ``fot_kernels.testing.assert_close_to_reference``.
  A point that fails shows FAIL and gets no speed ratio.

Writes ``bench_cpu_<date>.csv`` (one row per measurement and metric, Liger-Kernel schema, see
benchmarks/_common.py), ``.png`` (time vs M, log-log, one panel per op and Lq) and ``.txt`` (the
console tables) to benchmarks/results/ (``--out DIR`` to change), then prints issue 2's targets.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import fot_kernels as fk  # noqa: E402
from fot_kernels.testing import assert_close_to_reference  # noqa: E402

OPS = ("knn_attention", "dense_attention", "knn_topk")
OP_TITLES = {
    "knn_attention": "kNN memory attention (memory_attention topk=k, local causal Lk=Lq)",
    "dense_attention": "dense memory attention (memory_attention topk=None, local causal Lk=Lq)",
    "knn_topk": "knn_topk alone",
}
PROVIDERS = ("fot_kernels", "reference", "faiss", "chunked_loop", "torch_qk", "numpy_qk")
# at the low-precision-memory point, to save time: baselines run on an exact fp32 copy of the memory
LOW_PRECISION_PROVIDERS = ("fot_kernels", "faiss", "torch_qk")
GIB = 2**30


# ----------------------------------------------------------------------------------------------
# Shapes and inputs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    len_q: int
    mem: int
    q_heads: int = 8
    kv_heads: int = 8
    dim: int = 128
    k: int = 32
    mem_dtype: str = "float32"
    batch: int = 1

    @property
    def score_entries(self) -> int:
        """Size of the query x memory score matrix the reference materialises."""
        return self.batch * self.q_heads * self.len_q * self.mem

    @property
    def score_flops(self) -> float:
        """2 * B * Hq * Lq * M * D: the flops of the score product q @ K^T."""
        return 2.0 * self.score_entries * self.dim

    def config(self) -> dict:
        return {"B": self.batch, "Hq": self.q_heads, "Hkv": self.kv_heads, "Lq": self.len_q, "Lk": self.len_q,
                "M": self.mem, "D": self.dim, "k": self.k, "query_dtype": "float32",
                "mem_dtype": self.mem_dtype}  # fmt: skip

    def group(self) -> tuple:
        """Points sharing everything but M form one table / plot panel."""
        return (self.len_q, self.q_heads, self.kv_heads, self.dim, self.k, self.mem_dtype)


@dataclass
class Inputs:
    shape: Shape
    query: torch.Tensor  # [B, Hq, Lq, D] fp32
    key: torch.Tensor  # [B, Hkv, Lk, D] fp32, local context
    value: torch.Tensor
    mem_keys: torch.Tensor  # [B, Hkv, M, D] in shape.mem_dtype
    mem_values: torch.Tensor

    @property
    def scale(self) -> float:
        return self.shape.dim**-0.5

    @cached_property
    def mem_keys32(self) -> torch.Tensor:
        """fp32 memory for the baselines (a copy only for bf16 memory; made outside the timing)."""
        return self.mem_keys.float()

    @cached_property
    def mem_values32(self) -> torch.Tensor:
        return self.mem_values.float()

    def grouped_rows(self) -> torch.Tensor:
        """[B, Hkv, G * Lq, D]: the queries of the G query heads that share a kv head (a view)."""
        b, hq, lq, d = self.query.shape
        return self.query.reshape(b, self.shape.kv_heads, (hq // self.shape.kv_heads) * lq, d)


def make_inputs(shape: Shape, seed: int) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    b, hq, hkv, lq, m, d = shape.batch, shape.q_heads, shape.kv_heads, shape.len_q, shape.mem, shape.dim
    dtype = getattr(torch, shape.mem_dtype)

    def randn(*size: int, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(dt)  # no copy for fp32

    return Inputs(shape, randn(b, hq, lq, d), randn(b, hkv, lq, d), randn(b, hkv, lq, d),
                  randn(b, hkv, m, d, dt=dtype), randn(b, hkv, m, d, dt=dtype))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Baselines written here: faiss search, the plain chunked loop, attention over given slots
# ----------------------------------------------------------------------------------------------


def attend_selected(inp: Inputs, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Joint softmax over [local causal | the given memory slots], in torch (gather + softmax).

    scores/indices [B, Hq, Lq, k] (raw inner products, slots into M) -> out [B, Hq, Lq, D]."""
    b, hq, lq, d = inp.query.shape
    hkv, m, g = inp.shape.kv_heads, inp.shape.mem, hq // inp.shape.kv_heads
    k_loc = inp.key.repeat_interleave(g, 1) if g > 1 else inp.key
    v_loc = inp.value.repeat_interleave(g, 1) if g > 1 else inp.value
    local = (inp.query @ k_loc.transpose(-1, -2)) * inp.scale  # [B, Hq, Lq, Lk]
    local.masked_fill_(torch.ones(lq, lq, dtype=torch.bool).triu_(1), float("-inf"))
    probs = torch.softmax(torch.cat([local, scores * inp.scale], -1), -1)
    head_base = (torch.arange(b)[:, None] * hkv + torch.arange(hq)[None, :] // g) * m  # [B, Hq]
    v_sel = inp.mem_values32.reshape(-1, d)[indices + head_base[..., None, None]]  # [B, Hq, Lq, k, D]
    out = probs[..., :lq] @ v_loc
    return out + (probs[..., None, lq:] @ v_sel).squeeze(-2)


def faiss_indexes(inp: Inputs) -> list:
    """One IndexFlatIP per (batch row, kv head), holding an fp32 copy of that head's keys."""
    import faiss

    indexes = []
    for b in range(inp.shape.batch):
        for h in range(inp.shape.kv_heads):
            index = faiss.IndexFlatIP(inp.shape.dim)
            index.add(inp.mem_keys32[b, h].numpy())
            indexes.append(index)
    return indexes


def faiss_search(inp: Inputs, indexes: list, rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product with faiss, per kv head over its G * Lq query rows."""
    b, hq, lq, _ = inp.query.shape
    found = [index.search(q, inp.shape.k) for index, q in zip(indexes, rows)]
    scores = torch.from_numpy(np.stack([s for s, _ in found])).reshape(b, hq, lq, -1)
    indices = torch.from_numpy(np.stack([i for _, i in found])).reshape(b, hq, lq, -1)
    return scores, indices


def chunked_topk(inp: Inputs, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain chunked loop: per memory chunk a torch matmul, torch.topk, merge with the running top-k."""
    rows, keys, k = inp.grouped_rows(), inp.mem_keys32, inp.shape.k
    best_s = best_i = None
    for start in range(0, inp.shape.mem, chunk):
        s = rows @ keys[:, :, start : start + chunk].transpose(-1, -2)  # [B, Hkv, G*Lq, C]
        top_s, top_i = s.topk(min(k, s.shape[-1]), dim=-1)
        top_i += start
        if best_s is not None:
            top_s, pick = torch.cat([best_s, top_s], -1).topk(k, dim=-1)
            top_i = torch.cat([best_i, top_i], -1).gather(-1, pick)
        best_s, best_i = top_s, top_i
    return best_s.reshape(*inp.query.shape[:3], k), best_i.reshape(*inp.query.shape[:3], k)


# ----------------------------------------------------------------------------------------------
# Providers: each yields jobs; a job's laps name the (op, provider) rows they report
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """fn(lap) -> {lap name: output}; ``laps[name]`` = the (op, provider) rows timed by that lap
    (time since the start of the call). The last lap's rows also get the call's peak memory."""

    fn: Callable[[Callable[[str], None]], dict]
    laps: dict[str, list[tuple[str, str]]]
    slow: bool = False  # the reference: one call, no warm-up
    selection_lap: str | None = None  # lap whose output is a kNN selection (scores, indices)


def fot_jobs(inp: Inputs, args: argparse.Namespace, backend: str = "cpu", slow: bool = False) -> Iterator[Job]:
    q, k, v, mk, mv, topk = inp.query, inp.key, inp.value, inp.mem_keys, inp.mem_values, inp.shape.k
    name = "fot_kernels" if backend == "cpu" else backend
    calls = {
        "knn_attention": lambda: fk.memory_attention(q, k, v, mk, mv, topk=topk, backend=backend),
        "dense_attention": lambda: fk.memory_attention(q, k, v, mk, mv, topk=None, backend=backend),
        "knn_topk": lambda: fk.knn_topk(q, mk, topk, backend=backend),
    }
    for op, call in calls.items():
        yield Job(fn=_single_lap(op, call), laps={op: [(op, name)]}, slow=slow)


def _single_lap(op: str, call: Callable[[], object]) -> Callable:
    def fn(lap: Callable[[str], None]) -> dict:
        out = call()
        lap(op)
        return {op: out}

    return fn


def reference_jobs(inp: Inputs, args: argparse.Namespace) -> Iterator[Job]:
    yield from fot_jobs(inp, args, backend="reference", slow=True)


def faiss_jobs(inp: Inputs, args: argparse.Namespace) -> Iterator[Job]:
    indexes = faiss_indexes(inp)  # setup, not timed; freed when the generator finishes
    rows = [r.numpy() for r in inp.grouped_rows().reshape(-1, *inp.grouped_rows().shape[2:])]

    def fn(lap: Callable[[str], None]) -> dict:
        scores, indices = faiss_search(inp, indexes, rows)
        lap("search")
        out = attend_selected(inp, scores, indices)
        lap("attention")
        return {"search": (scores, indices), "attention": out}

    laps = {"search": [("knn_topk", "faiss"), ("knn_attention", "faiss_search_only")],
            "attention": [("knn_attention", "faiss")]}  # fmt: skip
    yield Job(fn=fn, laps=laps, selection_lap="search")


def chunked_jobs(inp: Inputs, args: argparse.Namespace) -> Iterator[Job]:
    def fn(lap: Callable[[str], None]) -> dict:
        scores, indices = chunked_topk(inp, args.chunk)
        lap("select")
        out = attend_selected(inp, scores, indices)
        lap("attention")
        return {"select": (scores, indices), "attention": out}

    laps = {"select": [("knn_topk", "chunked_loop")], "attention": [("knn_attention", "chunked_loop")]}
    yield Job(fn=fn, laps=laps, selection_lap="select")


def _score_product_job(name: str, matmul: Callable, rows: list, keys: list, buf) -> Job:
    def fn(lap: Callable[[str], None]) -> dict:
        for r, kt in zip(rows, keys):  # per kv head, into one reused [G*Lq, M] buffer
            matmul(r, kt, out=buf)
        lap("qk")
        return {}

    return Job(fn=fn, laps={"qk": [("dense_attention", name)]})


def torch_qk_jobs(inp: Inputs, args: argparse.Namespace) -> Iterator[Job]:
    rows = list(inp.grouped_rows().flatten(0, 1))
    keys = [kh.transpose(0, 1) for kh in inp.mem_keys32.flatten(0, 1)]
    buf = torch.empty(rows[0].shape[0], inp.shape.mem)
    yield _score_product_job("torch_qk", torch.matmul, rows, keys, buf)


def numpy_qk_jobs(inp: Inputs, args: argparse.Namespace) -> Iterator[Job]:
    rows = [r.numpy() for r in inp.grouped_rows().flatten(0, 1)]
    keys = [kh.numpy().T for kh in inp.mem_keys32.flatten(0, 1)]
    buf = np.empty((rows[0].shape[0], inp.shape.mem), dtype=np.float32)
    yield _score_product_job("numpy_qk", np.matmul, rows, keys, buf)


PROVIDER_JOBS = {"fot_kernels": fot_jobs, "reference": reference_jobs, "faiss": faiss_jobs,
                 "chunked_loop": chunked_jobs, "torch_qk": torch_qk_jobs, "numpy_qk": numpy_qk_jobs}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The reference's cost model (to skip it where it would not fit) from one calibration run per op
# ----------------------------------------------------------------------------------------------


@dataclass
class ReferenceModel:
    """Bytes and seconds per entry of the materialised score matrix, per op, measured once."""

    bytes_per_entry: dict[str, float] = field(default_factory=dict)
    seconds_per_entry: dict[str, float] = field(default_factory=dict)
    calibrated_at: str = ""

    @classmethod
    def calibrate(cls, mem: int, entries: int, dim: int, k: int, seed: int) -> ReferenceModel:
        """Run each reference op once with Hq=1 and about ``entries`` scores (Lq = entries / M);
        keep the score matrix above glibc's 32 MiB mmap threshold for an exact peak."""
        len_q = max(1, min(entries // mem, 4096))
        shape = Shape(len_q=len_q, mem=mem, q_heads=1, kv_heads=1, dim=dim, k=min(k, mem))
        inp, model = make_inputs(shape, seed), cls(calibrated_at=f"Hq=1, Lq={shape.len_q}, M={mem}")
        for job in reference_jobs(inp, argparse.Namespace()):
            (op, _), = next(iter(job.laps.values()))
            m = C.measure(job.fn, repeats=1, warmup=0, min_repeats=1)
            model.bytes_per_entry[op] = max(m.peak_bytes, 0) / shape.score_entries
            model.seconds_per_entry[op] = m.laps[C.TOTAL].median / shape.score_entries
        return model

    def skip_reason(self, op: str, shape: Shape, max_bytes: float, max_seconds: float) -> str | None:
        need_b = self.bytes_per_entry[op] * shape.score_entries
        need_s = self.seconds_per_entry[op] * shape.score_entries
        if need_b > max_bytes:
            return f"needs ~{C.human_bytes(need_b)} > --ref-max-gib {max_bytes / GIB:g}"
        if need_s > max_seconds:
            return f"needs ~{need_s:.2g} s per call > --ref-max-seconds {max_seconds:g}"
        return None


# ----------------------------------------------------------------------------------------------
# Correctness checks of fot_kernels' results
# ----------------------------------------------------------------------------------------------


def max_key_norm(mem_keys: torch.Tensor, block: int = 65536) -> float:
    """Largest key norm, a block of slots at a time (no fp32 copy of a whole bf16 memory)."""
    blocks = (mem_keys[:, :, s : s + block] for s in range(0, mem_keys.shape[2], block))
    return max((float(b.float().norm(dim=-1).max()) for b in blocks), default=0.0)


def selected_scores(inp: Inputs, indices: torch.Tensor) -> torch.Tensor:
    """Exact float64 inner products of each query with the keys at ``indices`` [B, Hq, Lq, k]."""
    g = inp.shape.q_heads // inp.shape.kv_heads
    out = torch.empty(indices.shape, dtype=torch.float64)
    for b in range(inp.shape.batch):
        for h in range(inp.shape.q_heads):
            keys = inp.mem_keys[b, h // g][indices[b, h]].double()  # [Lq, k, D]
            out[b, h] = (keys @ inp.query[b, h].double()[..., None]).squeeze(-1)
    return out


def check_selection(inp: Inputs, scores: torch.Tensor, indices: torch.Tensor, base_indices: torch.Tensor) -> None:
    """fot's knn_topk against a baseline's selection: valid distinct slots, returned scores equal
    the exact scores of the returned slots, descending, and the same exact top-k scores as the
    baseline within fp32 rounding (so only near-ties may be chosen differently)."""
    k, m = inp.shape.k, inp.shape.mem
    if scores.shape != (*inp.query.shape[:3], k) or indices.dtype != torch.int64 or scores.dtype != torch.float32:
        raise AssertionError(f"knn_topk: got {tuple(scores.shape)} {scores.dtype} / {indices.dtype}")
    if (indices < 0).any() or (indices >= m).any():
        raise AssertionError("knn_topk: index out of range")
    srt = indices.sort(-1).values
    if (srt[..., 1:] == srt[..., :-1]).any():
        raise AssertionError("knn_topk: a slot selected twice in one row")
    tol = 1e-5 * inp.query.double().norm(dim=-1, keepdim=True) * max(max_key_norm(inp.mem_keys), 1.0)
    exact = selected_scores(inp, indices)
    if ((scores.double() - exact).abs() > tol).any():
        raise AssertionError("knn_topk: returned scores differ from the exact scores of the returned slots")
    if (scores[..., 1:] > scores[..., :-1]).any():
        raise AssertionError("knn_topk: scores not in descending order")
    base = selected_scores(inp, base_indices).sort(-1, descending=True).values
    bad = (exact.sort(-1, descending=True).values - base).abs() > 2 * tol
    if bad.any():
        raise AssertionError(f"knn_topk: {int(bad.any(-1).sum())} rows select a different top-k than the baseline")


def attention_rows(inp: Inputs, rows: int, selection: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Output of the last ``rows`` queries recomputed in ``dtype`` over [local causal | memory]
    (all slots when ``selection`` is None, else the selected ones) -> [B, Hq, rows, D]."""
    s, g = inp.shape, inp.shape.q_heads // inp.shape.kv_heads
    n = min(rows, s.len_q)
    causal = torch.ones(s.len_q, s.len_q, dtype=torch.bool).triu_(1)[-n:]  # local key j > query i
    out = torch.empty(s.batch, s.q_heads, n, s.dim, dtype=dtype)
    for b in range(s.batch):
        for h in range(s.q_heads):
            q, kv = inp.query[b, h, -n:].to(dtype), h // g
            local = (q @ inp.key[b, kv].to(dtype).T * inp.scale).masked_fill(causal, float("-inf"))
            if selection is None:
                keys, vals = inp.mem_keys[b, kv], inp.mem_values[b, kv]
                mem = torch.cat([q @ keys[i : i + 65536].to(dtype).T for i in range(0, s.mem, 65536)], -1)
                probs = torch.softmax(torch.cat([local, mem * inp.scale], -1), -1)
                acc = sum(probs[:, s.len_q + i : s.len_q + i + 65536] @ vals[i : i + 65536].to(dtype)
                          for i in range(0, s.mem, 65536))  # fmt: skip
            else:
                sel = selection[b, h, -n:]  # [n, k]
                keys, vals = inp.mem_keys[b, kv][sel].to(dtype), inp.mem_values[b, kv][sel].to(dtype)
                probs = torch.softmax(torch.cat([local, (keys @ q[..., None]).squeeze(-1) * inp.scale], -1), -1)
                acc = (probs[:, None, s.len_q :] @ vals).squeeze(1)
            out[b, h] = probs[:, : s.len_q] @ inp.value[b, kv].to(dtype) + acc
    return out


def check_attention(inp: Inputs, out: torch.Tensor, rows: int, selection: torch.Tensor | None, op: str) -> None:
    n = min(rows, inp.shape.len_q)
    hi, lo = (attention_rows(inp, rows, selection, dt) for dt in (torch.float64, torch.float32))
    assert_close_to_reference(out[:, :, -n:], hi, lo, name=op)


def check_point(inp: Inputs, outputs: dict, rows: int) -> dict[str, str]:
    """'ok' / 'FAIL: why' / 'unchecked: why' for each op fot_kernels ran at this point. The kNN
    attention is recomputed over fot's knn_topk selection once that passed its check (the same
    scan serves both), else over the baseline's selection."""
    fot = {op: outputs.get((op, "fot_kernels")) for op in OPS}
    base = outputs.get(("selection", "faiss")) or outputs.get(("selection", "chunked_loop"))
    status = {}
    if fot["knn_topk"] is not None:
        status["knn_topk"] = (_run_check(lambda: check_selection(inp, *fot["knn_topk"], base[1])) if base
                              else "unchecked: no baseline selection (run faiss or chunked_loop)")  # fmt: skip
    selection = fot["knn_topk"][1] if status.get("knn_topk") == "ok" else (base[1] if base else None)
    for op, sel in (("knn_attention", selection), ("dense_attention", None)):
        if fot[op] is None:
            continue
        if op == "knn_attention" and sel is None:
            status[op] = "unchecked: no selection to compare with (run knn_topk, faiss or chunked_loop)"
        else:
            status[op] = _run_check(lambda: check_attention(inp, fot[op], rows, sel, op))
    return status


def _run_check(check: Callable[[], None]) -> str:
    try:
        check()
        return "ok"
    except AssertionError as exc:
        return f"FAIL: {exc}"


# ----------------------------------------------------------------------------------------------
# Running one point
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    op: str
    provider: str
    time: C.Stats  # seconds
    peak_bytes: int | None


@dataclass
class PointResult:
    shape: Shape
    results: dict[tuple[str, str], Result] = field(default_factory=dict)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)

    def time(self, op: str, provider: str) -> float | None:
        r = self.results.get((op, provider))
        return r.time.median if r else None


def run_job(job: Job, args: argparse.Namespace) -> C.Measurement:
    if job.slow:
        return C.measure(job.fn, repeats=1, warmup=0, min_repeats=1)
    return C.measure(job.fn, repeats=args.repeats, warmup=args.warmup, budget_s=args.max_seconds, min_repeats=2,
                     long_call_s=args.max_seconds / 4)  # fmt: skip


def run_point(shape: Shape, args: argparse.Namespace, ref: ReferenceModel | None, log: Callable) -> PointResult:
    t0 = time.perf_counter()
    inp = make_inputs(shape, args.seed)
    log(f"\n# Lq={shape.len_q} M={shape.mem} Hq={shape.q_heads} Hkv={shape.kv_heads} D={shape.dim} k={shape.k} "
        f"memory {shape.mem_dtype} (inputs made in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    point, outputs = PointResult(shape), {}
    low = shape.mem_dtype != "float32"
    for provider in (p for p in args.providers if not low or p in LOW_PRECISION_PROVIDERS):
        run_provider(provider, inp, args, ref, point, outputs, log)
    point.status = check_point(inp, outputs, args.check_rows)
    for op, status in point.status.items():
        log(f"  check {op:<16} {status}")
    return point


def run_provider(provider: str, inp: Inputs, args, ref: ReferenceModel | None, point: PointResult, outputs: dict,
                 log: Callable) -> None:  # fmt: skip
    """Measure one provider's jobs at this point; its setup (faiss indexes, buffers) is freed on return."""
    if provider == "faiss" and not _have_faiss():
        point.skipped.update({(op, "faiss"): "faiss not installed" for op in ("knn_topk", "knn_attention")})
        return
    for job in PROVIDER_JOBS[provider](inp, args):
        rows = {lap: [(op, p) for op, p in targets if op in args.ops] for lap, targets in job.laps.items()}
        if not any(rows.values()):
            continue
        if provider == "reference":
            op = next(op for targets in rows.values() for op, _ in targets)
            reason = ref.skip_reason(op, inp.shape, args.ref_max_gib * GIB, args.ref_max_seconds)
            if reason:
                point.skipped[(op, provider)] = reason
                log(f"  {provider:<18} {op:<16} skipped: {reason}")
                continue
        m = run_job(job, args)
        _record(point, outputs, m, rows, log)
        if job.selection_lap:
            outputs[("selection", provider)] = m.result[job.selection_lap]


def _record(point: PointResult, outputs: dict, m: C.Measurement, rows: dict, log: Callable) -> None:
    last = list(rows)[-1]
    for lap, targets in rows.items():
        for op, provider in targets:
            peak = m.peak_bytes if lap == last and m.peak_bytes >= 0 else None
            point.results[(op, provider)] = Result(op, provider, m.laps[lap], peak)
            outputs[(op, provider)] = m.result.get(lap)
            st = m.laps[lap]
            log(f"  {provider:<18} {op:<16} {st.median * 1e3:10.2f} ms (n={st.samples})  "
                f"{point.shape.score_flops / st.median / 1e9:7.1f} GFLOP/s  peak {C.human_bytes(peak)}")  # fmt: skip


def _have_faiss() -> bool:
    try:
        import faiss  # noqa: F401

        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------------------------
# Reporting: tables, CSV rows, plot, targets
# ----------------------------------------------------------------------------------------------


def time_ratio(point: PointResult, op: str, provider: str) -> float | None:
    """fot_kernels time / provider time; None unless fot_kernels passed its check at this point."""
    t_fot, t_other = point.time(op, "fot_kernels"), point.time(op, provider)
    if provider == "fot_kernels" or t_fot is None or t_other is None or not _ok(point, op):
        return None
    return t_fot / t_other


def ratio_text(point: PointResult, op: str, provider: str) -> str:
    ratio = time_ratio(point, op, provider)
    if ratio is None and provider != "fot_kernels" and (op, "fot_kernels") in point.results:
        return _status_word(point, op)
    return "" if ratio is None else f"{ratio:.2f}x"


def _status_word(point: PointResult, op: str) -> str:
    """'FAIL' / 'unchecked' for an op whose fot_kernels result did not pass its check."""
    return point.status.get(op, "unchecked").split(":")[0]


def tables(points: list[PointResult]) -> str:
    out = []
    groups = sorted({p.shape.group() for p in points}, key=lambda g: (g[5] != "float32", g))
    for op in OPS:
        for grp in groups:
            pts = sorted((p for p in points if p.shape.group() == grp), key=lambda p: p.shape.mem)
            body = [_table_row(p, op, prov, i == 0) for p in pts for i, prov in enumerate(_providers_of(p, op))]
            if not body:
                continue
            lq, hq, hkv, d, k, mdt = grp
            out.append(f"\n{OP_TITLES[op].replace('topk=k', f'topk={k}')}\n"
                       f"Lq={lq}  B=1 Hq={hq} Hkv={hkv} D={d} k={k}  query fp32, memory {mdt}")  # fmt: skip
            headers = ("M", "provider", "median ms", "p20..p80 ms", "GFLOP/s", "peak extra", "fot/provider",
                       "check / note")  # fmt: skip
            out.append(C.format_table(headers, body))
    return "\n".join(out)


def _providers_of(point: PointResult, op: str) -> list[str]:
    names = [p for o, p in point.results if o == op] + [p for o, p in point.skipped if o == op]
    return sorted(set(names), key=lambda p: (p != "fot_kernels", p))


def _table_row(point: PointResult, op: str, provider: str, first: bool) -> tuple:
    mem = point.shape.mem if first else ""
    if (op, provider) in point.skipped:
        return (mem, provider, "skipped", "", "", "", "", point.skipped[(op, provider)])
    r = point.results[(op, provider)]
    t = r.time
    check = point.status.get(op, "") if provider == "fot_kernels" else ""
    return (mem, provider, f"{t.median * 1e3:.2f}", f"{t.p20 * 1e3:.2f}..{t.p80 * 1e3:.2f}",
            f"{point.shape.score_flops / t.median / 1e9:.1f}", C.human_bytes(r.peak_bytes),
            ratio_text(point, op, provider), check[:60])  # fmt: skip


def csv_rows(points: list[PointResult], info: dict) -> list[dict]:
    rows = []
    for point in points:
        cfg, flops = point.shape.config(), point.shape.score_flops
        for (op, provider), r in point.results.items():
            t = r.time
            check = point.status.get(op, "") if provider == "fot_kernels" else ""
            common = dict(kernel=op, provider=provider, mode="forward", x_name="M", x_value=point.shape.mem,
                          samples=t.samples, check=check)  # fmt: skip
            rows.append(C.csv_row(info, cfg, metric="time", unit="ms", median=t.median * 1e3, p20=t.p20 * 1e3,
                                  p80=t.p80 * 1e3, **common))  # fmt: skip
            rows.append(C.csv_row(info, cfg, metric="throughput", unit="GFLOP/s (2*B*Hq*Lq*M*D / time)",
                                  median=flops / t.median / 1e9, p20=flops / t.p80 / 1e9, p80=flops / t.p20 / 1e9,
                                  **common))  # fmt: skip
            if r.peak_bytes is not None:
                mib = r.peak_bytes / 2**20
                rows.append(C.csv_row(info, cfg, metric="peak_memory", unit="MiB", median=mib, p20=mib, p80=mib,
                                      **{**common, "samples": 1}))  # fmt: skip
            ratio = time_ratio(point, op, provider)
            if ratio is not None:
                rows.append(C.csv_row(info, cfg, metric=f"time_ratio_vs_{provider}", unit="fot_time/provider_time",
                                      median=ratio, p20=ratio, p80=ratio,
                                      **{**common, "provider": "fot_kernels"}))  # fmt: skip
    return rows


def plot(points: list[PointResult], path: Path, info: dict) -> None:
    """One panel per (op, Lq): rows are ops, columns query lengths; low-precision memory dashed."""
    lqs = sorted({p.shape.len_q for p in points})
    panels: dict[str, dict[str, list]] = {f"{op}  Lq={lq}": {} for op in OPS for lq in lqs}
    for point in points:
        s = point.shape
        for (op, provider), r in point.results.items():
            series = provider + ("" if s.mem_dtype == "float32" else f" [{s.mem_dtype} memory]")
            ok = not (provider == "fot_kernels" and point.status.get(op, "").startswith("FAIL"))
            panels[f"{op}  Lq={s.len_q}"].setdefault(series, []).append((s.mem, r.time.median * 1e3, ok))
    s = points[0].shape
    title = (f"fot-kernels CPU benchmark: B=1 Hq={s.q_heads} Hkv={s.kv_heads} D={s.dim} k={s.k}, fp32 query\n"
             f"{info['device']}, {info['timestamp']}, threads {info['threads']}, "
             f"commit {info['git_commit'][:12]}")  # fmt: skip
    panels = {name: series for name, series in panels.items() if series}
    C.plot_panels(panels, path, xlabel="memory slots M", ylabel="median time (ms)", title=title, ncols=len(lqs))


def targets_report(points: list[PointResult], ref: ReferenceModel | None) -> str:
    """Issue 2's performance targets, evaluated at the measured points."""
    lines = ["\nTargets (issue 2), at the measured points; ratios only where fot_kernels passed its check:"]
    fp32 = [p for p in points if p.shape.mem_dtype == "float32" and (p.shape.q_heads, p.shape.kv_heads,
            p.shape.dim, p.shape.k) == (8, 8, 128, 32)]  # fmt: skip
    lines += _knn_target(fp32, 1024, "time <= 1.2 x faiss search alone", lambda r: r <= 1.2, "{:.2f}x faiss")
    lines += _knn_target(fp32, 256, ">= 3x faster than faiss search alone", lambda r: 1 / r >= 3,
                         "{:.2f}x faster", invert=True)  # fmt: skip
    lines += _memory_target(points, ref)
    lines += _dense_target(points)
    return "\n".join(lines)


def _ok(point: PointResult, op: str) -> bool:
    return point.status.get(op) == "ok"


def _knn_target(points, len_q: int, goal: str, met, fmt: str, invert: bool = False) -> list[str]:
    head = f"- kNN memory attention, B=1 Hq=Hkv=8 D=128 k=32 fp32, Lq={len_q}, M=65536: {goal}"
    found = []
    for p in sorted((p for p in points if p.shape.len_q == len_q), key=lambda p: p.shape.mem):
        t_fot, t_faiss = p.time("knn_attention", "fot_kernels"), p.time("knn_attention", "faiss_search_only")
        if t_fot is None or t_faiss is None:
            continue
        if not _ok(p, "knn_attention"):
            found.append((p.shape.mem, f"M={p.shape.mem}: {_status_word(p, 'knn_attention')} (check), not reported",
                          False))  # fmt: skip
            continue
        r = t_fot / t_faiss
        found.append((p.shape.mem, f"M={p.shape.mem}: " + fmt.format(1 / r if invert else r), met(r)))
    main = [f for f in found if f[0] == 65536]
    verdict = ("MET" if main[0][2] else "NOT MET") if main else "NOT MEASURED at M=65536"
    return [head, f"    {verdict}.  " + "; ".join(f"{text}{' (met)' if ok else ''}" for _, text, ok in found)]


def _memory_target(points: list[PointResult], ref: ReferenceModel | None) -> list[str]:
    points = [p for p in points if p.shape.mem_dtype == "float32"]
    if not points:
        return []
    mem_max = max(p.shape.mem for p in points)
    lines = [f"- peak extra memory of kNN memory attention <= 1/10 of the reference's, at M=1048576 "
             f"(largest M measured here: {mem_max})"]  # fmt: skip
    for p in (p for p in points if p.shape.mem == mem_max):
        r = p.results.get(("knn_attention", "fot_kernels"))
        if r is None or r.peak_bytes is None:
            continue
        measured = p.results.get(("knn_attention", "reference"))
        floor = 4 * p.shape.score_entries  # the fp32 score matrix alone
        if measured and measured.peak_bytes is not None:
            basis, how = measured.peak_bytes, "reference measured at this shape"
        else:
            basis, per_score = floor, ref.bytes_per_entry["knn_attention"] if ref else None
            est = (f"; calibrated estimate ~{C.human_bytes(per_score * p.shape.score_entries)} "
                   f"({per_score:.1f} B per score, at {ref.calibrated_at})") if ref else ""  # fmt: skip
            how = f"reference not run; lower bound = its fp32 score matrix 4*B*Hq*Lq*M{est}"
        verdict = "MET" if r.peak_bytes * 10 <= basis else "NOT MET"
        verdict = verdict if _ok(p, "knn_attention") else f"{_status_word(p, 'knn_attention')} (check), not reported"
        lines.append(f"    Lq={p.shape.len_q}: {verdict}. fot_kernels {C.human_bytes(r.peak_bytes)} "
                     f"vs reference >= {C.human_bytes(basis)} ({how})")  # fmt: skip
    return lines


def _dense_target(points: list[PointResult]) -> list[str]:
    vals = []
    for p in points:
        t_fot, t_mm = p.time("dense_attention", "fot_kernels"), p.time("dense_attention", "torch_qk")
        if t_fot is None or t_mm is None:
            continue
        where = f"Lq={p.shape.len_q} M={p.shape.mem} {p.shape.mem_dtype}"
        if _ok(p, "dense_attention"):
            vals.append((t_fot / t_mm, f"{where}: {t_fot / t_mm:.2f}x"))
        else:
            vals.append((math.inf, f"{where}: {_status_word(p, 'dense_attention')} (check)"))
    if not vals:
        return ["- dense memory attention within 1.3x of the score product alone (torch q@K^T): NOT MEASURED"]
    met = sum(v <= 1.3 for v, _ in vals)
    return ["- dense memory attention within 1.3x of the score product alone (torch q@K^T, MKL)",
            f"    met at {met}/{len(vals)} points.  " + "; ".join(t for _, t in vals)]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


DEFAULTS = dict(m=[16384, 65536, 262144, 1048576], lq=[256, 1024], max_lq_m=2**28, repeats=5, max_seconds=8.0,
                bf16_at="1024,65536", ref_max_seconds=15.0)  # fmt: skip
QUICK = dict(m=[8192, 32768], lq=[256, 1024], max_lq_m=2**23, repeats=3, max_seconds=2.0, bf16_at="256,32768",
             ref_max_seconds=4.0)  # fmt: skip


def size(text: str) -> int:
    """'64k' -> 65536, '1M' -> 1048576, '1000' -> 1000."""
    mult = {"k": 2**10, "m": 2**20}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Default grid: M in {16k, 64k, 256k, 1M} x Lq in {256, 1024}, minus the points with\n"
            "Lq*M > --max-lq-m (2^28: so M=1M only at Lq=256), plus one bf16-memory point at Lq=1024,\n"
            "M=64k; B=1, Hq=Hkv=8, D=128, k=32.\n"
            "Estimated 7-8 minutes on a quiet 2-core machine (the M=1M point ~2 minutes; it needs ~14 GiB\n"
            "of RAM: 8 GiB of fp32 memory keys/values + faiss's 4 GiB copy); several times longer while\n"
            "other jobs load the CPU. --quick: M in {8k, 32k}, Lq in {256, 1024} with Lq*M <= 2^23,\n"
            "3 repeats, bf16 point at Lq=256, M=32k: about 1 minute."
        ),
    )
    ap.add_argument("--m", nargs="+", type=size, help="memory sizes M (suffix k/M allowed)")
    ap.add_argument("--lq", nargs="+", type=int, help="query lengths Lq (local causal context Lk = Lq)")
    ap.add_argument("--heads", type=int, default=8, help="query heads Hq (default 8)")
    ap.add_argument("--kv-heads", type=int, help="key/value heads Hkv (default: --heads)")
    ap.add_argument("--dim", type=int, default=128, help="head dim D (default 128)")
    ap.add_argument("--k", type=int, default=32, help="top-k of kNN mode (default 32)")
    ap.add_argument("--repeats", type=int, help="timed calls per measurement (default 5; quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1; the first one is checked)")
    ap.add_argument("--max-seconds", type=float,
                    help="stop repeating after this much timed time, keeping >= 2 samples (default 8; "
                         "quick 2); a first call longer than a quarter of it counts as a sample, "
                         "not a warm-up")  # fmt: skip
    ap.add_argument("--max-lq-m", type=size, help="skip points with Lq*M above this (default 2^28; 0: no limit)")
    ap.add_argument("--bf16-at", help="'LQ,M' of the extra bf16-memory point, or 'none'")
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--ref-max-gib", type=float, default=6.0, help="run the reference only below this peak (GiB)")
    ap.add_argument("--ref-max-seconds", type=float, help="... and this estimated time per call (default 15 s)")
    ap.add_argument("--chunk", type=int, default=4096, help="memory chunk of the plain chunked loop")
    ap.add_argument("--check-rows", type=int, default=32, help="query rows per head checked against float64")
    ap.add_argument("--threads", type=int, help="torch and faiss threads (numpy: set OPENBLAS_NUM_THREADS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run on small shapes")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.kv_heads = args.kv_heads or args.heads
    return args


def plan(args: argparse.Namespace) -> tuple[list[Shape], list[str]]:
    base = Shape(len_q=0, mem=0, q_heads=args.heads, kv_heads=args.kv_heads, dim=args.dim, k=args.k)
    shapes, skipped = [], []
    for lq in args.lq:
        for m in args.m:
            if args.max_lq_m and lq * m > args.max_lq_m:
                skipped.append(f"Lq={lq} M={m} (Lq*M > --max-lq-m {args.max_lq_m})")
            else:
                shapes.append(replace(base, len_q=lq, mem=m))
    if args.bf16_at and args.bf16_at.lower() != "none":
        lq, m = (size(v) for v in args.bf16_at.split(","))
        shapes.append(replace(base, len_q=lq, mem=m, mem_dtype="bfloat16"))
    return sorted(shapes, key=lambda s: (s.mem_dtype != "float32", s.mem, s.len_q)), skipped


def threads_text() -> str:
    import os

    text = f"torch={torch.get_num_threads()}"
    if _have_faiss():
        import faiss

        text += f" faiss={faiss.omp_get_max_threads()}"
    return text + f" openblas={os.environ.get('OPENBLAS_NUM_THREADS', 'default')}"


def faiss_settings() -> str:
    if not _have_faiss():
        return "faiss absent"
    import faiss

    return f"faiss distance_compute_blas_threshold={faiss.cvar.distance_compute_blas_threshold} (default kept)"


def setup_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
        if _have_faiss():
            import faiss

            faiss.omp_set_num_threads(args.threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_threads(args)
    shapes, skipped = plan(args)
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    transcript: list[str] = []

    def log(text: str = "") -> None:
        print(text, flush=True)
        transcript.append(text)

    from fot_kernels.backends import cpu

    t_start = time.perf_counter()
    ext = cpu.extension_status()  # builds the C++ kernels on first use, before any timing
    info = C.machine_info(threads_text())
    log(f"fot-kernels {info['version']} ({info['git_commit']}), torch {info['torch_version']}, numpy "
        f"{info['numpy_version']}, faiss {info['faiss_version']}\n{info['device']}, threads {info['threads']}\n"
        f"CPU kernels: {'C++ extension' if ext is None else 'PyTorch fallback: ' + ext}\n"
        f"{faiss_settings()}")  # fmt: skip
    for text in skipped:
        log(f"skipping {text}")
    ref = None
    if "reference" in args.providers:
        mem = min(max(s.mem for s in shapes), 262144)
        ref = ReferenceModel.calibrate(mem, 2**22 if args.quick else 2**24, args.dim, args.k, args.seed)
        costs = (f"{op} {ref.bytes_per_entry[op]:.1f} B & {ref.seconds_per_entry[op] * 1e9:.0f} ns"
                 for op in ref.bytes_per_entry)  # fmt: skip
        log(f"reference cost per score entry (one call each at {ref.calibrated_at}): " + ", ".join(costs))
    points = [run_point(shape, args, ref, log) for shape in shapes]
    log(tables(points))
    log(targets_report(points, ref))
    log(f"\nGFLOP/s = 2*B*Hq*Lq*M*D / median time (the score product q @ K^T only, for every op); "
        f"fot/provider = fot_kernels time / provider time (< 1: fot_kernels faster).\n"
        f"Total wall time {time.perf_counter() - t_start:.0f} s.")  # fmt: skip
    write_outputs(args, points, info, stamp, transcript, log)
    return 0 if all(not s.startswith("FAIL") for p in points for s in p.status.values()) else 1


def write_outputs(args, points, info, stamp, transcript, log) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path, txt_path = (args.out / f"bench_cpu_{stamp}.{ext}" for ext in ("csv", "png", "txt"))
    C.write_csv(csv_path, csv_rows(points, info))
    written = [csv_path]
    if not args.no_plot:
        plot(points, png_path, info)
        written.append(png_path)
    log("wrote " + ", ".join(str(p) for p in written + [txt_path]))
    txt_path.write_text("\n".join(transcript) + "\n")


if __name__ == "__main__":
    sys.exit(main())
