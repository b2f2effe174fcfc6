"""The unchanged `matryoshka train` under torchrun: 2 CPU processes on gloo match one process on the same global
batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # an end-to-end pipeline (still run by `make test`)


def run_train(args: list[str], nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "matryoshka_lm.cli", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "matryoshka_lm.cli",
            *args,
        ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def losses(out) -> list[dict[str, float]]:
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tmp_path, corpus_file, mode):
    common = [
        "train",
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--data",
        str(corpus_file),
        "--max-corpus-chars",
        "60000",
        "--quiet",
        "--device",
        "cpu",
    ]
    run_train(common + ["--out", str(tmp_path / "one")], 1)
    run_train(common + ["--out", str(tmp_path / "two")] + (["--fsdp"] if mode == "fsdp" else []), 2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for size in ra:
            assert abs(ra[size] - rb[size]) < 1e-4, (size, ra[size], rb[size])
    # rank 0 alone wrote the checkpoint, and it loads
    from matryoshka_lm.core.checkpoint import load_model

    load_model(tmp_path / "two")


def test_fsdp_in_one_process_shards_and_matches_the_unsharded_model():
    """torchrun with one process and fsdp: a gloo group of one, every parameter a DTensor, and three training steps
    equal to the unsharded model's (FSDP used to be skipped silently when there was one process)."""
    from pathlib import Path

    probe = Path(__file__).parents[1] / "_fsdp_one_process.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(probe), "cpu"]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["OK", "gloo"]
