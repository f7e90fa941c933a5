"""CPU smoke test of benchmarks/bench_gpu.py: its whole code path (argument parsing, backend
discovery, correctness gates, every kernel and baseline, decode bandwidth rows, CSV, plots, exit
status) runs with ``--device cpu`` on tiny shapes, the triton backend in the Triton interpreter and
the cuda backend on csrc/cuda's kernels built for the CPU emulator (tests/cuda_emu). A GPU is lent
to this project rarely; a crash in the script there would waste it. Its --mode fwdbwd / bwd runs
too (backward kernels of both backends, the baselines under autograd, the gradient gate and the
ratio_to_sdpa goal rows). The shared baselines of every benchmark (benchmarks/baselines.py) are
checked against the reference here too, outputs and gradients (the benchmarks only gate the
package's backends), and so are the shared timer's interleaving and modes, and bench_cpu.py's
dense-vs-SDPA and forward + backward (gradient-checked) paths, on tiny shapes."""

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import emulate_cuda_backend

import fot_kernels as fk
from fot_kernels.testing import assert_close_to_reference, check_knn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common
import baselines
import bench_cpu
import bench_gpu

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
                             ("dense_attention", "sdpa_concat"), ("dense_attention", "sdpa_call_only"),
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
            "--kernels", "knn_topk", "knn_attention", "--providers", "cuda", "torch_unfused",
            "--out", str(tmp_path)]  # fmt: skip
    status = bench_gpu.main(args)
    out, err = capsys.readouterr()
    assert status == 1, out + err
    # the gate checks the benchmarked kernels: every kNN memory_attention case fails (2 per dtype), knn_topk passes
    assert "backend cuda: FAILS its correctness gate (6 of 9 cases)" in err, err
    assert "memory_attention kNN k=32, causal local: AssertionError" in err
    assert "correctness gate passed" not in out
    rows = _read_csv(tmp_path / "bench_gpu.csv")
    assert {r["provider"] for r in rows} == {"torch_unfused"}


# --mode bwd / fwdbwd: tiny shapes (the Triton interpreter runs forward and backward kernels)
GRAD_SMOKE_ARGS = ["--device", "cpu", "--m", "100", "--lq", "20", "--dim", "64", "--k", "8", "--heads", "2"]


def test_cpu_smoke_fwdbwd(tmp_path, monkeypatch, capsys, interpreter):
    """--mode fwdbwd on dense attention (the backward goal's kernel): both backends pass a gate
    that checks their gradients (the 2 dense cases per dtype); every provider has rows of the
    forward + backward (CSV mode "full") and of the backward alone ("backward"), TFLOP/s by the
    FA2 convention (3.5x / 2.5x the forward's flops), and each backend the goal row ratio_to_sdpa
    (sdpa_call_only time / its time) in both."""
    emulate_cuda_backend(monkeypatch)
    status = bench_gpu.main([*GRAD_SMOKE_ARGS, "--mode", "fwdbwd", "--kernels", "dense_attention",
                             "--out", str(tmp_path)])  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 0, f"exit status {status}\nstdout:\n{out}\nstderr:\n{err}"
    for backend in bench_gpu.BACKENDS:
        assert f"backend {backend}: correctness gate passed (6 cases, outputs and gradients)" in out, out + err
    rows = _read_csv(tmp_path / "bench_gpu.csv")
    assert {r["kernel"] for r in rows} == {"dense_attention"}
    by_key = {(r["provider"], r["mode"], r["metric"]): r for r in rows}
    for provider in (*bench_gpu.BACKENDS, "torch_longllama", "sdpa_concat", "sdpa_call_only"):
        for mode, factor in (("full", 3.5), ("backward", 2.5)):
            time_row = by_key[provider, mode, "time"]
            assert (provider, mode, "peak_memory") in by_key, (provider, mode)
            c = json.loads(time_row["config"])
            flops = 4 * c["B"] * c["Hq"] * c["Lq"] * (c["Lk"] + c["M"]) * c["D"] * factor
            tflops = float(by_key[provider, mode, "throughput"]["median"])
            assert abs(tflops * float(time_row["median"]) * 1e9 / flops - 1) < 1e-6, (provider, mode)
    for backend in bench_gpu.BACKENDS:
        for mode in ("full", "backward"):
            ratio = float(by_key[backend, mode, "ratio_to_sdpa"]["median"])
            sdpa, mine = (float(by_key[p, mode, "time"]["median"]) for p in ("sdpa_call_only", backend))
            assert ratio == pytest.approx(sdpa / mine), (backend, mode)
            assert json.loads(by_key[backend, mode, "ratio_to_sdpa"]["config"])["sdpa_flash"] is True  # CPU flash
    for r in rows:
        assert r["check"] == ("passed (with gradients)" if r["provider"] in bench_gpu.BACKENDS else ""), r
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "bench_gpu_dense_attention.png").stat().st_size > 0


def test_cpu_smoke_bwd_knn(tmp_path, monkeypatch, capsys):
    """--mode bwd, kNN attention (the cuda backend on the emulator, and the unfused baseline under
    autograd): the gate checks gradients, knn_topk (forward only) is skipped with the reason, and
    only backward rows are written (no TFLOP/s for the kNN backward)."""
    emulate_cuda_backend(monkeypatch)
    status = bench_gpu.main([*GRAD_SMOKE_ARGS, "--mode", "bwd", "--kernels", "knn_topk", "knn_attention",
                             "--providers", "cuda", "torch_unfused", "--no-plot", "--out", str(tmp_path)])  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 0, f"exit status {status}\nstdout:\n{out}\nstderr:\n{err}"
    assert "backend cuda: correctness gate passed (6 cases, outputs and gradients)" in out, out + err
    assert "knn_topk: skipped (forward only" in out
    rows = _read_csv(tmp_path / "bench_gpu.csv")
    assert {r["mode"] for r in rows} == {"backward"} and {r["kernel"] for r in rows} == {"knn_attention"}
    seen = {(r["provider"], r["metric"]) for r in rows}
    assert seen == {(p, m) for p in ("cuda", "torch_unfused") for m in ("time", "peak_memory")}, seen


def test_wrong_gradients_fail_the_gate(tmp_path, monkeypatch, capsys):
    """A backend whose memory-value gradient is 25% off (its outputs right) fails the gradient gate
    of --mode bwd (every dense case), is left out of the timings, and the run exits 1."""
    emulate_cuda_backend(monkeypatch)
    from fot_kernels.backends import cuda

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.25

    real = cuda.memory_attention
    monkeypatch.setattr(cuda, "memory_attention",
                        lambda q, k, v, mk, mv, **kw: real(q, k, v, mk, Scale.apply(mv), **kw))  # fmt: skip
    status = bench_gpu.main([*GRAD_SMOKE_ARGS, "--mode", "bwd", "--kernels", "dense_attention", "--providers", "cuda",
                             "sdpa_call_only", "--no-plot", "--out", str(tmp_path)])  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 1, out + err
    assert "backend cuda: FAILS its correctness gate (6 of 6 cases, outputs and gradients)" in err, err
    assert "dense, causal local: AssertionError: " in err and ": dmem_v: max error" in err, err
    assert {r["provider"] for r in _read_csv(tmp_path / "bench_gpu.csv")} == {"sdpa_call_only"}


def test_cuda_device_without_gpu_exits_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_gpu.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _reference(q, key, value, mk, mv, *, topk=None, causal=True, mem_mask=None, scale=None):
    """(float64 reference, reference in the inputs' own precision) of memory_attention."""
    kw = dict(topk=topk, causal=causal, softmax_scale=scale, mem_mask=mem_mask, backend="reference")

    def dbl(t):
        return None if t is None else t.double()

    hi = fk.memory_attention(q.double(), dbl(key), dbl(value), mk.double(), mv.double(), **kw)
    return hi, fk.memory_attention(q, key, value, mk, mv, **kw)


@pytest.mark.parametrize("hq, hkv", [(4, 2), (3, 3)])
def test_baselines_match_reference(hq, hkv):
    """The PyTorch baselines over several memory chunks (the last one partial) and GQA, in float32
    (in bf16 the unfused kNN baselines round the scores to bf16, as cuBLAS bf16 outputs do, so
    their near-ties may select other slots than the fp32-scoring kernels); Lk != Lq, so that the
    causal mask's bottom-right alignment matters."""
    b, lq, lk, m, d, k, chunk = 2, 5, 7, 1000, 32, 16, 300
    q = torch.randn(b, hq, lq, d)
    mk, mv = torch.randn(b, hkv, m, d), torch.randn(b, hkv, m, d)
    kl, vl = torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
    scale = d**-0.5

    scores, idx = baselines.chunked_topk(q, mk, k, chunk)
    check_knn(scores, idx, q, mk, k)

    for causal in (True, False):
        out = baselines.attend_selected(q, kl, vl, mv, scores, idx, scale=scale, causal=causal)
        assert_close_to_reference(out, *_reference(q, kl, vl, mk, mv, topk=k, causal=causal), name=f"kNN {causal=}")
        hi, lo = _reference(q, kl, vl, mk, mv, causal=causal)
        grouped = dict(head_chunk=2, query_chunk=2)
        for name, out in (
            ("longllama", baselines.longllama_attention(q, kl, vl, mk, mv, scale=scale, causal=causal)),
            ("longllama grouped", baselines.longllama_attention(q, kl, vl, mk, mv, causal=causal, **grouped)),
            ("sdpa_concat", baselines.sdpa_concat(q, kl, vl, mk, mv, causal=causal, scale=scale)),
        ):
            assert_close_to_reference(out, hi, lo, name=f"{name} {causal=}")
    memory_only = baselines.attend_selected(q, None, None, mv, scores, idx, scale=scale)
    assert_close_to_reference(memory_only, *_reference(q, None, None, mk, mv, topk=k), name="kNN memory only")
    baselines.score_product(q, mk, chunk)  # runs; its result is not kept


def test_baselines_gradients_match_reference():
    """The baselines bench_gpu.py times under autograd (--mode bwd / fwdbwd): the gradients of
    sum(out * grad_out) w.r.t. every input of sdpa_concat, longllama_attention (grouped) and the
    unfused kNN attention (chunked_topk + attend_selected), in float32 with GQA and several memory
    chunks, against the reference's autograd in float64 (2x rule, against the fp32 reference)."""
    b, hq, hkv, lq, lk, m, d, k, chunk = 1, 4, 2, 5, 7, 200, 16, 8, 64
    inputs = [torch.randn(b, h, n, d) for h, n in ((hq, lq), (hkv, lk), (hkv, lk), (hkv, m), (hkv, m))]
    grad_out, scale = torch.randn(b, hq, lq, d), d**-0.5

    def grads(fn, dtype=None):
        xs = [t.to(dtype or t.dtype).requires_grad_() for t in inputs]
        return torch.autograd.grad(fn(*xs), xs, grad_out.to(xs[0].dtype))

    def unfused(q, key, value, mk, mv):
        return baselines.attend_selected(q, key, value, mv, *baselines.chunked_topk(q, mk, k, chunk), scale=scale,
                                         causal=False)  # fmt: skip

    for name, fn, kw in (
        ("sdpa_concat", lambda *x: baselines.sdpa_concat(*x, causal=True, scale=scale), dict(causal=True)),
        ("longllama grouped", lambda *x: baselines.longllama_attention(*x, scale=scale, causal=False, head_chunk=2,
                                                                       query_chunk=2), dict(causal=False)),
        ("unfused kNN", unfused, dict(causal=False, topk=k)),
    ):
        def ref(*x, kw=kw):
            return fk.memory_attention(*x, softmax_scale=scale, backend="reference", **kw)

        got, hi, lo = grads(fn), grads(ref, torch.float64), grads(ref)
        for what, g, g_hi, g_lo in zip(("dq", "dk", "dv", "dmk", "dmv"), got, hi, lo):
            assert_close_to_reference(g, g_hi, g_lo, name=f"{name} {what}")


def test_baselines_with_invalid_slots_and_bf16_memory():
    """Memory validity (mem_valid) and bf16 memory with an fp32 query, where the baselines take them."""
    b, hq, hkv, lq, m, d = 2, 4, 2, 6, 300, 64
    q = torch.randn(b, hq, lq, d)
    kl, vl = torch.randn(b, hkv, lq, d), torch.randn(b, hkv, lq, d)
    mk, mv = torch.randn(b, hkv, m, d).bfloat16(), torch.randn(b, hkv, m, d).bfloat16()
    valid = torch.rand(b, m) < 0.7
    hi, lo = _reference(q, kl, vl, mk, mv, mem_mask=valid)
    for name, out in (
        ("sdpa_concat", baselines.sdpa_concat(q, kl, vl, mk, mv, mem_valid=valid)),
        ("longllama", baselines.longllama_attention(q, kl, vl, mk, mv, mem_valid=valid)),
    ):
        assert out.dtype == q.dtype
        assert_close_to_reference(out, hi, lo, name=name)
    kc, vc, mask = baselines.sdpa_concat_inputs(q, kl, vl, mk, mv, mem_valid=valid)
    assert kc.dtype == vc.dtype == q.dtype and mask.shape == (b, 1, lq, m + lq)
    assert baselines.sdpa_concat_inputs(q, kl, vl, mk, mv, causal=False)[2] is None  # all visible: no mask


def test_chunk_for():
    assert baselines.chunk_for(rows=100, bytes_per_entry=4, budget=100 * 4 * 5000, m=10**6) == 4096
    assert baselines.chunk_for(rows=100, bytes_per_entry=4, budget=1, m=10**6) == 1024  # at least 1024 slots
    assert baselines.chunk_for(rows=100, bytes_per_entry=4, budget=2**40, m=3000) == 3000  # at most M
    assert baselines.chunk_for(rows=100, bytes_per_entry=4, budget=2**40, m=10**6, cap=65536) == 65536


def test_longllama_grouping():
    # everything fits: one group
    assert baselines.longllama_grouping(1, 32, 2048, 10_000, 128, 2, 2**40) == (32, 2048)
    # queries grouped as widely as fit with one head, then heads
    hc, qc = baselines.longllama_grouping(1, 32, 2048, 2**20, 128, 2, 4 * 2**30)
    assert 1 <= hc <= 32 and 1 <= qc <= 2048
    assert hc * (2**20 * 128 * 2 + qc * 2**20 * 12) <= 4 * 2**30
    assert baselines.longllama_grouping(1, 32, 2048, 2**24, 128, 2, 1) == (1, 1)  # never below one row


def test_mode_option():
    """--mode: fwd (default), bwd and fwdbwd in both scripts."""
    assert bench_gpu.parse_args(["--out", "x"]).mode == "fwd"
    for mode in ("bwd", "fwdbwd"):
        assert bench_gpu.parse_args(["--out", "x", "--mode", mode]).mode == mode
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--out", "x", "--mode", "backward"])
    assert bench_cpu.parse_args([]).mode == "fwd"
    assert bench_cpu.parse_args(["--mode", "bwd"]).mode == "bwd"
    assert bench_cpu.parse_args(["--only", "fwdbwd"]).mode == "fwdbwd"
    assert bench_cpu.parse_args(["--only", "fwdbwd", "--mode", "bwd"]).mode == "bwd"  # explicit wins


def test_timed_fn_modes():
    """fwdbwd returns the gradients of sum(out * grad_out); bwd's clock restarts after the forward."""
    import time

    x, g = torch.randn(5, requires_grad=True), torch.randn(5)

    def forward():
        time.sleep(0.2)
        return x * 3

    for mode in ("fwdbwd", "bwd"):
        call = _common.timed_fn(mode, forward, (x,), g)

        def fn(lap, call=call):
            out = call(lambda: lap(_common.RESTART))
            lap("op")
            return out

        m = _common.measure(fn, repeats=1, warmup=0, min_repeats=1)
        out, (dx,) = m.result
        assert torch.equal(out, x.detach() * 3) and not out.requires_grad and torch.allclose(dx, 3 * g)
        assert (m.laps["op"].median < 0.15) == (mode == "bwd"), (mode, m.laps["op"].median)
    assert _common.timed_fn("fwd", forward) is forward
    with pytest.raises(ValueError):
        _common.timed_fn("fwdbwd", forward, (torch.randn(5),), g)  # no grad: refused


FWDBWD_TINY = ["--only", "fwdbwd", "--m", "1k", "--lq", "16", "--heads", "4", "--kv-heads", "2", "--dim", "32",
               "--k", "8", "--repeats", "2", "--max-seconds", "0.1", "--no-plot"]  # fmt: skip


def test_bench_cpu_fwdbwd(tmp_path, capsys):
    """bench_cpu.py --only fwdbwd on tiny shapes (GQA): every provider's gradients pass their float64
    check, the CSV has times, ratios and peak memory in bytes, and the summary tables are printed."""
    assert bench_cpu.main([*FWDBWD_TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "forward + backward of memory attention" in out and "peak extra memory" in out
    rows = _read_csv(next(tmp_path.glob("bench_cpu_*-fwdbwd.csv")))
    assert {r["mode"] for r in rows} == {"full"}
    seen = {(r["kernel"], r["provider"], r["metric"]) for r in rows}
    for op in ("dense_attention", "knn_attention"):
        for provider in ("fot_kernels", "longllama"):
            for metric in ("time", "peak_memory", "peak_memory_beyond_grads"):
                assert (op, provider, metric) in seen, (op, provider, metric)
        assert (op, "fot_kernels", "time_ratio_vs_longllama") in seen
    assert ("dense_attention", "fot_kernels", "time_ratio_vs_sdpa_concat") in seen
    assert {r["check"] for r in rows if r["metric"] == "time"} == {"ok"}
    assert {r["unit"] for r in rows if r["metric"].startswith("peak_memory")} == {"bytes"}
    assert all(int(float(r["median"])) > 0 for r in rows if r["metric"] == "peak_memory")


def test_bench_cpu_bwd_catches_wrong_gradients(tmp_path, capsys, monkeypatch):
    """--mode bwd: a provider whose memory-value gradient is 1% off fails its check (FAIL, no
    ratio, exit 1); the forward-only providers are skipped with the reason."""

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    real = fk.memory_attention
    monkeypatch.setattr(bench_cpu.fk, "memory_attention",
                        lambda q, k, v, mk, mv, **kw: real(q, k, v, mk, Scale.apply(mv), **kw))  # fmt: skip
    args = [*FWDBWD_TINY, "--mode", "bwd", "--providers", "fot_kernels", "sdpa_concat", "faiss"]
    assert bench_cpu.main([*args, "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "faiss              skipped: forward-only (--mode bwd)" in out
    rows = _read_csv(next(tmp_path.glob("bench_cpu_*-fwdbwd-bwd.csv")))
    checks = {(r["kernel"], r["provider"]): r["check"] for r in rows if r["metric"] == "time"}
    assert checks[("dense_attention", "sdpa_concat")] == "ok"
    for op in ("dense_attention", "knn_attention"):
        assert checks[(op, "fot_kernels")].startswith("FAIL") and "dmv" in checks[(op, "fot_kernels")], checks
    assert not any(r["metric"].startswith("time_ratio") for r in rows)
    assert {r["mode"] for r in rows} == {"backward"}


def test_wall_clock_quantiles():
    calls = []
    med, p20, p80 = bench_gpu.wall_clock(lambda: calls.append(1))
    assert len(calls) == bench_gpu.CPU_REPEATS and 0 <= p20 <= med <= p80


def test_measure_interleaved():
    """Calls alternate, one of each function per round, until each has its samples."""
    calls = []
    fns = [lambda lap, name=name: calls.append(name) or name for name in "abc"]
    ms = _common.measure_interleaved(fns, repeats=3, warmup=1, budget_s=float("inf"), min_repeats=2)
    assert [m.result for m in ms] == ["a", "b", "c"]  # the first (checked) call's result
    assert [m.laps[_common.TOTAL].samples for m in ms] == [3, 3, 3]
    assert calls[:3] == ["a", "b", "c"]  # first calls (the warm-up), then rounds in rotating order
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_bench_cpu_dense_vs_sdpa(tmp_path, capsys):
    """bench_cpu.py's dense-vs-SDPA path on tiny shapes: checks pass, ratio rows, the summary table."""
    shape = ["--m", "1k", "--lq", "16", "--heads", "4", "--kv-heads", "2", "--dim", "32", "--bf16-at", "16,1k"]
    args = ["--only", "dense-vs-sdpa", *shape, "--repeats", "2", "--max-seconds", "0.1", "--no-plot"]
    assert bench_cpu.main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vs SDPA over cat([memory, local])" in out
    rows = _read_csv(next(tmp_path.glob("bench_cpu_*-dense-vs-sdpa.csv")))
    seen = {(r["kernel"], r["provider"], r["metric"]) for r in rows}
    for provider in ("fot_kernels", "sdpa_concat", "sdpa_call_only"):
        assert ("dense_attention", provider, "time") in seen
    for provider in ("sdpa_concat", "sdpa_call_only"):
        assert ("dense_attention", "fot_kernels", f"time_ratio_vs_{provider}") in seen
    assert {r["check"] for r in rows if r["metric"] == "time"} == {"ok"}
    assert {r["mode"] for r in rows} == {"forward"}
    bf16 = {r["provider"] for r in rows if json.loads(r["config"])["mem_dtype"] == "bfloat16"}
    assert bf16 == {"fot_kernels", "sdpa_concat"}
