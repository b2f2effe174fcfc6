"""Mix'n'Match search: budgets, the pruned candidate space, the frontier, the CLI and its bad input."""

from __future__ import annotations

import json
from itertools import product

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _tiny_ckpt import make_checkpoint
from conftest import tiny_config
from matryoshka_lm.cli import main
from matryoshka_lm.core.spec import count_params, parse_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.mixnmatch.candidates import (
    Budget,
    enumerate_candidates,
    granularity_levels,
    monotone_sequences,
    parse_budget,
    spec_text,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file):
    return make_checkpoint(tmp_path_factory.mktemp("mnm") / "ckpt", corpus_file)


@pytest.mark.parametrize(
    "text, want",
    [
        ("params=5M", Budget("params", 5e6)),
        ("flops = 1.5g", Budget("flops", 1.5e9)),
        ("params=120000", Budget("params", 1.2e5)),
        ("latency=3ms", Budget("latency", 3e-3)),
        ("latency=0.5s", Budget("latency", 0.5)),
    ],
)
def test_parse_budget(text, want):
    got = parse_budget(text)
    assert got.metric == want.metric and got.value == pytest.approx(want.value)


@pytest.mark.parametrize("text", ["params", "size=5M", "params=5Q", "latency=3", "params=-1", "flops=0", ""])
def test_bad_budget(text):
    with pytest.raises(MatryoshkaError, match="budget"):
        parse_budget(text)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5))
def test_sequences_grow_monotonically_in_steps_of_one_level(depth, levels):
    seqs = list(monotone_sequences(depth, levels))
    brute = [s for s in product(range(levels), repeat=depth) if all(0 <= b - a <= 1 for a, b in zip(s, s[1:]))]
    assert len(seqs) == len(set(seqs)) and sorted(seqs) == brute


def test_four_layers_four_levels_count():
    assert len(list(monotone_sequences(4, 4))) == 20  # 4 starts x 2^3 step patterns, minus those above level 3


def test_candidates_include_the_trained_sizes_and_name_round_trips():
    cfg = tiny_config()
    names, _ = granularity_levels(cfg)
    assert names == ["S", "M", "L", "XL"]
    cands = enumerate_candidates(cfg)
    for c in cands:
        text = spec_text(cfg, c)
        spec = parse_spec(cfg, text)
        assert (spec.width, spec.layers) == (c.spec.width, c.spec.layers)
        assert c.params == count_params(cfg, c.spec)["total"]
    texts = {spec_text(cfg, c) for c in cands}
    assert set(cfg.sizes) <= texts


def test_search_cli_writes_frontier(ckpt, tmp_path, capsys):
    budget = "params=30K"
    assert (
        main(
            [
                "mixnmatch",
                str(ckpt),
                "--budget",
                budget,
                "--batches",
                "1",
                "--max-evals",
                "8",
                "--plot",
                str(tmp_path / "f.png"),
                "--json",
                str(tmp_path / "f.json"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    best = out.strip().splitlines()[-1].split(": ", 1)[1]
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["best"] == best
    from matryoshka_lm.core import checkpoint as ck

    cfg, _ = ck.read_config(ckpt)
    assert count_params(cfg, parse_spec(cfg, best))["total"] <= 30_000
    points = report["points"]
    kinds = {p["kind"] for p in points}
    assert kinds == {"uniform", "mix'n'match"}
    fits = [p for p in points if p["params"] <= 30_000]
    assert min(fits, key=lambda p: p["val_loss"])["spec"] == best
    front = [p for p in points if p["pareto"]]
    assert all(a["val_loss"] > b["val_loss"] for a, b in zip(front, front[1:]))  # cheaper -> worse on the frontier
    assert "| uniform |" in out and "| mix'n'match |" in out
    assert (tmp_path / "f.png").stat().st_size > 5000


def test_latency_budget_is_measured(ckpt, tmp_path, capsys):
    assert (
        main(
            [
                "mixnmatch",
                str(ckpt),
                "--budget",
                "latency=10s",
                "--batches",
                "1",
                "--max-evals",
                "4",
                "--latency-tokens",
                "16",
                "--json",
                str(tmp_path / "l.json"),
                "--plot",
                str(tmp_path / "l.png"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "l.json").read_text())
    assert all(p["latency_ms"] is not None and p["latency_ms"] > 0 for p in report["points"])
    assert "latency ms" in capsys.readouterr().out


@pytest.mark.parametrize(
    "budget, msg",
    [
        ("params=1K", "no submodel fits params=1.00K: the smallest is S at"),
        ("latency=1us", "no submodel fits latency=0.001ms: the smallest is S"),
        ("params=lots", "bad budget"),
    ],
)
def test_budget_errors(ckpt, tmp_path, capsys, budget, msg):
    assert (
        main(
            [
                "mixnmatch",
                str(ckpt),
                "--budget",
                budget,
                "--latency-tokens",
                "8",
                "--plot",
                str(tmp_path / "x.png"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_memory_budget_searches_size_x_bits(ckpt, tmp_path, capsys):
    """A memory budget tries every candidate at fp32, int8, int4 and int2; the best fits the bytes and is the
    lowest loss among the evaluated cells that fit; its name round-trips with its bit width."""
    from matryoshka_lm.core import checkpoint as ck
    from matryoshka_lm.core import quant

    cfg, _ = ck.read_config(ckpt)
    full = quant.weight_bytes(cfg, parse_spec(cfg, "XL"), None, quant.QuantConfig())
    budget = int(full * 0.3)
    args = ["mixnmatch", str(ckpt), "--budget", f"memory={budget}B", "--batches", "1", "--max-evals", "8"]
    assert main([*args, "--plot", str(tmp_path / "m.png"), "--json", str(tmp_path / "m.json")]) == 0
    best = capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1]
    report = json.loads((tmp_path / "m.json").read_text())
    assert {p["bits"] for p in report["points"]} == {None, 8, 4, 2}
    spec = parse_spec(cfg, best)
    assert spec.bits is not None and quant.weight_bytes(cfg, spec, spec.bits, quant.QuantConfig()) <= budget
    fits = [p for p in report["points"] if p["weight_bytes"] <= budget]
    assert min(fits, key=lambda p: p["val_loss"])["spec"] == best
    for p in report["points"]:  # every cell's bytes are the formula's
        s = parse_spec(cfg, p["spec"])
        assert p["weight_bytes"] == quant.weight_bytes(cfg, s, s.bits, quant.QuantConfig())
    assert main([*args[:4], "--bits", "fp32,int9"]) == 2
    assert "bit width 9" in capsys.readouterr().err


def test_memory_budget_units():
    assert parse_budget("memory=1.5MB") == Budget("memory", 1.5e6)
    assert parse_budget("memory=200kb").value == 2e5
    with pytest.raises(MatryoshkaError, match="not one of B, KB"):
        parse_budget("memory=3ms")
