"""Fitting and measuring the size router (issue 11): oracle labels, ridge fit, calibration, curves, APGR and CPT.

Queries. Held-out text is cut into windows of `window` tokens; query i's prompt is the first P_i tokens (P_i drawn
uniformly) and its reference continuation the next `cont` tokens. Causality makes one forward of the window per
candidate enough: its logits at P_i-1 .. P_i+cont-2 score the continuation, and its first P_i positions equal a
prefill of the prompt alone (the router's features).

Oracle labels. Every candidate runs on every query: NLL[i, k], the mean NLL per token of query i's continuation at
candidate k. The gap to the full size, NLL[i, k] - NLL[i, full], is what the learned router regresses. That is the
default, "scoring" quality. The issue's other one, "generation" (`label_generation`), puts in NLL[i, k] the FULL
size's mean NLL of candidate k's greedy continuation of the prompt (N tokens), so the gap is how much worse the full
model finds k's continuation than its own greedy one (0 for the full size; it can dip below 0, greedy not being
NLL-optimal over a sequence). Everything downstream (fit, calibration, curves, metrics) takes either kind of labels.

Compute. Work is counted in FLOPs (core.spec.flops_per_token), relative to always-full on the same queries
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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.quant import weight_bytes
from matryoshka_lm.core.spec import (
    SubmodelSpec,
    flops_per_token,
    format_spec,
    full_spec,
    parse_spec,
    size_names,
    uniform_spec,
)
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.router import (
    CONFIDENCE_FEATURE,
    Predictor,
    Router,
    choose,
    feature_names,
    prompt_features,
    router_flops,
)
from matryoshka_lm.infer.sampling import GREEDY

BOOTSTRAP = 200


@dataclass
class Queries:
    windows: torch.Tensor  # (N, W) token ids
    prompt_lens: torch.Tensor  # (N,)
    cont: int  # continuation tokens scored per query

    def __len__(self) -> int:
        return self.windows.shape[0]

    def subset(self, idx: np.ndarray) -> Queries:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return Queries(self.windows[idx_t], self.prompt_lens[idx_t], self.cont)


def make_queries(
    tokens: np.ndarray, n: int, window: int = 128, cont: int = 32, min_prompt: int = 8, seed: int = 0
) -> Queries:
    """Up to `n` non-overlapping windows spread evenly over `tokens`, each with a random prompt length."""
    if window - cont < min_prompt:
        raise MatryoshkaError(f"window {window} leaves no room for a prompt of {min_prompt} and {cont} scored tokens")
    fits = len(tokens) // window
    if fits < 1:
        raise MatryoshkaError(f"text has {len(tokens)} tokens, fewer than one query window of {window}")
    count = min(n, fits)
    starts = (np.arange(count) * (fits // count)) * window
    windows = torch.from_numpy(np.stack([tokens[s : s + window].astype(np.int64) for s in starts]))
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_prompt, window - cont + 1, (count,), generator=g)
    return Queries(windows, lens, cont)


def candidate_specs(model: MatryoshkaLM, candidates: list[str] | None = None) -> list[SubmodelSpec]:
    """The trained sizes, smallest first, ending with the full size; or the given specs or cells ("S@int2",
    "M@int4", "XL"), cheapest first (relative_costs)."""
    cfg = model.cfg
    if candidates:
        specs = [parse_spec(cfg, c) for c in candidates]
        for spec in specs:
            model.check_bits(spec.bits)
        if len(set(specs)) != len(specs) or len(specs) < 2:
            raise MatryoshkaError(f"router candidates must be at least two distinct specs, got {candidates}")
        costs = relative_costs(model, specs)
        return [s for _, s in sorted(zip(costs, specs), key=lambda cs: cs[0])]
    specs = [uniform_spec(cfg, s) for s in reversed(size_names(cfg))]
    full = full_spec(cfg)
    if (specs[-1].width, specs[-1].layers) != (full.width, full.layers):
        specs.append(full)
    return specs


def relative_costs(model: MatryoshkaLM, specs: list[SubmodelSpec], context: int | None = None) -> list[float]:
    """Each candidate's cost relative to the full model: FLOPs per token (over `context`), or, when any
    candidate names a bit width, bytes of weights read per token (weight-only quantization leaves the FLOPs as
    they are; batch-1 decoding is bound by the bytes)."""
    cfg = model.cfg
    if any(s.bits is not None for s in specs):
        full = weight_bytes(cfg, full_spec(cfg), model.native_bits, model.quant)
        return [weight_bytes(cfg, s, s.bits or model.native_bits, model.quant) / full for s in specs]
    f_full = flops_per_token(cfg, full_spec(cfg), context)
    return [flops_per_token(cfg, s, context) / f_full for s in specs]


@dataclass
class Labels:
    nll: np.ndarray  # (N, K) continuation NLL per query and candidate, candidates smallest first
    features: np.ndarray  # (N, F) from the smallest candidate's prefill
    prompt_lens: np.ndarray  # (N,)
    cont: int

    def subset(self, idx: np.ndarray) -> Labels:
        return Labels(self.nll[idx], self.features[idx], self.prompt_lens[idx], self.cont)

    @property
    def gaps(self) -> np.ndarray:
        return self.nll - self.nll[:, -1:]


@torch.no_grad()
def label(model: MatryoshkaLM, queries: Queries, specs: list[SubmodelSpec], batch: int = 32) -> Labels:
    """The oracle's labels: every candidate on every query (a bar over candidates x batches)."""
    n, cont = len(queries), queries.cont
    lens = queries.prompt_lens
    nll = np.zeros((n, len(specs)))
    feats: list[torch.Tensor] = []
    device = model.head_weight().device
    bar = tqdm(total=len(specs) * math.ceil(n / batch), desc="oracle labels", unit="batch", leave=False)
    for k, spec in enumerate(specs):
        for a in range(0, n, batch):
            ids, p = queries.windows[a : a + batch].to(device), lens[a : a + batch].to(device)
            hidden = model.hidden_states(ids, spec)
            logits = model.logits(hidden)
            tok = -F.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            pos = torch.arange(ids.shape[1] - 1, device=device)[None]
            mask = (pos >= p[:, None] - 1) & (pos < p[:, None] - 1 + cont)
            nll[a : a + batch, k] = ((tok * mask).sum(1) / cont).cpu().numpy()
            if k == 0:
                for j in range(ids.shape[0]):
                    pj = int(p[j])
                    feats.append(prompt_features(ids[j, :pj], logits[j, :pj], hidden[j, :pj]))
            bar.update(1)
    bar.close()
    return Labels(nll, torch.stack(feats).cpu().numpy(), lens.numpy(), cont)


@torch.no_grad()
def label_generation(model: MatryoshkaLM, queries: Queries, specs: list[SubmodelSpec], new_tokens: int = 16) -> Labels:
    """The oracle's labels under the generation quality: nll[i, k] is the FULL size's mean NLL per token of
    candidate k's greedy continuation of `new_tokens` tokens from query i's prompt (the reference continuation is
    not used). The gap to the full size is then that minus the full size's NLL of its own greedy continuation: 0 for
    the full size by construction, usually > 0 for the others, but it can be negative (greedy decoding is not
    NLL-optimal over a sequence). Queries of equal prompt length are batched (no padding). Features are those of
    `label`: the smallest candidate's prefill of the prompt."""
    n, lens = len(queries), queries.prompt_lens
    if int(lens.max()) + new_tokens > model.cfg.max_seq_len:
        raise MatryoshkaError(
            f"a prompt of {int(lens.max())} tokens + {new_tokens} generated exceeds the context {model.cfg.max_seq_len}"
        )
    engine = Engine(model)
    device = engine.device
    nll = np.zeros((n, len(specs)))
    feats = torch.zeros(n, 3 + specs[0].width)
    groups = [np.nonzero(lens.numpy() == p)[0] for p in np.unique(lens.numpy())]
    bar = tqdm(total=len(groups) * len(specs), desc="generation labels", unit="batch", leave=False)
    for idx in groups:
        p = int(lens[idx[0]])
        prompts = queries.windows[torch.as_tensor(idx), :p].to(device)
        hidden = model.hidden_states(prompts, specs[0])
        logits = model.logits(hidden)
        for j in range(len(idx)):
            feats[idx[j]] = prompt_features(prompts[j], logits[j], hidden[j]).cpu()
        for k, spec in enumerate(specs):
            outs = engine.generate(prompts.tolist(), spec, new_tokens, GREEDY)
            gen = torch.tensor([o.tokens for o in outs], device=device)  # no stops: exactly new_tokens each
            ids = torch.cat([prompts, gen], 1)
            full_logits = model(ids[:, :-1])[:, p - 1 :]
            tok = -F.log_softmax(full_logits.float(), -1).gather(-1, gen[..., None]).squeeze(-1)
            nll[idx, k] = tok.mean(1).cpu().numpy()
            bar.update(1)
    bar.close()
    return Labels(nll, feats.numpy(), lens.numpy(), new_tokens)


# ---------------------------------------------------------------------------------------------------- fitting


def fit_predictors(
    labels: Labels, alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4)
) -> dict[str, Predictor]:
    """Ridge (alpha by leave-one-out CV) of each non-full candidate's gap on the standardised features ("learned"),
    and a 1-D least-squares map from the small size's prompt NLL alone ("confidence")."""
    from sklearn.linear_model import RidgeCV

    x, gaps = labels.features.astype(np.float64), labels.gaps[:, :-1]
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    z = (x - mean) / scale
    ridge = RidgeCV(alphas=alphas).fit(z, gaps)
    col = feature_names(x.shape[1] - 3).index(CONFIDENCE_FEATURE)
    conf_w = np.zeros_like(ridge.coef_)
    conf_b = np.zeros(gaps.shape[1])
    for k in range(gaps.shape[1]):
        slope, intercept = np.polyfit(z[:, col], gaps[:, k], 1)
        conf_w[k, col], conf_b[k] = slope, intercept

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32).contiguous()

    return {
        "learned": Predictor(t(ridge.coef_), t(ridge.intercept_), t(mean), t(scale)),
        "confidence": Predictor(t(conf_w), t(conf_b), t(mean), t(scale)),
    }


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
    return Costs(per, overhead, total)


# ---------------------------------------------------------------------------------------------------- curves


@dataclass
class Policy:
    """A family of routings: choice[t, i] is the candidate query i gets at setting t."""

    name: str
    choice: np.ndarray  # (T, N) ints
    routed: bool  # pays the router's overhead
    settings: np.ndarray  # (T,) the τ (or fraction) behind each row

    def points(self, labels: Labels, costs: Costs, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(compute fraction, mean NLL) per setting, over queries `idx` (all by default)."""
        idx = np.arange(labels.nll.shape[0]) if idx is None else idx
        ch = self.choice[:, idx]
        q = np.take_along_axis(labels.nll[idx].T, ch, 0)
        work = np.take_along_axis(costs.per_candidate[idx].T, ch, 0)
        if self.routed:
            work = work + np.take_along_axis(costs.overhead[idx].T, ch, 0)
        return work.sum(1) / costs.full[idx].sum(), q.mean(1)


def predicted_policy(name: str, gaps: np.ndarray, taus: np.ndarray) -> Policy:
    g = torch.as_tensor(gaps)
    return Policy(name, np.stack([choose(g, float(t)).numpy() for t in taus]), True, taus)


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
    return router.predictor(kind).gaps(torch.as_tensor(labels.features)).numpy()


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


# ---------------------------------------------------------------------------------------------------- evaluation


def evaluate(
    model: MatryoshkaLM,
    router: Router,
    labels: Labels,
    tau: float,
    n_boot: int = BOOTSTRAP,
) -> dict[str, Any]:
    """Every policy's curve, APGR/CPT with CIs, and the routers' operating point at `tau`."""
    specs = router.specs(model.cfg)
    costs = query_costs(model, specs, labels)
    n, k = labels.nll.shape
    policies: list[Policy] = []
    for kind in sorted(router.predictors):
        gaps = predicted_gaps(router, labels, kind)
        policies.append(predicted_policy(kind, gaps, tau_grid(gaps)))
    policies.append(oracle_policy(labels, tau_grid(labels.gaps, 60)))
    policies.append(random_policy(n, k, np.linspace(0, 1, 21)))
    # mixing adjacent fixed sizes at random traces the lines between them: the bar a per-query router must clear
    policies.append(Policy("fixed sizes", np.repeat(np.arange(k)[:, None], n, 1), False, np.arange(k)))
    curves, metrics = {}, {}
    for pol in policies:
        c, q = pol.points(labels, costs)
        curves[pol.name] = {"compute": c.tolist(), "nll": q.tolist()}
        metrics[pol.name] = metrics_with_ci(pol, labels, costs, n_boot)
    fixed = {}
    for pol in fixed_policies(n, router.candidates):
        c, q = pol.points(labels, costs)
        fixed[pol.name] = {"compute": float(c[0]), "nll": float(q[0])}
    diff = {}
    if {"learned", "confidence"} <= set(router.predictors):
        diff = paired_apgr_difference(policies[0], policies[1], labels, costs, n_boot)  # sorted: confidence, learned
    at_tau = {}
    for kind in sorted(router.predictors):
        pol = predicted_policy(kind, predicted_gaps(router, labels, kind), np.array([tau]))
        c, q = pol.points(labels, costs)
        share = np.bincount(pol.choice[0], minlength=k) / n
        at_tau[kind] = {"compute": float(c[0]), "nll": float(q[0]), "share": dict(zip(router.candidates, share))}
    flops = router_flops(model.cfg, specs[0], int(labels.prompt_lens.mean()), labels.features.shape[1], k - 1)
    return {
        "queries": n,
        "tau": tau,
        "default": router.default,
        "curves": curves,
        "metrics": metrics,
        "fixed": fixed,
        "at_tau": at_tau,
        "learned_minus_confidence": diff,
        "overhead": {
            "mean_prompt_len": float(labels.prompt_lens.mean()),
            "predictor_vs_full_prefill": flops["predictor"] / flops["full_prefill"],
            "small_prefill_vs_full_prefill": flops["small_prefill"] / flops["full_prefill"],
        },
    }


def _fmt(m: dict[str, Any]) -> str:
    v, (lo, hi) = m["value"], m["ci"]
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"{rep['queries']} queries; compute is relative to always-full (router overhead included)", ""]
    lines.append(f"{'policy':<22}{'compute':>9}{'NLL':>8}")
    for name, f in rep["fixed"].items():
        lines.append(f"{name:<22}{f['compute']:>9.3f}{f['nll']:>8.3f}")
    for kind, a in rep["at_tau"].items():
        share = " ".join(f"{s}:{v:.0%}" for s, v in a["share"].items())
        label = f"{kind} τ={rep['tau']:g}" + (" *" if kind == rep["default"] else "")
        lines.append(f"{label:<22}{a['compute']:>9.3f}{a['nll']:>8.3f}   {share}")
    lines += ["", f"{'curve':<14}{'APGR [95% CI]':>24}{'CPT(50%)':>24}{'CPT(80%)':>24}"]
    for name, m in rep["metrics"].items():
        lines.append(f"{name:<14}{_fmt(m['apgr']):>24}{_fmt(m['cpt50']):>24}{_fmt(m['cpt80']):>24}")
    if rep["learned_minus_confidence"]:
        lines.append(f"APGR learned - confidence (paired bootstrap): {_fmt(rep['learned_minus_confidence'])}")
    o = rep["overhead"]
    lines += [
        "",
        f"router overhead at the mean prompt ({o['mean_prompt_len']:.0f} tokens): predictor "
        f"{o['predictor_vs_full_prefill']:.2%} of a full prefill; small prefill (shared) "
        f"{o['small_prefill_vs_full_prefill']:.1%}",
        "* the router.json default",
    ]
    return "\n".join(lines)


def plot_curves(rep: dict[str, Any], path: str | Path, title: str = "") -> None:
    from matryoshka_lm.plots import figure

    with figure(path, (6.4, 4.4), legend={"fontsize": 8}) as (_, ax):
        for name, c in rep["curves"].items():
            style = {"oracle": "k--", "random": ":", "fixed sizes": "-"}.get(name, "-")
            if name == "fixed sizes":
                ax.plot(c["compute"], c["nll"], "-", color="0.6", lw=1, label="fixed sizes (mixed)")
                continue
            ax.plot(c["compute"], c["nll"], style, label=name, marker="." if name in ("learned", "confidence") else "")
        for name, f in rep["fixed"].items():
            ax.plot([f["compute"]], [f["nll"]], "s", label=name)
        ax.set_xlabel("mean compute (fraction of always-full FLOPs)")
        ax.set_ylabel("continuation NLL (nats/token)")
        ax.set_xlim(0, 1.3)
        if title:
            ax.set_title(title, fontsize=9)


# ---------------------------------------------------------------------------------------------------- one call each


def label_tokens(
    model: MatryoshkaLM,
    tokens: np.ndarray,
    n: int,
    window: int,
    cont: int,
    seed: int = 0,
    quality: str = "scoring",
    new_tokens: int = 16,
    candidates: list[str] | None = None,
) -> tuple[list[SubmodelSpec], Labels]:
    """Queries cut from `tokens` (window clipped to the model's context), labelled by every candidate.

    quality: "scoring" (the default: NLL of the reference continuation, `label`) or "generation" (the full size's
    NLL of each candidate's greedy continuation of `new_tokens`, `label_generation`; same prompts).
    candidates: specs or cells to route between (candidate_specs; default: the trained sizes)."""
    window = min(window, model.cfg.max_seq_len)
    cont = min(cont, window // 2)
    specs = candidate_specs(model, candidates)
    queries = make_queries(tokens, n, window, cont, seed=seed)
    if quality == "scoring":
        return specs, label(model, queries, specs)
    if quality == "generation":
        return specs, label_generation(model, queries, specs, min(new_tokens, cont))
    raise MatryoshkaError(f"quality must be 'scoring' or 'generation', got {quality!r}")


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
