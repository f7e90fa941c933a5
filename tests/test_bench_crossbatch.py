"""Smoke test of benchmarks/bench_crossbatch.py: its gather + SDPA baseline agrees with the float64
oracle (so the ratio compares two correct implementations), and a quick run writes its rows."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baselines
import bench_crossbatch as B

from fot_kernels.backends import reference
from fot_kernels.crossbatch import crossbatch_pack


@pytest.mark.parametrize(("d", "packing", "stepping"), [(1, 1, False), (3, 1, False), (3, 2, True), (5, 4, False)])
def test_gather_sdpa_baseline_matches_the_oracle(d, packing, stepping):
    gen = torch.Generator().manual_seed(d)
    q = torch.randn(4, 4, 24, 16, generator=gen, dtype=torch.float64)
    k, v, mk = (torch.randn(4, 2, 24, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    pack = crossbatch_pack(4, d, packing, stepping)
    got = baselines.crossbatch_gather_sdpa(q, k, v, mk, d=d, pack=pack)
    want, _ = reference.crossbatch_attention(q, k, v, mk, cross_batch_range=d, dataset_packing=packing,
                                             cross_batch_stepping=stepping)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_quick_run_writes_checked_rows(tmp_path):
    assert B.main(["--quick", "--repeats", "2", "--threads", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench_crossbatch_*.csv")
    rows = list(csv.DictReader(path.open()))
    assert {r["provider"] for r in rows} == {"fot_kernels", "gather_sdpa"}
    assert {r["metric"] for r in rows} == {"time", "peak_extra_memory"}
    assert all(r["check"] == "ok" for r in rows) and all(float(r["median"]) > 0 for r in rows)
