"""Build script: pure-Python package, plus the CUDA extension where CUDA is usable.

- The CPU C++ kernels (csrc/cpu) are not built here: they are JIT-compiled with ninja on first use
  (fot_kernels/backends/_cpu_ext.py). Their sources are copied into the package so that a
  non-editable install can compile them too.
- The CUDA extension (csrc/cuda/*.cu -> fot_kernels._C) is built when torch with CUDA and nvcc
  are usable in the build environment (e.g. `pip install --no-build-isolation -e .` on a GPU
  machine), or when FOT_KERNELS_BUILD_CUDA=1, which fails loudly if it is impossible;
  FOT_KERNELS_BUILD_CUDA=0 never builds it. Arch list: TORCH_CUDA_ARCH_LIST (default
  "8.0;9.0+PTX": sm_80 and sm_90 code, plus PTX that newer GPUs JIT-compile); parallel jobs:
  MAX_JOBS.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
SWITCH = os.environ.get("FOT_KERNELS_BUILD_CUDA", "auto").strip().lower()


class BuildPyWithCpuSources(build_py):
    """Ship csrc/cpu inside the package (fot_kernels/_csrc/cpu) for the JIT compiler."""

    def run(self):
        super().run()
        src = ROOT / "csrc" / "cpu"
        if src.is_dir():
            dst = Path(self.build_lib) / "fot_kernels" / "_csrc" / "cpu"
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.suffix in (".cpp", ".h", ".hpp"):
                    shutil.copy2(f, dst / f.name)


def _fail(reason: str):
    raise SystemExit(f"fot-kernels: FOT_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")


def cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) where it is not built."""
    if SWITCH in ("0", "false", "no", "off"):
        return [], {}
    forced = SWITCH in ("1", "true", "yes", "on")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if forced:
            _fail(f"torch is not importable in the build environment ({exc}); install torch first and "
                  "build with `pip install --no-build-isolation`")  # fmt: skip
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cpp"))
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        problems.append("nvcc / CUDA_HOME not found")
    if not any(s.endswith(".cu") for s in sources):
        problems.append("csrc/cuda holds no .cu sources")
    if problems:
        if forced:
            _fail("; ".join(problems))
        return [], {}
    # sm_80 and sm_90 machine code (the kernels use WMMA / mma.sync, nothing sm_90a-only) and
    # compute_90 PTX for newer GPUs; a TORCH_CUDA_ARCH_LIST in the environment wins. MAX_JOBS bounds ninja's
    # parallel compiles.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.h*"))
    headers += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cuh"))
    ext = CUDAExtension(
        name="fot_kernels._C",
        sources=sources,
        depends=headers,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
cmdclass["build_py"] = BuildPyWithCpuSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
