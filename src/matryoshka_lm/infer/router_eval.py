"""Measuring a fitted size router on labelled queries: every policy's compute-vs-quality curve, APGR and CPT
with bootstrap intervals, the operating point at a threshold, and the plot (the metrics: router_fit.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka_lm.core.model import MatryoshkaLM

from .early_exit_eval import TokenPolicy
from .router import Router, cheap_router_flops, router_flops
from .router_fit import (
    BOOTSTRAP,
    Policy,
    fixed_policies,
    metrics_with_ci,
    oracle_policy,
    paired_apgr_difference,
    predicted_gaps,
    predicted_policy,
    query_costs,
    random_policy,
    tau_grid,
)
from .router_labels import Labels


def evaluate(
    model: MatryoshkaLM,
    router: Router,
    labels: Labels,
    tau: float,
    n_boot: int = BOOTSTRAP,
    per_token: Sequence[TokenPolicy] = (),
) -> dict[str, Any]:
    """Every policy's curve, APGR/CPT with CIs, and the routers' operating point at `tau`; `per_token`: policies
    that decide per token on the same queries (early_exit_eval), compared like the rest, and each against the
    fixed sizes with a paired bootstrap."""
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
    fixed_curve = Policy("fixed sizes", np.repeat(np.arange(k)[:, None], n, 1), False, np.arange(k))
    policies += [fixed_curve, *per_token]
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
        by_name = {p.name: p for p in policies}
        diff = paired_apgr_difference(by_name["confidence"], by_name["learned"], labels, costs, n_boot)
    at_tau = {}
    for kind in sorted(router.predictors):
        pol = predicted_policy(kind, predicted_gaps(router, labels, kind), np.array([tau]))
        c, q = pol.points(labels, costs)
        share = np.bincount(pol.choice[0], minlength=k) / n
        at_tau[kind] = {"compute": float(c[0]), "nll": float(q[0]), "share": dict(zip(router.candidates, share))}
    p_mean = int(labels.prompt_lens.mean())
    flops = router_flops(model.cfg, specs[0], p_mean, labels.features.shape[1], k - 1)
    cheap = None
    if labels.cheap is not None:
        cheap = cheap_router_flops(model.cfg, specs[0], p_mean, labels.cheap.shape[1], k - 1)["predictor"]
    return {
        "queries": n,
        "tau": tau,
        "default": router.default,
        "curves": curves,
        "metrics": metrics,
        "fixed": fixed,
        "at_tau": at_tau,
        "learned_minus_confidence": diff,
        "minus_fixed_sizes": minus_fixed(fixed_curve, policies, labels, costs, n_boot),
        "label_reliability": dict(zip(router.candidates[:-1], labels.reliability() or [])),
        "per_token": {p.name: token_rows(p, labels, costs) for p in per_token},
        "overhead": {
            "mean_prompt_len": float(labels.prompt_lens.mean()),
            "predictor_vs_full_prefill": flops["predictor"] / flops["full_prefill"],
            "small_prefill_vs_full_prefill": flops["small_prefill"] / flops["full_prefill"],
            "cheap_vs_full_prefill": None if cheap is None else cheap / flops["full_prefill"],
        },
    }


def minus_fixed(fixed_curve: Policy, policies: list, labels: Labels, costs, n_boot: int) -> dict[str, Any]:
    """Each routed or per-token policy's APGR minus the fixed sizes' curve's, paired bootstrap (the issue's bar)."""
    kept = [p for p in policies if p.name not in ("fixed sizes", "oracle", "random")]
    return {p.name: paired_apgr_difference(fixed_curve, p, labels, costs, n_boot) for p in kept}


def token_rows(p: TokenPolicy, labels: Labels, costs) -> list[dict[str, Any]]:
    """A per-token policy's settings as JSON rows (None: a setting that never stops a token early)."""
    rows = []
    for t, c, q, e in zip(p.settings, *p.points(labels, costs), p.exits):
        setting = float(t) if np.isfinite(t) else None
        rows.append(
            {"setting": setting, "compute": float(c), "nll": float(q), "exits": {str(d): v for d, v in e.items()}}
        )
    return rows


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
    if rep.get("label_reliability"):
        rel = ", ".join(f"{k} {v:.2f}" for k, v in rep["label_reliability"].items())
        lines.append(f"label reliability (split-half gap, Spearman-Brown): {rel}")
    for name, d in rep.get("minus_fixed_sizes", {}).items():
        lines.append(f"APGR {name} - fixed sizes (paired bootstrap): {_fmt(d)}")
    for name, pts in rep.get("per_token", {}).items():
        lines += ["", f"{name}: setting, compute, NLL, share of tokens stopping at each depth"]
        for pt in pts:
            share = " ".join(f"{d}:{v:.0%}" for d, v in pt["exits"].items())
            setting = "never" if pt["setting"] is None else f"{pt['setting']:.4g}"  # None: the rule never stops early
            lines.append(f"  {setting:<10}{pt['compute']:>9.3f}{pt['nll']:>8.3f}   {share}")
    if rep["learned_minus_confidence"]:
        lines.append(f"APGR learned - confidence (paired bootstrap): {_fmt(rep['learned_minus_confidence'])}")
    o = rep["overhead"]
    lines += [
        "",
        f"router overhead at the mean prompt ({o['mean_prompt_len']:.0f} tokens): predictor "
        f"{o['predictor_vs_full_prefill']:.2%} of a full prefill; small prefill (shared) "
        f"{o['small_prefill_vs_full_prefill']:.1%}"
        + ("" if o.get("cheap_vs_full_prefill") is None else f"; cheap router {o['cheap_vs_full_prefill']:.3%}"),
        "* the router.json default",
    ]
    return "\n".join(lines)


def plot_curves(rep: dict[str, Any], path: str | Path, title: str = "") -> None:
    from matryoshka_lm.report import figure

    with figure(path, (6.4, 4.4), legend={"fontsize": 8}) as (_, ax):
        for name, c in rep["curves"].items():
            style = {"oracle": "k--", "random": ":", "fixed sizes": "-"}.get(name, "-")
            if name == "fixed sizes":
                ax.plot(c["compute"], c["nll"], "-", color="0.6", lw=1, label="fixed sizes (mixed)")
                continue
            routed = name in ("learned", "confidence", "cheap")
            ax.plot(c["compute"], c["nll"], style, label=name, marker="." if routed else "")
        for name, f in rep["fixed"].items():
            ax.plot([f["compute"]], [f["nll"]], "s", label=name)
        ax.set_xlabel("mean compute (fraction of always-full FLOPs)")
        ax.set_ylabel("continuation NLL (nats/token)")
        ax.set_xlim(0, 1.3)
        if title:
            ax.set_title(title, fontsize=9)
