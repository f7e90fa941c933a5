"""GPU benchmark of the Triton backend (issue 3).

Compares, on one CUDA device and in one run:
- ``knn_topk``: the fused Triton scan against (a) the unfused PyTorch pipeline (cuBLAS bf16 scores
  chunked over M, ``torch.topk`` per chunk, top-k merge) and a cuBLAS bf16 matmul of the same shape
  (the scoring product alone: the throughput ceiling), reporting TFLOP/s of the scoring product
  (2 * B * Hq * Lq * M * D) and its ratio to that matmul;
- ``knn_attention`` (memory part, kNN mode): fused (scan + gather attention) against the unfused
  pipeline (chunked scores, topk, gather, softmax);
- ``dense_attention`` (the released LongLLaMA mode, ``topk=None``, non-causal over
  [local | memory]): Triton against torch SDPA's flash backend on the concatenated keys (where it
  fits) and against the LongLLaMA-style chunked computation in PyTorch; TFLOP/s =
  4 * B * Hq * Lq * (Lk + M) * D / t.

Medians and 20/80 percentiles come from ``triton.testing.do_bench``; peak memory from
``torch.cuda.max_memory_allocated`` minus the inputs. One CSV row per measurement, in the Liger
schema: kernel, provider, mode, metric, unit, x_name, x_value, median, p20, p80, config, device,
timestamp, git_commit, torch_version, triton_version. A PNG per kernel plots the medians.

Before timing anything the script checks the Triton backend against the reference at small
shapes and refuses to report numbers when that check fails.

    python benchmarks/bench_gpu.py --out benchmarks/results/h100          # full sweep
    python benchmarks/bench_gpu.py --out /tmp/b --quick                    # a few points
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable

FIELDS = ["kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "median", "p20", "p80", "config",
          "device", "timestamp", "git_commit", "torch_version", "triton_version"]  # fmt: skip


def parse_size(text: str) -> int:
    """'16k' -> 16384, '4M' -> 4194304, '1000' -> 1000."""
    text = text.strip()
    mult = {"k": 1024, "K": 1024, "m": 1024**2, "M": 1024**2}.get(text[-1], 1)
    return int(text[:-1] if mult != 1 else text) * mult


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (CSV + PNG)")
    p.add_argument("--m", nargs="+", default=["16k", "64k", "256k", "1M", "4M"], help="memory sizes M")
    p.add_argument("--lq", nargs="+", type=int, default=[1, 2048], help="query lengths")
    p.add_argument("--k", nargs="+", type=int, default=[32, 128], help="top-k values")
    p.add_argument("--dim", nargs="+", type=int, default=[100, 128], help="head dims")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="query heads (= kv heads unless --kv-heads)")
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--local", type=int, default=None, help="local keys for the attention benchmarks (default Lq)")
    p.add_argument("--chunk", default="64k", help="memory chunk of the unfused PyTorch pipelines")
    p.add_argument("--kernels", nargs="+", default=["knn_topk", "knn_attention", "dense_attention"])
    p.add_argument("--quick", action="store_true", help="a few small points (smoke run)")
    p.add_argument("--max-gib", type=float, default=None, help="skip points whose inputs exceed this (default: 60%% of the GPU)")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness gate (numbers then say so in config)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.m, args.lq, args.k, args.dim = ["16k", "64k"], [1, 256], [32], [128]
    args.m = [parse_size(m) for m in args.m]
    args.chunk = parse_size(args.chunk)
    args.kv_heads = args.kv_heads or args.heads
    return args


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------ PyTorch baselines


def unfused_knn_topk(query, mem_keys, k: int, chunk: int):
    """cuBLAS scores per memory chunk (Lq x chunk, never Lq x M), torch.topk, running merge."""
    import torch

    group = query.shape[1] // mem_keys.shape[1]
    best_s = best_i = None
    for start in range(0, mem_keys.shape[2], chunk):
        keys = mem_keys[:, :, start : start + chunk].repeat_interleave(group, dim=1)
        scores = (query @ keys.transpose(-1, -2)).float()  # [B, Hq, Lq, chunk]
        s, i = scores.topk(min(k, scores.shape[-1]), dim=-1)
        i = i + start
        if best_s is not None:
            s, j = torch.cat([best_s, s], -1).topk(k, dim=-1)
            i = torch.cat([best_i, i], -1).gather(-1, j)
        best_s, best_i = s, i
    return best_s, best_i


def unfused_knn_attention(query, mem_keys, mem_values, k: int, chunk: int, scale: float):
    """Unfused kNN memory attention: chunked scores + topk, gather the selected values, softmax."""
    import torch

    scores, idx = unfused_knn_topk(query, mem_keys, k, chunk)
    group = query.shape[1] // mem_keys.shape[1]
    b, hq, lq, _ = idx.shape
    vals = mem_values.repeat_interleave(group, dim=1) if group > 1 else mem_values
    gathered = torch.gather(vals[:, :, None].expand(b, hq, lq, -1, -1), 3,
                            idx[..., None].expand(-1, -1, -1, -1, vals.shape[-1]))  # fmt: skip
    p = torch.softmax(scores * scale, dim=-1)
    return (p[..., None] * gathered.float()).sum(-2).to(query.dtype)


def longllama_dense(query, key, value, mem_keys, mem_values, chunk: int, scale: float):
    """The released LongLLaMA-style dense memory attention: logits per memory chunk in fp32, one
    joint softmax over [memory | local] through a running log-sum-exp (non-causal local part)."""
    import torch

    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    lse = torch.full(query.shape[:-1], float("-inf"), device=query.device)
    parts = [(key, value)] + [(mem_keys[:, :, s : s + chunk], mem_values[:, :, s : s + chunk])
                              for s in range(0, mem_keys.shape[2], chunk)]  # fmt: skip
    group = query.shape[1] // key.shape[1]
    for k_part, v_part in parts:
        k_part = k_part.repeat_interleave(group, dim=1)
        v_part = v_part.repeat_interleave(group, dim=1)
        logits = (query @ k_part.transpose(-1, -2)).float() * scale
        part_lse = logits.logsumexp(-1)
        new = torch.logaddexp(lse, part_lse)
        out = out * (lse - new).exp()[..., None] + (torch.softmax(logits, -1) @ v_part.float()) * (part_lse - new).exp()[..., None]
        lse = new
    return out.to(query.dtype)


# ---------------------------------------------------------------------------------- the harness


def correctness_gate() -> list[str]:
    """Small-shape check of the Triton backend against the reference; returns failures."""
    import torch

    from fot_kernels.backends import reference as R
    from fot_kernels.backends import triton as TB
    from fot_kernels.testing import assert_close_to_reference, check_knn

    failures = []
    torch.manual_seed(0)
    for d, dtype in ((100, torch.bfloat16), (128, torch.bfloat16), (64, torch.float32)):
        q = torch.randn(1, 4, 33, d, device="cuda").to(dtype)
        k = torch.randn(1, 2, 40, d, device="cuda").to(dtype)
        v = torch.randn_like(k)
        mk = torch.randn(1, 2, 5000, d, device="cuda").to(dtype)
        mv = torch.randn_like(mk)
        try:
            s, i = TB.knn_topk(q, mk, 32, mem_lengths=None, mem_mask=None)
            check_knn(s, i, q, mk, 32)
            for topk in (None, 32):
                out, lse = TB.memory_attention(q, k, v, mk, mv, topk=topk, causal=True, softmax_scale=d**-0.5,
                                               mem_lengths=None, mem_mask=None)  # fmt: skip
                hi = R.memory_attention(q.double(), k.double(), v.double(), mk.double(), mv.double(), topk=topk)
                lo = R.memory_attention(q, k, v, mk, mv, topk=topk)
                assert_close_to_reference(out, hi[0], lo[0], name=f"out d={d} {dtype} topk={topk}")
        except AssertionError as exc:
            failures.append(str(exc))
    return failures


def bench(fn: Callable[[], object]) -> tuple[float, float, float, int]:
    """(median, p20, p80 in ms, peak extra bytes) of fn on the current device."""
    import torch
    import triton

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    return med, p20, p80, peak


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (none found); nothing measured.", file=sys.stderr)
        return 2
    import triton

    from fot_kernels.backends import triton as TB

    os.makedirs(args.out, exist_ok=True)
    check = "skipped" if args.skip_check else "passed"
    if not args.skip_check:
        failures = correctness_gate()
        if failures:
            print("Triton backend fails its correctness check; refusing to report timings:\n" + "\n".join(failures), file=sys.stderr)
            return 1

    device = torch.cuda.get_device_name()
    meta = dict(device=device, timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=git_commit(), torch_version=torch.__version__, triton_version=triton.__version__)  # fmt: skip
    total_mem = torch.cuda.get_device_properties(0).total_memory
    max_bytes = (args.max_gib * 2**30) if args.max_gib else 0.6 * total_mem
    rows: list[dict] = []
    csv_path = os.path.join(args.out, "bench_gpu.csv")
    f = open(csv_path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()

    def record(kernel, provider, metric, unit, m, value, p20=None, p80=None, **config):
        row = dict(kernel=kernel, provider=provider, mode="forward", metric=metric, unit=unit, x_name="M", x_value=m,
                   median=value, p20=value if p20 is None else p20, p80=value if p80 is None else p80,
                   config=json.dumps({**config, "check": check}, sort_keys=True), **meta)  # fmt: skip
        writer.writerow(row)
        f.flush()
        rows.append(row)

    def run(kernel, provider, fn, m, flops, **config):
        try:
            med, p20, p80, peak = bench(fn)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"  {kernel:16} {provider:18} M={m:>8}: out of memory", flush=True)
            return None
        record(kernel, provider, "time", "ms", m, med, p20, p80, **config)
        record(kernel, provider, "memory", "MiB", m, peak / 2**20, **config)
        if flops:
            record(kernel, provider, "throughput", "TFLOP/s", m, flops / (med * 1e-3) / 1e12,
                   flops / (p80 * 1e-3) / 1e12, flops / (p20 * 1e-3) / 1e12, **config)  # fmt: skip
        print(f"  {kernel:16} {provider:18} M={m:>8}: {med:9.3f} ms  peak {peak / 2**20:9.1f} MiB"
              + (f"  {flops / (med * 1e-3) / 1e12:7.1f} TFLOP/s" if flops else ""), flush=True)  # fmt: skip
        return med

    dtype = torch.bfloat16
    B, Hq, Hkv = args.batch, args.heads, args.kv_heads
    for d in args.dim:
        for lq in args.lq:
            for m in args.m:
                need = 2 * B * Hkv * m * d * 2
                if need > max_bytes:
                    print(f"skip D={d} Lq={lq} M={m}: memory inputs {need / 2**30:.1f} GiB > budget")
                    continue
                torch.manual_seed(0)
                q = torch.randn(B, Hq, lq, d, device="cuda", dtype=dtype)
                mk = torch.randn(B, Hkv, m, d, device="cuda", dtype=dtype)
                mv = torch.randn(B, Hkv, m, d, device="cuda", dtype=dtype)
                lk = args.local or lq
                kl = torch.randn(B, Hkv, lk, d, device="cuda", dtype=dtype)
                vl = torch.randn_like(kl)
                scale = d**-0.5
                score_flops = 2 * B * Hq * lq * m * d
                base = dict(D=d, Lq=lq, B=B, Hq=Hq, Hkv=Hkv, dtype="bf16")
                print(f"D={d} Lq={lq} M={m}", flush=True)
                if "knn_topk" in args.kernels:
                    keys_rep = mk.repeat_interleave(Hq // Hkv, 1) if Hq != Hkv else mk
                    mm_chunk = min(m, max(args.chunk, (2**31 // max(1, B * Hq * lq * 2))))  # cuBLAS output <= 4 GiB
                    run("knn_topk", "cublas_bf16_matmul",
                        lambda: [q @ keys_rep[:, :, s : s + mm_chunk].transpose(-1, -2) for s in range(0, m, mm_chunk)],
                        m, score_flops, **base, chunk=mm_chunk)  # fmt: skip
                    for k in args.k:
                        run("knn_topk", "triton", lambda: TB.knn_topk(q, mk, k, mem_lengths=None, mem_mask=None),
                            m, score_flops, **base, k=k)  # fmt: skip
                        run("knn_topk", "torch_unfused", lambda: unfused_knn_topk(q, mk, k, args.chunk), m, score_flops,
                            **base, k=k, chunk=args.chunk)  # fmt: skip
                if "knn_attention" in args.kernels:
                    for k in args.k:
                        run("knn_attention", "triton",
                            lambda: TB.memory_attention(q, None, None, mk, mv, topk=k, causal=False, softmax_scale=scale,
                                                        mem_lengths=None, mem_mask=None),
                            m, score_flops, **base, k=k)  # fmt: skip
                        run("knn_attention", "torch_unfused", lambda: unfused_knn_attention(q, mk, mv, k, args.chunk, scale),
                            m, score_flops, **base, k=k, chunk=args.chunk)  # fmt: skip
                if "dense_attention" in args.kernels:
                    attn_flops = 4 * B * Hq * lq * (lk + m) * d
                    cfg = dict(**base, Lk=lk, causal=False)
                    run("dense_attention", "triton",
                        lambda: TB.memory_attention(q, kl, vl, mk, mv, topk=None, causal=False, softmax_scale=scale,
                                                    mem_lengths=None, mem_mask=None),
                        m, attn_flops, **cfg)  # fmt: skip
                    run("dense_attention", "torch_longllama", lambda: longllama_dense(q, kl, vl, mk, mv, args.chunk, scale),
                        m, attn_flops, **cfg, chunk=args.chunk)  # fmt: skip
                    cat_bytes = 2 * B * Hq * (lk + m) * d * 2
                    if cat_bytes + need <= max_bytes and d % 8 == 0:
                        from torch.nn.attention import SDPBackend, sdpa_kernel

                        kc = torch.cat([mk, kl], 2).repeat_interleave(Hq // Hkv, 1)
                        vc = torch.cat([mv, vl], 2).repeat_interleave(Hq // Hkv, 1)

                        def sdpa():
                            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                                return torch.nn.functional.scaled_dot_product_attention(q, kc, vc, scale=scale)

                        run("dense_attention", "sdpa_flash_concat", sdpa, m, attn_flops, **cfg)
                        del kc, vc
                del q, mk, mv, kl, vl
                torch.cuda.empty_cache()
    f.close()
    print(f"wrote {csv_path} ({len(rows)} rows)")
    if not args.no_plot:
        plot(rows, args.out)
    return 0


def plot(rows: list[dict], out: str) -> None:
    """One PNG per kernel: median time vs M, a panel per (D, Lq), a line per (provider, k)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    for kernel in sorted({r["kernel"] for r in rows}):
        sel = [r for r in rows if r["kernel"] == kernel and r["metric"] == "time"]
        panels = sorted({(json.loads(r["config"])["D"], json.loads(r["config"])["Lq"]) for r in sel})
        if not panels:
            continue
        cols = min(2, len(panels))
        fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(6 * cols, 4 * math.ceil(len(panels) / cols)),
                                 squeeze=False)  # fmt: skip
        for ax, (d, lq) in zip(axes.flat, panels):
            lines: dict[str, list] = {}
            for r in sel:
                c = json.loads(r["config"])
                if (c["D"], c["Lq"]) == (d, lq):
                    label = r["provider"] + (f" k={c['k']}" if "k" in c else "")
                    lines.setdefault(label, []).append((int(r["x_value"]), float(r["median"])))
            for label, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set(xscale="log", yscale="log", xlabel="memory slots M", ylabel="ms (median)", title=f"{kernel} D={d} Lq={lq}")
            ax.legend(fontsize=7)
        fig.suptitle(f"{kernel} on {rows[0]['device']} ({rows[0]['timestamp'][:10]})")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"bench_gpu_{kernel}.png"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
