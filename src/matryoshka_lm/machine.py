"""Name the machine a measurement ran on (reports and benchmarks cite it)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from matryoshka_lm.errors import MatryoshkaError

T = TypeVar("T")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The vector extensions that pick PyTorch's CPU kernels, as /proc/cpuinfo lists them (the same model name can
    hide AVX2-only and AMX machines), e.g. "AVX2" or "AVX-512, AMX"."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability()
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    named = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX")]
    found = [name for flag, name in named if flag in flags]
    return ", ".join(found[1:] if len(found) > 1 else found) or "no AVX2"


def describe_machine(device: str = "cpu") -> str:
    """CPU model, its vector extensions and cores, the GPU when `device` is CUDA, and the torch / Python versions."""
    gpu = f"GPU {torch.cuda.get_device_name()}, " if device.startswith("cuda") and torch.cuda.is_available() else ""
    return (
        f"{gpu}{cpu_name()} ({cpu_isa()}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: str | torch.device = "cpu") -> tuple[float, T]:
    """The one timer: wall seconds of fn() with the device's queued work finished at both ends, and its result."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def read_bandwidth(device: str | torch.device = "cpu", mb: int = 1024, repeats: int = 5) -> float:
    """Bytes per second of summing a large fp32 tensor on `device` (median of `repeats`): the read roofline that
    a memory-bound batch-1 decode is measured against."""
    big = torch.ones(mb * 2**20 // 4, device=device)
    times = [timed(big.sum, device)[0] for _ in range(repeats + 1)]  # the first warms the allocator and kernels
    return big.numel() * 4 / sorted(times[1:])[len(times[1:]) // 2]


# dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, TFLOP/s: what MFU is quoted against
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def matmul_peak(device: str | torch.device = "cpu", n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul on `device` in fp32 (best of `repeats`): the measured peak a CPU's MFU is read
    against (about 0.1 s on 2 cores)."""
    a = torch.randn(n, n, device=device)
    times = [timed(lambda: a @ a, device)[0] for _ in range(repeats + 1)]
    return 2 * n**3 / min(times[1:])


def peak_flops(device: str | torch.device = "cpu", peak_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): the user's --peak-tflops, a known GPU's data-sheet bf16 peak, else the
    measured fp32 matmul peak of this device."""
    if peak_tflops is not None:
        if not peak_tflops > 0:
            raise MatryoshkaError(f"--peak-tflops must be positive, got {peak_tflops}")
        return peak_tflops * 1e12, "given"
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for gpu, tflops in GPU_PEAK_TFLOPS.items():
            if gpu in name:
                return tflops * 1e12, f"{gpu} bf16 data sheet"
    return matmul_peak(device), "measured fp32 matmul"
