"""CPU smoke test of benchmarks/bench_gpu.py: its whole code path (argument parsing, backend
discovery, correctness gates, every kernel and baseline, decode bandwidth rows, CSV, plots, exit
status) runs with ``--device cpu`` on tiny shapes, the triton backend in the Triton interpreter and
the cuda backend on csrc/cuda's kernels built for the CPU emulator (tests/cuda_emu). A GPU is lent
to this project rarely; a crash in the script there would waste it. The baselines' results are
checked against the reference here too (the benchmark only gates the package's backends)."""

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import emulate_cuda_backend
from fot_kernels.backends import reference
from fot_kernels.testing import assert_close_to_reference, check_knn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402

# tiny: every kernel, decode (Lq=1: bandwidth rows) and Lq=20 (40 rows per kv head: non-decode tiles)
SMOKE_ARGS = ["--device", "cpu", "--m", "256", "--lq", "1", "20", "--dim", "64", "--k", "8", "--heads", "2"]


@pytest.fixture
def interpreter():
    """The triton backend serves CPU tensors only through the interpreter, which is chosen when its
    kernels are imported (conftest.py sets TRITON_INTERPRET=1 where there is no GPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1 (a GPU machine compiles the Triton kernels: run bench_gpu.py itself)")


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cpu_smoke_run(tmp_path, monkeypatch, capsys, interpreter):
    emulate_cuda_backend(monkeypatch)
    status = bench_gpu.main([*SMOKE_ARGS, "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert status == 0, f"exit status {status}\nstdout:\n{out}\nstderr:\n{err}"
    for backend in bench_gpu.BACKENDS:
        assert f"backend {backend}: correctness gate passed (15 cases)" in out, out + err
    assert "sdpa_flash_concat: skipped" in out  # needs CUDA

    rows = _read_csv(tmp_path / "bench_gpu.csv")
    assert rows
    assert {r["device"].split(":")[0] for r in rows} == {"CPU smoke run, not GPU timings"}
    seen = {(r["kernel"], r["provider"], r["metric"]) for r in rows}
    for kernel in bench_gpu.KERNELS:
        for backend in bench_gpu.BACKENDS:
            for metric in ("time", "peak_memory", "throughput", "bandwidth", "bandwidth_ratio_to_copy"):
                assert (kernel, backend, metric) in seen, (kernel, backend, metric)
    for backend in bench_gpu.BACKENDS:
        assert ("knn_topk", backend, "ratio_to_cublas") in seen
    for kernel, provider in (("knn_topk", "cublas_bf16_matmul"), ("knn_topk", "torch_unfused"),
                             ("knn_attention", "torch_unfused"), ("dense_attention", "torch_longllama"),
                             ("memory_copy", "d2d_copy_keys")):  # fmt: skip
        assert (kernel, provider, "time") in seen, (kernel, provider)
    assert ("memory_copy", "d2d_copy_keys", "bandwidth") in seen
    lqs = {(r["kernel"], r["provider"]): set() for r in rows}
    for r in rows:
        if r["metric"] == "time":
            lqs[r["kernel"], r["provider"]].add(json.loads(r["config"])["Lq"])
    assert lqs["knn_topk", "triton"] == lqs["dense_attention", "cuda"] == {1, 20}
    for r in rows:
        assert r["check"] == ("passed" if r["provider"] in bench_gpu.BACKENDS else ""), r
        if r["metric"] == "time":
            assert float(r["p20"]) <= float(r["median"]) <= float(r["p80"]) and float(r["median"]) > 0, r

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for kernel in (*bench_gpu.KERNELS, "memory_copy"):
        assert (tmp_path / f"bench_gpu_{kernel}.png").stat().st_size > 0


def test_failed_gate_exits_1(tmp_path, monkeypatch, capsys, interpreter):
    """A backend with wrong attention outputs fails its gate, is left out of the timings, and the
    run exits 1 (the other providers are still timed)."""
    emulate_cuda_backend(monkeypatch)
    from fot_kernels.backends import cuda

    real = cuda.memory_attention

    def perturbed(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out + 0.05, lse

    monkeypatch.setattr(cuda, "memory_attention", perturbed)
    args = ["--device", "cpu", "--m", "256", "--lq", "1", "--dim", "64", "--k", "8", "--heads", "2", "--no-plot",
            "--kernels", "knn_attention", "--providers", "cuda", "torch_unfused", "--out", str(tmp_path)]  # fmt: skip
    status = bench_gpu.main(args)
    out, err = capsys.readouterr()
    assert status == 1, out + err
    # every memory_attention case fails (4 per dtype), knn_topk passes
    assert "backend cuda: FAILS its correctness gate (12 of 15 cases)" in err, err
    assert "memory_attention dense, causal local: AssertionError" in err
    assert "correctness gate passed" not in out
    rows = _read_csv(tmp_path / "bench_gpu.csv")
    assert {r["provider"] for r in rows} == {"torch_unfused"}


def test_cuda_device_without_gpu_exits_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_gpu.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("hq, hkv", [(4, 2), (3, 3)])
def test_baselines_match_reference(hq, hkv):
    """The PyTorch baselines over several memory chunks (the last one partial) and GQA, in float32
    (in bf16 the unfused kNN baselines round the scores to bf16, as cuBLAS bf16 outputs do, so
    their near-ties may select other slots than the fp32-scoring kernels)."""
    b, lq, lk, m, d, k, chunk = 2, 5, 7, 1000, 32, 16, 300
    q = torch.randn(b, hq, lq, d)
    mk, mv = torch.randn(b, hkv, m, d), torch.randn(b, hkv, m, d)
    kl, vl = torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
    scale = d**-0.5

    scores, idx = bench_gpu.unfused_knn_topk(q, mk, k, chunk)
    check_knn(scores, idx, q, mk, k)

    def against_reference(out, key, value, topk):
        kw = dict(topk=topk, causal=False, softmax_scale=scale)
        dbl = (lambda t: None if t is None else t.double())  # noqa: E731
        hi = reference.memory_attention(q.double(), dbl(key), dbl(value), mk.double(), mv.double(), **kw)[0]
        lo = reference.memory_attention(q, key, value, mk, mv, **kw)[0]
        assert_close_to_reference(out, hi, lo, name=f"topk={topk}")

    against_reference(bench_gpu.unfused_knn_attention(q, mk, mv, k, chunk, scale), None, None, k)
    against_reference(bench_gpu.longllama_dense(q, kl, vl, mk, mv, chunk, scale), kl, vl, None)
    bench_gpu.cublas_matmul(q, mk, chunk)  # runs; its result is not kept


def test_chunk_for():
    assert bench_gpu.chunk_for(rows=100, bytes_per_entry=4, budget=100 * 4 * 5000, m=10**6) == 4096
    assert bench_gpu.chunk_for(rows=100, bytes_per_entry=4, budget=1, m=10**6) == 1024  # at least 1024 slots
    assert bench_gpu.chunk_for(rows=100, bytes_per_entry=4, budget=2**40, m=3000) == 3000  # at most M
    assert bench_gpu.chunk_for(rows=100, bytes_per_entry=4, budget=2**40, m=10**6, cap=65536) == 65536


def test_wall_clock_quantiles():
    calls = []
    med, p20, p80 = bench_gpu.wall_clock(lambda: calls.append(1))
    assert len(calls) == bench_gpu.CPU_REPEATS and 0 <= p20 <= med <= p80
