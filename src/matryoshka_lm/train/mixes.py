"""Which submodels a training step trains (TrainConfig.sampling):

  all        every trained size (MatFormer's recipe; the default)
  sandwich   the full size and the smallest, plus `mixes` random Mix'n'Match specs (the sandwich rule of
             slimmable networks, Yu & Huang 2019, with mixes where they draw random widths)
  mix        `mixes` random Mix'n'Match specs only

A random spec draws a depth among the trained sizes' depths, then each layer's granularity (FFN units and heads)
from a trained size, and the residual width of a trained size: the per-layer mixes Mix'n'Match search picks from,
trained directly instead of only through the uniform sizes. Draws are seeded by (seed, step): every rank, and a
resumed run, trains the same specs.
"""

from __future__ import annotations

import random

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.core.spec import SubmodelSpec, parse_spec, size_extent


def random_spec(cfg: ModelConfig, names: list[str], rng: random.Random) -> SubmodelSpec:
    """A random Mix'n'Match spec over the trained sizes `names` (see the module doc)."""
    depth = rng.choice(sorted({size_extent(cfg, n)[1] for n in names}))
    layers = ",".join(rng.choice(names) for _ in range(depth))
    return parse_spec(cfg, f"{layers}@{rng.choice(names)}")


def step_specs(
    cfg: ModelConfig,
    tcfg: TrainConfig,
    names: list[str],
    specs: dict[str, SubmodelSpec],
    step: int,
) -> tuple[list[str], list[SubmodelSpec], list[float]]:
    """(labels, specs, loss weights) of the submodels step `step` trains under sampling "sandwich" or "mix" ("all":
    loop.step_sizes); names are the trained sizes, largest first. Under "mix" with distillation the full size
    leads with weight 0: the teacher, not trained."""
    if tcfg.sampling not in ("sandwich", "mix"):
        raise ValueError(f"step_specs samples for 'sandwich' or 'mix', not {tcfg.sampling!r}")
    rng = random.Random(tcfg.seed * 104729 + step)
    mixes = [random_spec(cfg, names, rng) for _ in range(tcfg.mixes)]
    labels = [f"mix{i}" for i in range(len(mixes))]
    if tcfg.sampling == "sandwich":
        return [names[0], names[-1], *labels], [specs[names[0]], specs[names[-1]], *mixes], [1.0] * (2 + len(mixes))
    if tcfg.distill > 0:
        return [names[0], *labels], [specs[names[0]], *mixes], [0.0] + [1.0] * len(mixes)
    return labels, mixes, [1.0] * len(mixes)
