"""`python -m fot_kernels`: which backends can run here, and why the others cannot."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .backends import NAMES, load


def main() -> None:
    print(f"fot-kernels {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        q = torch.randn(1, 1, 1, 8, device=device)
        mk = torch.randn(1, 1, 4, 8, device=device)
        for name in NAMES:
            module, reason = load(name)
            reasons = [reason] if module is None else module.unsupported_reasons("memory_attention", q, mk, topk=2)
            status = "ok" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"  {device:5s} {name:10s} {status}")
    from .backends import cpu

    ext = cpu.extension_status()
    print(f"  cpu C++ kernels: {'in use' if ext is None else 'not in use (PyTorch fallback): ' + ext}")


if __name__ == "__main__":
    main()
