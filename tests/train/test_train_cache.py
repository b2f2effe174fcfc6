"""`train --data TEXT` through the token-shard cache (data/cache.py): text prepared once into a `matryoshka prepare`
folder, trained on by memory map with the losses of training on that folder directly; reused by a second run, the
run's eval and its resume; prepared again when the text changes; and which sources `auto` sends there."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from conftest import tiny_config, tiny_train_config
from matryoshka_lm.cli import main
from matryoshka_lm.data import cache
from matryoshka_lm.data.prepare import prepare
from matryoshka_lm.data.shards import open_prepared, read_manifest
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split
from matryoshka_lm.train.loop import train

TIMING = ("tokens_per_s", "flops_per_s", "mfu")


def metrics(out):
    rows = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(r).items() if k not in TIMING} for r in rows]


def tcfg(**kw):
    return tiny_train_config(**{"max_corpus_chars": 0, "prepare_text": "always", "eval_every": 3, **kw})


@pytest.fixture()
def text(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "texts" / "a.txt"
    path.parent.mkdir()
    path.write_text(corpus_file.read_text()[:150_000])
    return path


def cached_folders(tmp_path):
    return sorted(p for p in (tmp_path / "cache" / "prepared").iterdir() if p.is_dir())


def test_text_through_the_cache_trains_like_its_prepared_folder(tmp_path, text):
    train(tiny_config(), tcfg(steps=6), tmp_path / "cached", data=str(text))
    (folder,) = cached_folders(tmp_path)
    assert read_manifest(folder)["sources"][0]["path"] == "a.txt"
    direct = tmp_path / "direct"
    prepare(text, direct, vocab_size=256, val_fraction=0.05, workers=1)
    assert (direct / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()
    train(tiny_config(), tcfg(steps=6, prepare_text="never"), tmp_path / "on_folder", data=str(direct))
    assert metrics(tmp_path / "cached") == metrics(tmp_path / "on_folder")
    stats = json.loads((tmp_path / "cached" / "data.json").read_text())
    assert stats == json.loads((tmp_path / "on_folder" / "data.json").read_text())  # unigram from its counts
    # the run's eval splits what it trained on: the cache folder's validation shard
    _, _, val = checkpoint_val_split(tmp_path / "cached")
    assert (val == open_prepared(folder)[2]).all()


def test_a_second_run_and_a_resume_reuse_the_folder(tmp_path, text):
    train(tiny_config(), tcfg(steps=8, save_every=4), tmp_path / "full", data=str(text))
    (folder,) = cached_folders(tmp_path)
    shard = folder / read_manifest(folder)["shards"]["train"][0]["file"]
    written = shard.stat().st_mtime_ns
    halted = tmp_path / "halted"
    train(tiny_config(), tcfg(steps=8, save_every=4), halted, data=str(text), halt_after=4)
    train(tiny_config(), tcfg(steps=8, save_every=4), halted, data=str(text), resume=True)
    assert metrics(tmp_path / "full") == metrics(halted)
    assert cached_folders(tmp_path) == [folder] and shard.stat().st_mtime_ns == written


def test_a_changed_text_is_prepared_again(tmp_path, text):
    train(tiny_config(), tcfg(steps=2), tmp_path / "a", data=str(text))
    (folder,) = cached_folders(tmp_path)
    before = read_manifest(folder)["train_tokens"]
    text.write_text(text.read_text() * 2)
    train(tiny_config(), tcfg(steps=2), tmp_path / "b", data=str(text))
    assert cached_folders(tmp_path) == [folder] and read_manifest(folder)["train_tokens"] > before


def test_auto_prepares_large_or_structured_text_only(tmp_path, text, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": p}) + "\n" for p in text.read_text().split("\n\n")))
    assert cache.uses_cache(rows, "auto") and not cache.uses_cache(rows, "never")
    assert cache.uses_cache(rows, "auto", max_corpus_chars=10)  # records are never read as prose
    assert not cache.uses_cache(text, "auto") and not cache.uses_cache(None, "auto")
    assert not cache.uses_cache(text.parent, "auto", max_corpus_chars=10)  # a limit is a read in memory
    monkeypatch.setattr(cache, "AUTO_BYTES", 100_000)
    assert cache.uses_cache(text.parent, "auto") and cache.uses_cache(None, "always")
    main(["train", "--preset", "tiny", "--steps", "2", "--data", str(rows), "--out", str(tmp_path / "run"), "--quiet"])
    (folder,) = cached_folders(tmp_path)
    assert read_manifest(folder)["sources"][0]["path"] == "rows.jsonl"
    # eval on records given explicitly splits the same cache folder, not the JSON read as prose
    assert (checkpoint_val_split(tmp_path / "run", str(rows))[2] == open_prepared(folder)[2]).all()
    with pytest.raises(MatryoshkaError, match="max-corpus-chars"):
        cache.uses_cache(text, "always", max_corpus_chars=1000)
    with pytest.raises(MatryoshkaError, match="prepare_text"):
        tiny_train_config(prepare_text="sometimes")


def _prepare_in(root: str, text: str, queue) -> None:
    os.environ[cache.CACHE_ENV] = root
    queue.put(str(cache.cached_prepare(text, vocab_size=256)))


def test_two_ranks_preparing_at_once_share_one_folder(tmp_path, text):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in, args=(str(tmp_path / "cache"), str(text), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    folders = {queue.get(timeout=5) for _ in procs}
    (folder,) = cached_folders(tmp_path)
    assert folders == {str(folder)} and read_manifest(folder)["train_tokens"] > 0
