"""Dense memory attention, fot_kernels.memory_attention(q, k, v, mem_k, mem_v, topk=None,
backend="cpu") (memory part + local causal part + log-sum-exp merge), vs torch's CPU SDPA over the
concatenation [memory | local] with a bool mask (memory all visible, local causal). B=1, H=8,
D=128, fp32, Lq = Lk. Medians of --reps runs, wall time and process CPU time (user+sys of both
threads: steadier on a shared machine), ours and SDPA interleaved in the same process.

python dense_vs_sdpa.py [--lq 256 1024] [--m 16384 65536] [--reps 5] [--so LIB.so]
(--so: load that build of the CPU kernels instead of building csrc/cpu, for before/after runs)"""

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--lq", type=int, nargs="+", default=[256, 1024])
p.add_argument("--m", type=int, nargs="+", default=[16384, 65536])
p.add_argument("--reps", type=int, default=5)
p.add_argument("--so", default=None)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
import fot_kernels  # noqa: E402
from fot_kernels import _library  # noqa: E402

if a.so:
    _library.ops()
    torch.ops.load_library(a.so)
else:
    from fot_kernels.backends import _cpu_ext

    assert _cpu_ext.load(), _cpu_ext.unavailable_reason()

B, H, D = 1, 8, 128


def ours(q, k, v, mk, mv, mask):
    return fot_kernels.memory_attention(q, k, v, mk, mv, topk=None, backend="cpu")


def sdpa(q, k, v, mk, mv, mask):
    return F.scaled_dot_product_attention(q, torch.cat([mk, k], 2), torch.cat([mv, v], 2), attn_mask=mask)


g = torch.Generator().manual_seed(0)
print(
    f"# {platform.machine()} threads={a.threads} torch={torch.__version__} kernels={a.so or 'csrc/cpu'} "
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
)
print("Lq,M,ours_wall_ms,sdpa_wall_ms,wall_ratio,ours_cpu_ms,sdpa_cpu_ms,cpu_ratio,max_abs_diff")
for M in a.m:
    mk, mv = torch.randn(B, H, M, D, generator=g), torch.randn(B, H, M, D, generator=g)
    for Lq in a.lq:
        q, k, v = (torch.randn(B, H, Lq, D, generator=g) for _ in range(3))
        mask = torch.ones(Lq, M + Lq, dtype=torch.bool)
        mask[:, M:] = torch.ones(Lq, Lq, dtype=torch.bool).tril()
        args = (q, k, v, mk, mv, mask)
        diff = (ours(*args) - sdpa(*args)).abs().max().item()
        wall, cpu = {"ours": [], "sdpa": []}, {"ours": [], "sdpa": []}
        for _ in range(a.reps):
            for name, fn in (("ours", ours), ("sdpa", sdpa)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn(*args)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        w = {n: statistics.median(x) * 1e3 for n, x in wall.items()}
        c = {n: statistics.median(x) * 1e3 for n, x in cpu.items()}
        print(
            f"{Lq},{M},{w['ours']:.0f},{w['sdpa']:.0f},{w['ours'] / w['sdpa']:.2f},"
            f"{c['ours']:.0f},{c['sdpa']:.0f},{c['ours'] / c['sdpa']:.2f},{diff:.1e}",
            flush=True,
        )
