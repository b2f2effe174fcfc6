"""Shared by the benchmarks: name the machine, write a marked section of BENCHMARKS.md, time things fairly."""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from matryoshka_lm.machine import describe_machine, timed
from matryoshka_lm.report import md_table

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
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved so machine noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn)[0])
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
        return timed(big.sum)[0] / (big.numel() * 4)

    return run


def generate_timer(engine, prompts: list[list[int]], n: int) -> Callable[[], float]:
    """Seconds to generate n tokens after each prompt (batch 1, the prefill included, as speculative runs are)."""

    def run() -> float:
        return timed(lambda: [engine.generate([p], None, n) for p in prompts])[0]

    return run


def speculative_timer(model, engine, prompts, n, draft, want, stats, **kw) -> Callable[[], float]:
    """Seconds for speculative decoding after each prompt, checking each output is the target's (`want`) and
    adding every run's counts and phase times into `stats` (a SpeculativeStats)."""
    from matryoshka_lm.infer.speculative import speculative_decode

    def body() -> None:
        for p, w in zip(prompts, want):
            got, s = speculative_decode(model, p, None, draft, n, engine=engine, **kw)
            assert got.tokens == w, f"draft {draft}: not the target's greedy output"
            stats.rounds, stats.drafted, stats.accepted = (
                stats.rounds + s.rounds,
                stats.drafted + s.drafted,
                stats.accepted + s.accepted,
            )
            stats.draft_s, stats.verify_s = stats.draft_s + s.draft_s, stats.verify_s + s.verify_s

    return lambda: timed(body)[0]


def speculative_rows(times: dict[str, float], stats: dict, base: dict[str, float], tokens: int) -> list[str]:
    """Markdown rows for speculative runs keyed "..., MODE": speedup over `base[MODE]` (the target alone, timed the
    same way), tokens/s, acceptance, tokens per target pass and the draft/verify time split."""
    head = ["draft", "speedup vs target alone (same mode)", "tok/s", "acceptance", "tokens / target pass",
            "draft : verify time"]  # fmt: skip
    rows = []
    for key, secs in times.items():
        s = stats[key]
        split = s.draft_s / max(s.draft_s + s.verify_s, 1e-9)
        rows.append([key, f"{base[key.rsplit(', ', 1)[1]] / secs:.2f}x", f"{tokens / secs:.1f}", f"{s.acceptance:.2f}",
                     f"{s.tokens_per_round:.2f}", f"{split:.0%} : {1 - split:.0%}"])  # fmt: skip
    return md_table(head, rows).split("\n")
