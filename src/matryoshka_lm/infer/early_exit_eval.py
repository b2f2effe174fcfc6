"""The per-token early exit as a routing policy: the same queries, quality and compute as the size router's.

Teacher forcing with the real decoding semantics: each query's prompt but its last token is prefilled by the full
model, then its continuation is fed one reference token at a time through exit_step (so the skipped layers' keys
and values come from exit states, as in serving, and later tokens see them). Quality is the mean NLL of the reference
continuation under the logits each token exited with: the router labels' NLL (router_labels.label) for this policy.
Compute is in full-size token-passes per query, as router_fit.Costs counts the fixed sizes: the prefilled prompt at
1 per token, each continuation token at its counted FLOPs over a full token's (ExitCounter), and the window's last
token, which the labels count too, at 1. Queries are batched with left padding (the engine's layout).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.scoring import log_probs, token_logprobs

from .early_exit import NEVER, ExitCost, ExitCounter, exit_points, exit_step
from .forward import left_padded
from .router_labels import Queries

log = logging.getLogger(__name__)

THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, NEVER)


@dataclass
class TokenPolicy:
    """A policy that decides per token: per setting, each query's work (full-size token-passes) and NLL. It
    answers `points` as router_fit.Policy does, so APGR, CPT and their bootstrap treat both alike."""

    name: str
    work: np.ndarray  # (T, N)
    nll: np.ndarray  # (T, N)
    settings: np.ndarray  # (T,)
    exits: list[dict[int, float]]  # per setting: share of tokens stopping at each depth
    routed: bool = False

    def points(self, labels, costs, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(self.work.shape[1]) if idx is None else idx
        return self.work[:, idx].sum(1) / costs.full[idx].sum(), self.nll[:, idx].mean(1)


@torch.no_grad()
def exit_run(
    model: MatryoshkaLM, queries: Queries, threshold: float, points: list[int], batch: int = 64
) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """(work (N,), continuation NLL (N,), tokens per exit depth) of every query at one threshold."""
    cfg, cont = model.cfg, queries.cont
    device = model.head_weight().device
    cost = ExitCost.of(cfg, queries.windows.shape[1])
    n = len(queries)
    work, nll, exits = np.zeros(n), np.zeros(n), {}
    for a in range(0, n, batch):
        win, lens = queries.windows[a : a + batch], queries.prompt_lens[a : a + batch].tolist()
        prompts = [win[j, : p - 1].tolist() for j, p in enumerate(lens)]
        idx, pad = left_padded(prompts, device)
        B, P = idx.shape
        cache = KVCache.allocate(cfg, model.full, B, P + cont, device, pad=pad)
        if P:
            model.hidden_states(idx, model.full, cache, 0)
        counter = ExitCounter.zeros(B, cfg.n_layers)
        step_in = torch.stack([win[j, p - 1 : p - 1 + cont] for j, p in enumerate(lens)]).to(device)
        target = torch.stack([win[j, p : p + cont] for j, p in enumerate(lens)]).to(device)
        tok_nll = torch.zeros(B, cont)
        for t in range(cont):
            logits, _ = exit_step(model, step_in[:, t : t + 1], cache, P + t, threshold, points, counter)
            tok_nll[:, t] = -token_logprobs(log_probs(logits), target[:, t]).cpu()
        lens_np = np.asarray(lens, dtype=np.float64)
        work[a : a + B] = (lens_np - 1) + counter.flops(cost).numpy() / cost.full + 1
        nll[a : a + B] = tok_nll.mean(1).numpy()
        for d, c in counter.exits.items():
            exits[d] = exits.get(d, 0) + c
    return work, nll, exits


def exit_policy(
    model: MatryoshkaLM,
    queries: Queries,
    thresholds: tuple[float, ...] = THRESHOLDS,
    points: list[int] | None = None,
    name: str = "early exit (margin)",
) -> TokenPolicy:
    """The early exit at every threshold on every query (progress logged per threshold)."""
    points = points or exit_points(model.cfg)
    works, nlls, shares = [], [], []
    for i, thr in enumerate(thresholds):
        log.info("early exit: threshold %g (%d of %d), %d queries", thr, i + 1, len(thresholds), len(queries))
        w, q, ex = exit_run(model, queries, thr, points)
        works.append(w)
        nlls.append(q)
        total = sum(ex.values())
        shares.append({d: c / total for d, c in sorted(ex.items())})
    return TokenPolicy(name, np.stack(works), np.stack(nlls), np.asarray(thresholds), shares)
