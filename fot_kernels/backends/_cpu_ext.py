"""Loader of the C++ CPU kernels (``csrc/cpu/fot_cpu.cpp``), registered as ``torch.ops.fot_cpu.*``.

Nothing happens at import. :func:`load` JIT-compiles the extension with
``torch.utils.cpp_extension.load`` (ninja) on first use, caches the outcome and returns whether the
ops are usable; :func:`unavailable_reason` says why not. The first build takes about a minute;
later processes reuse the cached build (torch's extension directory, keyed by sources and flags).

Ops (all tensors on the CPU; query float32 ``[B, Hkv, N, D]``, memory ``[B, Hkv, M, D]`` in
float32/bfloat16/float16 with ``stride(-1) == 1``):

- ``knn_scan(query, mem_keys, mem_lengths?, mem_mask?, k) -> (scores [B,Hkv,N,k] f32, indices i64)``
- ``flash_scan(query, keys, values, mem_lengths?, mem_mask?, scale, causal_lq) -> (out [B,Hkv,N,D] f32, lse [B,Hkv,N] f32)``
- ``gather_attention(scores, indices, values, scale) -> (out, lse)``
- ``simd_level() -> int``: 512 when the AVX-512 kernels were compiled in, 0 for the portable build.

Environment:

- ``FOT_KERNELS_CPU_EXT=0`` disables the extension.
- ``FOT_KERNELS_CPU_EXT_PORTABLE=1`` skips ``-march=native`` (portable scalar kernels).
- ``FOT_KERNELS_CPU_EXT_VERBOSE=1`` shows the compiler output.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

__all__ = ["load", "unavailable_reason", "source_dir"]

_SOURCES = ("fot_cpu.cpp",)
_lock = threading.Lock()
_loaded: Optional[bool] = None
_reason: Optional[str] = None
_fakes_registered = False

_NATIVE_FLAGS = ["-O3", "-march=native", "-mtune=native", "-fno-math-errno"]
_PORTABLE_FLAGS = ["-O3", "-fno-math-errno"]


def source_dir() -> Optional[Path]:
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
    import torch

    try:
        return hasattr(torch.ops.fot_cpu, "knn_scan") and hasattr(torch.ops.fot_cpu, "flash_scan")
    except (AttributeError, RuntimeError):
        return False


def _truncate(text: str, limit: int = 2000) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    return "...\n" + text[-limit:]


def _build(name: str, flags: list, src: Path) -> None:
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=name,
        sources=[str(src / s) for s in _SOURCES],
        extra_cflags=flags,
        extra_ldflags=[],
        is_python_module=False,
        verbose=os.environ.get("FOT_KERNELS_CPU_EXT_VERBOSE", "0") == "1",
    )


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    import torch

    def _knn_scan_fake(query, mem_keys, mem_lengths, mem_mask, k):
        shape = (*query.shape[:3], k)
        return query.new_empty(shape), query.new_empty(shape, dtype=torch.int64)

    def _flash_scan_fake(query, keys, values, mem_lengths, mem_mask, scale, causal_lq):
        return query.new_empty(query.shape), query.new_empty(query.shape[:3])

    def _gather_attention_fake(scores, indices, values, scale):
        shape = (*scores.shape[:3], values.shape[-1])
        return scores.new_empty(shape), scores.new_empty(scores.shape[:3])

    for op, fn in (
        ("fot_cpu::knn_scan", _knn_scan_fake),
        ("fot_cpu::flash_scan", _flash_scan_fake),
        ("fot_cpu::gather_attention", _gather_attention_fake),
    ):
        try:
            torch.library.register_fake(op)(fn)
        except RuntimeError as exc:  # already registered (e.g. a second loader path)
            if "already" not in str(exc) and "register_fake" not in str(exc):
                raise
    _fakes_registered = True


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
        return False, "C++ sources (csrc/cpu/fot_cpu.cpp) not found next to the package"
    errors = []
    attempts = []
    if os.environ.get("FOT_KERNELS_CPU_EXT_PORTABLE", "0") != "1":
        attempts.append(("fot_cpu_native", _NATIVE_FLAGS))
    attempts.append(("fot_cpu_portable", _PORTABLE_FLAGS))
    for name, flags in attempts:
        try:
            _build(name, flags, src)
        except Exception as exc:  # compiler missing, build error, ...
            msg = str(exc)
            if isinstance(exc, FileNotFoundError) or "ninja" in msg.lower() and "not" in msg.lower():
                errors.append(f"{name}: {_truncate(msg)}")
            else:
                errors.append(f"{name}: {type(exc).__name__}: {_truncate(msg)}")
            if _ops_present():  # the library loaded but something after it failed
                break
            continue
        if _ops_present():
            return True, None
        errors.append(f"{name}: built but torch.ops.fot_cpu has no ops")
    if _ops_present():
        return True, None
    return False, "C++ CPU extension could not be built:\n" + "\n".join(errors)


def load() -> bool:
    """Build (first call) and load the extension; True when ``torch.ops.fot_cpu.*`` are usable.

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
            if ok:
                _register_fakes()
        except Exception as exc:  # never raise from load()
            ok, reason = False, f"{type(exc).__name__}: {_truncate(str(exc))}"
        _loaded, _reason = ok, reason
        return ok


def unavailable_reason() -> Optional[str]:
    """Why the extension is not usable (None when it is, or when :func:`load` was not called yet)."""
    if _loaded is None:
        return None
    return _reason
