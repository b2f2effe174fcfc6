"""`prepare` counts each split's token ids as it packs the shards, so a run's unigram baseline never rereads the
corpus: on a memory-mapped corpus that read would pull every page of it into the training process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from matryoshka_lm.data import read_corpus, token_counts, train_tokenizer, unigram_loss
from matryoshka_lm.data.prepare import prepare
from matryoshka_lm.data.shards import open_prepared, prepared_counts
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.train.state import split_unigram_loss, write_split_stats


class Untouchable:
    """A token stream of the right length whose tokens must not be read."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        raise AssertionError("the train stream was read")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_file):
    root = tmp_path_factory.mktemp("counts")
    tok = root / "tokenizer.json"
    tok.write_text(train_tokenizer(read_corpus(corpus_file), 300).to_str())
    prepare(corpus_file, root / "data", tokenizer=tok, workers=1, shard_tokens=20_000)
    return root / "data"


def test_prepare_writes_the_counts_of_its_shards(prepared):
    _, train, val, m = open_prepared(prepared)
    assert len(m["shards"]["train"]) > 1  # the counts span several shards
    vocab = m["tokenizer"]["vocab_size"]
    got_train, got_val = prepared_counts(prepared)
    assert np.array_equal(got_train, token_counts(train, vocab))
    assert np.array_equal(got_val, token_counts(val, vocab))
    assert got_train.sum() == m["train_tokens"] and got_val.sum() == m["val_tokens"]


def test_the_baseline_from_counts_is_the_one_from_tokens_and_reads_no_train_token(prepared, tmp_path):
    _, train, val, m = open_prepared(prepared)
    vocab = m["tokenizer"]["vocab_size"] + 7  # a model's table may be larger than the tokenizer's
    want = unigram_loss(train, val, vocab)
    assert split_unigram_loss(Untouchable(len(train)), Untouchable(len(val)), vocab, prepared) == pytest.approx(
        want, rel=1e-12
    )
    write_split_stats(tmp_path, Untouchable(len(train)), Untouchable(len(val)), vocab, str(prepared))
    stats = json.loads((tmp_path / "data.json").read_text())
    assert stats == {"train_tokens": len(train), "val_tokens": len(val), "unigram_loss": pytest.approx(want)}


def test_a_folder_prepared_before_counts_existed_still_gets_its_baseline(prepared, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in prepared.iterdir():
        if f.name != "counts.npy":
            (old / f.name).write_bytes(f.read_bytes())
    m = json.loads((old / "manifest.json").read_text())
    del m["counts"]
    (old / "manifest.json").write_text(json.dumps(m))
    _, train, val, _ = open_prepared(old)
    assert prepared_counts(old) is None
    assert split_unigram_loss(train, val, 300, old) == pytest.approx(unigram_loss(train, val, 300), rel=1e-12)


def test_damaged_counts_are_a_clear_error(prepared, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in prepared.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "counts.npy").write_bytes(b"not numpy")
    with pytest.raises(MatryoshkaError, match="counts.npy: unreadable token counts"):
        prepared_counts(bad)


def test_a_large_text_source_read_into_memory_names_prepare(tmp_path, monkeypatch, caplog):
    from matryoshka_lm.data import corpus

    (tmp_path / "a.txt").write_text("some text\n" * 200)
    monkeypatch.setattr(corpus, "LARGE_TEXT_BYTES", 1000)
    with caplog.at_level("WARNING"):
        assert corpus.read_corpus(tmp_path) == ["some text\n" * 200]
    assert f"`matryoshka prepare {tmp_path} -o DIR`" in caplog.text
    caplog.clear()
    monkeypatch.setattr(corpus, "LARGE_TEXT_BYTES", 10_000)
    corpus.read_corpus(tmp_path)
    assert "prepare" not in caplog.text
