"""Mix'n'Match candidates: budgets, the pruned space of per-layer granularities, and the selection to evaluate.

MatFormer (Devvrit et al., 2023, sec. 4.1) finds that Mix'n'Match submodels whose granularity grows
monotonically with depth and changes little between adjacent layers lie on the accuracy-vs-compute frontier.
We use that to prune: candidates are level sequences (levels = the trained sizes' per-layer granularities,
smallest first) that never decrease with depth and step by at most one level between neighbouring layers,
at every trained residual width and depth. Costs come from formulas (spec.count_params / flops_per_token)
for all of them; only a few are evaluated on a validation subset:
  - a spread over the whole cost range (one per cost bin, the smoothest: fewest level changes), for the frontier;
  - the candidates just under the budget (the top cost band that fits), smoothest first;
  - the trained uniform sizes (drawn differently in the plot).
The search that evaluates them is search.py; bit widths (core/quant.py) multiply the space by each width.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core import quant
from matryoshka_lm.core.nested import layer_shapes
from matryoshka_lm.core.spec import (
    LayerSpec,
    SubmodelSpec,
    count_params,
    flops_per_token,
    format_spec,
    parse_spec,
    size_names,
)
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.train.evaluate import human

METRICS = ("params", "flops", "latency", "memory")
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}
_BYTES = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9}
MEMORY_BITS = (None, 8, 4, 2)  # the widths a memory budget searches by default (None = fp32)
_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class Budget:
    metric: str  # params (total) | flops (forward FLOPs per token) | latency (seconds per forward) | memory (bytes)
    value: float

    def __str__(self) -> str:
        if self.metric == "latency":
            return f"latency={self.value * 1e3:g}ms"
        if self.metric == "memory":
            return f"memory={self.value / 1e6:g}MB"
        return f"{self.metric}={human(self.value)}"


def parse_budget(text: str) -> Budget:
    """'params=5M', 'flops=1.5G', 'latency=3ms', 'memory=1.5MB' (units: K M G/B T for counts; us ms s for time;
    B KB MB GB for bytes of weights)."""
    m = re.fullmatch(r"\s*([a-z]+)\s*=\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z]*)\s*", (text or "").lower())
    if not m or m.group(1) not in METRICS:
        raise MatryoshkaError(f"bad budget {text!r}: use params=5M, flops=1.5G, latency=3ms or memory=1.5MB")
    metric, number, unit = m.group(1), float(m.group(2)), m.group(3)
    if metric == "memory":
        if unit not in _BYTES:
            raise MatryoshkaError(f"bad memory budget {text!r}: unit {unit!r} is not one of B, KB, MB, GB")
        value = number * _BYTES[unit]
    elif metric == "latency":
        if unit not in _TIME:
            raise MatryoshkaError(f"bad latency budget {text!r}: give a unit, e.g. latency=3ms (us, ms, s)")
        value = number * _TIME[unit]
    else:
        if unit not in _SCALE:
            raise MatryoshkaError(f"bad {metric} budget {text!r}: unit {unit!r} is not one of K, M, G, T")
        value = number * _SCALE[unit]
    if value <= 0:
        raise MatryoshkaError(f"budget {text!r} must be positive")
    return Budget(metric, value)


@dataclass
class Candidate:
    spec: SubmodelSpec
    levels: tuple[int, ...]  # granularity level per layer (0 = smallest)
    width_name: str  # the trained size whose residual width this uses
    level_names: tuple[str, ...]  # the size whose granularity each level is, smallest first
    params: int
    flops: int
    latency: float | None = None  # seconds, measured
    predicted_latency: float | None = None  # seconds, from FLOPs (latency budgets only)
    val_loss: float | None = None
    text: str = ""
    kind: str = "mix'n'match"  # or "uniform" for a trained size
    memory: int = 0  # bytes of weights at spec.bits (quant.weight_bytes)

    @property
    def changes(self) -> int:
        return sum(a != b for a, b in zip(self.levels, self.levels[1:]))

    def cost(self, metric: str) -> float:
        return {"params": self.params, "flops": self.flops, "latency": self.latency, "memory": self.memory}[metric]


def granularity_levels(cfg: ModelConfig) -> tuple[list[str], list[tuple[LayerSpec, ...]]]:
    """The trained sizes with distinct per-layer granularities, smallest first, and each one's layers at
    every depth (a size's granularity may be used at any layer, even below its own depth)."""
    names, tables = [], []
    for name in reversed(size_names(cfg)):
        layers = parse_spec(cfg, ",".join([name] * cfg.n_layers)).layers
        if layers not in tables:
            names.append(name)
            tables.append(layers)
    order = sorted(range(len(names)), key=lambda i: _layer_cost(cfg, tables[i][0]))
    return [names[i] for i in order], [tables[i] for i in order]


def _layer_cost(cfg: ModelConfig, layer: LayerSpec) -> int:
    """A layer's weights per unit of residual width (nested.layer_shapes at width 1): what orders granularities."""
    return sum(r * c for r, c in layer_shapes(cfg, layer, 1).values())


def monotone_sequences(depth: int, n_levels: int):
    """Level sequences of length `depth`, non-decreasing, stepping by at most one level between layers."""

    def grow(seq: list[int]):
        if len(seq) == depth:
            yield tuple(seq)
            return
        for nxt in (seq[-1], seq[-1] + 1):
            if nxt < n_levels:
                yield from grow(seq + [nxt])

    for start in range(n_levels):
        yield from grow([start])


def enumerate_candidates(
    cfg: ModelConfig,
    limit: int = 200_000,
    bits: tuple[int | None, ...] = (None,),
    qcfg: quant.QuantConfig | None = None,
) -> list[Candidate]:
    """Every pruned candidate at every trained (width, depth) and each of `bits` (None = the loaded weights),
    with params, FLOPs and bytes of weights from the formulas."""
    qcfg = qcfg or quant.QuantConfig()
    names, tables = granularity_levels(cfg)
    widths: dict[int, str] = {}
    for name in size_names(cfg):  # largest first: a width is named after the largest size that has it
        widths.setdefault(parse_spec(cfg, name).width, name)
    depths = sorted({parse_spec(cfg, n).depth for n in cfg.sizes})
    out = []
    for width, wname in widths.items():
        for depth in depths:
            for levels, b in itertools.product(monotone_sequences(depth, len(names)), bits):
                spec = SubmodelSpec(width=width, layers=tuple(tables[l][i] for i, l in enumerate(levels)), bits=b)
                c = Candidate(
                    spec, levels, wname, tuple(names), count_params(cfg, spec)["total"], flops_per_token(cfg, spec)
                )
                c.memory = quant.weight_bytes(cfg, spec, b, qcfg)
                out.append(c)
                if len(out) > limit:
                    raise MatryoshkaError(f"more than {limit} Mix'n'Match candidates; train fewer sizes")
    return out


def spec_text(cfg: ModelConfig, c: Candidate) -> str:
    """The spec in the name form ('S,S,M,M@M', 'M@int4'), which parse_spec reads back to the same spec."""
    body = ",".join(c.level_names[l] for l in c.levels)
    bits = "" if c.spec.bits is None else f"@int{c.spec.bits}"
    for text in (body, f"{body}@{c.width_name}"):
        spec = parse_spec(cfg, text)
        if (spec.width, spec.layers) == (c.spec.width, c.spec.layers):
            return (spec.name or text) + bits
    return format_spec(c.spec)


def select(
    cands: list[Candidate], metric: str, budget: float, n_spread: int, n_near: int, band: float = 0.15
) -> list[Candidate]:
    """A spread over the cost range (smoothest per bin) plus the smoothest candidates just under the budget."""
    key = "flops" if metric == "latency" else metric
    costs = np.array([c.cost(key) for c in cands], dtype=np.float64)
    lo, hi = np.log(costs.min()), np.log(costs.max())
    bins = np.minimum(((np.log(costs) - lo) / max(hi - lo, 1e-12) * n_spread).astype(int), n_spread - 1)
    chosen: dict[int, Candidate] = {}
    for b in range(n_spread):
        members = [c for c, k in zip(cands, bins) if k == b]
        if members:
            best = min(members, key=lambda c: (c.changes, -c.cost(key)))
            chosen[id(best)] = best
    fits = [c for c in cands if _predicted(c, metric) <= budget]
    if fits:
        top = max(_predicted(c, metric) for c in fits)
        near = sorted(
            (c for c in fits if _predicted(c, metric) >= top * (1 - band)),
            key=lambda c: (c.changes, -_predicted(c, metric)),
        )
        for c in near[:n_near]:
            chosen[id(c)] = c
    return list(chosen.values())


def _predicted(c: Candidate, metric: str) -> float:
    return c.predicted_latency if metric == "latency" else c.cost(metric)


def pareto_front(points: list[Candidate], metric: str) -> list[Candidate]:
    """Points no other point beats on both cost and loss, cheapest first."""
    front, best = [], math.inf
    for c in sorted(points, key=lambda c: (c.cost(metric), c.val_loss)):
        if c.val_loss < best:
            front.append(c)
            best = c.val_loss
    return front


def cost_text(c: Candidate, metric: str) -> str:
    if metric == "latency":
        return f"{c.latency * 1e3:.2f} ms here"
    if metric == "memory":
        return f"{c.memory / 1e6:.3g} MB of weights"
    return f"{human(c.cost(metric))} {'params' if metric == 'params' else 'FLOPs/token'}"
