"""The Mix'n'Match frontier: every evaluated candidate as a Markdown table, as JSON and as a cost-vs-loss plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matryoshka_lm.core.spec import format_spec
from matryoshka_lm.report import figure, md_table
from matryoshka_lm.train.evaluate import human

from .candidates import Budget, Candidate, pareto_front


def format_frontier(points: list[Candidate], best: Candidate, budget: Budget) -> str:
    """Markdown table of every evaluated candidate, cheapest first; '*' marks the Pareto frontier."""
    front = {id(c) for c in pareto_front(points, budget.metric)}
    lat = any(c.latency is not None for c in points)
    head = ["spec", "kind", "params", "FLOPs/token", "MB", *(["latency ms"] if lat else []), "val loss", "frontier"]
    rows = []
    for c in points:
        name = f"**{c.text}**" if c is best else c.text
        row = [name, c.kind, human(c.params), human(c.flops), f"{c.memory / 1e6:.3g}"]
        if lat:
            row.append(f"{c.latency * 1e3:.2f}" if c.latency is not None else "")
        fits = c.cost(budget.metric) <= budget.value
        rows.append([*row, f"{c.val_loss:.3f}", "*" if id(c) in front else "", "yes" if fits else ""])
    return md_table([*head, "fits"], rows, "ll" + "r" * (len(head) - 3) + "CC")


def frontier_json(points: list[Candidate], best: Candidate, budget: Budget) -> dict[str, Any]:
    """The search's result for mixnmatch.json: the budget, the best spec and every evaluated point."""
    front = {id(c) for c in pareto_front(points, budget.metric)}
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
    return {"budget": str(budget), "best": best.text, "best_canonical": format_spec(best.spec), "points": rows}


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
