"""Mix'n'Match search: the best submodel under a params / FLOPs / latency / memory budget (`matryoshka mixnmatch`).

The pruned candidates and the ones picked for evaluation come from candidates.py (MatFormer's monotone mixes).
Latency is measured (best of a few forwards of one sequence on this machine); to rank candidates before
timing them, it is predicted from FLOPs by a line fitted to the spread's measurements.
With bit widths (Matryoshka Quantization, core/quant.py) every candidate is also tried at each width: the search
is over size x bits, and a memory budget (bytes of weights, quant.weight_bytes) searches fp32, int8, int4 and
int2 by default.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core import precision
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, parse_spec
from matryoshka_lm.errors import MatryoshkaError

from .candidates import (
    MEMORY_BITS,
    Budget,
    Candidate,
    cost_text,
    enumerate_candidates,
    parse_budget,
    select,
    spec_text,
)
from .frontier import format_frontier, frontier_json, plot_frontier

log = logging.getLogger(__name__)


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
    cands = enumerate_candidates(cfg, bits=search_bits(model, budget, bits), qcfg=model.precision.quant)
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
            f"{cost_text(min(picked, key=lambda c: c.cost(metric)), metric)}"
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
    cands = cands or enumerate_candidates(model.cfg, bits=search_bits(model, budget, None), qcfg=model.precision.quant)
    metric = budget.metric
    cheapest = min(cands, key=lambda c: (c.flops, c.params) if metric == "latency" else c.cost(metric))
    if metric == "latency":
        _measure(model, cheapest, latency_tokens, device)
    if cheapest.cost(metric) > budget.value:
        raise MatryoshkaError(
            f"no submodel fits {budget}: the smallest is {spec_text(model.cfg, cheapest)} at "
            f"{cost_text(cheapest, metric)}"
        )


def search_bits(model: MatryoshkaLM, budget: Budget, bits: tuple[int | None, ...] | None) -> tuple[int | None, ...]:
    """The widths to search: those given (checked against the weights), else MEMORY_BITS for a memory budget
    (the widths a quantized checkpoint's codes hold; its own width as None), else the loaded weights only."""
    if bits is not None:
        for b in bits:
            precision.check_bits(model, b)
        return tuple(bits)
    if budget.metric != "memory":
        return (None,)
    if not model.precision.has_codes:
        return MEMORY_BITS
    return (None,) + tuple(b for b in MEMORY_BITS if b is not None and b < model.precision.code_bits)


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
    cands = enumerate_candidates(model.cfg, bits=bits, qcfg=model.precision.quant)
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
    out = {**frontier_json(points, best, b), "val_windows": n_batches * 8, "seq_len": seq_len}
    write_json(Path(json_path or ckpt / "mixnmatch.json"), out)
    return best, format_frontier(points, best, b)
