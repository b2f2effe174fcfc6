"""scripts/train_proof.py, the one-command GPU proof of issue #25, as the device would run it but on CPU: it
prepares shards, trains on them, and its report is what the run's metrics.jsonl says."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a prepare and a training run in subprocesses (still run by `make test`)

SCRIPT = Path(__file__).parents[2] / "scripts" / "train_proof.py"


def test_the_proof_prepares_trains_and_reports_the_runs_own_numbers(tmp_path):
    out = tmp_path / "proof"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu", "--preset", "tiny", "--steps", "4",
           "--vocab-size", "300", "--no-compile"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "proof.json").read_text())
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert res["steps"] == 4 == rows[-1]["step"]
    assert res["loss_first"] == rows[0]["loss"] and res["loss_last"] == rows[-1]["loss"]
    timed = [r for r in rows if "tokens_per_s" in r]
    assert res["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in timed[len(timed) // 2 :]) > 0
    assert set(res["val_loss_last"]) == set(rows[0]["loss"])
    assert (out / "data" / "manifest.json").is_file() and (out / "loss.png").stat().st_size > 1000
    md = (out / "proof.md").read_text()
    assert "preset tiny on cpu, fp32, prepared shards" in md and "| XL |" in md
