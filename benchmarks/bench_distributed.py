"""Scale benchmark of ``fot_kernels.distributed``: one memory sharded over P gloo ranks on one machine.

Run (from the repository root)::

    python benchmarks/bench_distributed.py            # 1M, 4M, 16M slots over 1, 2, 4 ranks (16M: ~8 GiB of memory)
    python benchmarks/bench_distributed.py --quick    # smoke run: 64k slots over 1 and 2 ranks, a minute or two
    python benchmarks/bench_distributed.py --slots 1M 4M --ranks 1 2 --modes knn --phases decode
    python benchmarks/bench_distributed.py --slots 1M 4M --phases train   # forward + backward

What is measured (B=1, fp32 query, memory bf16 ``[1, Hkv, M, D]``, default Hq=4, Hkv=2, D=64):
for each total memory size M and rank count P, the memory is split into P contiguous shards (one
per rank, sizes M/P), and each rank calls ``fot_kernels.distributed.memory_attention`` with its
shard (backend ``auto``: the C++ CPU kernels), in

- ``decode``: one query (Lq=1) with a local context of ``--local`` keys (causal),
- ``prefill``: a chunk of ``--chunk`` (256) queries with as many local keys (causal),
- ``train`` (not in the default phases): the prefill call with its backward, the gradients of the
  query, local key and value (``torch.autograd.grad``; the memory is frozen, as the memory layers
  of a model trained through ``enable_memory`` read it), timed from the forward to the gradients;

and two memory modes: ``knn`` (topk=``--k``, default 64) and ``dense`` (topk=None).

- time: per call, the slowest rank's time from a common barrier to the result (the result is the
  same on every rank); median, p20, p80 of ``--repeats`` calls after one warm-up call;
- bytes_sent: what each rank contributes to the collectives per call
  (``fot_kernels.distributed.bytes_sent``); with all_gather every rank receives (P - 1) times that;
- peak_rss: the largest peak resident set (VmHWM, reset before each memory size) over the ranks,
  shard included; shard_bytes: the bytes of one rank's shard (keys + values).
- check: the output (train: and the gradients) of every call at P > 1 is compared with the P = 1
  run's on the same memory (the memory is generated chunk by chunk from a seed, so its
  concatenation does not depend on P): ``ok`` within 1e-4 x max(1, largest magnitude) (fp32; sums
  merged in another order), ``FAIL``, or ``unchecked`` when P = 1 was not run first.

Each rank gets ``--threads`` // P intra-op threads (default: every logical CPU): the comparison
over P is at a fixed machine, not a fixed per-rank budget.

Writes ``bench_distributed_<date>.csv`` (the Liger-Kernel schema of benchmarks/_common.py),
``.png`` (time vs M, one panel per phase and mode, one line per P) and ``.txt`` (the table) to
benchmarks/results/ (``--out DIR``).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

CHUNK = 4096  # slots generated from one seed: the memory does not depend on the sharding
CHECK_ATOL = 1e-4


def _slot_chunk(seed: int, index: int, heads: int, dim: int) -> torch.Tensor:
    """keys and values of global slots [index * CHUNK, (index + 1) * CHUNK): [2, 1, Hkv, CHUNK, D]."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(2, 1, heads, CHUNK, dim, generator=gen).to(torch.bfloat16)


def make_shard(seed: int, start: int, stop: int, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slots [start, stop) of the seeded memory, bf16 [1, Hkv, stop - start, D] each."""
    keys = torch.empty(1, heads, stop - start, dim, dtype=torch.bfloat16)
    values = torch.empty_like(keys)
    for index in range(start // CHUNK, math.ceil(stop / CHUNK)):
        lo, hi = max(start, index * CHUNK), min(stop, (index + 1) * CHUNK)
        if lo >= hi:
            continue
        chunk = _slot_chunk(seed, index, heads, dim)[:, :, :, lo - index * CHUNK : hi - index * CHUNK]
        keys[:, :, lo - start : hi - start] = chunk[0]
        values[:, :, lo - start : hi - start] = chunk[1]
    return keys, values


def shard_bounds(total: int, ranks: int, rank: int) -> tuple[int, int]:
    base, extra = divmod(total, ranks)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _worker(rank: int, ranks: int, init_file: str, args: argparse.Namespace, ref_dir: str, out_file: str) -> None:
    torch.set_num_threads(max(1, args.threads // ranks))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=args.timeout))  # fmt: skip
    from fot_kernels import distributed as fd

    heads, kv_heads, dim = args.heads, args.kv_heads, args.head_dim
    rows = []
    for total in args.slots:
        start, stop = shard_bounds(total, ranks, rank)
        C.release_free_heap()
        C.reset_peak_rss()
        mem_keys, mem_values = make_shard(args.seed, start, stop, kv_heads, dim)
        for phase in args.phases:
            len_q = 1 if phase == "decode" else args.chunk
            len_k = args.local if phase == "decode" else args.chunk
            gen = torch.Generator().manual_seed(args.seed + len_q)
            query = torch.randn(1, heads, len_q, dim, generator=gen)
            key = torch.randn(1, kv_heads, len_k, dim, generator=gen)
            value = torch.randn(1, kv_heads, len_k, dim, generator=gen)
            grad_out = torch.randn(query.shape, generator=gen)
            for mode in args.modes:
                topk = args.k if mode == "knn" else None
                times, sent, out = [], 0, None
                for call in range(args.repeats + 1):
                    leaves = [t.detach().requires_grad_(phase == "train") for t in (query, key, value)]
                    dist.barrier()
                    before_bytes = fd.bytes_sent()
                    started = time.perf_counter()
                    result = fd.memory_attention(*leaves, mem_keys, mem_values, topk=topk, causal=True)
                    if phase == "train":
                        grads = torch.autograd.grad(result, leaves, grad_out)
                        result = torch.cat([result.detach().flatten(), *(g.flatten() for g in grads)])
                    elapsed = torch.tensor([time.perf_counter() - started])
                    sent = fd.bytes_sent() - before_bytes
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                    if call == 0:
                        out = result
                    else:
                        times.append(float(elapsed))
                ref_path = Path(ref_dir) / f"{total}-{phase}-{mode}.pt"
                if ranks == 1:
                    torch.save(out, ref_path)
                    check = "ok"
                elif ref_path.exists():
                    ref = torch.load(ref_path)
                    err, bound = float((out - ref).abs().max()), CHECK_ATOL * max(1.0, float(ref.abs().max()))
                    check = "ok" if err <= bound else f"FAIL (max error {err:.2g})"
                else:
                    check = "unchecked"
                peak = torch.tensor([float(C.status_bytes("VmHWM"))])
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                rows.append(dict(slots=total, ranks=ranks, phase=phase, mode=mode, len_q=len_q, len_k=len_k,
                                 topk=topk, times=times, bytes_sent=sent, peak_rss=float(peak),
                                 shard_bytes=2 * mem_keys.numel() * mem_keys.element_size(), check=check,
                                 threads=torch.get_num_threads()))  # fmt: skip
                if rank == 0:
                    t = np.median(times) * 1e3
                    print(f"  P={ranks} M={total} {phase:7s} {mode:5s}: {t:9.2f} ms, sent {C.human_bytes(sent)}, "
                          f"peak RSS {C.human_bytes(float(peak))}, {check}", flush=True)  # fmt: skip
        del mem_keys, mem_values
        gc.collect()
    if rank == 0:
        torch.save(rows, out_file)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(ranks: int, args, ref_dir: str) -> list[dict]:
    """Spawn ``ranks`` processes running every size; a run past ``--timeout`` is killed."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "rows.pt")
        C.spawn_ranks(_worker, ranks, (args, ref_dir, out_file), args.timeout)
        return torch.load(out_file)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", nargs="+", type=C.parse_size, default=[2**20, 2**22, 2**24])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", choices=("knn", "dense"), default=["knn", "dense"])
    parser.add_argument("--phases", nargs="+", choices=("decode", "prefill", "train"), default=["decode", "prefill"])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256, help="queries (and local keys) of a prefill call")
    parser.add_argument("--local", type=int, default=256, help="local keys of a decode step")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads, all ranks")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per rank count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 64k slots, 1 and 2 ranks, 2 repeats")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.slots, args.ranks, args.repeats = [2**16], [1, 2], 2
    args.slots, args.ranks = sorted(args.slots), sorted(set(args.ranks))
    gib = max(args.slots) * args.kv_heads * args.head_dim * 2 * 2 / 2**30
    print(f"memory: {', '.join(map(str, args.slots))} slots; the largest holds {gib:.2f} GiB (keys + values, bf16)")

    rows = []
    with tempfile.TemporaryDirectory() as ref_dir:
        for ranks in args.ranks:
            print(f"{ranks} rank(s), {max(1, args.threads // ranks)} thread(s) each", flush=True)
            rows += run_ranks(ranks, args, ref_dir)

    info = C.machine_info(threads=f"{args.threads} in total, split over the ranks")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    csv_rows, table, panels = [], [], {}
    for row in rows:
        config = dict(B=1, Hq=args.heads, Hkv=args.kv_heads, D=args.head_dim, Lq=row["len_q"], Lk=row["len_k"],
                      topk=row["topk"], ranks=row["ranks"], phase=row["phase"], memory_dtype="bfloat16",
                      query_dtype="float32", threads_per_rank=row["threads"],
                      shard_bytes=row["shard_bytes"])  # fmt: skip
        stats = C.Stats.of(row["times"])
        common = dict(kernel=f"distributed.memory_attention[{row['mode']}]", provider=f"gloo x{row['ranks']}",
                      mode="fwdbwd" if row["phase"] == "train" else "forward", x_name="slots",
                      x_value=row["slots"], check=row["check"])  # fmt: skip
        csv_rows.append(C.csv_row(info, config, **common, metric=f"time_{row['phase']}", unit="ms",
                                  median=stats.median * 1e3, p20=stats.p20 * 1e3, p80=stats.p80 * 1e3,
                                  samples=stats.samples))  # fmt: skip
        for metric, value in (("bytes_sent", row["bytes_sent"]), ("peak_rss", row["peak_rss"]),
                              ("shard_bytes", row["shard_bytes"])):  # fmt: skip
            csv_rows.append(C.csv_row(info, config, **common, metric=f"{metric}_{row['phase']}", unit="bytes",
                                      median=value, p20=value, p80=value, samples=1))  # fmt: skip
        table.append([row["phase"], row["mode"], row["slots"], row["ranks"], f"{stats.median * 1e3:.2f}",
                      f"{stats.p20 * 1e3:.2f}", f"{stats.p80 * 1e3:.2f}", C.human_bytes(row["bytes_sent"]),
                      C.human_bytes(row["peak_rss"]), C.human_bytes(row["shard_bytes"]), row["check"]])  # fmt: skip
        panel = f"{row['phase']} (Lq={row['len_q']}), {row['mode']}" + (f" k={row['topk']}" if row["topk"] else "")
        ok = row["check"] in ("ok", "unchecked")
        panels.setdefault(panel, {}).setdefault(f"{row['ranks']} rank(s)", []).append(
            (row["slots"], stats.median * 1e3, ok)
        )
    text = C.format_table(["phase", "mode", "slots", "ranks", "median ms", "p20", "p80", "sent/rank/call",
                           "peak RSS (max rank)", "shard", "check"], table)  # fmt: skip
    header = (f"fot_kernels.distributed.memory_attention, gloo on {info['device']}, {info['timestamp']}, "
              f"commit {info['git_commit']}, torch {info['torch_version']}")  # fmt: skip
    print(header)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"bench_distributed_{stamp}"
    C.write_csv(base.with_suffix(".csv"), csv_rows)
    base.with_suffix(".txt").write_text(header + "\n" + text + "\n")
    try:
        title = f"fot_kernels.distributed.memory_attention over gloo ranks, {info['device']}, {info['timestamp']}"
        C.plot_panels(panels, base.with_suffix(".png"), xlabel="memory slots (total)", ylabel="ms per call",
                      title=title)  # fmt: skip
    except ImportError as exc:
        print(f"no plot: {exc}")
    print(f"wrote {base}.csv/.txt/.png")
    return 1 if any(r["check"].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
