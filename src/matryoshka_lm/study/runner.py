"""The one study runner: plan -> train -> evaluate -> report, for every preset of presets.py.

Runs already complete in the work dir are reused (an interrupted study continues; a finished one re-evaluates and
rewrites its report), and `jobs` > 1 trains, and where the study allows evaluates, that many runs at once in
worker processes (runs.py). A study module (sizes.py, recipes.py) supplies plan, evaluate, meta and write_report.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from matryoshka_lm.machine import describe_machine

from . import recipes, sizes
from .presets import get_preset
from .runs import train_all

STUDIES = {"sizes": sizes, "recipes": recipes}  # a preset's class names its study


def run_study(
    preset_name: str,
    report: str | Path,
    work: str | Path | None = None,
    data: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    jobs: int = 1,
    on_run: Callable[[str, str], None] | None = None,
    train_only: bool = False,
) -> dict[str, Any]:
    """Train (or reuse) every run of the preset, evaluate, and write the report folder. Returns the results
    (with `train_only`, only {"train_seconds"})."""
    p = get_preset(preset_name)
    study = STUDIES[p.study]
    report = Path(report)
    work = Path(work) if work else Path("runs") / f"{study.WORK_PREFIX}-{preset_name}"
    runs = study.plan(p, seed)
    t0 = time.perf_counter()
    seconds = train_all(runs, work, data, device, on_run, jobs=jobs)
    if train_only:
        return {"train_seconds": seconds}
    res = study.evaluate(runs, p, work, seed, device, jobs)
    res["meta"] = {
        "preset": preset_name,
        "settings": dataclasses.asdict(p),
        "seed": seed,
        "data": data or "default corpus",
        **study.meta(p, jobs),
        "machine": describe_machine(device),
        "train_seconds": seconds,
        "train_seconds_total": sum(seconds.values()),
        "wall_seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
        "command": f"matryoshka study --preset {preset_name} -o {report} --seed {seed}"
        + (f" --jobs {jobs}" if jobs > 1 else ""),
    }
    study.write_report(res, p, report)
    return res
