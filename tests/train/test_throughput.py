"""Throughput you can read: every step logs tokens/s, FLOP/s and MFU (the joint step's FLOPs from train/plan.py
over the device's peak); `train --dry-run` prints the plan from the same FLOPs formula and trains nothing."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config, tiny_train_config
from matryoshka_lm.cli import main
from matryoshka_lm.config import preset
from matryoshka_lm.machine import GPU_PEAK_TFLOPS
from matryoshka_lm.train.dry_run import run_plan
from matryoshka_lm.train.loop import train
from matryoshka_lm.train.plan import size_plan, step_flops


def test_each_step_logs_tokens_per_second_and_mfu_against_the_given_peak(tmp_path, corpus_file):
    cfg, tcfg = tiny_config(vocab_size=256), tiny_train_config(steps=3)
    train(cfg, tcfg, tmp_path / "run", data=str(corpus_file), peak_tflops=0.5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    plan = size_plan(cfg, tcfg)
    flops = 0.0
    for i, row in enumerate(rows):
        flops += step_flops(cfg, tcfg, plan, i)
        elapsed = flops / row["flops_per_s"]  # the FLOPs so far are the formula's, whatever the clock said
        assert row["tokens_per_s"] == pytest.approx((i + 1) * tcfg.batch_size * tcfg.seq_len / elapsed, rel=1e-3)
        assert row["mfu"] == pytest.approx(row["flops_per_s"] / 0.5e12)
        assert 0 < row["mfu"] < 1


def test_dry_run_matches_the_flops_formula():
    cfg, tcfg = preset("small")
    plan = run_plan(cfg, tcfg, mfu=0.5, cpu_peak=1e11)
    want = sum(step_flops(cfg, tcfg, size_plan(cfg, tcfg), s) for s in range(tcfg.steps))
    assert plan["flops"] == pytest.approx(want)
    assert plan["tokens"] == tcfg.steps * tcfg.batch_size * tcfg.seq_len
    assert plan["hours"]["1x H100 at 50% MFU"] == pytest.approx(want / (GPU_PEAK_TFLOPS["H100"] * 1e12 * 0.5) / 3600)
    assert set(plan["sizes"]) == {"XL", "L", "M", "S"}
    assert plan["sizes"]["XL"]["total"] > plan["sizes"]["S"]["total"]


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    main(["train", "--preset", "tiny", "--steps", "50", "--out", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    assert "50 steps" in printed and "H100" in printed and "| XL |" in printed
    assert not out.exists()


def test_a_bad_peak_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "tiny", "--peak-tflops", "-1", "--dry-run"])
    assert e.value.code == 2 and "--peak-tflops" in capsys.readouterr().err
