"""Mix'n'Match: search per-layer granularities for the best submodel under a params / FLOPs / latency budget.

MatFormer (Devvrit et al., 2023, sec. 4.1) finds that Mix'n'Match submodels whose granularity grows
monotonically with depth and changes little between adjacent layers lie on the accuracy-vs-compute frontier.
We use that to prune: candidates are level sequences (levels = the trained sizes' per-layer granularities,
smallest first) that never decrease with depth and step by at most one level between neighbouring layers,
at every trained residual width and depth. Costs come from formulas (spec.count_params / flops_per_token)
for all of them; only a few are evaluated on a validation subset:
  - a spread over the whole cost range (one per cost bin, the smoothest: fewest level changes), for the frontier;
  - the candidates just under the budget (the top cost band that fits), smoothest first;
  - the trained uniform sizes (drawn differently in the plot).
Latency is measured (best of a few forwards of one sequence on this machine); to rank candidates before
timing them, it is predicted from FLOPs by a line fitted to the spread's measurements.
With bit widths (Matryoshka Quantization, core/quant.py) every candidate is also tried at each width: the search
is over size x bits, and a memory budget (bytes of weights, quant.weight_bytes) searches fp32, int8, int4 and
int2 by default.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core import quant
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.nested import kv_heads
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
from matryoshka_lm.plots import figure
from matryoshka_lm.train.evaluate import human

log = logging.getLogger(__name__)

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
    return 3 * layer.ffn + 2 * layer.heads * cfg.head_dim + 2 * kv_heads(layer.heads, cfg.group_size) * cfg.head_dim


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


@torch.no_grad()
def measure_latency(
    model: MatryoshkaLM, spec: SubmodelSpec, tokens: int = 128, repeats: int = 3, device: str | torch.device = "cpu"
) -> float:
    """Seconds for one forward over one sequence of `tokens` (best of `repeats`, after a warm-up)."""
    model.eval()
    x = torch.randint(0, model.cfg.vocab_size, (1, min(tokens, model.cfg.max_seq_len)), device=device)
    model(x, spec)
    best = math.inf
    for _ in range(repeats):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x, spec)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


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


def mixnmatch_search(
    model: MatryoshkaLM,
    val: np.ndarray,
    budget: Budget,
    seq_len: int,
    n_batches: int = 4,
    batch: int = 8,
    max_evals: int = 24,
    latency_tokens: int = 128,
    device: str | torch.device = "cpu",
    bits: tuple[int | None, ...] | None = None,
) -> tuple[list[Candidate], Candidate]:
    """Search; returns (every evaluated candidate, the best one that fits the budget). `bits`: the widths to
    try every candidate at (None in it = the loaded weights); default: MEMORY_BITS (those the weights allow) for
    a memory budget, else the loaded weights only.

    Raises MatryoshkaError when no submodel fits, naming the smallest possible cost.
    """
    from matryoshka_lm.train.evaluate import evaluate_specs

    cfg = model.cfg
    cands = enumerate_candidates(cfg, bits=search_bits(model, budget, bits), qcfg=model.quant)
    metric = budget.metric
    if metric == "latency":
        _predict_latency(model, cands, max(4, max_evals // 4), latency_tokens, device)
    check_fits(model, budget, cands, latency_tokens, device)
    picked = select(cands, metric, budget.value, n_spread=max(2, max_evals // 2), n_near=max(1, max_evals // 2))
    picked += [c for c in _uniform(cfg, cands) if all(c is not p for p in picked)]
    for c in picked:
        c.text = spec_text(cfg, c)
        c.kind = "uniform" if c.text.partition("@int")[0] in cfg.sizes else "mix'n'match"  # at any width
        if metric == "latency" and c.latency is None:
            _measure(model, c, latency_tokens, device)
    log.info("evaluating %d of %d candidates", len(picked), len(cands))
    res = evaluate_specs(
        model, val, {c.text: c.spec for c in picked}, seq_len, batch=batch, n_batches=n_batches, device=device
    )
    for c in picked:
        c.val_loss = res[c.text]["loss"]
    fits = [c for c in picked if c.cost(metric) <= budget.value]
    if not fits:
        raise MatryoshkaError(
            f"no submodel fits {budget}: the smallest measured is "
            f"{_cost_str(min(picked, key=lambda c: c.cost(metric)), metric)}"
        )
    return sorted(picked, key=lambda c: c.cost(metric)), min(fits, key=lambda c: c.val_loss)


def check_fits(
    model: MatryoshkaLM,
    budget: Budget,
    cands: list[Candidate] | None = None,
    latency_tokens: int = 128,
    device: str | torch.device = "cpu",
) -> None:
    """Raise a clear error when even the smallest submodel (timed, for latency) exceeds the budget."""
    cands = cands or enumerate_candidates(model.cfg, bits=search_bits(model, budget, None), qcfg=model.quant)
    metric = budget.metric
    cheapest = min(cands, key=lambda c: (c.flops, c.params) if metric == "latency" else c.cost(metric))
    if metric == "latency":
        _measure(model, cheapest, latency_tokens, device)
    if cheapest.cost(metric) > budget.value:
        raise MatryoshkaError(
            f"no submodel fits {budget}: the smallest is {spec_text(model.cfg, cheapest)} at "
            f"{_cost_str(cheapest, metric)}"
        )


def search_bits(model: MatryoshkaLM, budget: Budget, bits: tuple[int | None, ...] | None) -> tuple[int | None, ...]:
    """The widths to search: those given (checked against the weights), else MEMORY_BITS for a memory budget
    (the widths a quantized checkpoint's codes hold; its own width as None), else the loaded weights only."""
    if bits is not None:
        for b in bits:
            model.check_bits(b)
        return tuple(bits)
    if budget.metric != "memory":
        return (None,)
    if model.codes is None:
        return MEMORY_BITS
    return (None,) + tuple(b for b in MEMORY_BITS if b is not None and b < model.code_bits)


def _uniform(cfg: ModelConfig, cands: list[Candidate]) -> list[Candidate]:
    """The candidates that are trained uniform sizes."""
    wanted = {(s.width, s.layers) for s in (parse_spec(cfg, n) for n in cfg.sizes)}
    return [c for c in cands if (c.spec.width, c.spec.layers) in wanted]


def _measure(model: MatryoshkaLM, c: Candidate, tokens: int, device) -> float:
    if c.latency is None:
        c.latency = measure_latency(model, c.spec, tokens, device=device)
    return c.latency


def _predict_latency(model: MatryoshkaLM, cands: list[Candidate], n: int, tokens: int, device) -> None:
    """Time a spread of candidates, fit latency = a + b * FLOPs, predict the rest (timed ones keep their time)."""
    probe = select(cands, "flops", math.inf, n_spread=n, n_near=0)
    xs = np.array([c.flops for c in probe], dtype=np.float64)
    ys = np.array([_measure(model, c, tokens, device) for c in probe])
    b, a = np.polyfit(xs, ys, 1) if len(set(xs)) > 1 else (0.0, float(ys.mean()))
    for c in cands:
        c.predicted_latency = c.latency if c.latency is not None else a + b * c.flops


def _cost_str(c: Candidate, metric: str) -> str:
    if metric == "latency":
        return f"{c.latency * 1e3:.2f} ms here"
    if metric == "memory":
        return f"{c.memory / 1e6:.3g} MB of weights"
    return f"{human(c.cost(metric))} {'params' if metric == 'params' else 'FLOPs/token'}"


def format_frontier(points: list[Candidate], best: Candidate, budget: Budget) -> str:
    """Markdown table of every evaluated candidate, cheapest first; '*' marks the Pareto frontier."""
    front = {id(c) for c in pareto_front(points, budget.metric)}
    lat = any(c.latency is not None for c in points)
    head = (
        "| spec | kind | params | FLOPs/token | MB |"
        + (" latency ms |" if lat else "")
        + " val loss | frontier | fits |"
    )
    lines = [head, "|---|---|---:|---:|---:|" + ("---:|" if lat else "") + "---:|:-:|:-:|"]
    for c in points:
        name = f"**{c.text}**" if c is best else c.text
        row = f"| {name} | {c.kind} | {human(c.params)} | {human(c.flops)} | {c.memory / 1e6:.3g} |"
        if lat:
            row += f" {c.latency * 1e3:.2f} |" if c.latency is not None else " |"
        fits = c.cost(budget.metric) <= budget.value
        row += f" {c.val_loss:.3f} | {'*' if id(c) in front else ''} | {'yes' if fits else ''} |"
        lines.append(row)
    return "\n".join(lines)


def plot_frontier(points: list[Candidate], best: Candidate, budget: Budget, path: Path, title: str) -> None:
    """Cost (the budget's metric) vs val loss: Mix'n'Match dots, trained sizes squares, frontier line, budget."""
    metric = budget.metric
    scale, label = {
        "params": (1, "parameters"),
        "flops": (1, "forward FLOPs / token"),
        "latency": (1e3, "latency (ms, one forward, this machine)"),
        "memory": (1e-6, "bytes of weights (MB)"),
    }[metric]
    mm = [c for c in points if c.kind != "uniform"]
    uni = [c for c in points if c.kind == "uniform"]
    front = pareto_front(points, metric)
    with figure(path, (7, 4.5), legend=dict(fontsize=8)) as (fig, ax):
        ax.scatter([c.cost(metric) * scale for c in mm], [c.val_loss for c in mm], s=18, alpha=0.6, label="Mix'n'Match")
        ax.scatter(
            [c.cost(metric) * scale for c in uni],
            [c.val_loss for c in uni],
            marker="s",
            s=60,
            color="C3",
            label="trained sizes",
            zorder=3,
        )
        for c in uni:
            ax.annotate(c.text, (c.cost(metric) * scale, c.val_loss), textcoords="offset points", xytext=(5, 4))
        ax.plot(
            [c.cost(metric) * scale for c in front],
            [c.val_loss for c in front],
            "-",
            color="gray",
            lw=1,
            label="Pareto frontier",
        )
        ax.axvline(budget.value * scale, color="C2", ls="--", lw=1, label=f"budget {budget}")
        ax.scatter(
            [best.cost(metric) * scale],
            [best.val_loss],
            marker="*",
            s=220,
            color="C2",
            zorder=4,
            label=f"best: {best.text}"[:60],
        )
        if metric != "latency":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(title)


def run_mixnmatch(
    ckpt: str | Path,
    budget: str,
    n_batches: int = 4,
    max_evals: int = 24,
    plot_path: str | Path | None = None,
    json_path: str | Path | None = None,
    latency_tokens: int = 128,
    device: str = "cpu",
    bits: tuple[int | None, ...] | None = None,
) -> tuple[Candidate, str]:
    """`matryoshka mixnmatch`: search the checkpoint, write the PNG and JSON, return (best, Markdown table).
    `bits`: widths to search besides the loaded weights' (see mixnmatch_search)."""
    from matryoshka_lm.core import checkpoint as ck
    from matryoshka_lm.core.checkpoint import write_json
    from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split

    ckpt = Path(ckpt)
    b = parse_budget(budget)  # bad input fails before anything is loaded
    model = ck.load_model(ckpt, device)
    bits = search_bits(model, b, bits)
    cands = enumerate_candidates(model.cfg, bits=bits, qcfg=model.quant)
    check_fits(model, b, cands, latency_tokens=latency_tokens, device=device)  # before the corpus is tokenized
    tcfg, _, val = checkpoint_val_split(ckpt)
    seq_len = min(tcfg.seq_len, model.cfg.max_seq_len)
    points, best = mixnmatch_search(
        model,
        val,
        b,
        seq_len,
        n_batches=n_batches,
        max_evals=max_evals,
        latency_tokens=latency_tokens,
        device=device,
        bits=bits,
    )
    plot_frontier(points, best, b, Path(plot_path or ckpt / "mixnmatch.png"), f"{ckpt.name}: Mix'n'Match, {b}")
    front = {id(c) for c in pareto_front(points, b.metric)}
    rows = [
        {
            "spec": c.text,
            "canonical": format_spec(c.spec),
            "kind": c.kind,
            "params": c.params,
            "flops_per_token": c.flops,
            "latency_ms": None if c.latency is None else c.latency * 1e3,
            "bits": c.spec.bits,
            "weight_bytes": c.memory,
            "val_loss": c.val_loss,
            "pareto": id(c) in front,
        }
        for c in points
    ]
    write_json(
        Path(json_path or ckpt / "mixnmatch.json"),
        {
            "budget": str(b),
            "best": best.text,
            "best_canonical": format_spec(best.spec),
            "points": rows,
            "val_windows": n_batches * 8,
            "seq_len": seq_len,
        },
    )
    return best, format_frontier(points, best, b)
