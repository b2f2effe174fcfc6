"""Turn the recipe study's results (recipes.py) into README.md, results.json and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from matryoshka_lm.core.checkpoint import write_json
from matryoshka_lm.report import figure, md_table
from matryoshka_lm.train.evaluate import human

from .evaluate import BAR, line_through
from .presets import SIZES

DOMAINS = {"in_domain": "in domain (held-out Shakespeare + KJV)", "out_of_domain": "out of domain (Python docs)"}
WORSE = 0.02  # the bar: no trained size worse than under today's recipe by more than this


def deltas(res: dict[str, Any], d: int, recipe: str, dom: str) -> dict[str, float]:
    """Per size: Matryoshka loss under `recipe` minus the independent baseline's, on domain `dom`."""
    rec, base = res["recipes"][d][recipe]["sizes"], res["baseline"][d]
    return {s: rec[s][dom]["val_loss"] - base[s][dom]["val_loss"] for s in SIZES}


def below_line(res: dict[str, Any], d: int, recipe: str, dom: str) -> tuple[int, int, list[float]]:
    """Mix'n'Match specs on or below the line (log params) through the same model's trained sizes."""
    r = res["recipes"][d][recipe]
    trained = [(v[dom]["non_embedding_params"], v[dom]["val_loss"]) for v in r["sizes"].values()]
    gaps = [v[dom]["val_loss"] - line_through(trained, v[dom]["non_embedding_params"]) for v in r["mixnmatch"].values()]
    return sum(g <= 0 for g in gaps), len(gaps), gaps


def vs_today(res: dict[str, Any], d: int, recipe: str, dom: str = "in_domain") -> float:
    """The largest loss increase of any trained size under `recipe` relative to today's recipe ("all")."""
    a, b = res["recipes"][d]["all"]["sizes"], res["recipes"][d][recipe]["sizes"]
    return max(b[s][dom]["val_loss"] - a[s][dom]["val_loss"] for s in SIZES)


def summary(res: dict[str, Any], p: Any) -> list[dict[str, Any]]:
    """One row per recipe over all scales: the issue's three goals, in and out of domain."""
    rows = []
    for r in p.recipes:
        row: dict[str, Any] = {"recipe": r}
        for dom in DOMAINS:
            ds = [v for d in p.scales for v in deltas(res, d, r, dom).values()]
            lines = [below_line(res, d, r, dom) for d in p.scales]
            row[dom] = {
                "within": sum(x <= BAR for x in ds),
                "sizes": len(ds),
                "mean_delta": float(np.mean(ds)),
                "below": sum(b for b, _, _ in lines),
                "mixes": sum(n for _, n, _ in lines),
                "mean_gap": float(np.mean([g for _, _, gs in lines for g in gs])),
            }
        row["worst_vs_today"] = max(vs_today(res, d, r) for d in p.scales)
        row["flops"] = sum(res["flops"][f"d{d}-recipe-{r}"] for d in p.scales)
        rows.append(row)
    return rows


def best_recipe(rows: list[dict[str, Any]]) -> str:
    """The recipe that meets most of the issue's goals in domain: sizes within the bar, mixes on or below the line,
    no size worse than today by more than WORSE; ties broken by the mean gap to the baselines."""

    def score(r: dict[str, Any]) -> tuple:
        i = r["in_domain"]
        return (i["within"] + i["below"] - 100 * (r["worst_vs_today"] > WORSE), -i["mean_delta"])

    return max(rows, key=score)["recipe"]


def summary_table(rows: list[dict[str, Any]]) -> str:
    head = ["recipe", "sizes within 0.04 (in / out of domain)", "mean Δ vs baseline (in / out)",
            "Mix'n'Match on or below the line (in / out)", "worst size vs `all`", "training FLOPs"]  # fmt: skip
    lines = []
    for r in rows:
        i, o = r["in_domain"], r["out_of_domain"]
        within = f"{i['within']}/{i['sizes']} / {o['within']}/{o['sizes']}"
        below = f"{i['below']}/{i['mixes']} / {o['below']}/{o['mixes']}"
        delta = f"{i['mean_delta']:+.3f} / {o['mean_delta']:+.3f}"
        lines.append([r["recipe"], within, delta, below, f"{r['worst_vs_today']:+.3f}", f"{r['flops']:.3g}"])
    return md_table(head, lines)


def sizes_table(res: dict[str, Any], p: Any, dom: str) -> str:
    head = ["scale", "size", "non-emb params", "baseline", *(f"{r} (Δ)" for r in p.recipes)]
    rows = []
    for d in p.scales:
        for s in SIZES:
            b = res["baseline"][d][s][dom]
            cells = []
            for r in p.recipes:
                v = res["recipes"][d][r]["sizes"][s][dom]["val_loss"]
                cells.append(f"{v:.3f} ({v - b['val_loss']:+.3f})")
            rows.append([f"d={d}", s, human(b["non_embedding_params"]), f"{b['val_loss']:.3f}", *cells])
    return md_table(head, rows, "ll" + "r" * (len(head) - 2))


def consistency_table(res: dict[str, Any], p: Any) -> str:
    head = ["scale", "size", "baselines vs their XL", *p.recipes]
    rows = []
    for d in p.scales:
        for s in SIZES[1:]:
            b = res["baseline"][d][s]["in_domain"]["agree"]
            cells = [f"{res['recipes'][d][r]['sizes'][s]['in_domain']['agree']:.3f}" for r in p.recipes]
            rows.append([f"d={d}", s, f"{b:.3f}", *cells])
    return md_table(head, rows, "ll" + "r" * (len(head) - 2))


def ordering(res: dict[str, Any], p: Any) -> str:
    """Whether loss falls with size (S > M > L > XL) for each model, in and out of domain."""
    rows = []

    def ordered(losses: list[float]) -> str:
        return "yes" if all(a >= b for a, b in zip(losses[::-1], losses[::-1][1:])) else "no"

    for d in p.scales:
        for r in [*p.recipes, "baselines"]:
            cells = []
            for dom in DOMAINS:
                if r == "baselines":
                    losses = [res["baseline"][d][s][dom]["val_loss"] for s in SIZES]
                else:
                    losses = [res["recipes"][d][r]["sizes"][s][dom]["val_loss"] for s in SIZES]
                cells.append(ordered(losses))
            rows.append([f"d={d}", r, *cells])
    return md_table(["scale", "model", "sizes ordered in domain", "out of domain"], rows, "llcc")


def fits_table(res: dict[str, Any], p: Any) -> str:
    head = ["recipe", "a", "b", "c (loss floor)", "rmse", "loss at ¼ of the largest FLOPs − at all of it"]
    rows = []
    top = top_flops(res, p)
    for r in p.recipes:
        f = res["fits"][r]
        if "error" in f:
            rows.append([r, f"fit failed: {f['error']}", "", "", "", ""])
            continue
        rows.append([r, f"{f['a']:.3g} ± {f['a_err']:.2g}", f"{f['b']:.3f} ± {f['b_err']:.2g}",
                     f"{f['c']:.3f} ± {f['c_err']:.2g}", f"{f['rmse']:.3f}",
                     f"{fit_at(f, top / 4) - fit_at(f, top):+.3f}"])  # fmt: skip
    return md_table(head, rows)


def harness_table(res: dict[str, Any], p: Any) -> str:
    d = max(p.scales)
    h = res.get("harness") or {}
    if not h:
        return "(not run in this preset)"
    head = ["model", *(f"{s} bits/byte" for s in SIZES), *(f"{s} cloze" for s in SIZES)]

    def row(label: str, scores: list[dict[str, float] | None]) -> list[str]:
        bpb = [f"{x['matryoshka_ppl']:.3f}" if x else "-" for x in scores]
        acc = [f"{x['matryoshka_cloze']:.2f}" if x else "-" for x in scores]
        return [label, *bpb, *acc]

    rows = [row(r, [h.get(f"d{d}-recipe-{r}", {}).get(s) for s in SIZES]) for r in p.recipes]
    rows.append(row("baselines (one model per size)", [h.get(f"d{d}-baseline-{s}", {}).get("XL") for s in SIZES]))
    return md_table(head, rows)


def plot_flops(res: dict[str, Any], p: Any, path: Path) -> None:
    """Loss vs forward FLOPs per token: every size (dots) and Mix'n'Match spec (crosses) of every scale, per recipe,
    with the fitted curve; baselines as squares."""
    n = len(p.recipes)
    cols = min(3, n)
    with figure(path, (4.2 * cols, 3.4), ncols=cols, legend=dict(fontsize=6)) as (fig, axes):
        axes = np.atleast_1d(axes)
        for i, r in enumerate(p.recipes[:cols] if n <= cols else p.recipes[::2][:cols]):
            ax = axes[i]
            pts = []
            for j, d in enumerate(p.scales):
                rec = res["recipes"][d][r]
                xs = [v["in_domain"]["flops_per_token"] for v in rec["sizes"].values()]
                ys = [v["in_domain"]["val_loss"] for v in rec["sizes"].values()]
                ax.plot(xs, ys, "o", color=f"C{j}", label=f"d={d} sizes")
                mx = [v["in_domain"]["flops_per_token"] for v in rec["mixnmatch"].values()]
                my = [v["in_domain"]["val_loss"] for v in rec["mixnmatch"].values()]
                ax.plot(mx, my, "x", color=f"C{j}", alpha=0.7, label=f"d={d} Mix'n'Match")
                bx = [v["in_domain"]["flops_per_token"] for v in res["baseline"][d].values()]
                by = [v["in_domain"]["val_loss"] for v in res["baseline"][d].values()]
                ax.plot(bx, by, "s", mfc="none", color=f"C{j}", label=f"d={d} baselines")
                pts += list(zip(xs + mx, ys + my))
            f = res["fits"][r]
            if "error" not in f:
                grid = np.geomspace(min(x for x, _ in pts), max(x for x, _ in pts), 100)
                ax.plot(grid, f["a"] * grid ** (-f["b"]) + f["c"], "k-", lw=1, label="fit a·F^-b + c")
            ax.set_xscale("log")
            ax.set(xlabel="forward FLOPs per token", ylabel="val loss (nats/token)", title=f"recipe: {r}")


def plot_deltas(res: dict[str, Any], p: Any, path: Path) -> None:
    """Δ vs the independent baseline per size, per recipe (grouped bars), in and out of domain."""
    with figure(path, (10, 3.6), ncols=2, grid_axis="y", legend=dict(fontsize=6, ncol=2)) as (fig, axes):
        for ax, dom in zip(axes, DOMAINS):
            labels = [f"d={d} {s}" for d in p.scales for s in SIZES]
            x = np.arange(len(labels))
            w = 0.8 / len(p.recipes)
            for k, r in enumerate(p.recipes):
                ys = [deltas(res, d, r, dom)[s] for d in p.scales for s in SIZES]
                ax.bar(x + (k - (len(p.recipes) - 1) / 2) * w, ys, w, label=r)
            ax.axhline(BAR, color="k", ls="--", lw=0.8)
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xticks(x, labels, rotation=60, fontsize=7)
            ax.set(ylabel="Δ loss vs baseline (nats)", title=DOMAINS[dom])


def write_recipe_report(res: dict[str, Any], p: Any, report: Path) -> None:
    report.mkdir(parents=True, exist_ok=True)
    rows = summary(res, p)
    res["summary"], res["best"] = rows, best_recipe(rows)
    keyed = {k: ({str(d): v for d, v in res[k].items()} if k in ("recipes", "baseline") else res[k]) for k in res}
    write_json(report / "results.json", keyed)
    plot_flops(res, p, report / "flops_vs_loss.png")
    plot_deltas(res, p, report / "delta_vs_baseline.png")
    notes = report / "READING.md"  # a reading written after the run; kept when the report is written again
    reading = f"\n{notes.read_text().strip()}\n" if notes.is_file() else ""
    (report / "README.md").write_text(readme(res, p, rows, reading))


# one f-string template of the whole README: it reads as the page it writes, so it stays in one piece
def readme(res: dict[str, Any], p: Any, rows: list[dict[str, Any]], reading: str) -> str:
    meta, best = res["meta"], res["best"]
    steps = ", ".join(f"{r} {res['steps'][f'd{max(p.scales)}-recipe-{r}']}" for r in p.recipes)
    wall = meta["wall_seconds"] / 60
    train = meta["train_seconds_total"] / 60
    parallel = f"; {meta['jobs']} runs trained at once, one torch thread each" if meta["jobs"] > 1 else ""
    b = next(r for r in rows if r["recipe"] == best)
    a = next(r for r in rows if r["recipe"] == "all")
    return f"""# Which training recipe makes every size good? — preset `{meta["preset"]}`

Reproduce: `{meta["command"]}` (finished runs in the work folder are reused).
Machine: {meta["machine"]}{parallel}. Seed {meta["seed"]}.
Scales d = {", ".join(map(str, p.scales))} ({p.n_layers} layers, vocabulary {p.vocab_size}; every axis nested:
residual width, heads, FFN, depth), sizes {", ".join(SIZES)}. Data: {meta["data"]}, {p.corpus_chars:,} characters.
Baselines: one dense model per size, {meta["tokens_per_baseline_run"]:,} training tokens each. Recipes: the same
training FLOPs as today's recipe (`all`, {p.steps} steps), counted by `train/plan.py` (forward + backward of each
trained submodel, a forward of a distillation teacher); steps at d={max(p.scales)}: {steps}.
Training: {train:.0f} min summed over {len(meta["train_seconds"])} runs; this invocation: {wall:.0f} min of wall time.

## Headline
{headline(rows, best, a, b)}

{summary_table(rows)}
{reading}
Recipes (`matryoshka train --sampling … --mixes … --distill …`): `all` trains every size each step (MatFormer; the
default); `sandwich` the full size, the smallest and 2 random Mix'n'Match specs; `mix` 2 random Mix'n'Match specs
only; `+distill` adds KL(full ‖ size) from the full size's detached distribution (weight 1). A random spec draws a
depth, each layer's granularity and the residual width among the trained sizes' (train/mixes.py).
Mix'n'Match specs evaluated: {p.mixnmatch} per model, per-layer mixes of the trained granularities drawn at random
(non-decreasing with depth, evaluate.mixnmatch_specs), never hand-picked; "the line" interpolates, in log parameters,
the same model's trained sizes.

![Δ vs baseline](delta_vs_baseline.png)

## Loss per size, in domain (nats/token; Δ vs the independent baseline)
{sizes_table(res, p, "in_domain")}

## Loss per size, out of domain: Python's documentation (nats/token; Δ vs the baseline on the same text)
{sizes_table(res, p, "out_of_domain")}

## Does the ordering of sizes hold off the training distribution?
{ordering(res, p)}

## Consistency: top-1 agreement of each size with its own model's XL (in domain)
{consistency_table(res, p)}

## FLOPs per token vs loss, and the seed project's efficiency claim
The seed project claims "efficiency improving exponentially as a function of model size choice while causing only
minor increases in loss". Fitted per recipe over every size and Mix'n'Match spec of both scales: L(F) = a·F^(−b) + c
(F = forward FLOPs per token; ± 1σ from the fit covariance):

{fits_table(res, p)}

{fit_reading(res, p)}

![FLOPs vs loss](flops_vs_loss.png)

## lm-evaluation-harness at d={max(p.scales)}
lm-eval's own evaluator through `matryoshka harness`'s model class, on the two packaged held-out tasks:
`matryoshka_ppl` (bits per byte, lower is better; 50 passages) and `matryoshka_cloze` (accuracy on 200 four-way
next-line choices; chance 0.25).

{harness_table(res, p)}
"""


def headline(rows: list[dict[str, Any]], best: str, a: dict[str, Any], b: dict[str, Any]) -> str:
    i, ai = b["in_domain"], a["in_domain"]
    o = b["out_of_domain"]
    goals = [
        f"sizes within {BAR} nats of their baselines: {i['within']} of {i['sizes']} (goal ≥ 14 of 16; today's "
        f"recipe: {ai['within']})",
        f"Mix'n'Match on or below the line: {i['below']} of {i['mixes']} = {i['below'] / max(i['mixes'], 1):.0%} "
        f"(goal ≥ 75%; today's recipe: {ai['below']} of {ai['mixes']})",
        f"no trained size worse than under today's recipe by more than {WORSE}: worst {b['worst_vs_today']:+.3f}"
        + (" (met)" if b["worst_vs_today"] <= WORSE else " (not met)"),
    ]
    out = [f"- Best recipe by the issue's goals (in domain): **{best}**."]
    out += [f"  - {g}" for g in goals]
    out.append(
        f"- Out of domain the same recipe has {o['within']} of {o['sizes']} sizes within {BAR} and "
        f"{o['below']} of {o['mixes']} mixes on or below the line."
    )
    ood = min(rows, key=lambda x: x["out_of_domain"]["mean_delta"])  # the closest to the baselines off-domain
    r = ood["out_of_domain"]
    out.append(
        f"- Closest to the baselines out of domain: **{ood['recipe']}** (mean Δ {r['mean_delta']:+.3f}; "
        f"{r['within']} of {r['sizes']} sizes within {BAR})."
    )
    return "\n".join(out)


def top_flops(res: dict[str, Any], p: Any) -> float:
    """Forward FLOPs per token of the largest trained size."""
    return max(
        v["in_domain"]["flops_per_token"] for r in res["recipes"][max(p.scales)].values() for v in r["sizes"].values()
    )


def fit_at(f: dict[str, float], x: float) -> float:
    return f["a"] * x ** (-f["b"]) + f["c"]


def fit_reading(res: dict[str, Any], p: Any) -> str:
    """What the fits say, in numbers: the loss cost of a 4x cut in compute, or that the fit cannot tell; and, without
    a fit, what going from the full size to the smallest costs in loss and saves in FLOPs."""
    top, parts, loose = top_flops(res, p), [], []
    for r in p.recipes:
        f = res["fits"][r]
        if "error" in f or f["b_err"] > f["b"]:
            loose.append(r)
        else:
            parts.append(f"{r} {fit_at(f, top / 4) - fit_at(f, top):+.3f} (b = {f['b']:.2f} ± {f['b_err']:.2f})")
    costs = []
    for r in p.recipes:
        dl, ratio = [], []
        for d in p.scales:
            sz = res["recipes"][d][r]["sizes"]
            dl.append(sz[SIZES[-1]]["in_domain"]["val_loss"] - sz[SIZES[0]]["in_domain"]["val_loss"])
            ratio.append(sz[SIZES[0]]["in_domain"]["flops_per_token"] / sz[SIZES[-1]]["in_domain"]["flops_per_token"])
        costs.append(f"{r} +{np.mean(dl):.3f} nats for {np.mean(ratio):.1f}× fewer FLOPs")
    text = "Reading: "
    if parts:
        text += f"where the fit determines an exponent, a 4× cut in FLOPs per token costs {'; '.join(parts)} nats. "
    if loose:
        text += (
            f"For {', '.join(loose)} the exponent is not determined (its error exceeds it): loss changes too little "
            "with FLOPs across these points, and the points of both scales overlap. "
        )
    return text + (
        "Read directly, from the full size to the smallest (mean over scales, in domain): "
        + "; ".join(costs)
        + ". Loss rises polynomially or less as compute falls, not exponentially; whether the increase is minor "
        "depends on the recipe."
    )


def rewrite_report(report: str | Path, preset: Any) -> None:
    """Write README.md and the plots again from the folder's results.json (no training, no evaluation)."""
    import json

    report = Path(report)
    res = json.loads((report / "results.json").read_text())
    for k in ("recipes", "baseline"):
        res[k] = {int(d): v for d, v in res[k].items()}
    write_recipe_report(res, preset, report)
