"""The report kit: a PNG appears whole or not at all, no figure stays open, and md_table writes every Markdown table."""

from __future__ import annotations

import pytest

from matryoshka_lm.plots import figure
from matryoshka_lm.report import md_table

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


def test_md_table_aligns_numbers_right_by_default_and_takes_an_alignment():
    assert md_table(["size", "loss"], [["XL", "3.100"], ["S", 4]]) == (
        "| size | loss |\n|---|---:|\n| XL | 3.100 |\n| S | 4 |"
    )
    text = md_table(["a", "b", "c", "d"], [], "lrcC")
    assert text == "| a | b | c | d |\n|---|---:|:---:|:-:|"
    with pytest.raises(ValueError, match="2 letters for 3 columns"):
        md_table(["a", "b", "c"], [], "lr")
