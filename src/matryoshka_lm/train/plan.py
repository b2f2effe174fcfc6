"""Which submodels each training step trains, and what that costs in FLOPs.

`size_plan` names the trained sizes (or size x bits cells); `step_submodels` picks the ones step `step` trains
under the run's sampling (all, a seeded subset, or Mix'n'Match draws: mixes.py); `run_flops` adds up a run's
training FLOPs from the same picks, so recipes can be compared at equal compute (`steps_for_flops`).
"""

from __future__ import annotations

import dataclasses
import random

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.core import quant
from matryoshka_lm.core.spec import SubmodelSpec, flops_per_token, size_names, uniform_spec
from matryoshka_lm.errors import MatryoshkaError

from .mixes import step_specs as mix_specs

BACKWARD = 2  # a trained submodel costs its forward plus a backward of about twice that; a teacher, one forward


def trained_sizes(cfg: ModelConfig, tcfg: TrainConfig) -> list[str]:
    names = size_names(cfg)
    if tcfg.sizes:
        unknown = [s for s in tcfg.sizes if s not in cfg.sizes]
        if unknown:
            raise MatryoshkaError(f"unknown sizes {unknown}; the model config has {list(cfg.sizes)}")
        names = [n for n in names if n in tcfg.sizes]
    return names


def size_plan(model_cfg: ModelConfig, tcfg: TrainConfig) -> tuple[list[str], list[float], dict[str, SubmodelSpec]]:
    """The trained sizes, largest first, with their loss weights and specs; with bits, every (size, bits) cell
    ("M@int4"), the widest bits first, weighted by size weight x bit weight."""
    names = trained_sizes(model_cfg, tcfg) if not tcfg.only else ["XL"]
    weights = tcfg.size_weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise MatryoshkaError(f"{len(weights)} size weights for {len(names)} sizes {names}")
    specs = {n: uniform_spec(model_cfg, n) for n in names}
    if not tcfg.bits:
        return names, weights, specs
    quant.check_groups(model_cfg, quant.QuantConfig(tcfg.quant_group))
    bits = sorted(zip(tcfg.bits, tcfg.bit_weights or [1.0] * len(tcfg.bits)), key=lambda bw: -bw[0])
    cells = {str(specs[n].at_bits(b)): (specs[n].at_bits(b), w * bw) for b, bw in bits for n, w in zip(names, weights)}
    return list(cells), [w for _, w in cells.values()], {c: spec for c, (spec, _) in cells.items()}


def step_sizes(names: list[str], weights: list[float], tcfg: TrainConfig, step: int) -> tuple[list[str], list[float]]:
    """The sizes (cells, with bits) trained at `step`: all, or the first (the largest, at the widest bits) plus a
    seeded random subset (same on every rank)."""
    k = tcfg.sample_cells if tcfg.bits else tcfg.sample_sizes
    if k <= 0 or k >= len(names):
        return names, weights
    rng = random.Random(tcfg.seed * 7919 + step)
    rest = sorted(rng.sample(range(1, len(names)), k - 1))
    idx = [0] + rest
    return [names[i] for i in idx], [weights[i] for i in idx]


def step_submodels(
    cfg: ModelConfig,
    tcfg: TrainConfig,
    plan: tuple[list[str], list[float], dict[str, SubmodelSpec]],
    step: int,
) -> tuple[list[str], list[SubmodelSpec], list[float]]:
    """(labels, specs, loss weights) that step `step` trains; weight 0 marks a distillation teacher only."""
    names, weights, specs = plan
    if tcfg.sampling == "all":
        picked, w = step_sizes(names, weights, tcfg, step)
        return picked, [specs[n] for n in picked], w
    return mix_specs(cfg, tcfg, names, specs, step)


def step_flops(cfg: ModelConfig, tcfg: TrainConfig, plan, step: int) -> float:
    """Training FLOPs of one step: forward + backward of each trained submodel, a forward of a teacher."""
    _, specs, weights = step_submodels(cfg, tcfg, plan, step)
    tokens = tcfg.batch_size * tcfg.seq_len
    passes = [1 + (BACKWARD if w > 0 else 0) for w in weights]
    per_token = sum(flops_per_token(cfg, s, tcfg.seq_len) * k for s, k in zip(specs, passes))
    return float(tokens * per_token)


def run_flops(cfg: ModelConfig, tcfg: TrainConfig, steps: int | None = None) -> float:
    """Training FLOPs of the run's first `steps` steps (default: all of them), from the same seeded picks."""
    plan = size_plan(cfg, tcfg)
    return sum(step_flops(cfg, tcfg, plan, s) for s in range(tcfg.steps if steps is None else steps))


def steps_for_flops(cfg: ModelConfig, tcfg: TrainConfig, budget: float) -> int:
    """The number of steps whose training FLOPs first reach `budget` (equal-compute comparisons of recipes)."""
    plan = size_plan(cfg, tcfg)
    total, step = 0.0, 0
    while total < budget:
        total += step_flops(cfg, tcfg, plan, step)
        step += 1
        if step > 10_000_000:
            raise MatryoshkaError("a FLOPs budget this large needs more than 10M steps")
    return max(1, step)


def with_steps(tcfg: TrainConfig, steps: int) -> TrainConfig:
    """The same recipe run for `steps` steps, with warmup, eval and checkpoint cadences scaled to match."""
    return dataclasses.replace(tcfg, steps=steps, warmup_steps=max(1, steps // 10), eval_every=steps, save_every=steps)
