"""The per-token early exit as a routing policy: the same queries, quality and compute as the size router's.

Teacher forcing with the real decoding semantics: each query's window goes through exit_forward in one pass (every
token deciding, the skipped layers' keys and values computed from exit states, which later tokens attend to: by
causality the same as decoding the tokens one at a time). Quality is the mean NLL of the reference continuation
under the logits each token stopped with, at the positions the router labels score (router_labels.label). Compute
is in full-size token-passes per query, as router_fit.Costs counts the fixed sizes: the FLOPs of each of the query's
prompt + continuation tokens over a full-size token's (ExitResult.flops).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.scoring import next_token_logprobs

from .early_exit import NEVER, ExitCost, exit_forward, exit_points
from .exit_probe import NEVER_TAU, ExitProbe, probe_data
from .router_labels import Queries

log = logging.getLogger(__name__)

MARGIN, LEARNED = "early exit (margin)", "early exit (learned)"
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
    model: MatryoshkaLM,
    queries: Queries,
    threshold: float,
    points: list[int] | None,
    probe: ExitProbe | None = None,
    batch: int = 32,
) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """(work (N,), continuation NLL (N,), tokens per exit depth) of every query at one threshold."""
    cont, W = queries.cont, queries.windows.shape[1]
    device = model.norm.weight.device  # not head_weight(): a quantized model keeps its weights as planes (meta)
    cost = ExitCost.of(model.cfg, W)
    n = len(queries)
    work, nll, exits = np.zeros(n), np.zeros(n), {}
    pos = torch.arange(W - 1, device=device)[None]
    for a in range(0, n, batch):
        ids, p = queries.windows[a : a + batch].to(device), queries.prompt_lens[a : a + batch].to(device)
        res = exit_forward(model, ids, threshold, points=points, probe=probe)
        tok = -next_token_logprobs(res.logits, ids)  # (B, W - 1): position t's NLL of token t + 1
        scored = (pos >= p[:, None] - 1) & (pos < p[:, None] - 1 + cont)
        nll[a : a + len(ids)] = ((tok * scored).sum(1) / cont).cpu().numpy()
        counted = torch.arange(W, device=device)[None] < (p + cont)[:, None]  # the tokens the labels count
        work[a : a + len(ids)] = ((res.flops(cost) * counted.double().cpu()).sum(1) / cost.full).numpy()
        for d in res.depth[counted].tolist():
            exits[d] = exits.get(d, 0) + 1
    return work, nll, exits


def probe_thresholds(model: MatryoshkaLM, queries: Queries, probe: ExitProbe, n: int = 12) -> tuple[float, ...]:
    """τ settings that sweep the learned rule's whole curve: quantiles of its predicted gaps on these queries' tokens
    (every point pooled), and never."""
    x, _ = probe_data(model, queries.windows, probe.points)
    pred = torch.cat([probe.gap(i, x[i]) for i in range(len(probe.points))])
    qs = torch.quantile(pred[torch.randperm(len(pred), generator=torch.Generator().manual_seed(0))[:100_000]],
                        torch.linspace(0, 1, n)).tolist()  # fmt: skip
    return tuple(sorted(set(qs), reverse=True)) + (NEVER_TAU,)


def exit_policy(
    model: MatryoshkaLM,
    queries: Queries,
    thresholds: tuple[float, ...] | None = None,
    points: list[int] | None = None,
    probe: ExitProbe | None = None,
) -> TokenPolicy:
    """The early exit at every threshold on every query (progress logged per threshold): the softmax margin, or
    the learned rule when a probe is given."""
    if probe is None:
        points, name = points or exit_points(model.cfg), MARGIN
        thresholds = thresholds or THRESHOLDS
    else:
        probe.check(model)
        name, thresholds = LEARNED, thresholds or probe_thresholds(model, queries, probe)
    works, nlls, shares = [], [], []
    for i, thr in enumerate(thresholds):
        log.info("%s: threshold %g (%d of %d), %d queries", name, thr, i + 1, len(thresholds), len(queries))
        w, q, ex = exit_run(model, queries, thr, points, probe)
        works.append(w)
        nlls.append(q)
        total = sum(ex.values())
        shares.append({d: c / total for d, c in sorted(ex.items())})
    return TokenPolicy(name, np.stack(works), np.stack(nlls), np.asarray(thresholds), shares)
