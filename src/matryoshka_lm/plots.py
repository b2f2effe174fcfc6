"""The matplotlib set-up every PNG of the package shares: Agg backend, figure, grid, legend, tight layout and an
atomic save (a reader never sees half a PNG, and a failed plot leaves the previous file, or none)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DPI = 120


@contextmanager
def figure(
    path: str | Path,
    figsize: tuple[float, float],
    ncols: int = 1,
    grid_axis: str = "both",
    legend: dict[str, Any] | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Yield (fig, ax) to draw on (ax is an array of `ncols` axes when ncols > 1); when the block ends, grid
    every axes, put the legend (keyword arguments `legend`) on the first, lay out, and write `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield fig, ax
        axes = list(ax) if ncols > 1 else [ax]
        for a in axes:
            a.grid(alpha=0.3, axis=grid_axis)
        axes[0].legend(**(legend or {}))
        fig.tight_layout()
        save_png(fig, Path(path))
    finally:
        plt.close(fig)


def save_png(fig: Any, path: Path) -> None:
    """Write into a temporary sibling, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
