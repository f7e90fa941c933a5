"""Shared test set-up: seeds, the Triton interpreter switch, NaN-poisoned allocations, and the
choice of CPU kernels (C++ extension or the PyTorch block-streaming fallback)."""

import os
from types import SimpleNamespace

import pytest
import torch
from _dist import poison_fill

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty / empty_like / new_empty return NaN-filled (float) or -7777 (signed int)
    tensors, so that an element a kernel forgets to write fails the comparison. Dtypes that cannot
    hold -7777 (uint8, int8, bool: e.g. the Triton interpreter's scratch) are left as they are."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_fill(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison_fill(real_new_empty(self, *a, **k)))


def _use_cpu_kernels(kind: str, monkeypatch) -> None:
    """"ext": the C++ kernels (skipped without a compiler, unless FOT_KERNELS_REQUIRE_CPU_EXT=1, set
    by CI, where a failed build fails the test instead of hiding behind the fallback); "torch": the
    PyTorch fallback kernels."""
    from fot_kernels.backends import _cpu_ext

    if kind == "ext":
        if not _cpu_ext.load():
            msg = f"C++ CPU extension unavailable: {_cpu_ext.unavailable_reason()}"
            if os.environ.get("FOT_KERNELS_REQUIRE_CPU_EXT") == "1":
                pytest.fail(msg)
            pytest.skip(msg)
    else:
        monkeypatch.setattr(_cpu_ext, "load", lambda: False)


@pytest.fixture(params=["ext", "torch"])
def cpu_kernels(request, monkeypatch):
    """Run a cpu-backend test with the C++ kernels and with the PyTorch fallback kernels."""
    _use_cpu_kernels(request.param, monkeypatch)
    return request.param


def emulate_cuda_backend(monkeypatch):
    """Point the cuda backend at csrc/cuda's kernels built for the CPU emulator (tests/cuda_emu):
    the backend's own code path, on CPU tensors. Skipped without a compiler, unless
    FOT_KERNELS_REQUIRE_CPU_EXT=1 (CI), where a failed build fails the test."""
    from fot_kernels.backends import cuda

    import cuda_emu

    try:
        ops = cuda_emu.load()
    except Exception as exc:  # a missing compiler, or a build error in csrc/cuda
        msg = f"CUDA emulator build failed: {exc}"
        if os.environ.get("FOT_KERNELS_REQUIRE_CPU_EXT") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    cuda_emu.configure()
    monkeypatch.setattr(cuda, "_EXTENSION_REASON", None)
    monkeypatch.setattr(cuda, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cuda, "_ops", lambda: ops)
    return ops


@pytest.fixture(params=["cpu", "cpu-pytorch-kernels", "streaming", "cuda-emulated", "cuda"])
def impl(request, monkeypatch):
    """A production backend to test: ``impl.name`` (the ``backend=`` argument), ``impl.device``
    (where the inputs live), ``impl.kind`` (the parameter). "cuda-emulated" runs the cuda backend
    with csrc/cuda's kernels on the CPU (tests/cuda_emu), "cuda" on a GPU."""
    kind = request.param
    if kind.startswith("cpu"):
        _use_cpu_kernels("ext" if kind == "cpu" else "torch", monkeypatch)
        return SimpleNamespace(name="cpu", device="cpu", kind=kind)
    if kind == "streaming":
        return SimpleNamespace(name="streaming", device=DEVICE, kind=kind)
    if kind == "cuda-emulated":
        emulate_cuda_backend(monkeypatch)
        return SimpleNamespace(name="cuda", device="cpu", kind=kind)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from fot_kernels.backends import cuda

    if cuda.extension_status() is not None:
        pytest.skip(f"CUDA extension unavailable: {cuda.extension_status()}")
    return SimpleNamespace(name="cuda", device="cuda", kind=kind)
