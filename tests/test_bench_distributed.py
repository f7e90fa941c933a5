"""Smoke test of benchmarks/bench_distributed.py: a tiny run over 1 and 2 gloo ranks (spawned by
the script, with its own timeout) of every phase, forward + backward included, writes its rows,
and every sharded result (train: the gradients too) matches the one-rank result."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_distributed as B

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")


def test_tiny_run_of_every_phase_is_checked(tmp_path):
    argv = ["--slots", "5000", "--ranks", "1", "2", "--repeats", "1", "--phases", "decode", "prefill", "train",
            "--chunk", "8", "--local", "8", "--k", "5", "--threads", "2", "--timeout", "240",
            "--out", str(tmp_path)]  # fmt: skip
    assert B.main(argv) == 0
    (path,) = tmp_path.glob("bench_distributed_*.csv")
    rows = list(csv.DictReader(path.open()))
    times = [r for r in rows if r["metric"].startswith("time_")]
    assert {r["metric"] for r in times} == {"time_decode", "time_prefill", "time_train"}
    assert {r["provider"] for r in times} == {"gloo x1", "gloo x2"}
    assert len(times) == 2 * 3 * 2  # ranks x phases x modes
    assert all(r["check"] == "ok" for r in rows) and all(float(r["median"]) > 0 for r in times)
    assert {r["mode"] for r in times if r["metric"] == "time_train"} == {"fwdbwd"}
    sent = [float(r["median"]) for r in rows if r["metric"].startswith("bytes_sent") and r["provider"] == "gloo x2"]
    assert sent and all(b > 0 for b in sent)
