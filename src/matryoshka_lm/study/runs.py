"""A study's runs: training each unless a finished copy is in the work dir (an interrupted study continues), and
the process pool that trains, or evaluates, several at once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.train.loop import train

Runs = dict[str, tuple[ModelConfig, TrainConfig]]  # run name -> (model config, train config)


def train_all(
    runs: Runs,
    work: Path,
    data: str | None,
    device: str,
    on_run: Callable[[str, str], None] | None = None,
    jobs: int = 1,
) -> dict[str, float]:
    """Train each run unless complete; returns wall seconds per trained run. jobs > 1 trains that many runs at
    once in worker processes (one torch thread each: on a small CPU, runs in parallel beat threads in one run)."""
    seconds, todo = {}, {}
    for name, (mcfg, tcfg) in runs.items():
        if _complete(work / name, tcfg.steps):
            on_run and on_run(name, "cached")
            seconds[name] = _logged_seconds(work / name, tcfg)
        else:
            todo[name] = (mcfg, tcfg)
    if jobs <= 1 or len(todo) <= 1:
        for name, (mcfg, tcfg) in todo.items():
            on_run and on_run(name, "training")
            seconds[name] = train_one(mcfg, tcfg, work / name, data, device)
        return seconds
    from concurrent.futures import as_completed

    with process_pool(jobs) as pool:
        futures = {pool.submit(train_one, m, t, work / n, data, device): n for n, (m, t) in todo.items()}
        for n in todo:
            on_run and on_run(n, "queued")
        for f in as_completed(futures):
            seconds[futures[f]] = f.result()
            on_run and on_run(futures[f], f"trained in {seconds[futures[f]] / 60:.1f} min")
    return seconds


def map_jobs(fn: Callable, tasks: list, jobs: int) -> list:
    """fn over tasks, in order; in `jobs` worker processes (one torch thread each) when jobs > 1."""
    if jobs <= 1:
        return [fn(t) for t in tasks]
    with process_pool(jobs) as pool:
        return list(pool.map(fn, tasks))


def process_pool(jobs: int) -> Any:
    """`jobs` worker processes (spawned: no fork of a process that holds torch threads), one torch thread each."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_one_thread)


def _one_thread() -> None:
    torch.set_num_threads(1)


def train_one(mcfg: ModelConfig, tcfg: TrainConfig, out: Path, data: str | None, device: str) -> float:
    """Train one run, continuing it if it was interrupted with state saved; returns its wall seconds."""
    resume = (out / ck.STATE).is_file()
    if out.exists() and not resume:  # interrupted before its first checkpoint: start over
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    train(mcfg, tcfg, out, data=data, resume=resume, device=device)
    return time.perf_counter() - t0


def _complete(out: Path, steps: int) -> bool:
    if not (out / ck.STATE).is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(out / ck.STATE), "pt") as f:
        return int((f.metadata() or {}).get("step", -1)) >= steps


def _logged_seconds(out: Path, tcfg: TrainConfig) -> float:
    """Training time of a finished run, from the throughput its last logged step reports."""
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return tcfg.steps * tcfg.batch_size * tcfg.seq_len / last["tokens_per_s"]
