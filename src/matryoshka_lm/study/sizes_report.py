"""The sizes study's report (sizes.py): README.md, results.json and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from matryoshka_lm.core.checkpoint import write_json
from matryoshka_lm.report import figure, md_table
from matryoshka_lm.train.evaluate import human

from .evaluate import BAR, line_through
from .presets import SIZES


def plot_sizes(res: dict[str, Any], main: int, path: Path) -> None:
    with figure(path, (7, 4.5), legend=dict(fontsize=7, ncol=2)) as (fig, ax):
        for i, d in enumerate(sorted(res["matryoshka"], key=int)):
            color = f"C{i}"
            for kind, style in (("matryoshka", "o-"), ("baseline", "s--")):
                pts = sorted((v["non_embedding_params"], v["val_loss"]) for v in res[kind][d].values())
                ax.plot(
                    *zip(*pts), style, color=color, label=f"d={d} {kind}", alpha=0.9 if kind == "matryoshka" else 0.6
                )
        mix = res["mixnmatch"].get("all", [])
        if mix:
            ax.plot(
                [m["non_embedding_params"] for m in mix],
                [m["val_loss"] for m in mix],
                "kx",
                label=f"Mix'n'Match (d={main}, never trained)",
            )
        ax.set_xscale("log")
        ax.set(
            xlabel="non-embedding parameters",
            ylabel="validation loss (nats/token)",
            title="Matryoshka sizes vs independently trained baselines",
        )


def plot_ablation(res: dict[str, Any], path: Path) -> None:
    with figure(path, (6, 4)) as (fig, ax):
        for name, pts in res["ablation"].items():
            xy = sorted((v["flops_per_token"], v["val_loss"]) for v in pts.values())
            ax.plot(*zip(*xy), "o-", label=f"nest {name}")
        ax.set_xscale("log")
        ax.set(xlabel="forward FLOPs per token", ylabel="validation loss", title="Which axes to nest")


def plot_consistency(res: dict[str, Any], main: int, path: Path) -> None:
    cons = res["consistency"][main]
    x = np.arange(len(SIZES) - 1)
    with figure(path, (8, 3.5), ncols=2, grid_axis="y") as (fig, axes):
        for ax, key, label in (
            (axes[0], "top1_agreement", "top-1 agreement with full"),
            (axes[1], "kl", "KL(full || size)"),
        ):
            for j, kind in enumerate(("matryoshka", "baseline")):
                ax.bar(x + (j - 0.5) * 0.38, [cons[s][kind][key] for s in SIZES[1:]], 0.38, label=kind)
            ax.set_xticks(x, SIZES[1:])
            ax.set_title(label)
        fig.suptitle(f"consistency with the full model (d={main})")


def plot_scaling(res: dict[str, Any], path: Path) -> None:
    with figure(path, (6, 4), legend=dict(fontsize=8)) as (fig, ax):
        for i, kind in enumerate(("matryoshka", "baseline")):
            pts = [(v["non_embedding_params"], v["val_loss"]) for d in res[kind] for v in res[kind][d].values()]
            n, l = map(np.array, zip(*sorted(pts)))
            ax.plot(n, l, "o" if kind == "matryoshka" else "s", color=f"C{i}", label=f"{kind} points", alpha=0.7)
            fit = res["fits"].get(kind, {})
            if "a" in fit:
                grid = np.geomspace(n.min(), n.max(), 50)
                ax.plot(
                    grid,
                    fit["a"] * grid ** -fit["b"] + fit["c"],
                    "-",
                    color=f"C{i}",
                    label=f"{kind}: {fit['a']:.3g}·N^-{fit['b']:.3f} + {fit['c']:.3f}",
                )
        ax.set_xscale("log")
        ax.set(xlabel="non-embedding parameters N", ylabel="validation loss", title="L(N) = a·N^-b + c")


def quality_table(res: dict[str, Any]) -> tuple[str, list[float]]:
    head = ["scale", "size", "non-emb params", "Matryoshka loss", "baseline loss", "Δ (nats)", "within 0.04"]
    rows, deltas = [], []
    for d in sorted(res["matryoshka"], key=int):
        for s in SIZES:
            m, b = res["matryoshka"][d][s], res["baseline"][d][s]
            delta = m["val_loss"] - b["val_loss"]
            deltas.append(delta)
            rows.append([f"d={d}", s, human(m["non_embedding_params"]), f"{m['val_loss']:.3f}", f"{b['val_loss']:.3f}",
                         f"{delta:+.3f}", "yes" if delta <= BAR else "no"])  # fmt: skip
    return md_table(head, rows, "llrrrrc"), deltas


def consistency_table(res: dict[str, Any]) -> str:
    head = ["scale", "size", "agreement: Matryoshka", "agreement: baselines", "KL: Matryoshka", "KL: baselines"]
    rows = []
    for d in sorted(res["consistency"], key=int):
        for s in SIZES[1:]:
            m, b = res["consistency"][d][s]["matryoshka"], res["consistency"][d][s]["baseline"]
            rows.append(
                [f"d={d}", s, *(f"{x:.3f}" for x in (m["top1_agreement"], b["top1_agreement"], m["kl"], b["kl"]))]
            )
    return md_table(head, rows, "llrrrr")


def ablation_table(res: dict[str, Any]) -> str:
    rows = [
        [name, s, human(pts[s]["flops_per_token"]), human(pts[s]["non_embedding_params"]), f"{pts[s]['val_loss']:.3f}"]
        for name, pts in res["ablation"].items()
        for s in SIZES
    ]
    return md_table(["nested axes", "size", "FLOPs/token", "non-emb params", "val loss"], rows, "llrrr")


def mixnmatch_table(res: dict[str, Any]) -> tuple[str, dict[str, tuple[int, int]]]:
    """Per nesting design: each Mix'n'Match spec against the line through that model's trained sizes."""
    head = ["nested axes", "Mix'n'Match spec", "non-emb params", "val loss", "line through trained sizes", "Δ"]
    rows, counts = [], {}
    for design, mixes in res["mixnmatch"].items():
        trained = [(v["non_embedding_params"], v["val_loss"]) for v in res["ablation"][design].values()]
        below = 0
        for m in sorted(mixes, key=lambda m: m["non_embedding_params"]):
            pred = line_through(trained, m["non_embedding_params"])
            below += m["val_loss"] <= pred
            rows.append([design, f"`{m['spec']}`", human(m["non_embedding_params"]), f"{m['val_loss']:.3f}",
                         f"{pred:.3f}", f"{m['val_loss'] - pred:+.3f}"])  # fmt: skip
        counts[design] = (below, len(mixes))
    return md_table(head, rows, "llrrrr"), counts


def fits_table(res: dict[str, Any]) -> str:
    rows = []
    for kind, f in res["fits"].items():
        if "a" in f:
            rows.append([kind, f"{f['a']:.3g} ± {f['a_err']:.2g}", f"{f['b']:.3f} ± {f['b_err']:.3f}",
                         f"{f['c']:.3f} ± {f['c_err']:.3f}", f"{f['rmse']:.4f}"])  # fmt: skip
        else:
            rows.append([kind, f"fit failed: {f.get('error', '?')}", "", "", ""])
    return md_table(["points", "a", "b", "c (irreducible)", "RMSE"], rows)


def write_report(res: dict[str, Any], preset: Any, report: Path) -> None:
    report.mkdir(parents=True, exist_ok=True)
    main = preset.main_scale
    keyed = {
        k: ({str(d): v for d, v in res[k].items()} if k in ("matryoshka", "baseline", "consistency") else res[k])
        for k in res
    }
    write_json(report / "results.json", keyed)
    plot_sizes(res, main, report / "size_vs_loss.png")
    plot_ablation(res, report / "ablation_flops_vs_loss.png")
    plot_consistency(res, main, report / "consistency.png")
    plot_scaling(res, report / "scaling.png")
    (report / "README.md").write_text(readme(res, main))


def _summary(meta: dict[str, Any], deltas: list[float]) -> tuple[str, str, str, str]:
    """The README's lines on the runs, their training time, and the headline's bar and gap."""
    runs = (
        f"Every run: {meta['tokens_per_run']:,} training tokens, identical hyper-parameters; "
        "all evaluated on the same held-out tokens."
    )
    hours = (
        f"Training time, summed over the {len(meta['train_seconds'])} runs: "
        f"{meta['train_seconds_total'] / 60:.1f} min (this invocation's wall time: "
        f"{meta['wall_seconds'] / 60:.1f} min; finished runs are reused)."
    )
    within = (
        f"{sum(d <= BAR for d in deltas)} of {len(deltas)} Matryoshka sizes are within {BAR} nats of their "
        "independently trained baseline (the MatFormer bar);"
    )
    gap = (
        f"the largest gap is {max(deltas):+.3f} nats, the mean {np.mean(deltas):+.3f}. "
        "Negative Δ means the Matryoshka size is *better*."
    )
    return runs, hours, within, gap


# one f-string template of the whole README: it reads as the page it writes, so it stays in one piece
def readme(res: dict[str, Any], main: int) -> str:
    quality, deltas = quality_table(res)
    mix, mix_counts = mixnmatch_table(res)
    mix_line = ", ".join(f"{b} of {n} when nesting {d}" for d, (b, n) in mix_counts.items())
    meta = res["meta"]
    runs, hours, within, gap = _summary(meta, deltas)
    scaling = (
        "Scaling: L(N) = a·N^(−b) + c over all sizes of all scales "
        "(N = non-embedding parameters; ± 1σ from the fit covariance)"
    )
    return f"""# Matryoshka vs independently trained models — preset `{meta["preset"]}`

Reproduce: `{meta["command"]}` (same seed → same numbers on the same machine).
Machine: {meta["machine"]}. Seed {meta["seed"]}. Data: {meta["data"]}.
{runs}
{hours}

## Headline
- {within}
  {gap}
- One Matryoshka training run replaces {len(SIZES)} baseline runs per scale.
- Mix'n'Match submodels (never trained) on or below the line through their model's trained sizes: {mix_line}.

## Quality per size (val loss, nats/token)
{quality}

![size vs loss](size_vs_loss.png)

## Consistency with the full model
Matryoshka: each size vs the Matryoshka XL (same weights). Baselines: each independent model vs the independent XL.

{consistency_table(res)}

![consistency](consistency.png)

## Which axes to nest (d={main})
{ablation_table(res)}

![ablation](ablation_flops_vs_loss.png)

## Mix'n'Match (d={main}): per-layer mixes of the trained granularities, never trained
{mix}

## {scaling}
{fits_table(res)}

![scaling](scaling.png)

With this few points and this little training, the constants are loose; compare the two rows, not the absolute values.
"""
