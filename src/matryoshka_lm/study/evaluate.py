"""The one evaluator of the studies: every run's sizes (and Mix'n'Match specs) on the same held-out windows, the
measured point of each spec, the scaling fit, and the line that judges a Mix'n'Match spec."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, count_params, flops_per_token, parse_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split
from matryoshka_lm.train.evaluate import evaluate_specs

from .presets import SIZES, Preset

BAR = 0.04  # MatFormer's bar: each Matryoshka size within 0.04 nats of its independently trained baseline
EVAL_BATCH = 8  # sequences per evaluation batch


def held_out(runs: dict[str, Any], work: Path) -> tuple[np.ndarray, Any]:
    """The held-out tokens every run is evaluated on (the first run's validation split) and its tokenizer;
    refuses runs whose tokenizers differ (their losses would not be comparable)."""
    first = next(iter(runs))
    _, _, val = checkpoint_val_split(work / first)
    tok0 = (work / first / ck.TOKENIZER).read_text()
    for name in runs:
        if (work / name / ck.TOKENIZER).read_text() != tok0:
            raise MatryoshkaError(f"run {name} has a different tokenizer: the runs are not comparable")
    return val, ck.load_tokenizer(work / first)


def evaluate(
    model: MatryoshkaLM,
    tokens: np.ndarray,
    specs: dict[str, SubmodelSpec],
    p: Preset,
    device: str,
    reference: tuple[MatryoshkaLM, SubmodelSpec] | None = None,
) -> dict[str, dict[str, float]]:
    """Loss, top-1 agreement and KL (against `reference`, default the model's full size) per spec, on the same
    `p.eval_batches` windows of `tokens` for every model of the study."""
    return evaluate_specs(model, tokens, specs, p.seq_len, EVAL_BATCH, p.eval_batches, device, reference)


def point(cfg: ModelConfig, spec: SubmodelSpec, r: dict[str, float]) -> dict[str, float]:
    """A spec's measured point: its parameters and FLOPs per token with its loss, agreement and KL."""
    c = count_params(cfg, spec)
    return {
        "non_embedding_params": c["non_embedding"],
        "params": c["total"],
        "flops_per_token": flops_per_token(cfg, spec),
        "val_loss": r["loss"],
        "agree": r["agree"],
        "kl": r["kl"],
    }


def mixnmatch_specs(cfg: ModelConfig, n: int, seed: int) -> list[SubmodelSpec]:
    """Per-layer mixes of the trained granularities, non-decreasing with depth (MatFormer's best family)."""
    rng = random.Random(seed)
    order = SIZES[::-1]  # S < M < L < XL
    seen, out = set(), []
    for _ in range(50 * n):
        picks = sorted(rng.choices(range(len(order)), k=cfg.n_layers))
        if len(set(picks)) < 2:
            continue
        text = ",".join(order[i] for i in picks)
        if text not in seen:
            seen.add(text)
            out.append(parse_spec(cfg, text))
        if len(out) == n:
            break
    return out


def fit_scaling(n: np.ndarray, loss: np.ndarray) -> dict[str, float]:
    """Least-squares fit of L(N) = a * N^(-b) + c with 1-sigma uncertainties from the covariance (scipy)."""
    from scipy.optimize import curve_fit

    n, loss = np.asarray(n, float), np.asarray(loss, float)
    if len(n) < 4:
        raise MatryoshkaError(f"need at least 4 points to fit 3 constants, got {len(n)}")
    scale = float(n.min())

    def f(x, a, b, c):  # N scaled by its minimum keeps a in a sane range
        return a * (x / scale) ** (-b) + c

    p0 = (max(1e-3, float(loss.max() - loss.min())), 0.5, float(loss.min()) * 0.9)
    popt, pcov = curve_fit(f, n, loss, p0=p0, bounds=([0, 0, 0], [np.inf, 5, np.inf]), maxfev=20000)
    err = np.sqrt(np.clip(np.diag(pcov), 0, None))
    a = popt[0] * scale ** popt[1]  # back to L = a N^-b + c
    a_err = err[0] * scale ** popt[1]
    resid = loss - f(n, *popt)
    return {
        "a": float(a),
        "b": float(popt[1]),
        "c": float(popt[2]),
        "a_err": float(a_err),
        "b_err": float(err[1]),
        "c_err": float(err[2]),
        "rmse": float(np.sqrt(np.mean(resid**2))),
    }


def fit_or_error(x: list[float], loss: list[float]) -> dict[str, Any]:
    """fit_scaling, or {"error": why} when the points cannot determine it (curve_fit gives up on degenerate ones)."""
    try:
        return fit_scaling(np.array(x), np.array(loss))
    except (RuntimeError, MatryoshkaError) as e:
        return {"error": str(e)}


def line_through(points: list[tuple[float, float]], n: float) -> float:
    """Loss predicted at N by the piecewise-linear line (in log N) through the trained sizes."""
    pts = sorted(points)
    xs, ys = [math.log(p[0]) for p in pts], [p[1] for p in pts]
    return float(np.interp(math.log(n), xs, ys))
