"""A training run sized to a wall-clock budget and continued across calls of bounded length.

The plan times a few real steps (teacher, autocast, compilation and all), converts the budget into a step count
(so the LR schedule knows its end) and is kept in a JSON file; each later call resumes from the last checkpoint
and trains until its own time limit. Used by `matryoshka elastify` (elastify/) for the elastic model and the
student."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.train.loop import train
from matryoshka_lm.train.state import saved_step

log = logging.getLogger(__name__)


@dataclass
class Budgeted:
    run: Path  # the checkpoint directory
    plan_path: Path
    model_cfg: ModelConfig  # a fresh model's shape (ignored with init)
    make_tcfg: Callable[[int], TrainConfig]  # the settings for a run of this many steps
    minutes: float
    save_minutes: float = 2.0  # checkpoint cadence: a lost machine costs at most this much training
    plan_steps: int = 4  # timed steps, the first two of them warm-up
    steps: int | None = None  # fixed instead of sized to the budget
    init: Path | None = None  # start from these weights (and tokenizer)
    tokenizer: Path | None = None  # a fresh model with this checkpoint's tokenizer


def plan(job: Budgeted, data: str | None, device: str) -> dict[str, Any]:
    if job.plan_path.is_file():
        return json.loads(job.plan_path.read_text())
    scratch = job.run.with_name(job.run.name + "-plan-scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    stamps: list[float] = []
    tcfg = job.make_tcfg(job.plan_steps)
    train(job.model_cfg, tcfg, scratch, data=data, init=job.init, device=device, tokenizer=job.tokenizer,
          callback=lambda step, m: stamps.append(time.perf_counter()))  # fmt: skip
    shutil.rmtree(scratch, ignore_errors=True)
    warm = 2 if len(stamps) > 2 else 1  # compilation, the allocator and the teacher's first pass come first
    per_step = (stamps[-1] - stamps[warm - 1]) / (len(stamps) - warm)
    steps = job.steps or max(job.plan_steps, int(job.minutes * 60 / per_step))
    out = {
        "steps": steps,
        "seconds_per_step": per_step,
        "save_every": max(1, min(steps, int(job.save_minutes * 60 / per_step))),
        "tokens": steps * tcfg.batch_size * tcfg.seq_len,
        "device": device,
    }
    ck.write_json(job.plan_path, out)
    log.info(
        "%s: %.3f s/step -> %d steps (%s tokens) in %g min",
        *(job.run.name, per_step, steps, f"{out['tokens']:,}", job.minutes),
    )
    return out


def run_budgeted(
    job: Budgeted,
    data: str | None,
    device: str,
    time_limit_s: float | None,
    callback: Callable[[int, dict], None] | None = None,
) -> bool:
    """Train (or continue) the planned run; True once every planned step is done."""
    steps = json.loads(job.plan_path.read_text())["steps"]
    resume = (job.run / ck.STATE).is_file()
    if resume and saved_step(job.run) >= steps:
        return True
    tcfg = job.make_tcfg(steps)
    tcfg.save_every = json.loads(job.plan_path.read_text())["save_every"]
    log.info(f"train {job.run}: " + (f"resume at step {saved_step(job.run)}" if resume else "start") + f" of {steps}")
    train(job.model_cfg, tcfg, job.run, data=data, init=None if resume else job.init, resume=resume, device=device,
          callback=callback, time_limit_s=time_limit_s, tokenizer=None if resume else job.tokenizer)  # fmt: skip
    return saved_step(job.run) >= steps
