"""Study v2: which training recipe makes every size and every Mix'n'Match mix good, at equal training FLOPs.

Per scale it trains one Matryoshka model per recipe (what each step trains: all sizes, the sandwich rule, random
mixes; each with and without in-place distillation) and one independent model per size, all on the same data.
The recipes get the same training FLOPs as today's recipe ("all" for `steps` steps; train/plan.py counts them),
the baselines the same tokens. Every model is evaluated on held-out text of the training corpus and on prose from
another domain (Python's documentation, which ships with the interpreter). `run_recipe_study` trains what is
missing (in parallel with `jobs`), evaluates and writes the report (recipes_report.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import format_spec, uniform_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.eval.texts import ood_tokens
from matryoshka_lm.machine import describe_machine
from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split
from matryoshka_lm.train.evaluate import evaluate_specs
from matryoshka_lm.train.plan import run_flops, steps_for_flops, with_steps

from .report import SIZES
from .study import (
    ABLATIONS,
    _point,
    fit_scaling,
    mixnmatch_specs,
    preset_train_config,
    process_pool,
    scale_config,
    train_all,
)

# name -> TrainConfig fields; "all" is today's default and sets the FLOPs budget
RECIPES: dict[str, dict[str, Any]] = {
    "all": {},
    "all+distill": {"distill": 1.0},
    "sandwich": {"sampling": "sandwich", "mixes": 2},
    "sandwich+distill": {"sampling": "sandwich", "mixes": 2, "distill": 1.0},
    "mix": {"sampling": "mix", "mixes": 2},
    "mix+distill": {"sampling": "mix", "mixes": 2, "distill": 1.0},
}


@dataclass
class RecipePreset:
    scales: list[int]
    n_layers: int = 4
    steps: int = 300  # of the "all" recipe; the others run until they have spent its FLOPs
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    vocab_size: int = 1024
    corpus_chars: int = 3_000_000
    eval_batches: int = 16
    mixnmatch: int = 16  # sampled Mix'n'Match specs evaluated per model
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    harness: bool = True  # lm-eval bits per byte and cloze accuracy per size at the largest scale
    harness_limit: int | None = None  # documents per task (None: all)


RECIPE_PRESETS = {
    "recipes-micro": RecipePreset(
        scales=[32, 48],
        steps=4,
        batch_size=4,
        seq_len=32,
        vocab_size=256,
        corpus_chars=60_000,
        eval_batches=2,
        mixnmatch=3,
        recipes=["all", "sandwich", "mix+distill"],
        harness_limit=3,
    ),
    # ~2 hours of this 2-core machine with --jobs 2; both scales are wider than anything in cpu-small (d <= 192)
    "cpu-recipes": RecipePreset(scales=[256, 320]),
}


def plan_recipe_runs(p: RecipePreset, seed: int) -> dict[str, tuple[ModelConfig, TrainConfig]]:
    """name -> (model config, train config): per scale one run per recipe at equal FLOPs, one baseline per size."""
    runs = {}
    for d in p.scales:
        cfg = scale_config(d, p.n_layers, p.vocab_size, p.seq_len, ABLATIONS["all"])
        base = preset_train_config(p, seed)
        budget = run_flops(cfg, base)
        for r in p.recipes:
            if r not in RECIPES:
                raise MatryoshkaError(f"unknown recipe {r!r}; choose from {list(RECIPES)}")
            t = dataclasses.replace(base, **RECIPES[r])
            runs[f"d{d}-recipe-{r}"] = (cfg, with_steps(t, steps_for_flops(cfg, t, budget)))
        for s in SIZES:
            runs[f"d{d}-baseline-{s}"] = (cfg, dataclasses.replace(base, only=s))
    return runs


def evaluate_recipes(
    runs: dict[str, tuple[ModelConfig, TrainConfig]],
    p: RecipePreset,
    work: Path,
    seed: int,
    device: str,
    jobs: int = 1,
) -> dict[str, Any]:
    """Loss in and out of domain per trained size (Matryoshka recipes and baselines), Mix'n'Match specs, and
    agreement/KL with each model's own full size; `jobs` models are evaluated at once (worker processes)."""
    first = next(iter(runs))
    _, _, val = checkpoint_val_split(work / first)
    tok0 = (work / first / ck.TOKENIZER).read_text()
    sets = {"in_domain": val, "out_of_domain": ood_tokens(ck.load_tokenizer(work / first))}
    res: dict[str, Any] = {"recipes": {d: {} for d in p.scales}, "baseline": {d: {} for d in p.scales}}
    res["steps"] = {name: tcfg.steps for name, (_, tcfg) in runs.items()}
    for name in runs:
        if (work / name / ck.TOKENIZER).read_text() != tok0:
            raise MatryoshkaError(f"run {name} has a different tokenizer: the runs are not comparable")
    tasks = [(work, d, r, None, p, seed, device, sets) for d in p.scales for r in p.recipes]
    tasks += [(work, d, None, s, p, seed, device, sets) for d in p.scales for s in SIZES]
    for (d, r, s), out in _map(_evaluate_run, tasks, jobs):
        if r is not None:
            res["recipes"][d][r] = out
        else:
            res["baseline"][d][s] = out
    res["flops"] = {name: run_flops(*_shaped(work / name, tcfg)) for name, (_, tcfg) in runs.items()}
    res["fits"] = flops_fits(res, p)
    if p.harness:
        res["harness"] = harness_scores(runs, p, work, device, jobs)
    return res


def _shaped(path: Path, tcfg: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
    """The run's own model config (a baseline's is its size's dense shape) with its train config."""
    return ck.read_config(path)[0], tcfg


def _map(fn: Callable, tasks: list, jobs: int) -> list:
    """fn over tasks, in order; in `jobs` worker processes (one torch thread each) when jobs > 1."""
    if jobs <= 1:
        return [fn(t) for t in tasks]
    with process_pool(jobs) as pool:
        return list(pool.map(fn, tasks))


def _evaluate_run(task: tuple) -> tuple[tuple, dict[str, Any]]:
    """One model's evaluation: a recipe's sizes and Mix'n'Match specs, or one baseline (agreement and KL against
    its scale's baseline XL), on both domains."""
    work, d, recipe, size, p, seed, device, sets = task
    if recipe is None:
        b = ck.load_model(work / f"d{d}-baseline-{size}", device)
        full = ck.load_model(work / f"d{d}-baseline-XL", device)
        ref = (full, full.full)
        out = {k: _point(b.cfg, b.full, _eval(b, t, {size: b.full}, p, device, ref)[size]) for k, t in sets.items()}
        return (d, None, size), out
    m = ck.load_model(work / f"d{d}-recipe-{recipe}", device)
    specs = {s: uniform_spec(m.cfg, s) for s in SIZES}
    mixes = {format_spec(s): s for s in mixnmatch_specs(m.cfg, p.mixnmatch, seed)}
    out: dict[str, Any] = {"sizes": {}, "mixnmatch": {}}
    for k, tokens in sets.items():
        ev = _eval(m, tokens, {**specs, **mixes}, p, device)
        for s in SIZES:
            out["sizes"].setdefault(s, {})[k] = _point(m.cfg, specs[s], ev[s])
        for text, spec in mixes.items():
            out["mixnmatch"].setdefault(text, {})[k] = _point(m.cfg, spec, ev[text])
    return (d, recipe, None), out


HARNESS = {"matryoshka_ppl": "bits_per_byte,none", "matryoshka_cloze": "acc,none"}  # task -> reported metric


def harness_scores(
    runs, p: RecipePreset, work: Path, device: str, jobs: int = 1
) -> dict[str, dict[str, dict[str, float]]]:
    """lm-evaluation-harness on the packaged held-out tasks (study/harness_tasks: text outside these runs' share
    of the corpus) for every size of every recipe and every baseline, at the largest scale: run name -> size ->
    task -> metric (bits per byte of the perplexity task, accuracy of the cloze task)."""
    names = [n for n in runs if n.startswith(f"d{max(p.scales)}-")]
    scores = _map(_harness_run, [(work / n, p.harness_limit, device) for n in names], jobs)
    return dict(zip(names, scores))


def _harness_run(task: tuple) -> dict[str, dict[str, float]]:
    from matryoshka_lm.eval.harness import run_harness

    path, limit, device = task
    r = run_harness(path, None, list(HARNESS), limit=limit, device=device, bootstrap_iters=0)
    return {s: {t: v["results"][t][m] for t, m in HARNESS.items()} for s, v in r["sizes"].items()}


def _eval(m, tokens, specs, p: RecipePreset, device: str, ref=None) -> dict[str, dict[str, float]]:
    return evaluate_specs(m, tokens, specs, p.seq_len, 8, p.eval_batches, device, ref)


def flops_fits(res: dict[str, Any], p: RecipePreset) -> dict[str, Any]:
    """Per recipe: loss vs forward FLOPs per token over every size and Mix'n'Match spec of every scale, fitted as
    L = a F^-b + c. The seed project's claim ("efficiency improving exponentially ... minor increases in loss") is a
    claim about this curve."""
    fits = {}
    for r in p.recipes:
        pts = []
        for d in p.scales:
            rec = res["recipes"][d][r]
            pts += [(v["in_domain"]["flops_per_token"], v["in_domain"]["val_loss"]) for v in rec["sizes"].values()]
            pts += [(v["in_domain"]["flops_per_token"], v["in_domain"]["val_loss"]) for v in rec["mixnmatch"].values()]
        f, loss = map(np.array, zip(*pts))
        try:
            fits[r] = fit_scaling(f, loss)
        except (RuntimeError, MatryoshkaError) as e:
            fits[r] = {"error": str(e)}
    return fits


def run_recipe_study(
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
    """Train (or reuse) every run of the preset, evaluate and write the report folder; returns the results."""
    from .recipes_report import write_recipe_report

    if preset_name not in RECIPE_PRESETS:
        raise MatryoshkaError(f"unknown recipe-study preset {preset_name!r}; choose from {list(RECIPE_PRESETS)}")
    p = RECIPE_PRESETS[preset_name]
    report, work = Path(report), Path(work) if work else Path("runs") / f"recipes-{preset_name}"
    runs = plan_recipe_runs(p, seed)
    t0 = time.perf_counter()
    seconds = train_all(runs, work, data, device, on_run, jobs=jobs)
    if train_only:
        return {"train_seconds": seconds}
    res = evaluate_recipes(runs, p, work, seed, device, jobs)
    res["meta"] = {
        "preset": preset_name,
        "settings": dataclasses.asdict(p),
        "seed": seed,
        "data": data or "default corpus",
        "tokens_per_baseline_run": p.steps * p.batch_size * p.seq_len,
        "machine": describe_machine(device),
        "jobs": jobs,
        "train_seconds": seconds,
        "train_seconds_total": sum(seconds.values()),
        "wall_seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
        "command": f"matryoshka study --preset {preset_name} -o {report} --seed {seed}"
        + (f" --jobs {jobs}" if jobs > 1 else ""),
    }
    write_recipe_report(res, p, report)
    return res
