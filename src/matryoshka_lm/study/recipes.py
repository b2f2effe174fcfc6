"""The recipe study: which training recipe makes every size and every Mix'n'Match mix good, at equal training FLOPs.

Per scale it trains one Matryoshka model per recipe (presets.RECIPES: what each step trains, all sizes, the sandwich
rule, random mixes; each with and without in-place distillation) and one independent model per size, all on the same
data. The recipes get the same training FLOPs as today's recipe ("all" for `steps` steps; train/plan.py counts them),
the baselines the same tokens. Every model is evaluated on held-out text of the training corpus and on prose from
another domain (eval/texts.py). Run by runner.py; its report is recipes_report.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import format_spec, uniform_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.eval.texts import ood_tokens
from matryoshka_lm.train.plan import run_flops, steps_for_flops, with_steps

from .evaluate import evaluate as ev
from .evaluate import fit_or_error, held_out, mixnmatch_specs, point
from .presets import ABLATIONS, RECIPES, SIZES, RecipePreset, preset_train_config, scale_config
from .recipes_report import write_recipe_report as write_report
from .runs import Runs, map_jobs

WORK_PREFIX = "recipes"  # runs/recipes-PRESET
HARNESS = {"matryoshka_ppl": "bits_per_byte,none", "matryoshka_cloze": "acc,none"}  # task -> reported metric
__all__ = ["WORK_PREFIX", "evaluate", "meta", "plan", "write_report"]


def plan(p: RecipePreset, seed: int) -> Runs:
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


def meta(p: RecipePreset, jobs: int) -> dict[str, Any]:
    return {"tokens_per_baseline_run": p.steps * p.batch_size * p.seq_len, "jobs": jobs}


def evaluate(runs: Runs, p: RecipePreset, work: Path, seed: int, device: str, jobs: int = 1) -> dict[str, Any]:
    """Loss in and out of domain per trained size (Matryoshka recipes and baselines), Mix'n'Match specs, and
    agreement/KL with each model's own full size; `jobs` models are evaluated at once (worker processes)."""
    val, tok = held_out(runs, work)
    sets = {"in_domain": val, "out_of_domain": ood_tokens(tok)}
    res: dict[str, Any] = {"recipes": {d: {} for d in p.scales}, "baseline": {d: {} for d in p.scales}}
    res["steps"] = {name: tcfg.steps for name, (_, tcfg) in runs.items()}
    tasks = [(work, d, r, None, p, seed, device, sets) for d in p.scales for r in p.recipes]
    tasks += [(work, d, None, s, p, seed, device, sets) for d in p.scales for s in SIZES]
    for (d, r, s), out in map_jobs(_evaluate_run, tasks, jobs):
        res["recipes" if r is not None else "baseline"][d][r if r is not None else s] = out
    # a baseline's FLOPs are those of its own shape (its size's dense config)
    res["flops"] = {name: run_flops(ck.read_config(work / name)[0], tcfg) for name, (_, tcfg) in runs.items()}
    res["fits"] = flops_fits(res, p)
    if p.harness:
        res["harness"] = harness_scores(runs, p, work, device, jobs)
    return res


def _evaluate_run(task: tuple) -> tuple[tuple, dict[str, Any]]:
    """One model's evaluation: a recipe's sizes and Mix'n'Match specs, or one baseline (agreement and KL against
    its scale's baseline XL), on both domains."""
    work, d, recipe, size, p, seed, device, sets = task
    if recipe is None:
        b = ck.load_model(work / f"d{d}-baseline-{size}", device)
        full = ck.load_model(work / f"d{d}-baseline-XL", device)
        ref = (full, full.full)
        out = {k: point(b.cfg, b.full, ev(b, t, {size: b.full}, p, device, ref)[size]) for k, t in sets.items()}
        return (d, None, size), out
    m = ck.load_model(work / f"d{d}-recipe-{recipe}", device)
    specs = {s: uniform_spec(m.cfg, s) for s in SIZES}
    mixes = {format_spec(s): s for s in mixnmatch_specs(m.cfg, p.mixnmatch, seed)}
    out: dict[str, Any] = {"sizes": {}, "mixnmatch": {}}
    for k, tokens in sets.items():
        r = ev(m, tokens, {**specs, **mixes}, p, device)
        for s in SIZES:
            out["sizes"].setdefault(s, {})[k] = point(m.cfg, specs[s], r[s])
        for text, spec in mixes.items():
            out["mixnmatch"].setdefault(text, {})[k] = point(m.cfg, spec, r[text])
    return (d, recipe, None), out


def harness_scores(runs: Runs, p: RecipePreset, work: Path, device: str, jobs: int = 1) -> dict[str, Any]:
    """lm-evaluation-harness on the packaged held-out tasks (eval/harness_tasks: text outside these runs' share
    of the corpus) for every size of every recipe and every baseline, at the largest scale: run name -> size ->
    task -> metric (bits per byte of the perplexity task, accuracy of the cloze task)."""
    names = [n for n in runs if n.startswith(f"d{max(p.scales)}-")]
    scores = map_jobs(_harness_run, [(work / n, p.harness_limit, device) for n in names], jobs)
    return dict(zip(names, scores))


def _harness_run(task: tuple) -> dict[str, dict[str, float]]:
    from matryoshka_lm.eval.harness import run_harness

    path, limit, device = task
    r = run_harness(path, None, list(HARNESS), limit=limit, device=device, bootstrap_iters=0)
    return {s: {t: v["results"][t][m] for t, m in HARNESS.items()} for s, v in r["sizes"].items()}


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
        fits[r] = fit_or_error(*zip(*pts))
    return fits
