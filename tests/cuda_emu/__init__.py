"""Runs the CUDA C++ kernels of csrc/cuda on the CPU, so that CI (which has no GPU) executes them.

``load()`` compiles csrc/cuda/{knn,attention,backward}.cu and bindings.cpp as host C++ against a small CUDA
emulator (this directory: stand-in CUDA headers, threads as fibers, WMMA fragments split across
lanes, cp.async) and registers the kernels as the CPU implementations of the package's ops under
the emulator's own namespace, ``torch.ops.fot_cuda_emu`` (schemas and fake kernels from
``fot_kernels._library.ops("fot_cuda_emu")``, the same ones ``torch.ops.fot`` has). See
README.md for what the emulator checks (barrier and warp-collective convergence, WMMA and cp.async
alignment, launch limits, shared-memory bounds and garbage, schedule-dependence, AddressSanitizer
for global memory) and what it does not model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc" / "cuda"
# translated into the build directory; the .cu files find the translated headers there first
TRANSLATED = (CSRC / "common.cuh", CSRC / "knn.cu", CSRC / "attention.cu", CSRC / "backward.cu", HERE / "selftest.cu")

# kernel<<<grid, block, smem, stream>>>(args)
#   ->  ::fot_emu::launcher(kernel, "kernel", grid, block, smem, stream)(args)
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[\w:, ()]*>)?)<<<")
# extern __shared__ __align__(N) T name[];  ->  T* name = reinterpret_cast<T*>(::fot_emu::dynamic_smem());
_DYNAMIC_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\];")

# __shared__ T name[dims];  ->  a reference to block-scoped storage, poisoned at every block start
_STATIC_SMEM = re.compile(r"__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)((?:\[[^\]]+\])+)\s*;")

NAMESPACE = "fot_cuda_emu"  # bindings.cpp's FOT_OPS_NAMESPACE in this build; control.cpp's emu_* ops too
_OPS = None


def translate(source: str, path: Path) -> str:
    """The .cu source as host C++ for the emulator (line numbers kept for error messages)."""
    out = _LAUNCH.sub(lambda m: f'::fot_emu::launcher({m[1]}, "{m[1]}", ', source).replace(">>>(", ")(")
    out = _DYNAMIC_SMEM.sub(r"\1* \2 = reinterpret_cast<\1*>(::fot_emu::dynamic_smem());", out)
    out = _STATIC_SMEM.sub(
        r"auto& \2 = *reinterpret_cast<\1(*)\3>(::fot_emu::static_smem([] { static char site; return &site; }(), "
        r"sizeof(\1\3), alignof(\1)));",
        out,
    )
    for left in ("<<<", ">>>", "__shared__"):
        if left in out:
            raise RuntimeError(f"{path}: cannot translate {left!r} for the CUDA emulator")
    return f'#line 1 "{path}"\n{out}'


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def load(verbose: bool | None = None, *, sanitize: bool | None = None):
    """Builds (once per process; ninja caches across processes) and returns torch.ops.fot_cuda_emu:
    every op of fot_kernels._library.SCHEMAS (csrc/cuda's kernels for CPU tensors, the backward ones
    included) and emu_* (control.cpp).

    sanitize=True (default: FOT_CUDA_EMU_SANITIZE=1) builds with AddressSanitizer, which reports
    out-of-bounds reads and writes of global memory (the tensors' storage); such a build loads only
    into a process started with libasan preloaded (``asan_environment()``)."""
    global _OPS
    if _OPS is not None:
        return _OPS
    from torch.utils import cpp_extension

    from fot_kernels import _library

    if sanitize is None:
        sanitize = os.environ.get("FOT_CUDA_EMU_SANITIZE") == "1"
    name = "fot_cuda_emu_asan" if sanitize else "fot_cuda_emu"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    gen_dir = build_dir / "generated"
    gen_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(HERE / "runtime.cpp"), str(HERE / "control.cpp"), str(CSRC / "bindings.cpp")]
    for path in TRANSLATED:
        target = gen_dir / (path.name if path.suffix == ".cuh" else path.name + ".cpp")
        _write_if_changed(target, translate(path.read_text(), path))
        if target.suffix == ".cpp":
            sources.append(str(target))
    if verbose is None:
        verbose = os.environ.get("FOT_KERNELS_CPU_EXT_VERBOSE") == "1"
    flags = ["-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-Wall", "-Wextra", "-Wno-unused-parameter",
             "-DFOT_CUDA_EMULATION", "-DFOT_CUDA_NO_PYTHON_MODULE",
             f"-DFOT_OPS_NAMESPACE={NAMESPACE}", "-DFOT_OPS_DISPATCH_KEY=CPU"]  # fmt: skip
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else []
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_include_paths=[str(HERE / "include"), str(CSRC)],
        extra_cflags=flags + asan,
        extra_ldflags=asan,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    ops = _library.ops(NAMESPACE)  # the schemas and fakes; the library above registered the kernels
    missing = [op for op in _library.SCHEMAS if not _library.has_kernel(op, "CPU", NAMESPACE)]
    if missing:
        raise RuntimeError(f"the CUDA emulator build registered no CPU kernel for {NAMESPACE}::{missing}")
    _OPS = ops
    return _OPS


def asan_environment() -> dict[str, str] | None:
    """Environment for a subprocess that runs the AddressSanitizer build (None: no libasan found)."""
    import subprocess

    libs = []
    for name in ("libasan.so", "libstdc++.so"):  # libstdc++ first-hand, or ASan cannot intercept throws
        try:
            lib = subprocess.run(["c++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        except OSError:
            return None
        if not os.path.isabs(lib) or not os.path.exists(lib):
            return None
        libs.append(lib)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, LD_PRELOAD=" ".join(libs), FOT_CUDA_EMU_SANITIZE="1", PYTHONPATH=path)
    # torch and Python are not instrumented: leak reports and their allocator mismatches are noise
    env["ASAN_OPTIONS"] = "detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=0"
    return env


def configure(*, num_sms: int = 132, smem_optin: int = 227 * 1024, schedule: str = "forward", seed: int = 0) -> None:
    """The emulated device (default: an H100's SM count and shared-memory opt-in limit) and the
    order fibers and blocks run in: "forward", "reverse" or "shuffle" (seeded). Resets stats()."""
    code = {"forward": 0, "reverse": 1, "shuffle": 2}[schedule]
    load().emu_configure(num_sms, smem_optin, code, seed)


def selftest(which: int) -> tuple[str, int]:
    """Runs self-test kernel `which` (selftest.cu): (the launch's error message or "", checksum)."""
    return tuple(load().emu_selftest(which))


def plan(
    kind: str,
    *,
    rows: int,
    head_dim: int,
    k: int = 0,
    tensor_cores: bool,
    smem_optin: int,
    num_sms: int = 132,
    slots: int = 1 << 20,
) -> dict | None:
    """The launch plan csrc/cuda's own code (knn_plan / flash_plan / flash_backward_plan) picks for
    `kind` ("knn", "flash", "flash_bwd_dq" or "flash_bwd_dkv") on a device with that much opt-in
    shared memory per block: {"bm", "bn", "smem", "splits"}, or None when nothing fits."""
    (bm, bn, smem, splits), _why = load().emu_plan(kind, rows, head_dim, k, tensor_cores, num_sms, smem_optin, slots)
    return None if bm == 0 else {"bm": bm, "bn": bn, "smem": smem, "splits": splits}


def stats() -> dict[str, int]:
    launches, blocks, max_smem = load().emu_stats()
    return {"launches": launches, "blocks": blocks, "max_dynamic_smem": max_smem}
