"""Pieces shared by the benchmark scripts: timing, benchmark modes, machine/version info, the CSV
schema, tables and plots. Nothing here knows about a particular op (the baselines the ops are
compared with are in baselines.py).

Timing (:func:`measure`): ``warmup`` untimed calls (the first one is wrapped in
:func:`fot_kernels.testing.peak_memory` and its result is returned for correctness checks; a first
call longer than ``long_call_s`` counts as a sample instead), then timed calls with
``time.perf_counter`` until ``repeats`` samples or, once ``min_repeats`` samples exist, until
``budget_s`` seconds of timed calls have passed. A timed function receives a ``lap``
callable and may call ``lap(name)`` to record the time since the start of the call under ``name``
(e.g. faiss search alone, then search + attention, from the same run). Reported statistics are
the median and the 20th/80th percentiles of the samples. :func:`measure_interleaved` times
several functions in alternation instead, so that a changing machine load weighs on all alike.

CSV schema (Liger-Kernel's, one row per measurement and metric; see :data:`CSV_FIELDS`):
kernel, provider, mode, metric, unit, x_name, x_value, median, p20, p80, samples, check, config
(JSON of the shape), device, timestamp, version (fot_kernels), git_commit, torch_version,
numpy_version, faiss_version, threads.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CSV_FIELDS = (
    "kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "median", "p20", "p80",
    "samples", "check", "config", "device", "timestamp", "version", "git_commit", "torch_version",
    "numpy_version", "faiss_version", "threads",
)  # fmt: skip

TOTAL = "total"  # lap name of a whole call

#: ``--mode`` of the benchmark scripts -> the CSV ``mode`` column (Liger-Kernel's names). ``fwd``:
#: the forward pass; ``bwd``: the backward pass alone (its forward runs untimed in the same call,
#: see :data:`RESTART`; timers of whole calls use :func:`retained_backward` instead); ``fwdbwd``:
#: forward + backward. A script lists the modes it implements in :func:`add_mode_argument`
#: (bench_cpu.py and bench_gpu.py: all three).
MODES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "full"}
#: flops of a mode as a multiple of the forward's, FlashAttention-2's convention for attention: the
#: backward runs 5 matmuls of the forward's size (recomputed scores, dP, dV, dQ, dK) against the
#: forward's 2, so bwd = 2.5 x fwd and fwdbwd = 3.5 x fwd (the recomputation counts as work done)
FLOPS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
#: lap name that restarts a call's clock (:func:`_timed_call`): what ran before it is not timed
RESTART = "restart"


def add_mode_argument(parser, modes: Sequence[str] = ("fwd",), default: str | None = "fwd") -> None:
    """The ``--mode`` option shared by the benchmark scripts; ``modes``: those the script implements."""
    what = {"fwd": "fwd = the forward pass", "bwd": "bwd = the backward pass alone (its forward untimed)",
            "fwdbwd": "fwdbwd = forward + backward of sum(out * grad_out) w.r.t. every input"}  # fmt: skip
    planned = [m for m in MODES if m not in modes]
    parser.add_argument("--mode", choices=tuple(modes), default=default,
                        help="what is timed: " + ", ".join(what[m] for m in modes)
                             + (f" ({' and '.join(planned)}: not implemented here yet)" if planned else "")
                             + (f"; default {default}" if default else ""))  # fmt: skip


def timed_fn(mode: str, forward: Callable[[], object], inputs: Sequence = (), grad_out=None) -> Callable[..., object]:
    """The callable that ``mode`` times, built from an op's (or a baseline's) forward call.

    ``fwd``: the forward call itself (no arguments). ``bwd`` / ``fwdbwd``: a callable
    ``call(restart=None) -> (out detached, grads)`` that runs the forward and then the backward of
    ``sum(out * grad_out)`` (``torch.autograd.grad(out, inputs, grad_out)``: the same gradients
    without the product), ``grads`` = the gradients of ``inputs`` (tensors that require grad), in
    their order. ``bwd`` calls ``restart()`` between the two, which restarts the clock of the call
    (``lap(RESTART)`` of :func:`measure`), so that only the backward is timed; the forward's graph
    is built anew every call, outside the timing."""
    if mode == "fwd":
        return forward
    if mode not in MODES:
        raise ValueError(f"benchmark mode {mode!r} is not implemented (implemented: {', '.join(MODES)})")
    import torch

    inputs = _requiring_grad(inputs, f"mode {mode!r}")

    def call(restart: Callable[[], None] | None = None) -> tuple[object, tuple]:
        out = forward()
        if mode == "bwd" and restart is not None:
            restart()
        grads = torch.autograd.grad(out, inputs, grad_out)
        return out.detach(), grads

    return call


def retained_backward(forward: Callable[[], object], inputs: Sequence, grad_out) -> Callable[[], tuple]:
    """The backward alone, for timers that time whole calls (``triton.testing.do_bench``), where
    :func:`timed_fn`'s clock restart cannot apply: runs ``forward()`` once now (its graph kept), and
    returns ``call() -> grads``, the gradients of ``sum(out * grad_out)`` w.r.t. ``inputs``
    (tensors that require grad) by ``torch.autograd.grad(..., retain_graph=True)`` on that one
    graph, as FlashAttention's and Triton's attention benchmarks time backward passes. The graph
    lives as long as the returned callable."""
    import torch

    inputs = _requiring_grad(inputs, "retained_backward")
    out = forward()

    def call() -> tuple:
        return torch.autograd.grad(out, inputs, grad_out, retain_graph=True)

    return call


def _requiring_grad(inputs: Sequence, what: str) -> tuple:
    inputs = tuple(inputs)
    if not inputs or not all(t.requires_grad for t in inputs):
        raise ValueError(f"{what} needs input tensors that require grad")
    return inputs


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Median and 20th/80th percentiles of a list of samples (seconds for times)."""

    median: float
    p20: float
    p80: float
    samples: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        p20, median, p80 = np.percentile(np.asarray(samples, dtype=float), [20, 50, 80])
        return cls(float(median), float(p20), float(p80), len(samples))


@dataclass
class Measurement:
    """Result of the first (warm-up) call, its peak extra memory, and the statistics per lap."""

    result: object
    peak_bytes: int
    laps: dict[str, Stats] = field(default_factory=dict)


def _timed_call(fn: Callable[[Callable[[str], None]], object]) -> tuple[object, dict[str, float]]:
    """Run ``fn(lap)``; ``lap(name)`` records the time since the start, ``lap(RESTART)`` restarts
    the clock (the laps before it are dropped: bwd mode's untimed forward)."""
    start = [time.perf_counter()]
    laps: dict[str, float] = {}

    def lap(name: str) -> None:
        now = time.perf_counter()
        if name == RESTART:
            start[0] = now
            laps.clear()
        else:
            laps[name] = now - start[0]

    result = fn(lap)
    laps[TOTAL] = time.perf_counter() - start[0]
    return result, laps


def release_free_heap() -> None:
    """Give free heap pages back to the OS (glibc ``malloc_trim``) so that a following peak-RSS
    measurement sees small allocations too, instead of their reuse of already-resident pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(
    fn: Callable[[Callable[[str], None]], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    budget_s: float = 10.0,
    min_repeats: int = 2,
    long_call_s: float = math.inf,
) -> Measurement:
    """Time ``fn(lap)``; see the module docstring. The first call's result and peak extra memory
    are returned. It is a warm-up call unless ``warmup=0`` or it took at least ``long_call_s``
    seconds (then its one-off costs are negligible and it counts as the first sample)."""
    result, peak, samples = _first_calls(fn, warmup, long_call_s)
    spent = sum(s[TOTAL] for s in samples)
    while len(samples) < repeats and (len(samples) < min_repeats or spent < budget_s):
        samples.append(_timed_call(fn)[1])
        spent += samples[-1][TOTAL]
    return _measurement(result, peak, samples)


def measure_interleaved(
    fns: Sequence[Callable[[Callable[[str], None]], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    budget_s: float = 10.0,
    min_repeats: int = 2,
    long_call_s: float = math.inf,
) -> list[Measurement]:
    """:func:`measure` of several functions together, for ratios on a machine whose load changes
    (e.g. shared with other jobs): the first call and warm-up of each as in :func:`measure`, then
    rounds of timed calls, one call of each function per round, the order rotating. It stops when
    each has ``repeats`` samples, or at least ``min_repeats`` once ``budget_s`` seconds per
    function have been spent."""
    firsts = [_first_calls(fn, warmup, long_call_s) for fn in fns]
    samples = [f[2] for f in firsts]
    spent = sum(s[TOTAL] for ss in samples for s in ss)
    rounds = 0
    while any(len(ss) < repeats for ss in samples) and (
        min(len(ss) for ss in samples) < min_repeats or spent < budget_s * len(fns)
    ):
        for j in (i % len(fns) for i in range(rounds, rounds + len(fns))):
            if len(samples[j]) < repeats:
                samples[j].append(_timed_call(fns[j])[1])
                spent += samples[j][-1][TOTAL]
        rounds += 1
    return [_measurement(result, peak, ss) for (result, peak, _), ss in zip(firsts, samples)]


def _first_calls(fn, warmup: int, long_call_s: float) -> tuple[object, int, list[dict[str, float]]]:
    """The first call (its result and peak extra memory) and the rest of the warm-up; the first
    call is a sample when ``warmup=0`` or it took at least ``long_call_s`` seconds."""
    from fot_kernels.testing import peak_memory

    release_free_heap()
    (result, first_laps), peak = peak_memory(lambda: _timed_call(fn))
    counts = warmup == 0 or first_laps[TOTAL] >= long_call_s
    for _ in range(0 if counts else warmup - 1):
        _timed_call(fn)
    return result, peak, [first_laps] if counts else []


def _measurement(result: object, peak: int, samples: list[dict[str, float]]) -> Measurement:
    laps = {name: Stats.of([s[name] for s in samples]) for name in samples[0]}
    return Measurement(result=result, peak_bytes=peak, laps=laps)


# ----------------------------------------------------------------------------------------------
# Machine and versions
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform's description."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_commit(path: str | Path = ".") -> str:
    """``git rev-parse HEAD`` of the checkout holding ``path`` (+ "-dirty" with local changes)."""
    try:
        cwd = str(Path(path).resolve())
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: `git status` must not refresh the index

        def run(*a):
            return subprocess.run(["git", *a], cwd=cwd, env=env, capture_output=True, text=True, timeout=10)

        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def available_memory() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_kernels_status() -> str:
    """Which CPU path ``backend="cpu"`` runs: its C++ kernels or the PyTorch fallback (and why).
    Builds the C++ kernels on first use, so call it before any timing. Backend internals are being
    reorganised: where the status function has moved, this says "unknown"."""
    try:
        from fot_kernels.backends import cpu

        why = cpu.extension_status()
    except (ImportError, AttributeError) as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    return "C++ extension" if why is None else f"PyTorch fallback: {why}"


def machine_info(threads: str) -> dict[str, str]:
    """The per-row constant CSV fields: device, timestamp, versions, git commit, threads."""
    import torch

    import fot_kernels

    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = "absent"
    return {
        "device": f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "version": fot_kernels.__version__,
        "git_commit": git_commit(Path(__file__).parent),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "faiss_version": faiss_version,
        "threads": threads,
    }


# ----------------------------------------------------------------------------------------------
# Output: CSV rows, tables, plots
# ----------------------------------------------------------------------------------------------


def csv_row(info: dict[str, str], config: dict, **fields: object) -> dict[str, object]:
    """One CSV row: the measurement's fields + the shape config (JSON) + machine info."""
    row = dict.fromkeys(CSV_FIELDS, "")
    row.update(info)
    row["config"] = json.dumps(config, sort_keys=True)
    row.update(fields)
    return row


def write_csv(path: Path, rows: Iterable[dict[str, object]], fields: Sequence[str] = CSV_FIELDS) -> None:
    """Write ``rows`` with the columns ``fields`` (default :data:`CSV_FIELDS`; a script may append
    columns of its own, e.g. bench_gpu.py's triton/CUDA versions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


def parse_size(text: str) -> int:
    """A count with an optional binary suffix: '64k' -> 65536, '1M' -> 1048576, '1000' -> 1000."""
    text = text.strip()
    mult = {"k": 2**10, "m": 2**20}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table; numbers right-aligned, text left-aligned."""
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _numeric(text: str) -> bool:
    try:
        float(text.split()[0].rstrip("x%"))
        return True
    except (ValueError, IndexError):
        return False


def human_bytes(n: float | None) -> str:
    if n is None or n < 0 or math.isnan(n):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def plot_panels(
    panels: dict[str, dict[str, list[tuple[float, float, bool]]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    ncols: int = 2,
    ylabels: dict[str, str] | None = None,
    hlines: dict[str, tuple[float, str]] | None = None,
) -> None:
    """Log-log line plots, panels in the given order, ``ncols`` per row:
    ``panels[title][series] = [(x, y, ok), ...]``. A series keeps one colour in every panel; a
    variant named ``"<series> [<variant>]"`` takes its base series' colour with a dashed line.
    Points with ok=False (failed correctness check) are overdrawn with red crosses.
    ``ylabels[title]`` overrides ``ylabel`` for one panel; ``hlines[title] = (y, label)`` draws a
    horizontal line there (e.g. a goal ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = sorted({name.split(" [")[0] for series in panels.values() for name in series})
    colour = {base: plt.get_cmap("tab10")(i % 10) for i, base in enumerate(bases)}
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.2 * nrows), squeeze=False)
    for ax, (panel, series) in zip(axes.flat, panels.items()):
        for name, points in sorted(series.items()):
            points = sorted(points)
            variant = " [" in name
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name, color=colour[name.split(" [")[0]],
                    marker="s" if variant else "o", linestyle="--" if variant else "-", markersize=4)  # fmt: skip
            bad = [p for p in points if not p[2]]
            if bad:
                ax.plot([p[0] for p in bad], [p[1] for p in bad], "rx", markersize=12, mew=2)
        if hlines and panel in hlines:
            y, label = hlines[panel]
            ax.axhline(y, color="grey", linestyle=":", linewidth=1.5, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel((ylabels or {}).get(panel, ylabel))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- multi-process runs (gloo on the CPU) ------------------------------------------------------


def status_bytes(field: str) -> int:
    """A byte figure of this process from /proc/self/status (e.g. ``VmHWM``: the peak resident set);
    -1 where it is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def reset_peak_rss() -> None:
    """Reset this process's VmHWM (Linux; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def spawn_ranks(worker: Callable[..., None], ranks: int, args: tuple, timeout: float, what: str = "--timeout") -> None:
    """Run ``worker(rank, ranks, init_file, *args)`` in ``ranks`` spawned processes, which set up
    their process group through the file store ``init_file`` (a fresh temporary directory: no
    network). A rank that raises makes this raise; a run past ``timeout`` seconds is killed and
    raises TimeoutError (a hang fails instead of blocking)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "init")
        context = mp.start_processes(worker, args=(ranks, init_file, *args), nprocs=ranks, join=False,
                                     start_method="spawn")  # fmt: skip
        deadline = time.monotonic() + timeout
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{ranks} ranks did not finish within {what}={timeout} s")
