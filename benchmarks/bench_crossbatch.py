"""CrossBatch attention (docs/DESIGN.md 3.5): the fused ``fot_kernels.crossbatch_attention`` against
what a user would otherwise write, gather + SDPA over the concatenation, forward or forward +
backward (gradients w.r.t. query, key, value and mem_keys), in one interleaved run (ratios).

The baseline (``baselines.crossbatch_gather_sdpa``): gather each row's d context rows ``(b - c) mod B`` of ``mem_keys``
and ``value`` into ``[B, H, d * L, D]``, concatenate the local keys, and one
``F.scaled_dot_product_attention`` with a boolean mask (the contexts visible by FoT's
packing/stepping rule, then causal local keys), all in the inputs' dtype; autograd through the
gather. Before timing, both outputs (and gradients) are checked against each other.

Reported per d: median time (s), ratio fused / baseline, and peak extra memory (the largest
resident growth during the first call, beyond the inputs) of each.

    python benchmarks/bench_crossbatch.py                       # B=8 H=8 D=128 L=1024, d = 4 and 7, fwdbwd
    python benchmarks/bench_crossbatch.py --quick               # small shapes (smoke)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
from baselines import crossbatch_gather_sdpa

from fot_kernels import crossbatch_attention
from fot_kernels.crossbatch import crossbatch_pack


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq", type=int, default=1024, help="L: tokens per row (local context and memory per context)")
    ap.add_argument("--d", type=int, nargs="+", default=[4, 7], help="cross_batch_range values")
    ap.add_argument("--packing", type=int, default=1)
    ap.add_argument("--stepping", action="store_true")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--backend", default="auto")
    C.add_mode_argument(ap, ("fwd", "fwdbwd"), default="fwdbwd")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="B=4 H=4 D=64 L=128, d = 2 and 3")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.heads, args.kv_heads, args.head_dim, args.seq, args.d = 4, 4, 4, 64, 128, [2, 3]
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    info = C.machine_info(str(torch.get_num_threads()))
    print(f"# {info['device']}, torch {info['torch_version']}, {info['threads']} threads, mode {args.mode}")
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, dim, length = args.batch, args.heads, args.kv_heads, args.head_dim, args.seq

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    shapes = [(b, h, length, dim)] + [(b, hkv, length, dim)] * 3  # query, key, value, mem_keys
    inputs = [rand(*shape).requires_grad_(args.mode != "fwd") for shape in shapes]
    grad_out = rand(b, h, length, dim)
    rows, table = [], []
    for d in args.d:
        def fused(d=d):
            return crossbatch_attention(*inputs, cross_batch_range=d, dataset_packing=args.packing,
                                        cross_batch_stepping=args.stepping, backend=args.backend)  # fmt: skip

        def baseline(d=d):
            return crossbatch_gather_sdpa(*inputs, d=d, pack=crossbatch_pack(b, d, args.packing, args.stepping))

        fns = [C.timed_fn(args.mode, f, inputs, grad_out) for f in (fused, baseline)]
        # correctness gate (fp32: tight; bf16: the SDPA baseline rounds its probabilities)
        tol = 2e-4 if dtype == torch.float32 else 3e-2
        got, ref = fns[0](), fns[1]()
        pairs = [(got, ref)] if args.mode == "fwd" else [(got[0], ref[0]), *zip(got[1], ref[1])]
        errs = [float((a.float() - r.float()).abs().max() / (r.float().abs().max() + 1e-6)) for a, r in pairs]
        check = "ok" if max(errs) <= tol else f"FAIL (max relative error {max(errs):.2g})"
        del got, ref
        C.release_free_heap()
        started = time.perf_counter()
        fused_m, base_m = C.measure_interleaved(fns, repeats=args.repeats, warmup=0, min_repeats=2,
                                                long_call_s=1.0)  # fmt: skip
        config = dict(B=b, H=h, Hkv=hkv, D=dim, L=length, d=d, packing=args.packing, stepping=args.stepping,
                      dtype=args.dtype, backend=args.backend)  # fmt: skip
        for provider, m in (("fot_kernels", fused_m), ("gather_sdpa", base_m)):
            st = m.laps[C.TOTAL]
            rows.append(C.csv_row(info, config, kernel="crossbatch_attention", provider=provider,
                                  mode=C.MODES[args.mode], metric="time", unit="s", x_name="d", x_value=d,
                                  median=st.median, p20=st.p20, p80=st.p80, samples=st.samples,
                                  check=check))  # fmt: skip
            rows.append(C.csv_row(info, config, kernel="crossbatch_attention", provider=provider,
                                  mode=C.MODES[args.mode], metric="peak_extra_memory", unit="bytes", x_name="d",
                                  x_value=d, median=m.peak_bytes, samples=1, check=check))  # fmt: skip
        ft, bt = fused_m.laps[C.TOTAL].median, base_m.laps[C.TOTAL].median
        table.append([d, f"{ft:.3f}", f"{bt:.3f}", f"{ft / bt:.2f}", C.human_bytes(fused_m.peak_bytes),
                      C.human_bytes(base_m.peak_bytes), f"{fused_m.peak_bytes / max(base_m.peak_bytes, 1):.3f}",
                      check])  # fmt: skip
        print(f"d={d}: fused {ft:.3f} s, gather+SDPA {bt:.3f} s, ratio {ft / bt:.2f}; peak extra "
              f"{C.human_bytes(fused_m.peak_bytes)} vs {C.human_bytes(base_m.peak_bytes)}; {check} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    text = (f"crossbatch_attention {args.mode}, B={b} H={h} Hkv={hkv} D={dim} L={length} {args.dtype}, "
            f"packing {args.packing}, stepping {args.stepping}; {info['device']}, {info['threads']} threads\n\n")
    text += C.format_table(["d", "fused (s)", "gather+SDPA (s)", "ratio", "peak fused", "peak gather+SDPA",
                            "peak ratio", "check"], table)  # fmt: skip
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_crossbatch_{time.strftime('%Y%m%d-%H%M%S')}-{args.mode}"
    C.write_csv(stem.with_suffix(".csv"), rows)
    stem.with_suffix(".txt").write_text(text)
    print(f"wrote {stem}.csv/.txt")
    return 0 if all(r["check"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
