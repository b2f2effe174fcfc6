"""Shared by the benchmarks: name the machine, write a marked section of BENCHMARKS.md, time things fairly."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from matryoshka_lm.machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\nWritten by `make bench` (each section by one script in `benchmarks/`). "
    "Ratios are measured side by side in one run.\n"
)


def machine() -> str:
    """One line naming the machine (CPU model, cores, GPU if used, torch version)."""
    return describe_machine("cuda" if torch.cuda.is_available() else "cpu")


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the text between <!-- name:start --> and <!-- name:end -->."""
    text = path.read_text() if path.exists() else HEADER
    block = f"<!-- {name}:start -->\n{body.rstrip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved so machine noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def self_timed(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of what each fn returns (it times itself: seconds of just the part that counts), one warm-up call
    each, calls interleaved so machine noise hits all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def read_bandwidth(mb: int = 512) -> Callable[[], float]:
    """Seconds per byte of a large fp32 sum (the read roofline of a bandwidth-bound decode)."""
    big = torch.ones(mb * 2**20 // 4)

    def run() -> float:
        t0 = time.perf_counter()
        big.sum()
        return (time.perf_counter() - t0) / (big.numel() * 4)

    return run
