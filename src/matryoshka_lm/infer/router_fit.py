"""Fitting the size router (issue 11): ridge fit, calibration, and the compute-vs-quality metrics APGR and CPT.

(sum over queries of the work / sum of the full size's work). A routed query pays the small size's prompt prefill
and the predictor's FLOPs, plus the chosen size's pass; when the small size is chosen its prefill is reused, so only
the rest of its pass is added. Fixed sizes, random routing and the oracle pay no router overhead.

Metrics (after RouteLLM, Ong et al. 2024, with "calls to the strong model" replaced by compute). Let c_s and c_f be
the compute of always-smallest and always-full, and Q the mean NLL. A policy point (c, Q) has normalised compute
x = (c - c_s) / (c_f - c_s) and PGR y = (Q_s - Q) / (Q_s - Q_f), the performance gap recovered, clipped at 1 (full
quality is the ceiling). The curve is the running maximum of y over x (a policy can always use a cheaper threshold),
linear between points, anchored at (0, 0) (always-smallest needs no router). APGR is its mean over x in [0, 1]:
random routing between the smallest and full sizes is the diagonal, APGR 0.5; an oracle that recovers the full
quality at the smallest compute scores 1. CPT(p) is the compute (fraction of always-full) where the curve first
reaches PGR p. Confidence intervals: 95% percentile bootstrap over queries (thresholds and the fitted router held
fixed, so they do not include the variance of the fit); learned vs confidence is compared with a paired bootstrap.
Besides random routing between the smallest and full sizes, the "fixed sizes" curve (serving one size, or a random
mix of two adjacent sizes) is the bar a per-query router must clear to be worth its overhead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, flops_per_token, format_spec, full_spec
from matryoshka_lm.errors import MatryoshkaError

from .router import (
    CHEAP,
    CONFIDENCE_FEATURE,
    Predictor,
    Router,
    cheap_feature_names,
    cheap_router_flops,
    choose,
    feature_names,
    router_flops,
)
from .router_labels import Labels, candidate_specs, label_tokens, relative_costs

BOOTSTRAP = 200

# ---------------------------------------------------------------------------------------------------- fitting


def fit_predictors(
    labels: Labels, alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4)
) -> dict[str, Predictor]:
    """Ridge (alpha by leave-one-out CV) of each non-full candidate's gap on the standardised features ("learned"),
    a 1-D least-squares map from the small size's prompt NLL alone ("confidence"), and a ridge on the features that
    run no layer ("cheap", when the labels have them)."""
    gaps = labels.gaps[:, :-1]
    learned = _ridge(labels.features, gaps, alphas)
    col = feature_names(labels.features.shape[1] - 3).index(CONFIDENCE_FEATURE)
    z = (labels.features - learned.mean.numpy()) / learned.scale.numpy()
    conf_w = np.zeros((gaps.shape[1], z.shape[1]))
    conf_b = np.zeros(gaps.shape[1])
    for k in range(gaps.shape[1]):
        slope, intercept = np.polyfit(z[:, col], gaps[:, k], 1)
        conf_w[k, col], conf_b[k] = slope, intercept
    confidence = Predictor(_t(conf_w), _t(conf_b), learned.mean.clone(), learned.scale.clone())
    out = {"learned": learned, "confidence": confidence}
    if labels.cheap is not None:
        out[CHEAP] = _ridge(labels.cheap, gaps, alphas)
    return out


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32).contiguous()


def _ridge(x: np.ndarray, gaps: np.ndarray, alphas: tuple[float, ...]) -> Predictor:
    from sklearn.linear_model import RidgeCV

    x = x.astype(np.float64)
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    ridge = RidgeCV(alphas=alphas).fit((x - mean) / scale, gaps)
    coef = ridge.coef_.reshape(gaps.shape[1], -1)  # one target (two candidates): sklearn returns it 1-D
    return Predictor(_t(coef), _t(np.atleast_1d(ridge.intercept_)), _t(mean), _t(scale))


def tau_grid(gaps: np.ndarray, n: int = 40) -> np.ndarray:
    """Thresholds that sweep the whole curve: 0, quantiles of the predicted gaps, and one above them all."""
    pos = np.clip(gaps[:, :-1].ravel(), 0, None)
    qs = np.quantile(pos, np.linspace(0, 1, n)) if pos.size else np.zeros(1)
    return np.unique(np.concatenate([[0.0], qs + 1e-9, [pos.max(initial=0) * 2 + 1]]))


# ---------------------------------------------------------------------------------------------------- compute


@dataclass
class Costs:
    """Work per query in full-size token-passes, so that sums divide into fractions of always-full."""

    per_candidate: np.ndarray  # (N, K) work of serving query i at k with no router
    overhead: np.ndarray  # (N, K) extra work when a router chose k (small prefill unless k = 0, + predictor)
    full: np.ndarray  # (N,) work of always-full
    cheap_overhead: np.ndarray | None = None  # (N, K) the cheap router's: its features and predictor only


def query_costs(model: MatryoshkaLM, specs: list[SubmodelSpec], labels: Labels) -> Costs:
    cfg = model.cfg
    p = labels.prompt_lens.astype(np.float64)
    total = p + labels.cont
    window = int(total.max())
    f_full = flops_per_token(cfg, full_spec(cfg), window)
    rel = np.array(relative_costs(model, specs, window))
    per = total[:, None] * rel[None]
    n_feat, n_pred = labels.features.shape[1], len(specs) - 1
    pred = np.array([router_flops(cfg, specs[0], int(pi), n_feat, n_pred)["predictor"] / f_full for pi in p])
    small = p * rel[0]
    overhead = np.where(np.arange(len(specs))[None] == 0, 0.0, small[:, None]) + pred[:, None]
    cheap = None
    if labels.cheap is not None:
        nc = labels.cheap.shape[1]
        c = np.array([cheap_router_flops(cfg, specs[0], int(pi), nc, n_pred)["predictor"] / f_full for pi in p])
        cheap = np.repeat(c[:, None], len(specs), 1)
    return Costs(per, overhead, total, cheap)


# ---------------------------------------------------------------------------------------------------- curves


@dataclass
class Policy:
    """A family of routings: choice[t, i] is the candidate query i gets at setting t."""

    name: str
    choice: np.ndarray  # (T, N) ints
    routed: bool  # pays the router's overhead
    settings: np.ndarray  # (T,) the τ (or fraction) behind each row
    cheap: bool = False  # its overhead is the cheap router's (Costs.cheap_overhead)

    def points(self, labels: Labels, costs: Costs, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(compute fraction, mean NLL) per setting, over queries `idx` (all by default)."""
        idx = np.arange(labels.nll.shape[0]) if idx is None else idx
        ch = self.choice[:, idx]
        q = np.take_along_axis(labels.nll[idx].T, ch, 0)
        work = np.take_along_axis(costs.per_candidate[idx].T, ch, 0)
        if self.routed:
            overhead = costs.cheap_overhead if self.cheap else costs.overhead
            work = work + np.take_along_axis(overhead[idx].T, ch, 0)
        return work.sum(1) / costs.full[idx].sum(), q.mean(1)


def predicted_policy(name: str, gaps: np.ndarray, taus: np.ndarray) -> Policy:
    g = torch.as_tensor(gaps)
    return Policy(name, np.stack([choose(g, float(t)).numpy() for t in taus]), True, taus, cheap=name == CHEAP)


def oracle_policy(labels: Labels, taus: np.ndarray) -> Policy:
    return Policy("oracle", predicted_policy("oracle", labels.gaps, taus).choice, False, taus)


def random_policy(n: int, k: int, fractions: np.ndarray, seed: int = 0) -> Policy:
    """Each query goes to the full size with probability f, else to the smallest."""
    u = np.random.default_rng(seed).random(n)
    return Policy("random", np.where(u[None] < fractions[:, None], k - 1, 0), False, fractions)


def fixed_policies(n: int, names: list[str]) -> list[Policy]:
    return [Policy(f"always {s}", np.full((1, n), k), False, np.zeros(1)) for k, s in enumerate(names)]


def apgr_cpt(
    compute: np.ndarray, nll: np.ndarray, ends: tuple[float, float, float, float], targets=(0.5, 0.8)
) -> dict[str, float]:
    """APGR and CPT(p) of one curve; ends = (c_small, c_full, nll_small, nll_full). See the module doc."""
    c_s, c_f, q_s, q_f = ends
    if not (c_f > c_s and q_s > q_f):
        return {"apgr": float("nan"), **{f"cpt{round(p * 100)}": float("nan") for p in targets}}
    x = (np.asarray(compute) - c_s) / (c_f - c_s)
    y = np.minimum((q_s - np.asarray(nll)) / (q_s - q_f), 1.0)
    order = np.argsort(x, kind="stable")
    # anchored at always-smallest; a point cheaper than it counts from x = 0; running max: a cheaper setting is
    # always available to a policy that can afford a dearer one
    x = np.maximum(np.concatenate([[0.0], x[order]]), 0.0)
    y = np.maximum.accumulate(np.concatenate([[0.0], y[order]]))
    grid = np.linspace(0, 1, 1001)
    env = np.interp(grid, x, y, right=y[-1])
    out = {"apgr": float(env.mean())}
    for p in targets:
        hit = np.nonzero(env >= p - 1e-12)[0]
        out[f"cpt{round(p * 100)}"] = float(c_s + grid[hit[0]] * (c_f - c_s)) if hit.size else float("nan")
    return out


def _ends(labels: Labels, costs: Costs, idx: np.ndarray) -> tuple[float, float, float, float]:
    full_work = costs.full[idx].sum()
    return (
        float(costs.per_candidate[idx, 0].sum() / full_work),
        float(costs.per_candidate[idx, -1].sum() / full_work),
        float(labels.nll[idx, 0].mean()),
        float(labels.nll[idx, -1].mean()),
    )


def metrics_with_ci(
    policy: Policy, labels: Labels, costs: Costs, n_boot: int = BOOTSTRAP, seed: int = 0
) -> dict[str, Any]:
    """APGR, CPT(50%), CPT(80%) on all queries, and 95% bootstrap intervals (queries resampled)."""
    n = labels.nll.shape[0]
    everyone = np.arange(n)
    point = apgr_cpt(*policy.points(labels, costs), _ends(labels, costs, everyone))
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        m = apgr_cpt(*policy.points(labels, costs, idx), _ends(labels, costs, idx))
        for k, v in m.items():
            samples[k].append(v)
    out: dict[str, Any] = {}
    for k, v in point.items():
        s = np.asarray(samples[k])
        s = s[np.isfinite(s)]
        lo, hi = np.percentile(s, [2.5, 97.5]) if s.size else (float("nan"), float("nan"))
        out[k] = {"value": v, "ci": [float(lo), float(hi)]}
    return out


def paired_apgr_difference(
    a: Policy, b: Policy, labels: Labels, costs: Costs, n_boot: int = BOOTSTRAP, seed: int = 0
) -> dict[str, Any]:
    """APGR(b) - APGR(a) with a paired 95% bootstrap interval (both policies on the same resampled queries)."""
    n = labels.nll.shape[0]

    def diff(idx: np.ndarray) -> float:
        ends = _ends(labels, costs, idx)
        return (
            apgr_cpt(*b.points(labels, costs, idx), ends)["apgr"]
            - apgr_cpt(*a.points(labels, costs, idx), ends)["apgr"]
        )

    rng = np.random.default_rng(seed)
    s = np.asarray([diff(rng.integers(0, n, n)) for _ in range(n_boot)])
    s = s[np.isfinite(s)]
    lo, hi = np.percentile(s, [2.5, 97.5]) if s.size else (float("nan"), float("nan"))
    return {"value": diff(np.arange(n)), "ci": [float(lo), float(hi)]}


def predicted_gaps(router: Router, labels: Labels, kind: str) -> np.ndarray:
    x = labels.cheap if kind == CHEAP else labels.features
    if x is None:
        raise MatryoshkaError("these labels have no cheap features; label the queries again")
    return router.predictor(kind).gaps(torch.as_tensor(x)).numpy()


def calibrate(router: Router, labels: Labels, costs: Costs) -> None:
    """Per predictor, the table τ -> (mean compute, mean NLL) on the calibration split, saved in router.json."""
    for kind in router.predictors:
        gaps = predicted_gaps(router, labels, kind)
        taus = tau_grid(gaps)
        compute, nll = predicted_policy(kind, gaps, taus).points(labels, costs)
        router.calibration[kind] = {
            "tau": [float(t) for t in taus],
            "compute": [float(c) for c in compute],
            "nll": [float(q) for q in nll],
        }


def fit_router(
    model: MatryoshkaLM,
    labels: Labels,
    tolerance: float = 0.1,
    cal_fraction: float = 0.3,
    seed: int = 0,
    candidates: list[str] | None = None,
) -> Router:
    """Fit both predictors on part of the labelled queries, calibrate on the rest, and make the one with the
    higher APGR on the calibration split the default. `candidates`: as the labels were made with."""
    specs = candidate_specs(model, candidates)
    n = labels.nll.shape[0]
    if n < 10:
        raise MatryoshkaError(f"fitting a router needs at least 10 labelled queries, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_cal = max(2, int(n * cal_fraction))
    fit_idx, cal_idx = np.sort(perm[n_cal:]), np.sort(perm[:n_cal])
    fit, cal = labels.subset(fit_idx), labels.subset(cal_idx)
    router = Router(
        candidates=[format_spec(s) for s in specs],
        costs=relative_costs(model, specs),
        features=feature_names(specs[0].width),
        predictors=fit_predictors(fit),
        tolerance=tolerance,
        cheap_features=cheap_feature_names(specs[0].width) if labels.cheap is not None else [],
    )
    cal_costs = query_costs(model, specs, cal)
    calibrate(router, cal, cal_costs)
    apgr = {}
    for kind in router.predictors:
        gaps = predicted_gaps(router, cal, kind)
        pol = predicted_policy(kind, gaps, tau_grid(gaps))
        apgr[kind] = apgr_cpt(*pol.points(cal, cal_costs), _ends(cal, cal_costs, np.arange(len(cal_idx))))["apgr"]
    router.default = max(apgr, key=lambda k: (np.nan_to_num(apgr[k], nan=-1.0), k == "confidence"))
    router.info = {"fit_queries": len(fit_idx), "calibration_queries": len(cal_idx), "calibration_apgr": apgr}
    return router


def fit_on_tokens(
    model: MatryoshkaLM,
    tokens: np.ndarray,
    n: int = 1000,
    window: int = 128,
    cont: int = 32,
    tolerance: float = 0.1,
    seed: int = 0,
    candidates: list[str] | None = None,
) -> Router:
    """Label, fit, calibrate: the library side of `matryoshka route fit`."""
    _, labels = label_tokens(model, tokens, n, window, cont, seed, candidates=candidates)
    router = fit_router(model, labels, tolerance=tolerance, seed=seed, candidates=candidates)
    router.info |= {"window": min(window, model.cfg.max_seq_len), "cont": labels.cont}
    return router
