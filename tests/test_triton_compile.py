"""Compile every shipped Triton kernel configuration for sm_80 and sm_90 without a GPU, and fail on
register spills (stack/local memory) or shared memory above the device's per-block limit.

Uses ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, the ``cuobjdump``
that Triton's wheel ships (``--dump-resource-usage`` gives REG and STACK) and its ``ptxas -v``
(bytes of spill stores/loads: a small stack frame alone is not a spill). Skips cleanly where
triton, ptxas or cuobjdump is unavailable. The register/stack/shared-memory table is printed
(``pytest -s``), and ``python tests/test_triton_compile.py`` prints it alone.

Compiled kernels are cached by Triton (~/.triton/cache), so reruns are fast; the first run
compiles the matrix in parallel (FOT_COMPILE_JOBS workers, default: CPU count).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pytest

triton = pytest.importorskip("triton") if __name__ != "__main__" else __import__("triton")

#: per-block shared memory limits (opt-in maximum), bytes
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


def _tool(name: str) -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def _ptxas(arch: int) -> str | None:
    """The ptxas Triton itself uses for this arch (newer Tritons pick a newer ptxas than bin/ptxas,
    whose PTX ISA version the old one rejects)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        return _tool("ptxas")


@dataclass(frozen=True)
class Case:
    kernel: str  # "scan" | "merge" | "attn" | "dkdv" | "dq" | "kdq" | "kscat" (the last four: backward)
    label: str
    constexprs: tuple  # sorted (name, value) pairs
    dtypes: tuple  # sorted (arg name, triton type) pairs overriding the defaults
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        return f"{self.kernel}:{self.label}"


def _kernel(name: str):
    from fot_kernels.backends.triton import _attention, _backward, _knn

    return {"scan": _knn._knn_scan_kernel, "merge": _knn._knn_merge_kernel, "attn": _attention._attn_fwd_kernel,
            "dkdv": _backward._dense_bwd_dkdv_kernel, "dq": _backward._dense_bwd_dq_kernel,
            "kdq": _backward._knn_bwd_dq_kernel, "kscat": _backward._knn_bwd_scatter_kernel}[name]  # fmt: skip


# pointer argument types per kernel; the dtype variants override Q/MK/...
_PTRS = {
    "scan": {"Q": "*bf16", "MK": "*bf16", "MLEN": "*i64", "MMASK": "*u8", "OUT_S": "*fp32", "OUT_I": "*i64",
             "PART": "*i64"},
    "merge": {"PART": "*i64", "OUT_S": "*fp32", "OUT_I": "*i64"},
    "attn": {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "MK": "*bf16", "MV": "*bf16", "IDX": "*i64", "MLEN": "*i64",
             "MMASK": "*u8", "OUT": "*bf16", "LSE": "*fp32"},
    "dkdv": {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*fp32", "LSE": "*fp32", "DELTA": "*fp32",
             "MLEN": "*i64", "MMASK": "*u8", "DK": "*bf16", "DV": "*bf16"},
    "dq": {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*fp32", "LSE": "*fp32", "DELTA": "*fp32",
           "MLEN": "*i64", "MMASK": "*u8", "DQ": "*fp32"},
    "kdq": {"Q": "*bf16", "IDX": "*i64", "MK": "*bf16", "MV": "*bf16", "DO": "*fp32", "LSE": "*fp32",
            "DELTA": "*fp32", "DQ": "*fp32", "PBUF": "*fp32", "DSBUF": "*fp32"},
    "kscat": {"Q": "*bf16", "DO": "*fp32", "PBUF": "*fp32", "DSBUF": "*fp32", "ORDER": "*i64", "SORTED": "*i64",
              "RUN": "*i32", "DK": "*bf16", "DV": "*bf16"},
}  # fmt: skip
_FLOATS = {"qk_scale", "lse_scale", "scale"}

#: (label, pointer dtypes, whether the product runs in fp32) of the dtype variants compiled
_SCAN_DTYPES = [
    ("bf16", {"Q": "*bf16", "MK": "*bf16"}, False),
    ("fp32", {"Q": "*fp32", "MK": "*fp32"}, True),
    ("fp32q-bf16mem", {"Q": "*fp32", "MK": "*bf16"}, True),
]
_ATTN_DTYPES = [
    ("bf16", {}, (False, False)),
    ("fp32", dict.fromkeys(("Q", "K", "V", "MK", "MV", "OUT"), "*fp32"), (True, True)),
    ("fp32q-bf16mem", {"Q": "*fp32", "K": "*fp32", "V": "*fp32", "OUT": "*fp32"}, (True, True)),
]


def shipped_cases() -> list[Case]:
    """Every configuration the launchers can pick, in each dtype variant (deduplicated)."""
    from fot_kernels.backends.triton import _configs as C

    cases: dict[Case, None] = {}
    for kp, bd, rows, fp32 in C.shipped_knn_configs():
        cfg = C.knn_config(kp, bd, rows, fp32)
        for label, dts, dot_fp32 in _SCAN_DTYPES:
            if dot_fp32 != fp32 or (label == "fp32q-bf16mem" and bd not in (64, 128)):
                continue  # the mixed variant has the fp32 code shape; compiled for the head dims real models use
            for final in (True, False) if label == "bf16" else (True,):  # the split epilogue is dtype-free
                const = dict(BM=cfg.BM, BN=cfg.BN, BD=bd, DC=cfg.DC, K=cfg.K, HAS_LEN=True, HAS_MASK=True,
                             DOT_FP32=fp32, INTERPRET=False, FINAL=final, OFF64=False)  # fmt: skip
                name = f"K{cfg.K} BD{bd} DC{cfg.DC} BM{cfg.BM} BN{cfg.BN} w{cfg.num_warps} {label}"
                name += "" if final else " split"
                case = Case("scan", name, tuple(sorted(const.items())), tuple(sorted(dts.items())), cfg.num_warps,
                            cfg.num_stages)  # fmt: skip
                cases[case] = None
        bm = C.knn_merge_block(cfg.K)
        cases[Case("merge", f"K{cfg.K} BM{bm} w4", (("BM", bm), ("K", cfg.K)), (), 4, 1)] = None
    for bd, rows, mode, fp32 in C.shipped_attn_configs():
        cfg = C.attn_config(bd, rows, mode, fp32)
        for label, dts, (lf, mf) in _ATTN_DTYPES:
            if mf != fp32 or (label == "fp32q-bf16mem" and bd not in (64, 128)):
                continue
            # mode 0 is the op-shaped flash_scan's causal pass with the validity on the local keys
            const = dict(BM=cfg.BM, BN=cfg.BN, BD=bd, HAS_LOCAL=True, CAUSAL=True, MEM_MODE=mode, HAS_LEN=True,
                         HAS_MASK=True, LOCAL_FP32=lf, MEM_FP32=mf, INTERPRET=False, OFF64=False,
                         LOCAL_VALID=mode == 0)  # fmt: skip
            name = f"BD{bd} BM{cfg.BM} BN{cfg.BN} w{cfg.num_warps} mem{['-', 'dense', 'knn'][mode]} {label}"
            name += " local-valid" if mode == 0 else ""
            case = Case("attn", name, tuple(sorted(const.items())), tuple(sorted(dts.items())), cfg.num_warps,
                        cfg.num_stages)  # fmt: skip
            cases[case] = None
    _add_backward_cases(cases)
    return list(cases)


#: dtype variants of the backward kernels: (label, pointer dtypes, whether the products run in fp32)
_BWD_DTYPES = [
    ("bf16", {}, False),
    ("fp32", {"Q": "*fp32", "K": "*fp32", "V": "*fp32", "MK": "*fp32", "MV": "*fp32", "DK": "*fp32", "DV": "*fp32"},
     True),
    ("fp32q-bf16mem", {"Q": "*fp32"}, True),
]  # fmt: skip


def _add_backward_cases(cases: dict) -> None:
    """The backward kernels (``_backward.py``): dense dK/dV and dQ per (padded head dim, product
    path), the kNN dQ gather and the deterministic dK/dV scatter per head dim and dtype."""
    from fot_kernels.backends.triton import _configs as C

    for bd, fp32 in C.shipped_bwd_configs():
        for label, dts, dot_fp32 in _BWD_DTYPES:
            if dot_fp32 != fp32 or (label == "fp32q-bf16mem" and bd not in (64, 128)):
                continue
            for kernel, cfg in (("dkdv", C.bwd_dkdv_config(bd, fp32)), ("dq", C.bwd_dq_config(bd, fp32))):
                const = dict(BM=cfg.BM, BN=cfg.BN, BD=bd, DC=cfg.DC, CAUSAL=True, HAS_LEN=True, HAS_MASK=True,
                             DOT_FP32=fp32, INTERPRET=False, OFF64=False)  # fmt: skip
                name = f"BD{bd} DC{cfg.DC} BM{cfg.BM} BN{cfg.BN} w{cfg.num_warps} s{cfg.num_stages} {label}"
                cases[Case(kernel, name, tuple(sorted(const.items())), tuple(sorted(dts.items())), cfg.num_warps,
                           cfg.num_stages)] = None  # fmt: skip
            if fp32 and label == "fp32":
                continue  # the kNN kernels have no product path: their fp32 variant is compiled below
            cfg = C.knn_bwd_dq_config(bd)
            const = dict(BM=cfg.BM, BD=bd, NEED_DKV=True, OFF64=False)
            name = f"BD{bd} BM{cfg.BM} w{cfg.num_warps} {label}"
            cases[Case("kdq", name, tuple(sorted(const.items())), tuple(sorted(dts.items())), cfg.num_warps,
                       cfg.num_stages)] = None  # fmt: skip
            cfg = C.knn_bwd_scatter_config(bd)
            const = dict(BS=cfg.BM, BD=bd)
            name = f"BD{bd} BS{cfg.BM} w{cfg.num_warps} {label}"
            cases[Case("kscat", name, tuple(sorted(const.items())), tuple(sorted(dts.items())), cfg.num_warps,
                       cfg.num_stages)] = None  # fmt: skip
    for bd in (16, 32, 64, 128, 256):  # kNN kernels with fp32 memory (bd 256: fp16/bf16 only, as attention)
        if C.attn_unserved_reason(bd, True) is None:
            dts = _BWD_DTYPES[1][1]
            for kernel, cfg in (("kdq", C.knn_bwd_dq_config(bd)), ("kscat", C.knn_bwd_scatter_config(bd))):
                const = dict(BM=cfg.BM, BD=bd, NEED_DKV=True, OFF64=False) if kernel == "kdq" else {"BS": cfg.BM}
                const["BD"] = bd
                name = f"BD{bd} {'BM' if kernel == 'kdq' else 'BS'}{cfg.BM} w{cfg.num_warps} fp32"
                cases[Case(kernel, name, tuple(sorted(const.items())), tuple(sorted(dts.items())), cfg.num_warps,
                           cfg.num_stages)] = None  # fmt: skip


def compile_case(case: Case, arch: int) -> dict:
    """Compile one case for sm_<arch>; returns REG/STACK/LOCAL (cuobjdump) and shared bytes."""
    from triton.backends.compiler import GPUTarget

    fn = _kernel(case.kernel)
    const = dict(case.constexprs)
    ptrs = {**_PTRS[case.kernel], **{n: t for n, t in case.dtypes if n in _PTRS[case.kernel]}}
    signature = {}
    for name in fn.arg_names:
        if name in const:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = ptrs[name]
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # torch allocations are 16-byte aligned: the runtime would specialise the pointers likewise
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ptrs}
    src = triton.compiler.ASTSource(fn, signature, const, attrs)
    target = GPUTarget("cuda", arch, 32)
    from fot_kernels.backends.triton._configs import MAXNREG

    options = {"num_warps": case.num_warps, "num_stages": case.num_stages, "maxnreg": MAXNREG}
    kernel = triton.compile(src, target=target, options=options)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
        # the stack frame alone is not a spill (ptxas may keep small local arrays there): ask ptxas
        # for its spill statistics on the same PTX and architecture
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)  # fmt: skip
    usage = {key: int(val) for key, val in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text)}
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.stdout + log.stderr)]
    return {"reg": usage.get("REG", -1), "stack": usage.get("STACK", 0), "local": usage.get("LOCAL", 0),
            "spill": sum(spills), "smem": int(kernel.metadata.shared) + usage.get("SHARED", 0)}  # fmt: skip


def _compile_job(args):
    case, arch = args
    try:
        return case, arch, compile_case(case, arch), None
    except Exception as exc:  # reported per case by the test
        return case, arch, None, f"{type(exc).__name__}: {exc}"


def compile_all(cases: list[Case]) -> dict:
    jobs = [(c, a) for c in cases for a in ARCHS]
    workers = int(os.environ.get("FOT_COMPILE_JOBS", os.cpu_count() or 1))
    if workers <= 1:
        results = map(_compile_job, jobs)
        return {(c, a): (r, e) for c, a, r, e in results}
    with ProcessPoolExecutor(workers) as pool:
        return {(c, a): (r, e) for c, a, r, e in pool.map(_compile_job, jobs, chunksize=1)}


def format_table(results: dict) -> str:
    lines = [f"{'kernel':6} {'configuration':52} " + " ".join(f"sm_{a}: REG STACK SPILL SMEM".ljust(30) for a in ARCHS)]
    for case in dict.fromkeys(c for c, _ in results):
        cells = []
        for arch in ARCHS:
            res, _ = results[(case, arch)]
            cell = "ERROR" if res is None else f"{res['reg']:>3} {res['stack']:>5} {res['spill']:>5} {res['smem']:>7}"
            cells.append(cell.ljust(30))
        lines.append(f"{case.kernel:6} {case.label:52} " + "       ".join(cells))
    return "\n".join(lines)


def _tools_missing() -> str | None:
    for name in ("ptxas", "cuobjdump"):
        if _tool(name) is None:
            return f"{name} not found (Triton's wheel ships it under triton/backends/nvidia/bin)"
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as exc:
        return f"triton's NVIDIA backend is unavailable: {exc}"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile in a child process: this test process may run the Triton interpreter
    (TRITON_INTERPRET=1, set by conftest without a GPU), where @triton.jit functions cannot be compiled."""
    reason = _tools_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("compile") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", str(out)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    print("\n" + proc.stdout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def test_shipped_configs_compile_without_spills(compiled):
    failures = []
    for row in compiled:
        res, err, arch, what = row["result"], row["error"], row["arch"], f"{row['kernel']}:{row['label']}"
        if res is None:
            failures.append(f"sm_{arch} {what}: compile failed: {err}")
        elif res["spill"] > 0:
            failures.append(f"sm_{arch} {what}: spills {res['spill']} bytes (STACK {res['stack']}, REG {res['reg']})")
        elif res["smem"] > SMEM_LIMIT[arch]:
            failures.append(f"sm_{arch} {what}: shared memory {res['smem']} > {SMEM_LIMIT[arch]}")
    assert compiled, "no configuration was compiled"
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    missing = _tools_missing()
    if missing:
        sys.exit(missing)
    results = compile_all(shipped_cases())
    print(format_table(results))
    if len(sys.argv) == 3 and sys.argv[1] == "--json":
        rows = [{"kernel": c.kernel, "label": c.label, "arch": a, "result": r, "error": e}
                for (c, a), (r, e) in results.items()]  # fmt: skip
        with open(sys.argv[2], "w") as f:
            json.dump(rows, f)
