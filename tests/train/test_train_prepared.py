"""`train --data DATA_DIR` on `matryoshka prepare` shards: memory-mapped, the same losses as the same tokens in
memory, a resume reads the same windows, and a model of another tokenizer is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_config, tiny_train_config
from matryoshka_lm.cli import main
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.data.prepare import prepare
from matryoshka_lm.data.shards import TokenStream, open_prepared
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.train import loop
from matryoshka_lm.train.eval_checkpoint import evaluate_checkpoint
from matryoshka_lm.train.loop import train

TIMING = ("tokens_per_s", "flops_per_s", "mfu")  # wall-clock rates, not the run's numbers


def losses(out):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_file):
    """The test corpus in shards of 40,000 tokens (so training windows cross shard boundaries)."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(corpus_file, out, vocab_size=256, workers=1, shard_tokens=40_000)
    return out


def test_training_on_shards_equals_training_on_the_same_tokens_in_memory(tmp_path, prepared, monkeypatch):
    tok, train_tokens, val_tokens, _ = open_prepared(prepared)
    assert isinstance(train_tokens, TokenStream) and isinstance(val_tokens, np.memmap)
    train(tiny_config(), tiny_train_config(steps=6, eval_every=3), tmp_path / "mapped", data=str(prepared))
    in_memory = (tok, np.array(train_tokens[0 : len(train_tokens)]), np.array(val_tokens))
    monkeypatch.setattr(loop, "prepare_data", lambda *a: in_memory)
    train(tiny_config(), tiny_train_config(steps=6, eval_every=3), tmp_path / "memory", data=str(prepared))
    a, b = (tmp_path / "mapped" / "metrics.jsonl").read_text(), (tmp_path / "memory" / "metrics.jsonl").read_text()
    strip = lambda text: [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in text.splitlines()]
    assert strip(a) == strip(b)  # losses and val losses, bit for bit
    assert (tmp_path / "mapped" / ck.TOKENIZER).read_text() == tok.to_str()
    stats = json.loads((tmp_path / "mapped" / "data.json").read_text())
    assert stats["train_tokens"] == len(train_tokens) and stats["val_tokens"] == len(val_tokens)


def test_a_resumed_run_on_shards_reads_the_same_windows(tmp_path, prepared):
    tcfg = lambda: tiny_train_config(steps=8, save_every=4)
    full, halted = tmp_path / "full", tmp_path / "halted"
    train(tiny_config(), tcfg(), full, data=str(prepared))
    train(tiny_config(), tcfg(), halted, data=str(prepared), halt_after=4)
    train(tiny_config(), tcfg(), halted, data=str(prepared), resume=True)
    assert losses(full) == losses(halted)


def test_a_model_of_another_tokenizer_is_refused(tmp_path, prepared, corpus_file):
    other = tmp_path / "other"
    train(tiny_config(), tiny_train_config(steps=1, vocab_size=300), other, data=str(corpus_file))
    with pytest.raises(MatryoshkaError, match="prepared with another tokenizer"):
        train(tiny_config(), tiny_train_config(steps=1), tmp_path / "init", data=str(prepared), init=other)
    data = tmp_path / "data"  # a run on shards that are then prepared again with another tokenizer
    prepare(corpus_file, data, vocab_size=256, workers=1)
    run = tmp_path / "run"
    train(tiny_config(), tiny_train_config(steps=4, save_every=2), run, data=str(data), halt_after=2)
    for f in data.iterdir():
        f.unlink()
    data.rmdir()
    prepare(corpus_file, data, vocab_size=300, workers=1)
    with pytest.raises(MatryoshkaError, match="prepared with another tokenizer"):
        train(tiny_config(), tiny_train_config(steps=4, save_every=2), run, data=str(data), resume=True)


def test_eval_of_a_checkpoint_trained_on_shards_uses_their_validation_split(tmp_path, prepared):
    out = tmp_path / "run"
    train(tiny_config(), tiny_train_config(steps=2), out, data=str(prepared))
    rows, table = evaluate_checkpoint(out, n_batches=1)
    assert len(rows) == 4 and "XL" in table
    report = json.loads((out / "eval.json").read_text())
    assert report["val_tokens"] == len(open_prepared(prepared)[2])


def test_the_command_line_trains_on_a_prepared_folder(tmp_path, prepared):
    tiny = ["--preset", "tiny", "--quiet", "--device", "cpu", "--seq-len", "32", "--batch-size", "4"]
    assert main(["train", *tiny, "--steps", "2", "--data", str(prepared), "--out", str(tmp_path / "o")]) == 0
    assert ck.load_tokenizer(tmp_path / "o").to_str() == open_prepared(prepared)[0].to_str()
