"""pytest-benchmark settings of the benchmark suites in this folder (test_bench_*.py)."""

from __future__ import annotations

import os

import _common as C
import torch

import fot_kernels


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Versions and threads in the saved JSON, beside pytest-benchmark's CPU and commit info."""
    machine_info.update(torch_version=torch.__version__, fot_kernels_version=fot_kernels.__version__,
                        torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                        cpu_kernels=C.cpu_kernels_status())  # fmt: skip
