"""Name the machine a measurement ran on (reports and benchmarks cite it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: str = "cpu") -> str:
    """CPU model and cores, the GPU when `device` is CUDA, and the torch / Python versions."""
    gpu = f"GPU {torch.cuda.get_device_name()}, " if device.startswith("cuda") and torch.cuda.is_available() else ""
    return (
        f"{gpu}{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
