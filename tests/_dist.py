"""Harness of the multi-process tests (gloo on the CPU): start ``world`` processes, collect one
report per rank, and fail (never block) when a rank hangs or crashes.

A worker is a module-level function ``worker(rank, init_file, results, *args)`` that puts
``(rank, report)`` on ``results`` once, where ``report`` maps a case key to ``(traceback or
None, seconds)``; a failure outside the cases goes under the key ``("worker", "")``. Children
run with ``OMP_NUM_THREADS=1`` (they should also call ``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import os
import queue as queue_module
import time

import pytest
import torch
import torch.multiprocessing as mp


def poison_fill(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh tensor with NaN (float) or -7777 (int16/32/64), in place; other dtypes (uint8,
    int8, bool: they cannot hold -7777) are left as they are. Used by conftest's ``poison_empty``
    fixture and by :func:`poison_empty` in spawned children."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int16, torch.int32, torch.int64):
        t.fill_(-7777)
    return t


def poison_empty() -> None:
    """torch.empty / empty_like / new_empty return NaN-filled (float) or -7777 (int) tensors, so
    that an element nobody wrote fails (the ``poison_empty`` fixture of conftest.py, in a child)."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    torch.empty = lambda *a, **k: poison_fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison_fill(real_empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: poison_fill(real_new_empty(self, *a, **k))


def run_spawned(worker, world: int, init_file: str, deadline_s: float, args: tuple = ()) -> dict[int, dict]:
    """``{rank: report}`` from ``world`` spawned processes running ``worker(rank, init_file,
    results, *args)``. Calls ``pytest.fail`` when a rank sends no report within ``deadline_s``
    (the whole run, start-up included; the children still alive then are killed) or reports a
    failure outside its cases."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = [ctx.Process(target=worker, args=(r, init_file, results, *args), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    reports = {}
    deadline = time.monotonic() + deadline_s
    while len(reports) < world and time.monotonic() < deadline:
        try:
            rank, report = results.get(timeout=1.0)
            reports[rank] = report
        except queue_module.Empty:
            if all(not p.is_alive() for p in procs):
                break  # every child is gone and the queue is drained
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    missing = sorted(set(range(world)) - set(reports))
    if missing or alive:
        codes = {r: p.exitcode for r, p in enumerate(procs)}
        failed = "".join(f"\n--- rank {r}, {key}:\n{tb}" for r, rep in reports.items() for key, (tb, _) in rep.items()
                         if tb is not None)  # fmt: skip
        pytest.fail(f"ranks {missing} sent no report within {deadline_s} s (hang or crash); still alive and "
                    f"killed: {alive}; exit codes: {codes}; failures of the ranks that reported:"
                    f"{failed[:20000]}")  # fmt: skip
    for rank in range(world):
        error = reports[rank].get(("worker", ""))
        if error is not None:
            pytest.fail(f"rank {rank} failed outside the cases:\n{error[0]}")
    return reports
