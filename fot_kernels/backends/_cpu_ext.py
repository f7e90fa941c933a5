"""Loader of the C++ CPU kernels (``csrc/cpu``): the CPU implementations of the ``torch.ops.fot.*``
ops whose schemas and fake kernels ``fot_kernels._library`` defines.

Nothing happens at import. :func:`load` JIT-compiles the extension with
``torch.utils.cpp_extension.load`` (ninja) on first use, caches the outcome and returns whether the
ops are usable; :func:`unavailable_reason` says why not. The first build takes a minute or two;
later processes reuse the cached build (torch's extension directory, keyed by the sources, the
headers and the flags).

Ops (all tensors on the CPU; query float32 ``[B, Hkv, N, D]``, memory ``[B, Hkv, M, D]`` in
float32/bfloat16/float16 with ``stride(-1) == 1``):

- ``knn_scan(query, mem_keys, mem_lengths?, mem_mask?, k) -> (scores [B,Hkv,N,k] f32, indices i64)``
- ``flash_scan(query, keys, values, mem_lengths?, mem_mask?, scale, causal_lq)``
  ``-> (out [B,Hkv,N,D] f32, lse [B,Hkv,N] f32)``
- ``gather_attention(scores, indices, values, scale) -> (out, lse)``
- ``flash_scan_backward(...)`` and ``gather_attention_backward(...) -> (dq f32, dk, dv)``: the
  FlashAttention-2 backward of the two memory parts (contract in ``fot_kernels._library``).
  :func:`load` is True only when these are registered too, so the ``cpu`` backend runs its
  gradients through them whenever the extension is in use.
- ``cpu_simd_level() -> int`` (defined by the C++ library itself): 512 when the AVX-512 kernels were
  compiled in, 0 for the portable build.

Environment:

- ``FOT_KERNELS_CPU_EXT=0`` disables the extension.
- ``FOT_KERNELS_CPU_EXT_PORTABLE=1`` skips ``-march=native`` (portable scalar kernels).
- ``FOT_KERNELS_CPU_EXT_VERBOSE=1`` shows the compiler output.
- ``FOT_KERNELS_CPU_POISON=1`` (tests, read by the ops at each call) fills the ops' outputs with NaN /
  -7777 before the kernels run, so that an element a kernel forgets to write fails a test.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

__all__ = ["load", "source_dir", "unavailable_reason"]

_SOURCES = ("ops.cpp", "knn.cpp", "flash.cpp", "gather.cpp", "topk.cpp", "flash_bwd.cpp", "gather_bwd.cpp")
_HEADER_SUFFIXES = (".h", ".hpp")
_OPS = ("knn_scan", "flash_scan", "gather_attention", "flash_scan_backward", "gather_attention_backward")
_lock = threading.Lock()
_loaded: bool | None = None
_reason: str | None = None

# -fopenmp: at::parallel_for is inline code (ATen's OpenMP backend); compiled without it, every
# kernel's parallel_for runs its whole range on one thread. Linked with -fopenmp, the extension
# uses the libgomp.so.1 that torch has already loaded (same soname): one runtime, one thread pool,
# torch.set_num_threads applies. A compiler without OpenMP gets the last attempt: one thread.
_OPENMP = ["-fopenmp"]
_NATIVE_FLAGS = ["-O3", "-march=native", "-mtune=native", "-fno-math-errno"]
_PORTABLE_FLAGS = ["-O3", "-fno-math-errno"]


def source_dir() -> Path | None:
    """Directory holding the C++ sources: package data first, then the repository checkout."""
    here = Path(__file__).resolve()
    package = here.parents[1]  # fot_kernels/
    candidates = [
        package / "_csrc" / "cpu",
        package / "csrc" / "cpu",
        here.parents[2] / "csrc" / "cpu",
    ]
    for cand in candidates:
        if all((cand / name).is_file() for name in _SOURCES):
            return cand
    return None


def _ops_present() -> bool:
    """True when every op has a CPU implementation registered (the library is loaded)."""
    from .. import _library

    return all(_library.has_kernel(name, "CPU") for name in _OPS)


def _missing_ops() -> list:
    from .. import _library

    return [name for name in _OPS if not _library.has_kernel(name, "CPU")]


def _any_op_present() -> bool:
    """True when a fot CPU library is loaded (a stale or partial one included): loading a second
    would define ``fot::cpu_simd_level`` twice, which aborts the process."""
    return len(_missing_ops()) < len(_OPS)


def _headers_digest(src: Path) -> str:
    """Digest of the headers: torch keys its build cache on the sources and flags only, so the
    headers enter through a define (a header change then rebuilds, also in an installed copy)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in src.iterdir() if p.suffix in _HEADER_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _truncate(text: str, limit: int = 2000) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    return "...\n" + text[-limit:]


def _build(name: str, flags: list, ldflags: list, src: Path) -> None:
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=name,
        sources=[str(src / s) for s in _SOURCES],
        extra_cflags=[*flags, f"-DFOT_CPU_HEADERS={_headers_digest(src)}"],
        extra_ldflags=list(ldflags),
        is_python_module=False,
        verbose=os.environ.get("FOT_KERNELS_CPU_EXT_VERBOSE", "0") == "1",
    )


def _try_load() -> tuple:
    if os.environ.get("FOT_KERNELS_CPU_EXT", "1").strip().lower() in ("0", "false", "no", "off"):
        return False, "disabled by environment variable FOT_KERNELS_CPU_EXT=0"
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except Exception as exc:  # pragma: no cover - torch is a hard dependency
        return False, f"torch.utils.cpp_extension unavailable: {exc!r}"
    if _ops_present():
        return True, None
    src = source_dir()
    if src is None:
        return False, "C++ sources (csrc/cpu: " + ", ".join(_SOURCES) + ") not found next to the package"
    errors = []
    attempts = []
    if os.environ.get("FOT_KERNELS_CPU_EXT_PORTABLE", "0") != "1":
        attempts.append(("fot_cpu_native", [*_NATIVE_FLAGS, *_OPENMP], _OPENMP))
    attempts.append(("fot_cpu_portable", [*_PORTABLE_FLAGS, *_OPENMP], _OPENMP))
    attempts.append(("fot_cpu_serial", _PORTABLE_FLAGS, []))  # no OpenMP: one thread
    for name, flags, ldflags in attempts:
        try:
            _build(name, flags, ldflags, src)
        except Exception as exc:  # compiler missing, build error, ...
            msg = str(exc)
            if isinstance(exc, FileNotFoundError) or ("ninja" in msg.lower() and "not" in msg.lower()):
                errors.append(f"{name}: {_truncate(msg)}")
            else:
                errors.append(f"{name}: {type(exc).__name__}: {_truncate(msg)}")
            if _any_op_present():  # the library loaded but something after it failed
                break
            continue
        if _ops_present():
            return True, None
        errors.append(f"{name}: built but the fot ops have no CPU kernel: " + ", ".join(_missing_ops()))
        if _any_op_present():  # a second library would register cpu_simd_level again (fatal)
            break
    if _ops_present():
        return True, None
    return False, "C++ CPU extension could not be built:\n" + "\n".join(errors)


def load() -> bool:
    """Build (first call) and load the extension; True when ``torch.ops.fot.*`` have their CPU kernels.

    Never raises: on failure returns False and :func:`unavailable_reason` says why.
    """
    global _loaded, _reason
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            ok, reason = _try_load()
        except Exception as exc:  # never raise from load()
            ok, reason = False, f"{type(exc).__name__}: {_truncate(str(exc))}"
        _loaded, _reason = ok, reason
        return ok


def unavailable_reason() -> str | None:
    """Why the extension is not usable (None when it is, or when :func:`load` was not called yet)."""
    if _loaded is None:
        return None
    return _reason
