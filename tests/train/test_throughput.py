"""Throughput you can read: every step logs tokens/s, FLOP/s and MFU (the joint step's FLOPs from train/plan.py
over the device's peak); `train --dry-run` prints the plan from the same FLOPs formula and trains nothing."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, tiny_train_config
from matryoshka_lm.cli import main
from matryoshka_lm.config import preset
from matryoshka_lm.core import checkpoint as ck
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


# ---------------------------------------------------------------- throughput options: the same losses


def run_losses(tmp_path, corpus_file, name: str, **opts) -> list[dict]:
    """(per-step training losses of every size, the final weights) of 4 steps with `opts` set."""
    tcfg = tiny_train_config(steps=4, eval_every=4, **opts)
    out = train(tiny_config(vocab_size=256), tcfg, tmp_path / name, data=str(corpus_file))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], ck.load_tensors(out / ck.WEIGHTS)


def assert_same_run(a, b, rel: float) -> None:
    (la, wa), (lb, wb) = a, b
    for ra, rb in zip(la, lb, strict=True):
        assert ra.keys() == rb.keys()
        for size in ra:
            assert rb[size] == pytest.approx(ra[size], rel=rel, abs=rel), size
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=100 * rel, atol=100 * rel), k


@pytest.fixture(scope="module")
def plain(tmp_path_factory, corpus_file):
    return run_losses(tmp_path_factory.mktemp("plain"), corpus_file, "plain")


def test_activation_checkpointing_recomputes_the_same_losses(tmp_path, corpus_file, plain):
    # the recomputed forward is the same arithmetic: bit for bit on CPU
    assert_same_run(plain, run_losses(tmp_path, corpus_file, "ckpt", checkpointing=True), rel=0)


def test_fused_adamw_takes_the_same_steps(tmp_path, corpus_file, plain):
    assert_same_run(plain, run_losses(tmp_path, corpus_file, "fused", fused_adamw="on"), rel=1e-5)


def test_compiled_blocks_train_like_eager_ones(tmp_path, corpus_file):
    """torch.compile fuses and reorders fp32 arithmetic: equal to float rounding, not bit for bit. One size (a
    dense run) and checkpointing inside the compiled blocks: every size would be a graph each to compile (slow)."""
    from torch._dynamo.utils import counters

    eager = run_losses(tmp_path, corpus_file, "eager", only="XL")
    counters.clear()
    compiled = run_losses(tmp_path, corpus_file, "compiled", only="XL", compile=True, checkpointing=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    assert_same_run(eager, compiled, rel=2e-4)


def test_the_options_are_train_flags_and_may_change_on_resume(tmp_path, corpus_file):
    out = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--data", str(corpus_file), "--out", str(out), "--quiet"]
    assert main([*base, "--steps", "2", "--checkpointing", "--fused-adamw", "on"]) in (0, None)
    assert json.loads((out / ck.CONFIG).read_text())["train"]["checkpointing"] is True
    assert main([*base, "--steps", "3", "--resume", "--fused-adamw", "off"]) in (0, None)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(SystemExit):  # argparse's usage error names the choices
        main([*base, "--steps", "4", "--resume", "--fused-adamw", "sometimes"])
