"""The shared figure helper: a PNG appears whole or not at all, and no figure stays open."""

from __future__ import annotations

import pytest

from matryoshka_lm.plots import figure

PNG = b"\x89PNG\r\n\x1a\n"


def open_figures() -> list[int]:
    import matplotlib.pyplot as plt

    return plt.get_fignums()


def test_writes_a_png_with_nothing_left_beside_it(tmp_path):
    path = tmp_path / "new" / "plot.png"  # the folder is created
    with figure(path, (3, 2), ncols=2, legend=dict(fontsize=7)) as (fig, axes):
        axes[0].plot([1, 2], [3, 4], label="a line")
        axes[1].bar([0, 1], [1, 2])
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == ["plot.png"]
    assert axes[0].get_legend() is not None and axes[1].get_legend() is None
    assert open_figures() == []


def test_a_failing_plot_keeps_the_old_file(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        with figure(path, (3, 2)) as (fig, ax):
            ax.plot([1, 2], [1 / 0, 2])
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    assert open_figures() == []


def test_a_failing_save_leaves_no_file(tmp_path, monkeypatch):
    import matplotlib.figure

    def full_disk(self, fname, **kw):
        open(fname, "wb").write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="disk full"):
        with figure(tmp_path / "plot.png", (3, 2)) as (fig, ax):
            ax.plot([1, 2], [1, 2], label="x")
    assert list(tmp_path.iterdir()) == []
