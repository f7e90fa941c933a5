"""GPU benchmark of the package's GPU backends (Triton and CUDA C++) against PyTorch/cuBLAS baselines.

One run on one CUDA device, bf16, per point (D in --dim, Lq in --lq, M in --m, k in --k):

- ``knn_topk``: every GPU backend; ``torch_unfused`` (cuBLAS bf16 scores per memory chunk,
  ``torch.topk`` per chunk, running top-k merge); ``cublas_bf16_matmul``, the scoring product
  alone (the throughput ceiling). TFLOP/s = 2 * B * Hq * Lq * M * D / t, and per backend a
  ``ratio_to_cublas`` row (matmul time / backend time; goal >= 0.6).
- ``knn_attention`` (memory part, kNN mode): every GPU backend; ``torch_unfused`` (chunked scores,
  top-k, gather, softmax). TFLOP/s of the scoring product.
- ``dense_attention`` (the released LongLLaMA mode: ``topk=None``, non-causal over
  [local | memory]): every GPU backend; ``torch_longllama`` (the released LongLLaMA computation:
  scores of a group of heads and queries over [local | memory] materialised, one softmax, grouped
  to fit --score-gib); ``sdpa_concat`` (what a user writes today: torch SDPA over cat([memory,
  local]), the concatenation made per call; torch picks the SDPA kernel, flash where it can) and
  ``sdpa_call_only`` (the same SDPA call on a concatenation made outside the timing), where the
  concatenation fits. TFLOP/s = 4 * B * Hq * Lq * (Lk + M) * D / t (forward; see --mode below).
  Per backend a ``ratio_to_sdpa`` row: sdpa_call_only time / backend time (in --mode bwd /
  fwdbwd, its CSV mode "backward" row is the backward goal: >= 0.5).
- decode (Lq = 1): bandwidth of every backend (bytes of memory it must read once: the keys, plus
  the values in dense mode, / t) and ``bandwidth_ratio_to_copy`` rows against ``d2d_copy_keys``, a
  device-to-device copy of the keys measured in the same run ((read + written bytes) / t; goal
  >= 0.7).

The PyTorch baselines are shared with the other benchmarks: benchmarks/baselines.py.

--mode (_common.MODES; the CSV mode column): ``fwd`` (default) times forward calls. ``bwd`` and
``fwdbwd`` make every input (q, local k and v, mem_k, mem_v) a leaf that requires grad and time
the gradients of sum(out * grad_out) w.r.t. all five (``torch.autograd.grad``, a fixed random
grad_out) of ``knn_attention`` and ``dense_attention``: the GPU backends' fused backward kernels
(``memory_attention`` is differentiable on both), and the baselines under autograd: torch_unfused
(kNN), torch_longllama (where what it saves for its backward, ``baselines.longllama_saved_bytes``,
fits in 90% of the free memory), sdpa_concat (SDPA's own backward, flash where torch picks it, plus
the concatenation's backward) and sdpa_call_only (the gradients w.r.t. the query and the
concatenations, made outside the timing as leaves: the SDPA backward alone). ``bwd`` times the
backward alone, on one retained graph (``_common.retained_backward``: the forward runs once,
untimed; do_bench then times ``autograd.grad(..., retain_graph=True)``), CSV mode "backward";
``fwdbwd`` times forward + backward per call (``_common.timed_fn``, CSV mode "full") and then the
backward alone as in bwd, so that one run gives both. knn_topk (no gradients) and the forward-only
baselines (cublas_bf16_matmul, d2d_copy_keys) are skipped then, and there are no bandwidth rows.
Throughput of dense attention by FlashAttention-2's convention, ``_common.FLOPS_FACTOR``: backward
= 2.5 x and forward + backward = 3.5 x the forward's 4 * B * Hq * Lq * (Lk + M) * D (the backward's
5 matmuls against the forward's 2, its recomputation of the scores counted as work); kNN attention
gets TFLOP/s (of its scoring product) in fwd only (its backward works on the k selected slots).

GPU backends: ``triton`` (``fot_kernels.backends.triton``) and ``cuda``
(``fot_kernels.backends.cuda``, only when its extension is built: ``extension_status()`` is None;
else the reason is printed). A backend is timed only where its ``unsupported_reasons`` accepts the
inputs, as the public ops' dispatch would ask (the benchmark calls the backend modules directly);
elsewhere the reason is printed and the point skipped for it. Before timing, every backend passes
a correctness gate (small shapes against the float64 reference, every mode of the --kernels
benchmarked; in bwd / fwdbwd also the gradients w.r.t. every input, against the float64
reference's autograd, ``fot_kernels.testing.assert_close_to_reference``); a backend failing it is
left out of the timings, its failures are printed, and the run exits with status 1.
Points whose memory keys and values exceed the budget (--max-gib, default 60% of the GPU) are
skipped; each baseline chunks the memory so that one chunk's score block stays under --score-gib
and only one chunk's output is alive at a time.

Medians and 20/80 percentiles from ``triton.testing.do_bench`` (CUDA events); peak memory from
``torch.cuda.max_memory_allocated`` minus what was allocated before the call
(``fot_kernels.testing.peak_memory``). Output in --out:
``bench_gpu.csv`` (one row per measurement, benchmarks/_common.py's Liger schema plus
triton_version and cuda_version; rewritten after every point) and ``bench_gpu_<kernel>.png``
(median time against M, a panel per (D, Lq)). Exit status: 0; 1 if a correctness gate failed, a
backend raised during timing, or a backend named in --providers is unavailable; 2 without a CUDA
GPU (or without triton, or under TRITON_INTERPRET=1).

CPU smoke mode (``--device cpu``): the same code path on CPU tensors, to catch crashes before a
GPU is lent (tests/test_bench_gpu.py runs it). The triton backend runs in the Triton interpreter
(TRITON_INTERPRET=1, set by the script unless given; in-process callers must set it before
fot_kernels' Triton kernels are imported), the cuda backend where its kernels serve CPU tensors
(the tests point it at tests/cuda_emu); the correctness gate uses smaller shapes (GATE_SHAPE);
times are wall-clock medians of CPU_REPEATS calls (time.perf_counter) and peak memory is the growth
of the resident set (``fot_kernels.testing.peak_memory``); ``cublas_bf16_matmul`` is torch.matmul
on the CPU, ``d2d_copy_keys`` a host copy, and the SDPA baselines run torch's CPU SDPA kernel.
The CSV's device column reads "CPU smoke run, not GPU timings: <CPU model>". Exit 2 does not apply.
These numbers mean nothing; only the exit status, the gates and the files do.

    python benchmarks/bench_gpu.py --out benchmarks/results/h100                 # full sweep
    python benchmarks/bench_gpu.py --out /tmp/b --quick                           # short GPU run
    python benchmarks/bench_gpu.py --out /tmp/b --providers cuda cublas_bf16_matmul d2d_copy_keys --lq 1
    python benchmarks/bench_gpu.py --out /tmp/b --mode fwdbwd --kernels dense_attention knn_attention \
        --m 16k 64k --lq 2048 --dim 128 --heads 8                                  # backward goal (gpu_check.sh)
    python benchmarks/bench_gpu.py --out /tmp/b --device cpu --m 256 --lq 1 20 --dim 64 --k 8 --heads 2  # CPU smoke
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import baselines as B

#: the package's GPU backends, by provider name (modules imported lazily: fot_kernels.backends.load)
BACKENDS = ("triton", "cuda")
#: the baselines, by provider name
BASELINES = ("cublas_bf16_matmul", "torch_unfused", "torch_longllama", "sdpa_concat", "sdpa_call_only", "d2d_copy_keys")
PROVIDERS = BACKENDS + BASELINES
KERNELS = ("knn_topk", "knn_attention", "dense_attention")
#: --device: "cuda" measures; "cpu" is the smoke mode (the whole code path on CPU tensors, no GPU numbers)
DEVICES = ("cuda", "cpu")
#: timed calls per measurement in the CPU smoke mode (after the untimed peak-memory call)
CPU_REPEATS = 3
#: correctness-gate shape per device: (Lq, Lk, M) with B=1, Hq=4, Hkv=2. The CPU smoke mode's is
#: smaller (the Triton interpreter takes ~30 s per kNN call at M=5000), yet still has several key
#: tiles, the last one partial, and 18 query rows per kv head (more than the decode tiles' 16).
GATE_SHAPE = {"cuda": (33, 40, 5000), "cpu": (9, 12, 300)}
#: what each --mode times, in order (_common.MODES names; the CSV mode column): fwdbwd times the
#: backward alone too, so that one run gives the full step and the backward goal's rows
PHASES = {"fwd": ("fwd",), "bwd": ("bwd",), "fwdbwd": ("fwdbwd", "bwd")}
#: CSV columns: the shared schema plus the GPU toolchain
CSV_FIELDS = (*C.CSV_FIELDS, "triton_version", "cuda_version")

DEFAULTS = dict(m=["16k", "64k", "256k", "1M", "4M"], lq=[1, 2048], k=[32, 128], dim=[100, 128], heads=32)
QUICK = dict(m=["64k", "256k"], lq=[1, 512], k=[32], dim=[128], heads=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Providers: GPU backends " + ", ".join(BACKENDS) + "; baselines " + ", ".join(BASELINES) + ".\n"
            "Defaults: M in {16k, 64k, 256k, 1M, 4M} x Lq in {1, 2048} x D in {100, 128}, k in {32, 128},\n"
            "B=1, Hq=Hkv=32 (points over the memory budget are skipped with a message).\n"
            "--quick: M in {64k, 256k}, Lq in {1, 512}, D=128, k=32, Hq=Hkv=8 (options given explicitly win).\n"
            "--mode bwd / fwdbwd: knn_attention and dense_attention under autograd (gradients w.r.t. q, k, v,\n"
            "mem_k, mem_v, checked by the gate first); fwdbwd times forward + backward, then the backward alone.\n"
            "Exit status: 0 ok; 1 a correctness gate failed, a backend raised while timed, or a backend\n"
            "named in --providers is unavailable; 2 (--device cuda only) no CUDA GPU / no triton /\n"
            "TRITON_INTERPRET=1."
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (bench_gpu.csv + PNGs)")
    p.add_argument("--device", choices=DEVICES, default="cuda",
                   help="cuda (default): the benchmark; cpu: smoke run of the whole code path on CPU tensors (Triton "
                        "interpreter, wall-clock timing; not GPU numbers)")  # fmt: skip
    p.add_argument("--m", nargs="+", help="memory sizes M (suffix k/M allowed)")
    p.add_argument("--lq", nargs="+", type=int, help="query lengths Lq")
    p.add_argument("--k", nargs="+", type=int, help="top-k values")
    p.add_argument("--dim", nargs="+", type=int, help="head dims D")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, help="query heads Hq (default 32; quick 8)")
    p.add_argument("--kv-heads", type=int, help="key/value heads Hkv (default: Hq)")
    p.add_argument("--local", type=int, help="local keys Lk of dense_attention (default: Lq)")
    C.add_mode_argument(p, tuple(C.MODES))
    p.add_argument("--chunk", type=C.parse_size, default=C.parse_size("64k"),
                   help="memory chunk of the unfused kNN baselines (default 64k; capped by --score-gib)")  # fmt: skip
    p.add_argument("--score-gib", type=float, default=4.0,
                   help="largest score block of one baseline chunk, GiB (fp32 for the unfused pipelines, the "
                        "bf16 output for the cuBLAS matmul, scores + values copy for a LongLLaMA group; "
                        "default 4)")  # fmt: skip
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS,
                   help="providers to run (default: all; the cuda backend only where its extension is "
                        "built)")  # fmt: skip
    p.add_argument("--max-gib", type=float,
                   help="skip points whose memory keys+values exceed this (default: 60%% of the GPU; cpu: of "
                        "the RAM)")  # fmt: skip
    p.add_argument("--skip-check", action="store_true",
                   help="skip the correctness gates (the CSV check column then says so)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a few small points (smoke run)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.m = [C.parse_size(str(m)) for m in args.m]
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    return args


# ------------------------------------------------------------------------- device-dependent parts


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def empty_cache(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()


def free_memory(device: str) -> float:
    """Bytes that can still be allocated: free GPU memory plus the caching allocator's unused
    reserve, or the machine's available RAM."""
    import torch

    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    return C.available_memory() or float("inf")


def device_memory(device: str) -> int:
    """Bytes of memory of the device: the GPU's, or the machine's RAM."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------- backends and gate


def gpu_backends(names, device: str, needs_grad: bool = False) -> tuple[dict, dict[str, str]]:
    """({name: module} of the usable GPU backends among ``names``, {name: why not} of the others).
    Usable: the module imports and its ``unsupported_reasons`` accepts bf16 tensors on ``device``
    (for cuda, this includes ``extension_status()``: fot_kernels._C is built and loads), and with
    ``needs_grad`` (--mode bwd / fwdbwd) inputs that require grad (cuda: its backward kernels)."""
    import torch

    from fot_kernels import backends

    probe = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16, device=device)
    table, unavailable = {}, {}
    for name in names:
        mod, why = backends.load(name)
        if mod is not None:
            why = "; ".join(mod.unsupported_reasons("memory_attention", probe, probe, key=probe, value=probe,
                                                    mem_values=probe, topk=32,
                                                    needs_grad=needs_grad)) or None  # fmt: skip
        if why is None:
            table[name] = mod
        else:
            unavailable[name] = why
    return table, unavailable


#: the inputs of memory_attention, in its argument order (gradient names: "d" + name)
ATTN_INPUTS = ("q", "k", "v", "mem_k", "mem_v")


def correctness_gate(backend, device: str, grads: bool = False, kernels=KERNELS) -> tuple[int, list[str]]:
    """Check one backend module against the float64 reference at small shapes (:data:`GATE_SHAPE`,
    D in {100, 128} bf16 and D=64 fp32), in every mode the benchmark times for ``kernels``:
    knn_topk (k=32); knn_attention: memory_attention kNN (k=32) with a causal local part and
    without local part; dense_attention: memory_attention dense with a causal and with a non-causal
    local part. ``grads`` (--mode bwd / fwdbwd): memory_attention runs under autograd and the
    gradients of sum(out * grad_out) w.r.t. every input are checked too, against the reference's
    autograd in float64 (and in the inputs' dtype, for the tolerance: the 2x rule of
    ``assert_close_to_reference``); knn_topk, forward-only, is not timed then nor checked. Returns
    (cases run, failures); any exception is a failure."""
    import torch

    from fot_kernels.backends import reference as R
    from fot_kernels.testing import assert_close_to_reference, check_knn

    lq, lk, m = GATE_SHAPE[device]
    cases, failures = 0, []
    for d, dtype in ((100, torch.bfloat16), (128, torch.bfloat16), (64, torch.float32)):
        torch.manual_seed(0)
        q = torch.randn(1, 4, lq, d, device=device).to(dtype)
        k = torch.randn(1, 2, lk, d, device=device).to(dtype)
        v = torch.randn_like(k)
        mk = torch.randn(1, 2, m, d, device=device).to(dtype)
        mv = torch.randn_like(mk)
        grad_out = torch.randn_like(q) if grads else None
        scale = d**-0.5
        tag = f"{backend.NAME} D={d} {str(dtype).replace('torch.', '')}"
        if "knn_topk" in kernels and not grads:
            cases += 1
            try:
                s, i = backend.knn_topk(q, mk, 32, mem_lengths=None, mem_mask=None)
                synchronize(device)
                check_knn(s, i, q, mk, 32)
            except Exception as exc:  # a crash is a failed check too
                failures.append(f"{tag} knn_topk k=32: {type(exc).__name__}: {exc}")
        for kernel, mode, key, value, topk, causal in (
            ("dense_attention", "dense, causal local", k, v, None, True),
            ("dense_attention", "dense, non-causal local", k, v, None, False),
            ("knn_attention", "kNN k=32, causal local", k, v, 32, True),
            ("knn_attention", "kNN k=32, no local", None, None, 32, False),
        ):
            if kernel not in kernels:
                continue
            cases += 1
            inputs = dict(zip(ATTN_INPUTS, (q, key, value, mk, mv)))
            kw = dict(topk=topk, causal=causal, softmax_scale=scale)
            try:
                out, lse, dx = _attention(backend.memory_attention, inputs, grad_out, None, mem_lengths=None,
                                          mem_mask=None, **kw)  # fmt: skip
                synchronize(device)
                hi = _attention(R.memory_attention, inputs, grad_out, torch.float64, **kw)
                lo = _attention(R.memory_attention, inputs, grad_out, None, **kw)
                what = f"{tag} memory_attention {mode}"
                assert_close_to_reference(out, hi[0], lo[0], name=f"{what}: out")
                assert_close_to_reference(lse, hi[1], lo[1].float(), name=f"{what}: lse")
                for name in dx:
                    assert_close_to_reference(dx[name], hi[2][name], lo[2][name], name=f"{what}: d{name}")
            except Exception as exc:  # likewise
                failures.append(f"{tag} memory_attention {mode}: {type(exc).__name__}: {exc}")
    return cases, failures


def _attention(fn, inputs: dict, grad_out, dtype, **kw) -> tuple:
    """(out, lse, {input name: gradient}) of ``fn(q, k, v, mem_k, mem_v, **kw)`` on copies of the
    ``inputs`` (None: absent) cast to ``dtype`` (None: as they are); with ``grad_out``, the copies
    require grad and the gradients are those of sum(out * grad_out), else there are none."""
    import torch

    grads = grad_out is not None
    xs = {n: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(grads) for n, t in inputs.items()}
    out, lse = fn(*xs.values(), **kw)
    if not grads:
        return out, lse, {}
    leaves = {n: t for n, t in xs.items() if t is not None}
    dx = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return out.detach(), lse.detach(), dict(zip(leaves, dx))


# ---------------------------------------------------------------------------------- the harness


Timer = Callable[[Callable[[], object]], tuple[float, float, float]]


def wall_clock(fn: Callable[[], object], repeats: int = CPU_REPEATS) -> tuple[float, float, float]:
    """(median, p20, p80 in ms) of ``repeats`` calls timed with time.perf_counter: the CPU smoke
    mode's stand-in for do_bench (the caller's peak-memory call was the warm-up)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    stats = C.Stats.of(samples)
    return stats.median, stats.p20, stats.p80


def timer(device: str) -> Timer:
    """The timing function of ``device``: fn -> (median, p20, p80 in ms). CUDA: do_bench (CUDA
    events, 25 ms warm-up, 100 ms of repetitions); cpu: :func:`wall_clock`."""
    if device == "cuda":
        import triton

        return lambda fn: triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    return wall_clock


def bench(fn: Callable[[], object], device: str, time_fn: Timer) -> tuple[float, float, float, int]:
    """(median, p20, p80 in ms, peak extra bytes) of fn on ``device``: one untimed call for the
    peak memory (``fot_kernels.testing.peak_memory``: the CUDA caching allocator's peak above what
    was allocated before; on the CPU the growth of the resident set, -1 where unknown), then
    ``time_fn``. Nothing fn returns is kept: the first call's result is dropped before the timing
    starts, and the timer drops each."""
    from fot_kernels.testing import peak_memory

    peak = peak_memory(fn, device)[1]
    med, p20, p80 = time_fn(fn)
    return med, p20, p80, peak


class Runner:
    """Times providers and collects CSV rows."""

    def __init__(self, info: dict, checks: dict[str, str], backends: dict, max_bytes: float, device: str, mode: str):
        self.info, self.checks, self.backends = info, checks, backends
        self.device, self.time_fn, self.mode = device, timer(device), mode
        self.max_bytes = max_bytes  # memory budget of a point's inputs
        self.rows: list[dict] = []
        self.errors: list[str] = []  # backends that raised while timed

    def row(self, kernel: str, provider: str, cfg: dict, metric: str, unit: str, med: float, p20: float, p80: float,
            phase: str = "fwd"):  # fmt: skip
        self.rows.append(C.csv_row(self.info, cfg, kernel=kernel, provider=provider, mode=C.MODES[phase],
                                   metric=metric, unit=unit, x_name="M", x_value=cfg["M"], median=med, p20=p20,
                                   p80=p80, check=self.checks.get(provider, "")))  # fmt: skip

    def run(self, kernel: str, provider: str, fn: Callable[[], object], cfg: dict, *, inputs=(), grad_out=None,
            flops: dict[str, float] | None = None, nbytes=None) -> dict[str, float]:  # fmt: skip
        """Time ``fn`` (a forward call) in each phase of the mode (:data:`PHASES`): fwd the call;
        fwdbwd the call and the backward of sum(out * grad_out) w.r.t. ``inputs``
        (``_common.timed_fn``); bwd that backward alone, on one retained graph
        (``_common.retained_backward``). Rows per phase: time (ms), peak_memory (MiB), throughput
        (TFLOP/s) where ``flops[phase]`` is given, bandwidth (GB/s, fwd only) where nbytes is given.
        Returns {phase: median ms} of the phases that ran."""
        import torch

        shown = ("k", "chunk", "head_chunk", "query_chunk")
        label = f"  {kernel:15} {provider:19} {', '.join(f'{k}={v}' for k, v in cfg.items() if k in shown)}"
        times = {}
        for phase in PHASES[self.mode]:
            failure = timed = None
            try:
                timed = (fn if phase == "fwd" else C.timed_fn(phase, fn, inputs, grad_out) if phase == "fwdbwd"
                         else C.retained_backward(fn, inputs, grad_out))  # fmt: skip
                med, p20, p80, peak = bench(timed, self.device, self.time_fn)
            except torch.cuda.OutOfMemoryError:
                failure = "out of memory"
            except Exception as exc:  # report and go on with the other providers
                first = str(exc).splitlines()[0] if str(exc) else ""
                failure = f"FAILED {kernel} {provider} {phase} at {cfg}: {type(exc).__name__}: {first}"
                if provider in self.backends:
                    self.errors.append(failure)
            timed = None  # bwd: frees the retained graph
            at = f"{label} [{phase}]" if self.mode != "fwd" else label
            if failure is not None:  # outside the except block: its traceback no longer holds the call's tensors
                empty_cache(self.device)
                print(f"{at}: {failure}", flush=True)
                continue
            times[phase] = med
            row = functools.partial(self.row, kernel, provider, cfg, phase=phase)
            row("time", "ms", med, p20, p80)
            row("peak_memory", "MiB", peak / 2**20, peak / 2**20, peak / 2**20)
            line = f"{at}: {med:9.3f} ms  peak {peak / 2**20:9.1f} MiB"
            if flops and flops.get(phase):
                f = flops[phase]
                row("throughput", "TFLOP/s", f / med / 1e9, f / p80 / 1e9, f / p20 / 1e9)
                line += f"  {f / med / 1e9:7.1f} TFLOP/s"
            if nbytes and phase == "fwd":
                row("bandwidth", "GB/s", nbytes / med / 1e6, nbytes / p80 / 1e6, nbytes / p20 / 1e6)
                line += f"  {nbytes / med / 1e6:7.0f} GB/s"
            print(line, flush=True)
        return times

    def ratio(self, kernel: str, provider: str, cfg: dict, metric: str, unit: str, value: float, phase: str = "fwd"):
        self.row(kernel, provider, cfg, metric, unit, value, value, value, phase=phase)
        at = f" [{phase}]" if self.mode != "fwd" else ""
        print(f"  {kernel:15} {provider:19}{at} {metric} = {value:.3f}", flush=True)


def measure_point(r: Runner, args: argparse.Namespace, selected: set[str], d: int, lq: int, m: int) -> None:
    """Every selected (kernel, provider) at one shape. The tensors die when this returns."""
    import torch

    batch, hq, hkv, dtype, device = args.batch, args.heads, args.kv_heads, torch.bfloat16, r.device
    lk = args.local or lq
    grads = args.mode != "fwd"  # bwd / fwdbwd: every input is a leaf that requires grad
    torch.manual_seed(0)
    q, mk, mv, kl, vl = (torch.randn(batch, h, n, d, device=device, dtype=dtype).requires_grad_(grads)
                         for h, n in ((hq, lq), (hkv, m), (hkv, m), (hkv, lk), (hkv, lk)))  # fmt: skip
    grad_out = torch.randn_like(q) if grads else None
    scale = d**-0.5
    score_flops = 2 * batch * hq * lq * m * d
    key_bytes = mk.numel() * mk.element_size()
    rows = batch * hq * lq  # score rows of one memory slot
    budget = args.score_gib * 2**30
    unfused_chunk = B.chunk_for(rows, 4, budget, m, cap=args.chunk)
    base = dict(B=batch, Hq=hq, Hkv=hkv, Lq=lq, M=m, D=d, dtype="bf16")
    decode = lq == 1
    table = r.backends

    t_copy = None  # decode: the device-to-device copy of the keys (cpu: a host copy), the bandwidth ceiling
    if decode and "d2d_copy_keys" in selected and not grads:
        dst = torch.empty_like(mk)
        t_copy = r.run("memory_copy", "d2d_copy_keys", lambda: dst.copy_(mk.detach()), base,
                       nbytes=2 * key_bytes).get("fwd")  # fmt: skip
        del dst

    def served(kernel: str, name: str, mod, **inputs) -> bool:
        """Whether backend ``mod`` serves this point's inputs. The benchmark calls the backends
        directly, past the public ops' dispatch, so it asks what dispatch would ask; a point a
        backend does not serve (e.g. k=256 at D=128 in Triton) is skipped with the reason."""
        op = "knn_topk" if kernel == "knn_topk" else "memory_attention"
        why = mod.unsupported_reasons(op, q, mk, needs_grad=grads, **inputs)
        if why:
            at = f" k={inputs['topk']}" if inputs.get("topk") else ""
            print(f"  {kernel:15} {name:19}{at}: skipped (not served: {'; '.join(why)})", flush=True)
        return not why

    def versus_copy(kernel: str, name: str, cfg: dict, t: float | None, nbytes: int) -> None:
        if t and t_copy:  # (nbytes / t) / (2 * key_bytes / t_copy)
            r.ratio(kernel, name, cfg, "bandwidth_ratio_to_copy", "bandwidth / d2d copy bandwidth",
                    nbytes * t_copy / (2 * key_bytes * t))  # fmt: skip

    if "knn_topk" in args.kernels and grads:
        print(f"  knn_topk: skipped (forward only: no gradients; --mode {args.mode})", flush=True)
    elif "knn_topk" in args.kernels:
        t_mm = None
        if "cublas_bf16_matmul" in selected:
            mm_chunk = B.chunk_for(rows, 2, budget, m)
            t_mm = r.run("knn_topk", "cublas_bf16_matmul", lambda: B.score_product(q, mk, mm_chunk),
                         {**base, "chunk": mm_chunk}, flops={"fwd": score_flops}).get("fwd")  # fmt: skip
        for k in args.k:
            cfg = {**base, "k": k}
            for name, mod in table.items():
                if not served("knn_topk", name, mod, topk=k):
                    continue
                t = r.run("knn_topk", name,
                          lambda mod=mod, k=k: mod.knn_topk(q, mk, k, mem_lengths=None, mem_mask=None),
                          cfg, flops={"fwd": score_flops}, nbytes=key_bytes if decode else None).get("fwd")  # fmt: skip
                if t and t_mm:
                    r.ratio("knn_topk", name, cfg, "ratio_to_cublas", "cublas_time/time", t_mm / t)
                versus_copy("knn_topk", name, cfg, t, key_bytes)
            if "torch_unfused" in selected:
                r.run("knn_topk", "torch_unfused", lambda k=k: B.chunked_topk(q, mk, k, unfused_chunk),
                      {**cfg, "chunk": unfused_chunk}, flops={"fwd": score_flops})  # fmt: skip

    # forward flops: kNN counts the scoring product (its backward, over the k selected slots, gets
    # no throughput); dense the attention over [local | memory], the backward by the FA2 convention
    knn_flops = {"fwd": score_flops}
    attn_flops = {ph: 4 * batch * hq * lq * (lk + m) * d * C.FLOPS_FACTOR[ph] for ph in C.MODES}
    timed = dict(inputs=(q, mk, mv), grad_out=grad_out)  # kNN without local part
    if "knn_attention" in args.kernels:
        for k in args.k:
            cfg = {**base, "k": k}
            for name, mod in table.items():
                if not served("knn_attention", name, mod, mem_values=mv, topk=k):
                    continue
                t = r.run("knn_attention", name,
                          lambda mod=mod, k=k: mod.memory_attention(q, None, None, mk, mv, topk=k, causal=False,
                                                                    softmax_scale=scale, mem_lengths=None,
                                                                    mem_mask=None)[0],
                          cfg, flops=knn_flops, nbytes=key_bytes if decode else None, **timed)  # fmt: skip
                versus_copy("knn_attention", name, cfg, t.get("fwd"), key_bytes)
            if "torch_unfused" in selected:
                def unfused(k=k):
                    scores, idx = B.chunked_topk(q, mk, k, unfused_chunk)
                    return B.attend_selected(q, None, None, mv, scores, idx, scale=scale)

                r.run("knn_attention", "torch_unfused", unfused, {**cfg, "chunk": unfused_chunk}, flops=knn_flops,
                      **timed)  # fmt: skip

    if "dense_attention" in args.kernels:
        cfg = {**base, "Lk": lk, "causal": False}
        timed = dict(inputs=(q, kl, vl, mk, mv), grad_out=grad_out, flops=attn_flops)
        t_backend = {}
        for name, mod in table.items():
            if not served("dense_attention", name, mod, key=kl, value=vl, mem_values=mv):
                continue
            t_backend[name] = r.run("dense_attention", name,
                                    lambda mod=mod: mod.memory_attention(q, kl, vl, mk, mv, topk=None, causal=False,
                                                                         softmax_scale=scale, mem_lengths=None,
                                                                         mem_mask=None)[0],
                                    cfg, nbytes=2 * key_bytes if decode else None, **timed)  # fmt: skip
            versus_copy("dense_attention", name, cfg, t_backend[name].get("fwd"), 2 * key_bytes)
        grad_copies = 2 if grads else 1  # bwd / fwdbwd: the gradients are as large again
        if "torch_longllama" in selected:
            hc, qc = B.longllama_grouping(batch, hq, lq, lk + m, d, q.element_size(), budget)
            need = B.longllama_saved_bytes(batch, hq, lq, lk + m, q.element_size()) if grads else 0
            if need > 0.9 * free_memory(device):
                print(f"  dense_attention torch_longllama: skipped (~{need / 2**30:.1f} GiB saved for its backward "
                      "> 90% of the free memory)")  # fmt: skip
            else:
                r.run("dense_attention", "torch_longllama",
                      lambda: B.longllama_attention(q, kl, vl, mk, mv, scale=scale, causal=False, head_chunk=hc,
                                                    query_chunk=qc),
                      {**cfg, "head_chunk": hc, "query_chunk": qc}, **timed)  # fmt: skip
        sdpa = [p for p in ("sdpa_concat", "sdpa_call_only") if p in selected]
        need = B.sdpa_concat_bytes(q, lk, m, hkv) * grad_copies
        t_sdpa = {}
        # whether torch's flash kernel serves these SDPA calls (it is picked first then): in the SDPA
        # rows' and the ratio rows' config
        cfg = {**cfg, "sdpa_flash": B.sdpa_flash_serves(q, kl, vl, None)}
        if sdpa and need > 0.9 * free_memory(device):
            what = "concatenated keys/values" + (" and their gradients" if grads else "")
            print(f"  dense_attention {', '.join(sdpa)}: skipped ({what} ~{need / 2**30:.1f} GiB > 90% of the free "
                  "memory)")  # fmt: skip
        elif sdpa:
            if "sdpa_concat" in selected:
                r.run("dense_attention", "sdpa_concat",
                      lambda: B.sdpa_concat(q, kl, vl, mk, mv, causal=False, scale=scale), cfg, **timed)  # fmt: skip
            if "sdpa_call_only" in selected:  # bwd / fwdbwd: the concatenations are the leaves
                with torch.no_grad():
                    kc, vc, mask = B.sdpa_concat_inputs(q, kl, vl, mk, mv, causal=False)
                kc, vc = kc.requires_grad_(grads), vc.requires_grad_(grads)
                t_sdpa = r.run("dense_attention", "sdpa_call_only", lambda: B.sdpa(q, kc, vc, mask, scale=scale),
                               cfg, **{**timed, "inputs": (q, kc, vc)})  # fmt: skip
                del kc, vc, mask
        for name, times in t_backend.items():
            for phase, t in times.items():
                if t_sdpa.get(phase):
                    r.ratio("dense_attention", name, cfg, "ratio_to_sdpa", "sdpa_call_only time / time",
                            t_sdpa[phase] / t, phase)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "cpu":  # the triton backend serves CPU tensors through its interpreter (chosen before triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu.py needs a CUDA GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees none; "
              "nothing measured (--device cpu: a smoke run on the CPU).", file=sys.stderr)  # fmt: skip
        return 2
    if device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_gpu.py: unset TRITON_INTERPRET (the interpreter would be timed, not the compiled kernels)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as exc:
        if device == "cuda":
            print(f"bench_gpu.py times with triton.testing.do_bench; triton is not installed ({exc})", file=sys.stderr)
            return 2
        triton_version = "absent"  # cpu: the triton backend is reported unavailable below

    selected = set(args.providers or PROVIDERS)
    status = 0
    grads = args.mode != "fwd"
    table, unavailable = gpu_backends([b for b in BACKENDS if b in selected], device, needs_grad=grads)
    for name, why in unavailable.items():
        print(f"backend {name}: skipped ({why})", file=sys.stderr)
        if args.providers:  # asked for by name: a failure
            status = 1

    checks = {}
    for name, mod in list(table.items()):
        if args.skip_check:
            checks[name] = "skipped"
            continue
        cases, failures = correctness_gate(mod, device, grads=grads, kernels=args.kernels)
        what = f"{cases} cases" + (", outputs and gradients" if grads else "")
        if failures:
            print(f"backend {name}: FAILS its correctness gate ({len(failures)} of {what}); left out of the "
                  "timings:\n  " + "\n  ".join(failures), file=sys.stderr)  # fmt: skip
            del table[name]
            status = 1
        else:
            checks[name] = "passed (with gradients)" if grads else "passed"
            print(f"backend {name}: correctness gate passed ({what})")

    info = C.machine_info(threads=str(torch.get_num_threads()))
    if device == "cuda":
        info.update(device=torch.cuda.get_device_name(), cuda_version=torch.version.cuda or "")
    else:  # the CSV's device column says so on every row: these are no GPU numbers
        info.update(device=f"CPU smoke run, not GPU timings: {info['device']}", cuda_version="")
        if triton_version != "absent" and os.environ.get("TRITON_INTERPRET") == "1":
            triton_version += " (interpreter)"
    info.update(faiss_version="", triton_version=triton_version)
    total = device_memory(device)
    runner = Runner(info, checks, table, args.max_gib * 2**30 if args.max_gib else 0.6 * total, device, args.mode)
    baselines = [b for b in BASELINES if b in selected]
    print(f"device {info['device']}, torch {torch.__version__}, CUDA {info['cuda_version'] or '-'}, "
          f"triton {info['triton_version']}, commit {info['git_commit']}")  # fmt: skip
    print(f"timing backends: {', '.join(table) or 'none'}; baselines: {', '.join(baselines) or 'none'}; "
          f"memory budget {runner.max_bytes / 2**30:.1f} GiB")  # fmt: skip

    csv_path = args.out / "bench_gpu.csv"
    for d in args.dim:
        for lq in args.lq:
            for m in args.m:
                need = 2 * args.batch * args.kv_heads * m * d * 2 * (2 if grads else 1)  # memory keys + values, bf16
                if need > runner.max_bytes:
                    print(f"skip D={d} Lq={lq} M={m}: memory keys+values{' and their gradients' if grads else ''} "
                          f"{need / 2**30:.1f} GiB > budget {runner.max_bytes / 2**30:.1f} GiB")  # fmt: skip
                    continue
                print(f"D={d} Lq={lq} M={m}", flush=True)
                measure_point(runner, args, selected, d, lq, m)
                empty_cache(device)
                C.write_csv(csv_path, runner.rows, CSV_FIELDS)  # after every point: a crash keeps what was measured
    C.write_csv(csv_path, runner.rows, CSV_FIELDS)
    print(f"wrote {csv_path} ({len(runner.rows)} rows)")
    if not args.no_plot and runner.rows:
        plot(runner.rows, args.out)
    if runner.errors:
        print("backends that raised while timed:\n  " + "\n  ".join(runner.errors), file=sys.stderr)
        status = 1
    print(f"exit status {status}" + ("" if status == 0 else " (see the messages above)"))
    return status


def plot(rows: list[dict], out: Path) -> None:
    """bench_gpu_<kernel>.png: median time against M, a panel per (D, Lq), a line per provider (and k)."""
    import json

    panels: dict[str, dict[str, dict[str, list]]] = {}
    for r in rows:
        if r["metric"] != "time":
            continue
        c = json.loads(r["config"])
        series = r["provider"] + (f" k={c['k']}" if "k" in c else "") + (f" [{r['mode']}]" if r["mode"] == "backward"
                                                                         else "")  # fmt: skip
        panel = f"D={c['D']} Lq={c['Lq']}"
        panels.setdefault(r["kernel"], {}).setdefault(panel, {}).setdefault(series, []).append(
            (int(r["x_value"]), float(r["median"]), True))
    for kernel, by_panel in panels.items():
        ordered = dict(sorted(by_panel.items(), key=lambda kv: tuple(int(p.split("=")[1]) for p in kv[0].split())))
        path = out / f"bench_gpu_{kernel}.png"
        try:
            C.plot_panels(ordered, path, xlabel="memory slots M", ylabel="ms (median)",
                          title=f"{kernel} on {rows[0]['device']} ({rows[0]['timestamp'][:10]})")  # fmt: skip
        except ImportError:
            print("matplotlib not installed: no plots")
            return
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
