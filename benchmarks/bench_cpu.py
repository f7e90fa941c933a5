"""CPU benchmark of fot-kernels: kNN memory attention, dense memory attention and knn_topk.

Run (from the repository root, after ``pip install -e .[bench]``)::

    python benchmarks/bench_cpu.py                      # default grid (see --help), ~10 minutes on 2 quiet cores
    python benchmarks/bench_cpu.py --quick              # ~1-2 minute smoke run on small shapes
    python benchmarks/bench_cpu.py --only dense-vs-sdpa # dense memory attention vs SDPA, Lq 256/1024 x M 16k/64k
    python benchmarks/bench_cpu.py --only fwdbwd        # forward + backward, dense and kNN, Lq 1024 x M 16k/64k
    python benchmarks/bench_cpu.py --m 64k 256k --lq 1024 --ops knn_attention --providers fot_kernels faiss

What is measured (B=1, fp32 query; memory fp32, plus one bf16-memory point):

- ``knn_attention``: ``memory_attention(q, k, v, mem_k, mem_v, topk=K)`` with a local causal
  context of Lk = Lq keys; ``dense_attention``: the same with ``topk=None``; ``knn_topk`` alone.
- Providers: ``fot_kernels`` (backend="cpu", the production path); ``reference`` (backend=
  "reference": materialises the Lq x M scores; skipped where its calibrated memory or time estimate
  exceeds ``--ref-max-gib`` / ``--ref-max-seconds``); ``faiss`` (IndexFlatIP exact search per kv
  head, then the attention over the found slots in torch), with ``faiss_search_only`` the search
  lap of the same calls; ``chunked_loop`` (per memory chunk: torch matmul, torch.topk, merge with
  the running top-k; + the same torch attention); dense mode: ``sdpa_concat`` (torch SDPA over
  cat([memory, local]) with a bool mask, concatenation and mask made per call: what a user writes
  today) and ``sdpa_call_only`` (the same SDPA call on a concatenation made outside the timing);
  ``torch_qk`` / ``numpy_qk``: the score product q @ K^T alone (MKL / OpenBLAS); ``longllama``
  (not run by default): LongLLaMA's released computation, scores materialised per group of heads
  and queries, dense or thresholded at each row's k-th memory score. The baselines are in
  benchmarks/baselines.py.
- ``--mode``: ``fwd`` (default) times the forward call; ``fwdbwd`` the forward and the backward of
  sum(out * grad_out) w.r.t. q, k, v, mem_k, mem_v (``torch.autograd.grad``); ``bwd`` the backward
  alone (the forward runs untimed in the same call, its graph built anew each time). In bwd /
  fwdbwd only the attention ops and the providers fot_kernels, sdpa_concat, sdpa_call_only and
  longllama run (sdpa_concat's concatenation, mask and cat backward inside the timing); each
  provider's output and five gradients are checked at every point against a float64
  recomputation over the first and last kv heads (every row and slot of them; kNN: over the exact
  top-k, the query rows whose k-th/(k+1)-th scores are a near-tie getting zero grad_out).
- Median, p20 and p80 of the timed calls after one warm-up call (a first call longer than
  ``--max-seconds``/4 counts as a sample instead); the first call's result is checked for
  correctness and its peak extra resident memory is reported (``fot_kernels.testing.peak_memory``;
  in bwd / fwdbwd it includes the forward and the gradients returned, and is also given beyond
  those gradients).
  GFLOP/s counts the score product only, 2 * B * Hq * Lq * M * D flops, for every op and
  provider, so that rates are comparable.
- Correctness at every point: fot_kernels' knn_topk selection against faiss's (exact float64
  scores of both selections must agree, so only near-ties may differ); the attention outputs of
  fot_kernels (and of the SDPA baselines) for the last ``--check-rows`` queries against a float64
  recomputation (dense: over all slots; kNN: over fot's knn_topk selection), with the 2x rule of
  ``fot_kernels.testing.assert_close_to_reference``. A point that fails shows FAIL and gets no
  speed ratio.

Writes ``bench_cpu_<date>.csv`` (one row per measurement and metric, Liger-Kernel schema, see
benchmarks/_common.py), ``.png`` (time vs M, log-log, one panel per op and Lq, plus the
fot_kernels / SDPA time ratio) and ``.txt`` (the console tables) to benchmarks/results/ (``--out
DIR`` to change). The performance goals these numbers are read against are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import baselines as B

import fot_kernels as fk
from fot_kernels.testing import assert_close_to_reference

OPS = ("knn_attention", "dense_attention", "knn_topk")
OP_TITLES = {
    "knn_attention": "kNN memory attention (memory_attention topk=k, local causal Lk=Lq)",
    "dense_attention": "dense memory attention (memory_attention topk=None, local causal Lk=Lq)",
    "knn_topk": "knn_topk alone",
}
#: provider -> the ops it runs (a provider none of whose ops is selected is not set up at all)
PROVIDER_OPS = {
    "fot_kernels": OPS,
    "reference": OPS,
    "faiss": ("knn_topk", "knn_attention"),
    "chunked_loop": ("knn_topk", "knn_attention"),
    "sdpa_concat": ("dense_attention",),
    "sdpa_call_only": ("dense_attention",),
    "longllama": ("dense_attention", "knn_attention"),
    "torch_qk": ("dense_attention",),
    "numpy_qk": ("dense_attention",),
}
PROVIDERS = tuple(PROVIDER_OPS)
#: --mode bwd / fwdbwd: the ops with a backward and the providers that differentiate them (the others
#: are forward-only: skipped with the reason printed)
GRAD_OPS = ("knn_attention", "dense_attention")
GRAD_PROVIDERS = ("fot_kernels", "sdpa_concat", "sdpa_call_only", "longllama")
#: kv heads whose gradients are recomputed in float64 at every point of --mode bwd / fwdbwd (the
#: first and the last: the check's cost is that of a dense attention over these heads alone)
GRAD_CHECK_KV_HEADS = 2
#: the gradient check's tolerance: max |grad - float64| <= GRAD_FACTOR x max |fp32 recomputation -
#: float64| + 1e-5 x max |float64 grad| (sums over Lq or M terms, accumulated in other orders than the
#: recomputation's; the floor relative, as memory gradients are small: ~1/M of the output's scale)
GRAD_FACTOR = 4.0
#: goals read from the --mode fwdbwd summary table (benchmarks/README.md)
KNN_SPEEDUP_GOAL = 5.0
PEAK_GOAL = 0.1
#: at the low-precision-memory point, to save time (the baselines but SDPA's concatenation, which
#: casts to the query's dtype as a user's code would, run on an exact fp32 copy of the memory)
LOW_PRECISION_PROVIDERS = ("fot_kernels", "faiss", "sdpa_concat", "torch_qk")
#: the SDPA baselines of dense attention (their outputs are checked, like fot_kernels')
SDPA = ("sdpa_concat", "sdpa_call_only")
#: fot_kernels / sdpa_concat time ratio that dense memory attention aims at (benchmarks/README.md)
SDPA_GOAL = 0.9
#: --only: named subsets of the grid and providers (options given explicitly win)
SUBSETS = {
    "dense-vs-sdpa": dict(
        ops=["dense_attention"], providers=["fot_kernels", *SDPA], m=[16384, 65536], lq=[256, 1024], bf16_at="none",
        interleave=True, repeats=7, max_seconds=12.0,
    ),
    "fwdbwd": dict(
        mode="fwdbwd", ops=["dense_attention", "knn_attention"], providers=["fot_kernels", "sdpa_concat", "longllama"],
        m=[16384, 65536], lq=[1024], bf16_at="none", interleave=True, repeats=5, max_seconds=20.0,
    ),
}
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
    #: --mode bwd / fwdbwd: the gradient of the output ([B, Hq, Lq, D] fp32; zero on the query rows
    #: whose kNN selection is a near-tie in the checked heads) and those rows (bool [B, Hq, Lq])
    grad_out: torch.Tensor | None = None
    tie_rows: torch.Tensor | None = None

    def grad_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.query, self.key, self.value, self.mem_keys, self.mem_values

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
        return B.grouped_rows(self.query, self.shape.kv_heads)

    def attend_selected(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Joint softmax over [local causal | the given memory slots] in torch (baselines.py)."""
        return B.attend_selected(self.query, self.key, self.value, self.mem_values32, scores, indices,
                                 scale=self.scale)  # fmt: skip


def make_inputs(shape: Shape, seed: int, grad: bool = False) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    b, hq, hkv, lq, m, d = shape.batch, shape.q_heads, shape.kv_heads, shape.len_q, shape.mem, shape.dim
    dtype = getattr(torch, shape.mem_dtype)

    def randn(*size: int, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(dt)  # no copy for fp32

    inp = Inputs(shape, randn(b, hq, lq, d), randn(b, hkv, lq, d), randn(b, hkv, lq, d),
                 randn(b, hkv, m, d, dt=dtype), randn(b, hkv, m, d, dt=dtype))  # fmt: skip
    if grad:
        for t in inp.grad_inputs():
            t.requires_grad_(True)
        inp.grad_out = randn(b, hq, lq, d)
        inp.tie_rows = knn_tie_rows(inp)
        inp.grad_out[inp.tie_rows] = 0.0
    return inp


# ----------------------------------------------------------------------------------------------
# faiss (the other baselines are in baselines.py)
# ----------------------------------------------------------------------------------------------


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
        if args.mode == "fwd" or op in GRAD_OPS:
            yield Job(fn=_single_lap(op, _timed(args, inp, call), args.mode), laps={op: [(op, name)]}, slow=slow)


def _timed(args: argparse.Namespace, inp: Inputs, call: Callable[[], torch.Tensor],
           inputs: tuple[torch.Tensor, ...] | None = None) -> Callable:  # fmt: skip
    """``C.timed_fn`` of ``args.mode``: the forward call, or forward + backward w.r.t. ``inputs``
    (default: query, key, value, mem_keys, mem_values) of sum(out * inp.grad_out)."""
    if args.mode == "fwd":
        return C.timed_fn("fwd", call)
    return C.timed_fn(args.mode, call, inp.grad_inputs() if inputs is None else inputs, inp.grad_out)


def _single_lap(op: str, call: Callable, mode: str = "fwd") -> Callable:
    """fn(lap) of a job with one timed lap; in bwd mode ``call`` restarts the clock after its forward."""

    def fn(lap: Callable[[str], None]) -> dict:
        out = call() if mode == "fwd" else call(lambda: lap(C.RESTART))
        lap(op)
        return {op: out}

    return fn


def reference_jobs(inp: Inputs, args: argparse.Namespace) -> Iterator[Job]:
    yield from fot_jobs(inp, args, backend="reference", slow=True)


def sdpa_concat_jobs(inp: Inputs, args: argparse.Namespace) -> Iterator[Job]:
    """SDPA over cat([memory, local]) with the bool mask, all made per call (what a user writes)."""
    q, k, v, mk, mv = inp.query, inp.key, inp.value, inp.mem_keys, inp.mem_values
    call = _timed(args, inp, lambda: B.sdpa_concat(q, k, v, mk, mv, scale=inp.scale))
    laps = {"dense_attention": [("dense_attention", "sdpa_concat")]}
    yield Job(fn=_single_lap("dense_attention", call, args.mode), laps=laps)


def sdpa_call_only_jobs(inp: Inputs, args: argparse.Namespace) -> Iterator[Job]:
    """The SDPA call alone: concatenation and mask made once, outside the timing (freed on return).
    bwd / fwdbwd: the gradients w.r.t. the query and the concatenations (leaves: a user who keeps
    one [memory | local] buffer), returned split as (dq, dk, dv, dmk, dmv) views."""
    with torch.no_grad():
        kc, vc, mask = B.sdpa_concat_inputs(inp.query, inp.key, inp.value, inp.mem_keys, inp.mem_values)
    laps = {"dense_attention": [("dense_attention", "sdpa_call_only")]}
    if args.mode == "fwd":
        call = C.timed_fn("fwd", lambda: B.sdpa(inp.query, kc, vc, mask, scale=inp.scale))
        yield Job(fn=_single_lap("dense_attention", call, args.mode), laps=laps)
        return
    kc, vc, m = kc.requires_grad_(True), vc.requires_grad_(True), inp.shape.mem
    inner = _timed(args, inp, lambda: B.sdpa(inp.query, kc, vc, mask, scale=inp.scale), (inp.query, kc, vc))

    def call(restart=None):
        out, (dq, dkc, dvc) = inner(restart)
        return out, (dq, dkc[:, :, m:], dvc[:, :, m:], dkc[:, :, :m], dvc[:, :, :m])

    yield Job(fn=_single_lap("dense_attention", call, args.mode), laps=laps)


def longllama_jobs(inp: Inputs, args: argparse.Namespace) -> Iterator[Job]:
    """LongLLaMA's memory attention as released (baselines.longllama_attention): scores
    materialised per (heads, queries) group of at most --score-gib, values copied per group; kNN:
    the same with each row's memory scores thresholded at its k-th largest. Under autograd (bwd /
    fwdbwd) every group's scores and probabilities stay saved until the backward."""
    s = inp.shape
    hc, qc = B.longllama_grouping(s.batch, s.q_heads, s.len_q, s.len_q + s.mem, s.dim, 4, args.score_gib * GIB)
    q, k, v, mk, mv = inp.query, inp.key, inp.value, inp.mem_keys, inp.mem_values
    for op, topk in (("dense_attention", None), ("knn_attention", s.k)):
        call = partial(B.longllama_attention, q, k, v, mk, mv, scale=inp.scale, topk=topk, head_chunk=hc,
                       query_chunk=qc)  # fmt: skip
        yield Job(fn=_single_lap(op, _timed(args, inp, call), args.mode), laps={op: [(op, "longllama")]})


def faiss_jobs(inp: Inputs, args: argparse.Namespace) -> Iterator[Job]:
    indexes = faiss_indexes(inp)  # setup, not timed; freed when the generator finishes
    rows = [r.numpy() for r in inp.grouped_rows().reshape(-1, *inp.grouped_rows().shape[2:])]

    def fn(lap: Callable[[str], None]) -> dict:
        scores, indices = faiss_search(inp, indexes, rows)
        lap("search")
        out = inp.attend_selected(scores, indices)
        lap("attention")
        return {"search": (scores, indices), "attention": out}

    laps = {"search": [("knn_topk", "faiss"), ("knn_attention", "faiss_search_only")],
            "attention": [("knn_attention", "faiss")]}  # fmt: skip
    yield Job(fn=fn, laps=laps, selection_lap="search")


def chunked_jobs(inp: Inputs, args: argparse.Namespace) -> Iterator[Job]:
    def fn(lap: Callable[[str], None]) -> dict:
        scores, indices = B.chunked_topk(inp.query, inp.mem_keys32, inp.shape.k, args.chunk)
        lap("select")
        out = inp.attend_selected(scores, indices)
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
                 "chunked_loop": chunked_jobs, "sdpa_concat": sdpa_concat_jobs, "sdpa_call_only": sdpa_call_only_jobs,
                 "longllama": longllama_jobs, "torch_qk": torch_qk_jobs, "numpy_qk": numpy_qk_jobs}  # fmt: skip


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
        for job in reference_jobs(inp, argparse.Namespace(mode="fwd")):
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


def check_attention(inp: Inputs, op: str, outs: dict[str, torch.Tensor], rows: int,
                    selection: torch.Tensor | None) -> dict[tuple[str, str], str]:  # fmt: skip
    """Status of each provider's ``op`` output in ``outs`` against a recomputation of its last
    ``rows`` query rows (made once for all of them)."""
    n = min(rows, inp.shape.len_q)
    hi, lo = (attention_rows(inp, rows, selection, dt) for dt in (torch.float64, torch.float32))

    def check(provider: str, out: torch.Tensor) -> None:
        assert_close_to_reference(out[:, :, -n:], hi, lo, name=f"{op} {provider}")

    return {(op, provider): _run_check(partial(check, provider, out)) for provider, out in outs.items()}


def check_point(inp: Inputs, outputs: dict, rows: int, mode: str = "fwd") -> dict[tuple[str, str], str]:
    """'ok' / 'FAIL: why' / 'unchecked: why' per (op, provider) checked at this point: every op
    fot_kernels ran, and dense attention of the SDPA and LongLLaMA baselines (kNN attention too for
    LongLLaMA). The kNN attention is recomputed over fot's knn_topk selection once that passed its
    check (the same scan serves both), else over the baseline's selection. bwd / fwdbwd: every
    provider's output and gradients (:func:`check_grads`), dense outputs also on every head."""
    with torch.no_grad():
        if mode != "fwd":
            return _check_point_grads(inp, outputs, rows)
        return _check_point_fwd(inp, outputs, rows)


def _check_point_grads(inp: Inputs, outputs: dict, rows: int) -> dict[tuple[str, str], str]:
    status = {}
    for op in GRAD_OPS:
        results = {p: outputs[(op, p)] for o, p in list(outputs) if o == op and outputs[(op, p)] is not None}
        if not results:
            continue
        status.update(check_grads(inp, op, results))
        if op == "dense_attention":  # the forward's check too: the last rows of every head
            fwd = check_attention(inp, op, {p: r[0] for p, r in results.items()}, rows, None)
            status.update({key: st if st != "ok" else fwd[key] for key, st in status.items() if key in fwd})
    return status


def _check_point_fwd(inp: Inputs, outputs: dict, rows: int) -> dict[tuple[str, str], str]:
    fot = {op: outputs.get((op, "fot_kernels")) for op in OPS}
    base = outputs.get(("selection", "faiss")) or outputs.get(("selection", "chunked_loop"))
    status = {}
    if fot["knn_topk"] is not None:
        status[("knn_topk", "fot_kernels")] = (
            _run_check(lambda: check_selection(inp, *fot["knn_topk"], base[1])) if base
            else "unchecked: no baseline selection (run faiss or chunked_loop)")  # fmt: skip
    knn = {p: outputs[("knn_attention", p)] for p in ("fot_kernels", "longllama")
           if outputs.get(("knn_attention", p)) is not None}  # fmt: skip
    if knn:
        ok_topk = status.get(("knn_topk", "fot_kernels")) == "ok"
        selection = fot["knn_topk"][1] if ok_topk else (base[1] if base else None)
        if selection is None:
            why = "unchecked: no selection to compare with (run knn_topk, faiss or chunked_loop)"
            status.update({("knn_attention", p): why for p in knn})
        else:
            status.update(check_attention(inp, "knn_attention", knn, rows, selection))
    dense = {p: outputs[("dense_attention", p)] for p in ("fot_kernels", *SDPA, "longllama")
             if outputs.get(("dense_attention", p)) is not None}  # fmt: skip
    if dense:
        status.update(check_attention(inp, "dense_attention", dense, rows, None))
    return status


def checked_kv_heads(shape: Shape) -> list[int]:
    """The kv heads whose gradients are recomputed in float64 (--mode bwd / fwdbwd)."""
    return sorted({0, shape.kv_heads - 1})[:GRAD_CHECK_KV_HEADS]


def knn_tie_rows(inp: Inputs) -> torch.Tensor:
    """Bool [B, Hq, Lq]: query rows of the checked heads whose k-th and (k+1)-th largest exact
    memory scores are closer than twice fp32's scoring error, so that a provider may select
    either slot. Their grad_out is set to zero: such a row then contributes nothing to any
    gradient, whichever slot was selected, and the kNN gradients are comparable exactly."""
    s, g = inp.shape, inp.shape.q_heads // inp.shape.kv_heads
    ties = torch.zeros(s.batch, s.q_heads, s.len_q, dtype=torch.bool)
    if s.k >= s.mem:
        return ties
    with torch.no_grad():
        key_norm = max(max_key_norm(inp.mem_keys), 1.0)
        for b in range(s.batch):
            for kv in checked_kv_heads(s):
                q = inp.query[b, kv * g : (kv + 1) * g].double()  # [G, Lq, D]
                top = (q @ inp.mem_keys[b, kv].double().T).topk(s.k + 1, dim=-1).values
                tol = 1e-5 * q.norm(dim=-1) * key_norm
                ties[b, kv * g : (kv + 1) * g] = top[..., s.k - 1] - top[..., s.k] <= 2 * tol
    return ties


def grad_rows(inp: Inputs, b: int, kv: int, dtype: torch.dtype, topk: int | None) -> dict[str, torch.Tensor]:
    """Output and gradients of sum(out * grad_out) for the query heads of kv head ``kv`` (batch
    row ``b``), recomputed in ``dtype`` over [memory | local causal] with the whole score matrix
    (kNN: the exact top-k memory slots, by float64 scores): out, dq [G, Lq, D]; dk, dv [Lk, D];
    dmk, dmv [M, D]. FlashAttention-2's formulas (fot_kernels/autograd.py)."""
    s, g, scale = inp.shape, inp.shape.q_heads // inp.shape.kv_heads, inp.scale
    hs = slice(kv * g, (kv + 1) * g)
    q = inp.query[b, hs].to(dtype).reshape(g * s.len_q, s.dim)
    keys = torch.cat([inp.mem_keys[b, kv], inp.key[b, kv]]).to(dtype)  # [M + Lk, D]
    vals = torch.cat([inp.mem_values[b, kv], inp.value[b, kv]]).to(dtype)
    dout = inp.grad_out[b, hs].to(dtype).reshape(g * s.len_q, s.dim)
    logits = q @ keys.T
    logits.mul_(scale)
    future = torch.ones(s.len_q, s.len_q, dtype=torch.bool).triu_(1).repeat(g, 1)  # local key j > query i
    logits[:, s.mem :].masked_fill_(future, float("-inf"))
    if topk is not None and topk < s.mem:
        exact = logits[:, : s.mem] if dtype == torch.float64 else (q.double() @ keys[: s.mem].double().T)
        unselected = torch.ones(g * s.len_q, s.mem, dtype=torch.bool)
        unselected.scatter_(1, exact.topk(topk, dim=-1).indices, False)
        del exact
        logits[:, : s.mem].masked_fill_(unselected, float("-inf"))
        del unselected
    probs = torch.softmax(logits, -1)
    del logits
    out = probs @ vals
    ds = dout @ vals.T  # dP, then dS = P * (dP - rowsum(dO * O)) in place
    ds.sub_((dout * out).sum(-1, keepdim=True)).mul_(probs)
    dq = (ds @ keys).mul_(scale)
    dkeys = (ds.T @ q).mul_(scale)
    del ds
    dvals = probs.T @ dout
    shape = (g, s.len_q, s.dim)
    return dict(out=out.reshape(shape), dq=dq.reshape(shape), dk=dkeys[s.mem :], dv=dvals[s.mem :],
                dmk=dkeys[: s.mem], dmv=dvals[: s.mem])  # fmt: skip


def check_grads(inp: Inputs, op: str, results: dict[str, tuple]) -> dict[tuple[str, str], str]:
    """Status of each provider's (out, (dq, dk, dv, dmk, dmv)) for ``op`` against :func:`grad_rows`
    in float64 (and fp32, for the tolerance) on the checked kv heads: every row and slot of those
    heads (but the output of near-tie rows, whose gradients are zero by construction)."""
    s, g = inp.shape, inp.shape.q_heads // inp.shape.kv_heads
    topk = s.k if op == "knn_attention" else None
    failures: dict[str, str] = {}
    for b in range(s.batch):
        for kv in checked_kv_heads(s):
            hi, lo = (grad_rows(inp, b, kv, dt, topk) for dt in (torch.float64, torch.float32))
            hs = slice(kv * g, (kv + 1) * g)
            keep = ~inp.tie_rows[b, hs]
            for provider, (out, grads) in results.items():
                if provider in failures:
                    continue
                dq, dk, dv, dmk, dmv = grads
                got = dict(out=out[b, hs][keep], dq=dq[b, hs], dk=dk[b, kv], dv=dv[b, kv], dmk=dmk[b, kv],
                           dmv=dmv[b, kv])  # fmt: skip
                for name, actual in got.items():
                    if name == "out":
                        ref_hi, ref_lo, factor = hi[name][keep], lo[name][keep], 2.0
                    else:  # relative to the gradient's largest value: the floor is 1e-5 of it, not 1e-5
                        unit = max(float(hi[name].abs().max()), 1e-30)
                        actual, ref_hi, ref_lo, factor = actual / unit, hi[name] / unit, lo[name] / unit, GRAD_FACTOR
                    what = f"{op} {provider} {name} (kv head {kv})"
                    status = _run_check(partial(assert_close_to_reference, actual, ref_hi, ref_lo, name=what,
                                                factor=factor))  # fmt: skip
                    if status != "ok":
                        failures[provider] = status
                        break
            del hi, lo
    return {(op, provider): failures.get(provider, "ok") for provider in results}


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
    grad_bytes: int | None = None  # bwd / fwdbwd: the bytes of the gradients the call returns


@dataclass
class PointResult:
    shape: Shape
    results: dict[tuple[str, str], Result] = field(default_factory=dict)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)
    status: dict[tuple[str, str], str] = field(default_factory=dict)  # (op, provider) -> ok / FAIL... / unchecked...

    def time(self, op: str, provider: str) -> float | None:
        r = self.results.get((op, provider))
        return r.time.median if r else None


def timing(args: argparse.Namespace) -> dict:
    """Keyword arguments of C.measure / C.measure_interleaved from the command line."""
    return dict(repeats=args.repeats, warmup=args.warmup, budget_s=args.max_seconds, min_repeats=2,
                long_call_s=args.max_seconds / 4)  # fmt: skip


def run_job(job: Job, args: argparse.Namespace) -> C.Measurement:
    if job.slow:
        return C.measure(job.fn, repeats=1, warmup=0, min_repeats=1)
    return C.measure(job.fn, **timing(args))


def run_point(shape: Shape, args: argparse.Namespace, ref: ReferenceModel | None, log: Callable) -> PointResult:
    t0 = time.perf_counter()
    inp = make_inputs(shape, args.seed, grad=args.mode != "fwd")
    log(f"\n# Lq={shape.len_q} M={shape.mem} Hq={shape.q_heads} Hkv={shape.kv_heads} D={shape.dim} k={shape.k} "
        f"memory {shape.mem_dtype} (inputs made in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    point, outputs = PointResult(shape), {}
    low = shape.mem_dtype != "float32"
    deferred = []  # --interleave: (provider, job, rows) of every provider, timed together below
    if args.mode != "fwd":
        for op in sorted(set(args.ops) - set(GRAD_OPS)):
            point.skipped[(op, "fot_kernels")] = f"no backward (--mode {args.mode})"
    for provider in args.providers:
        if (not low or provider in LOW_PRECISION_PROVIDERS) and set(PROVIDER_OPS[provider]) & set(args.ops):
            deferred += run_provider(provider, inp, args, ref, point, outputs, log)
    if deferred:
        measurements = C.measure_interleaved([job.fn for _, job, _ in deferred], **timing(args))
        for (provider, job, rows), m in zip(deferred, measurements):
            _record(point, outputs, m, provider, job, rows, log)
    t0 = time.perf_counter()
    point.status = check_point(inp, outputs, args.check_rows, args.mode)
    ties = "" if inp.tie_rows is None else f"; {int(inp.tie_rows.sum())} near-tie kNN rows got zero grad_out"
    log(f"  checks done in {time.perf_counter() - t0:.1f} s{ties}")
    for (op, provider), status in point.status.items():
        log(f"  check {op:<16} {provider:<14} {status}")
    return point


def run_provider(provider: str, inp: Inputs, args, ref: ReferenceModel | None, point: PointResult, outputs: dict,
                 log: Callable) -> list[tuple[str, Job, dict]]:  # fmt: skip
    """Measure one provider's jobs at this point; its setup (faiss indexes, buffers) is freed on
    return. With --interleave, its jobs but the reference's are returned instead, to be timed
    together with the other providers' (their setup alive until then)."""
    reason = setup_skip_reason(provider, inp, args)
    if reason:
        point.skipped.update({(op, provider): reason for op in PROVIDER_OPS[provider] if op in args.ops})
        log(f"  {provider:<18} skipped: {reason}")
        return []
    deferred = []
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
        if args.interleave and not job.slow:
            deferred.append((provider, job, rows))
        else:
            _record(point, outputs, run_job(job, args), provider, job, rows, log)
    return deferred


def setup_skip_reason(provider: str, inp: Inputs, args: argparse.Namespace) -> str | None:
    """Why ``provider`` cannot run at this point (forward-only in --mode bwd / fwdbwd; faiss
    missing; SDPA's concatenation, or LongLLaMA's saved scores under autograd, not fitting in
    --sdpa-max-gib, by default 3/4 of the memory available now), or None."""
    if args.mode != "fwd" and provider == "reference":
        return f"not timed in --mode {args.mode} (its cost model is the forward's; float64 gradients check the others)"
    if args.mode != "fwd" and provider not in GRAD_PROVIDERS:
        return f"forward-only (--mode {args.mode})"
    if provider == "faiss" and not _have_faiss():
        return "faiss not installed"
    s = inp.shape
    if provider in SDPA or (provider == "longllama" and args.mode != "fwd"):
        if provider == "longllama":  # saved per score entry: the clamped input and the fp32 probabilities
            need, what = 9 * s.score_entries * (s.mem + s.len_q) / s.mem, "its scores saved for the backward need"
        else:  # the concatenation (and its gradient, in bwd / fwdbwd) and the mask
            need = B.sdpa_concat_bytes(inp.query, s.len_q, s.mem, s.kv_heads) * (1 if args.mode == "fwd" else 2)
            what = "its concatenated keys/values and mask need"
        available = C.available_memory()
        budget = args.sdpa_max_gib * GIB if args.sdpa_max_gib else 0.75 * available if available else math.inf
        if need > budget:
            limit = f"--sdpa-max-gib {args.sdpa_max_gib:g}" if args.sdpa_max_gib else "3/4 of the memory available now"
            return f"{what} ~{C.human_bytes(need)} > {limit}"
    return None


def _record(point: PointResult, outputs: dict, m: C.Measurement, provider: str, job: Job, rows: dict,
            log: Callable) -> None:  # fmt: skip
    if job.selection_lap:
        outputs[("selection", provider)] = m.result[job.selection_lap]
    last = list(rows)[-1]
    for lap, targets in rows.items():
        for op, provider in targets:
            peak = m.peak_bytes if lap == last and m.peak_bytes >= 0 else None
            result = m.result.get(lap)
            grads = result[1] if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], tuple) else ()
            grad_bytes = sum(t.numel() * t.element_size() for t in grads) if grads else None
            point.results[(op, provider)] = Result(op, provider, m.laps[lap], peak, grad_bytes)
            outputs[(op, provider)] = result
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
# Reporting: tables, CSV rows, plot
# ----------------------------------------------------------------------------------------------


def _ok(point: PointResult, op: str, provider: str = "fot_kernels") -> bool:
    return point.status.get((op, provider)) == "ok"


def _status_word(point: PointResult, op: str, provider: str = "fot_kernels") -> str:
    """'FAIL' / 'unchecked' for a result that did not pass its check."""
    return point.status.get((op, provider), "unchecked").split(":")[0]


def time_ratio(point: PointResult, op: str, provider: str) -> float | None:
    """fot_kernels time / provider time; None unless fot_kernels passed its check at this point
    (and the provider too, where its output is checked)."""
    t_fot, t_other = point.time(op, "fot_kernels"), point.time(op, provider)
    if provider == "fot_kernels" or t_fot is None or t_other is None or not _ok(point, op):
        return None
    if (op, provider) in point.status and not _ok(point, op, provider):
        return None
    return t_fot / t_other


def ratio_text(point: PointResult, op: str, provider: str) -> str:
    ratio = time_ratio(point, op, provider)
    measured = (op, "fot_kernels") in point.results and (op, provider) in point.results
    if ratio is None and provider != "fot_kernels" and measured:
        failed = provider if (op, provider) in point.status and not _ok(point, op, provider) else "fot_kernels"
        return _status_word(point, op, failed)
    return "" if ratio is None else f"{ratio:.2f}x"


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
    return (mem, provider, f"{t.median * 1e3:.2f}", f"{t.p20 * 1e3:.2f}..{t.p80 * 1e3:.2f}",
            f"{point.shape.score_flops / t.median / 1e9:.1f}", C.human_bytes(r.peak_bytes),
            ratio_text(point, op, provider), point.status.get((op, provider), "")[:60])  # fmt: skip


def sdpa_table(points: list[PointResult]) -> str:
    """Dense memory attention: fot_kernels against SDPA over the concatenation, one row per point."""
    body = []
    for p in sorted(points, key=lambda p: (p.shape.mem_dtype != "float32", p.shape.len_q, p.shape.mem)):
        t_fot = p.time("dense_attention", "fot_kernels")
        if t_fot is None or not any(p.time("dense_attention", s) for s in SDPA):
            continue
        row = [p.shape.len_q, p.shape.mem, p.shape.mem_dtype, f"{t_fot * 1e3:.1f}"]
        for provider in SDPA:
            t = p.time("dense_attention", provider)
            row += ["" if t is None else f"{t * 1e3:.1f}", ratio_text(p, "dense_attention", provider)]
        ratio = time_ratio(p, "dense_attention", "sdpa_concat")
        row.append("" if ratio is None else "met" if ratio <= SDPA_GOAL else "NOT MET")
        body.append(row)
    if not body:
        return ""
    headers = ("Lq", "M", "memory", "fot_kernels ms", "sdpa_concat ms", "fot/sdpa_concat", "sdpa_call_only ms",
               "fot/sdpa_call_only", f"fot/sdpa_concat <= {SDPA_GOAL}")  # fmt: skip
    s = points[0].shape
    title = (f"\ndense memory attention (topk=None, local causal Lk=Lq) vs SDPA over cat([memory, local]) with a "
             f"bool mask; B=1 Hq={s.q_heads} Hkv={s.kv_heads} D={s.dim}, query fp32\n")  # fmt: skip
    return title + C.format_table(headers, body)


def _peak(point: PointResult, op: str, provider: str, beyond_grads: bool = False) -> float | None:
    r = point.results.get((op, provider))
    if r is None or r.peak_bytes is None:
        return None
    return max(r.peak_bytes - (r.grad_bytes or 0), 0) if beyond_grads else r.peak_bytes


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def grad_table(points: list[PointResult], mode: str) -> str:
    """--mode bwd / fwdbwd summary, one row per point: dense fot_kernels against sdpa_concat and
    longllama (time ratios; goal <= SDPA_GOAL against sdpa_concat), kNN fot_kernels against dense
    fot_kernels (speed-up; goal >= KNN_SPEEDUP_GOAL) and longllama kNN, and peak extra memory of
    dense fot_kernels against sdpa_concat (goal <= PEAK_GOAL), measured and beyond the gradients.
    A ratio needs both results checked ok."""
    dense, knn = "dense_attention", "knn_attention"
    timing_rows, memory_rows = [], []

    def ms(p: PointResult, op: str, provider: str) -> str:
        t = p.time(op, provider)
        return "" if t is None else f"{t * 1e3:.0f}"

    def verdict(x: float | None, ok: Callable[[float], bool]) -> str:
        return "" if x is None else "met" if ok(x) else "NOT MET"

    def checked(p: PointResult, *keys: tuple[str, str]) -> bool:
        return all(_ok(p, op, provider) for op, provider in keys)

    for p in sorted(points, key=lambda p: (p.shape.mem_dtype != "float32", p.shape.len_q, p.shape.mem)):
        if not any(o in GRAD_OPS for o, _ in p.results):
            continue
        lead = [p.shape.len_q, p.shape.mem, p.shape.mem_dtype]
        t_dense, t_knn = p.time(dense, "fot_kernels"), p.time(knn, "fot_kernels")
        speedup = _ratio(t_dense, t_knn) if checked(p, (dense, "fot_kernels"), (knn, "fot_kernels")) else None
        timing_rows.append([*lead, ms(p, dense, "fot_kernels"), ms(p, dense, "sdpa_concat"),
                            ratio_text(p, dense, "sdpa_concat"),
                            verdict(time_ratio(p, dense, "sdpa_concat"), lambda x: x <= SDPA_GOAL),
                            ms(p, dense, "longllama"), ratio_text(p, dense, "longllama"), ms(p, knn, "fot_kernels"),
                            "" if speedup is None else f"{speedup:.1f}x",
                            verdict(speedup, lambda x: x >= KNN_SPEEDUP_GOAL), ms(p, knn, "longllama"),
                            ratio_text(p, knn, "longllama")])  # fmt: skip
        ok_mem = checked(p, (dense, "fot_kernels"), (dense, "sdpa_concat"))
        row = list(lead)
        for beyond in (False, True):
            fot, sdpa = _peak(p, dense, "fot_kernels", beyond), _peak(p, dense, "sdpa_concat", beyond)
            ratio = _ratio(fot, sdpa) if ok_mem else None
            row += [C.human_bytes(fot), C.human_bytes(sdpa), "" if ratio is None else f"{ratio:.3f}",
                    verdict(ratio, lambda x: x <= PEAK_GOAL)]  # fmt: skip
        row += [C.human_bytes(_peak(p, dense, "longllama")), C.human_bytes(_peak(p, knn, "fot_kernels")),
                C.human_bytes(_peak(p, knn, "longllama"))]  # fmt: skip
        memory_rows.append(row)
    if not timing_rows:
        return ""
    s = points[0].shape
    what = {"fwdbwd": "forward + backward", "bwd": "backward alone (forward untimed)"}[mode]
    out = [f"\n{what} of memory attention (local causal Lk=Lq), gradients w.r.t. q, k, v, mem_k, mem_v; "
           f"B=1 Hq={s.q_heads} Hkv={s.kv_heads} D={s.dim} k={s.k}, query fp32; median ms"]  # fmt: skip
    out.append(C.format_table(
        ("Lq", "M", "memory", "dense fot", "dense sdpa_concat", "fot/sdpa", f"<= {SDPA_GOAL}", "dense longllama",
         "fot/longllama", "kNN fot", "dense/kNN fot", f">= {KNN_SPEEDUP_GOAL:g}x", "kNN longllama",
         "fot/longllama"), timing_rows))  # fmt: skip
    out.append(f"\npeak extra memory (growth of the resident set during the first call) of dense {what}: measured, "
               f"and beyond the gradients the call returns (the same bytes for every provider)")  # fmt: skip
    out.append(C.format_table(
        ("Lq", "M", "memory", "dense fot", "dense sdpa_concat", "fot/sdpa", f"<= {PEAK_GOAL}", "fot beyond grads",
         "sdpa beyond grads", "fot/sdpa", f"<= {PEAK_GOAL}", "dense longllama", "kNN fot", "kNN longllama"),
        memory_rows))  # fmt: skip
    return "\n".join(out)


def csv_rows(points: list[PointResult], info: dict, mode: str) -> list[dict]:
    rows = []
    for point in points:
        cfg, flops = point.shape.config(), point.shape.score_flops
        for (op, provider), r in point.results.items():
            t = r.time
            common = dict(kernel=op, provider=provider, mode=C.MODES[mode], x_name="M", x_value=point.shape.mem,
                          samples=t.samples, check=point.status.get((op, provider), ""))  # fmt: skip
            rows.append(C.csv_row(info, cfg, metric="time", unit="ms", median=t.median * 1e3, p20=t.p20 * 1e3,
                                  p80=t.p80 * 1e3, **common))  # fmt: skip
            rows.append(C.csv_row(info, cfg, metric="throughput", unit="GFLOP/s (2*B*Hq*Lq*M*D / time)",
                                  median=flops / t.median / 1e9, p20=flops / t.p80 / 1e9, p80=flops / t.p20 / 1e9,
                                  **common))  # fmt: skip
            if r.peak_bytes is not None:
                n = r.peak_bytes
                rows.append(C.csv_row(info, cfg, metric="peak_memory", unit="bytes", median=n, p20=n, p80=n,
                                      **{**common, "samples": 1}))  # fmt: skip
                if r.grad_bytes is not None:
                    n = max(r.peak_bytes - r.grad_bytes, 0)
                    rows.append(C.csv_row(info, cfg, metric="peak_memory_beyond_grads", unit="bytes", median=n,
                                          p20=n, p80=n, **{**common, "samples": 1}))  # fmt: skip
            ratio = time_ratio(point, op, provider)
            if ratio is not None:
                rows.append(C.csv_row(info, cfg, metric=f"time_ratio_vs_{provider}", unit="fot_time/provider_time",
                                      median=ratio, p20=ratio, p80=ratio,
                                      **{**common, "provider": "fot_kernels",
                                         "check": point.status.get((op, "fot_kernels"), "")}))  # fmt: skip
    return rows


def plot(points: list[PointResult], path: Path, info: dict) -> None:
    """One panel per (op, Lq): rows are ops, columns query lengths; low-precision memory dashed.
    Then, where SDPA ran, a panel of the fot_kernels / SDPA time ratio of dense attention."""
    lqs = sorted({p.shape.len_q for p in points})
    panels: dict[str, dict[str, list]] = {f"{op}  Lq={lq}": {} for op in OPS for lq in lqs}
    ratio_panel = "dense_attention: fot_kernels time / SDPA time"
    panels[ratio_panel] = {}
    for point in points:
        s = point.shape
        variant = "" if s.mem_dtype == "float32" else f" [{s.mem_dtype} memory]"
        for (op, provider), r in point.results.items():
            ok = not point.status.get((op, provider), "").startswith("FAIL")
            panels[f"{op}  Lq={s.len_q}"].setdefault(provider + variant, []).append((s.mem, r.time.median * 1e3, ok))
        for provider in SDPA:
            ratio = time_ratio(point, "dense_attention", provider)
            if ratio is not None:
                panels[ratio_panel].setdefault(f"vs {provider} Lq={s.len_q}{variant}", []).append((s.mem, ratio, True))
    s = points[0].shape
    title = (f"fot-kernels CPU benchmark, --mode {info.get('mode', 'fwd')}: B=1 Hq={s.q_heads} Hkv={s.kv_heads} "
             f"D={s.dim} k={s.k}, fp32 query\n"
             f"{info['device']}, {info['timestamp']}, threads {info['threads']}, "
             f"commit {info['git_commit'][:12]}")  # fmt: skip
    panels = {name: series for name, series in panels.items() if series}
    C.plot_panels(panels, path, xlabel="memory slots M", ylabel="median time (ms)", title=title, ncols=len(lqs),
                  ylabels={ratio_panel: "fot_kernels / SDPA (median times)"},
                  hlines={ratio_panel: (SDPA_GOAL, f"goal <= {SDPA_GOAL} (vs sdpa_concat)")})  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


DEFAULTS = dict(m=[16384, 65536, 262144, 1048576], lq=[256, 1024], max_lq_m=2**28, repeats=5, max_seconds=8.0,
                bf16_at="1024,65536", ref_max_seconds=15.0, ops=list(OPS),
                providers=[p for p in PROVIDERS if p != "longllama"], interleave=False, mode="fwd")  # fmt: skip
QUICK = dict(m=[8192, 32768], lq=[256, 1024], max_lq_m=2**23, repeats=3, max_seconds=2.0, bf16_at="256,32768",
             ref_max_seconds=4.0)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Default grid: M in {16k, 64k, 256k, 1M} x Lq in {256, 1024}, minus the points with\n"
            "Lq*M > --max-lq-m (2^28: so M=1M only at Lq=256), plus one bf16-memory point at Lq=1024,\n"
            "M=64k; B=1, Hq=Hkv=8, D=128, k=32.\n"
            "Estimated 10 minutes on a quiet 2-core machine (the M=1M point several minutes; it needs\n"
            "~14 GiB of RAM: 8 GiB of fp32 memory keys/values + faiss's 4 GiB copy, and the SDPA\n"
            "baselines another 8 GiB for their concatenation, skipped where that does not fit); several\n"
            "times longer while other jobs load the CPU. --quick: M in {8k, 32k}, Lq in {256, 1024} with\n"
            "Lq*M <= 2^23, 3 repeats, bf16 point at Lq=256, M=32k: 1-2 minutes.\n"
            "--only dense-vs-sdpa: dense memory attention, fot_kernels vs sdpa_concat and sdpa_call_only,\n"
            "M in {16k, 64k} x Lq in {256, 1024}, fp32, interleaved: 1-3 minutes.\n"
            "--only fwdbwd: forward + backward of dense and kNN memory attention, fot_kernels vs\n"
            "sdpa_concat and longllama (under autograd), M in {16k, 64k}, Lq=1024, fp32, interleaved,\n"
            "gradients checked in float64: about 10 minutes on a quiet 2-core machine (estimate).\n"
            "Options given explicitly win over --quick and --only."
        ),
    )
    ap.add_argument("--m", nargs="+", type=C.parse_size, help="memory sizes M (suffix k/M allowed)")
    ap.add_argument("--lq", nargs="+", type=int, help="query lengths Lq (local causal context Lk = Lq)")
    ap.add_argument("--heads", type=int, default=8, help="query heads Hq (default 8)")
    ap.add_argument("--kv-heads", type=int, help="key/value heads Hkv (default: --heads)")
    ap.add_argument("--dim", type=int, default=128, help="head dim D (default 128)")
    ap.add_argument("--k", type=int, default=32, help="top-k of kNN mode (default 32)")
    C.add_mode_argument(ap, tuple(C.MODES), default=None)
    ap.add_argument("--repeats", type=int, help="timed calls per measurement (default 5; quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1; the first one is checked)")
    ap.add_argument("--interleave", action="store_true", default=None,
                    help="time a point's providers in alternation, one call of each per round, so that a changing "
                         "machine load weighs on all alike (default with --only dense-vs-sdpa; the setups of all "
                         "providers, e.g. faiss indexes, are then alive together)")  # fmt: skip
    ap.add_argument("--max-seconds", type=float,
                    help="stop repeating after this much timed time, keeping >= 2 samples (default 8; "
                         "quick 2); a first call longer than a quarter of it counts as a sample, "
                         "not a warm-up")  # fmt: skip
    ap.add_argument("--max-lq-m", type=C.parse_size,
                    help="skip points with Lq*M above this (default 2^28; 0: no limit)")  # fmt: skip
    ap.add_argument("--bf16-at", help="'LQ,M' of the extra bf16-memory point, or 'none'")
    ap.add_argument("--ops", nargs="+", choices=OPS, help="ops to run (default: all)")
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, help="providers to run (default: all but longllama)")
    ap.add_argument("--only", choices=tuple(SUBSETS),
                    help="a named subset: dense-vs-sdpa = --ops dense_attention --providers fot_kernels sdpa_concat "
                         "sdpa_call_only --m 16k 64k --lq 256 1024 --bf16-at none --interleave --repeats 7 "
                         "--max-seconds 12; fwdbwd = --mode fwdbwd --ops dense_attention knn_attention --providers "
                         "fot_kernels sdpa_concat longllama --m 16k 64k --lq 1024 --bf16-at none --interleave "
                         "--repeats 5 --max-seconds 20")  # fmt: skip
    ap.add_argument("--ref-max-gib", type=float, default=6.0, help="run the reference only below this peak (GiB)")
    ap.add_argument("--ref-max-seconds", type=float, help="... and this estimated time per call (default 15 s)")
    ap.add_argument("--sdpa-max-gib", type=float,
                    help="run the SDPA baselines only where their concatenation and mask take less (GiB; default: "
                         "3/4 of the memory available at that point)")  # fmt: skip
    ap.add_argument("--chunk", type=int, default=4096, help="memory chunk of the plain chunked loop")
    ap.add_argument("--score-gib", type=float, default=1.0,
                    help="score block per (heads, queries) group of the longllama baseline (GiB; default 1)")
    ap.add_argument("--check-rows", type=int, default=32, help="query rows per head checked against float64")
    ap.add_argument("--threads", type=int, help="torch and faiss threads (numpy: set OPENBLAS_NUM_THREADS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1-2 minute smoke run on small shapes")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    for preset in (SUBSETS.get(args.only, {}), QUICK if args.quick else {}, DEFAULTS):
        for name, value in preset.items():
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
        lq, m = (C.parse_size(v) for v in args.bf16_at.split(","))
        shapes.append(replace(base, len_q=lq, mem=m, mem_dtype="bfloat16"))
    return sorted(shapes, key=lambda s: (s.mem_dtype != "float32", s.mem, s.len_q)), skipped


def threads_text() -> str:
    import os

    text = f"torch={torch.get_num_threads()}"
    if _have_faiss():
        import faiss

        text += f" faiss={faiss.omp_get_max_threads()}"
    return text + f" openblas={os.environ.get('OPENBLAS_NUM_THREADS', 'default')}"


def load_text() -> str:
    """The machine's load average (other jobs on a shared machine weigh on the timings)."""
    try:
        import os

        return "load average (1/5/15 min) " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return "load average unknown"


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
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else f"-{args.only}" if args.only else "")
    if args.mode != "fwd" and args.only != args.mode:
        stamp += f"-{args.mode}"
    transcript: list[str] = []

    def log(text: str = "") -> None:
        print(text, flush=True)
        transcript.append(text)

    t_start = time.perf_counter()
    kernels = C.cpu_kernels_status()  # builds the C++ kernels on first use, before any timing
    info = C.machine_info(threads_text())
    log(f"fot-kernels {info['version']} ({info['git_commit']}), torch {info['torch_version']}, numpy "
        f"{info['numpy_version']}, faiss {info['faiss_version']}\n{info['device']}, threads {info['threads']}\n"
        f"CPU kernels: {kernels}; mode {args.mode}\n{faiss_settings()}\n{load_text()}")  # fmt: skip
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
    log(sdpa_table(points) if args.mode == "fwd" else grad_table(points, args.mode))
    log(f"\nGFLOP/s = 2*B*Hq*Lq*M*D / median time (the score product q @ K^T only, for every op); "
        f"fot/provider = fot_kernels time / provider time (< 1: fot_kernels faster).\n"
        f"Total wall time {time.perf_counter() - t_start:.0f} s; {load_text()}.")  # fmt: skip
    write_outputs(args, points, info, stamp, transcript, log)
    return 0 if all(not s.startswith("FAIL") for p in points for s in p.status.values()) else 1


def write_outputs(args, points, info, stamp, transcript, log) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path, txt_path = (args.out / f"bench_cpu_{stamp}.{ext}" for ext in ("csv", "png", "txt"))
    C.write_csv(csv_path, csv_rows(points, info, args.mode))
    written = [csv_path]
    if not args.no_plot:
        plot(points, png_path, {**info, "mode": args.mode})
        written.append(png_path)
    log("wrote " + ", ".join(str(p) for p in [*written, txt_path]))
    txt_path.write_text("\n".join(transcript) + "\n")


if __name__ == "__main__":
    sys.exit(main())
