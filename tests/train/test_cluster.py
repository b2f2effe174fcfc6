"""docs/cluster.md's commands as a test runs them: `matryoshka prepare` once, then scripts/train.sbatch itself on
one node outside SLURM with 2 CPU processes (gloo) on the shards; run again, the script finds the checkpoint and
resumes (what a requeued job does), ending where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from matryoshka_lm.cli import main

pytestmark = pytest.mark.slow  # two torchrun launches (still run by `make test`)

SCRIPT = Path(__file__).parents[2] / "scripts" / "train.sbatch"


def sbatch_locally(data: Path, out: Path, steps: int) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "DATA": str(data),
        "OUT": str(out),
        "PRESET": "tiny",
        "STEPS": str(steps),
        "NPROC_PER_NODE": "2",
        "DEVICE": "cpu",
        "PORT": "0",  # any free port: tests may run side by side
        "EXTRA": "--batch-size 8 --save-every 2 --quiet",
        "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)


def test_the_sbatch_script_trains_on_prepared_shards_and_resumes_after_a_requeue(tmp_path, corpus_file):
    data, out = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", str(corpus_file), "-o", str(data), "--vocab-size", "256", "--workers", "2"]) in (0, None)
    first = sbatch_locally(data, out, steps=2)
    assert first.returncode == 0, first.stderr[-3000:]
    again = sbatch_locally(data, out, steps=4)  # the requeued job: same script, more steps, finds the checkpoint
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["data"] == str(data) and saved["steps"] == 4
    from matryoshka_lm.core import checkpoint as ck

    assert (out / ck.TOKENIZER).read_text() == (data / "tokenizer.json").read_text()  # the shards' tokenizer
    assert ck.load_model(out).cfg.vocab_size == ck.load_tokenizer(out).get_vocab_size()
