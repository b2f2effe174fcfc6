"""`matryoshka prepare`: every source format gives the tokens encode_corpus gives its documents, split by a hash of
each piece; a rerun does nothing, an interrupted run resumes to the same result, errors name the file."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from matryoshka_lm.cli import main
from matryoshka_lm.data import encode_corpus, read_corpus, sections, train_tokenizer
from matryoshka_lm.data import prepare as prep
from matryoshka_lm.data.prepare import is_val, prepare
from matryoshka_lm.data.shards import TokenStream, open_prepared
from matryoshka_lm.errors import MatryoshkaError


@pytest.fixture(scope="module")
def docs(corpus_file):
    """~60 documents of varied length cut from the test corpus (some longer than one section)."""
    paras = corpus_file.read_text().split("\n\n")
    rng = random.Random(0)
    out, i = [], 0
    while i < len(paras) and len(out) < 60:
        n = rng.choice([1, 3, 40, 400])
        out.append("\n\n".join(paras[i : i + n]))
        i += n
    return out


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory, corpus_file):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(train_tokenizer(read_corpus(corpus_file), 300).to_str())
    return path


def merge_back(tok, docs, train, val, fraction=0.05):
    """Interleave the two splits back into document order, piece by piece (each piece goes where is_val says)."""
    pos = {"train": 0, "val": 0}
    arrays = {"train": np.asarray(train[0 : len(train)]), "val": np.asarray(val[0 : len(val)])}
    out = []
    for d in docs:
        secs = sections(d)
        for i, (s, enc) in enumerate(zip(secs, tok.encode_batch(secs))):
            split = "val" if is_val(s, fraction) else "train"
            n = len(enc.ids) + (i == len(secs) - 1)
            out.append(arrays[split][pos[split] : pos[split] + n])
            pos[split] += n
    assert pos == {k: len(a) for k, a in arrays.items()}  # nothing left over in either split
    return np.concatenate(out)


def write_source(kind, docs, root):
    if kind == "txt":
        (root / "corpus.txt").write_text("\n\n".join(docs))
        return root / "corpus.txt", ["\n\n".join(docs)]
    if kind == "folder":
        src = root / "texts"
        for i, d in enumerate(docs):
            f = src / f"part{i % 3}" / f"{i:03d}.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(d)
        (src / ".hidden").write_text("not corpus")  # hidden files are skipped
        return src, [docs[i] for i in sorted(range(len(docs)), key=lambda i: (i % 3, i))]
    records = [{"id": i, "text": d} for i, d in enumerate(docs)]
    if kind == "jsonl":
        (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return root / "c.jsonl", docs
    if kind == "jsonl.gz":
        with gzip.open(root / "c.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return root / "c.jsonl.gz", docs
    if kind == "json":
        (root / "c.json").write_text(json.dumps(records))
        return root / "c.json", docs
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), root / "c.parquet", row_group_size=16)
    return root / "c.parquet", docs


@pytest.mark.parametrize("kind", ["txt", "folder", "jsonl", "jsonl.gz", "json", "parquet"])
def test_every_format_gives_the_tokens_of_encoding_its_documents(tmp_path, docs, tok_file, kind):
    src, texts = write_source(kind, docs, tmp_path)
    r = prepare(src, tmp_path / "out", tokenizer=tok_file, workers=1, shard_tokens=30_000)
    tok, train, val, m = open_prepared(tmp_path / "out")
    assert len(train) == m["train_tokens"] and len(val) == m["val_tokens"] > 0
    assert np.array_equal(merge_back(tok, texts, train, val), encode_corpus(tok, texts))
    assert m["dtype"] == "uint16" and not r.up_to_date
    assert [s["tokens"] for s in m["shards"]["train"]][:-1] == [30_000] * (len(m["shards"]["train"]) - 1)
    assert sum(s["documents"] for s in m["sources"]) == len([t for t in texts if t.strip()])
    assert not (tmp_path / "out" / ".prepare").exists()


def test_a_trained_tokenizer_is_todays_bpe_when_the_sample_holds_the_corpus(tmp_path, corpus_file):
    prepare(corpus_file, tmp_path / "out", vocab_size=300, workers=1)
    tok, *_ = open_prepared(tmp_path / "out")
    assert tok.to_str() == train_tokenizer(read_corpus(corpus_file), 300).to_str()


def test_the_tokenizer_sample_is_bounded(tmp_path, docs):
    src, _ = write_source("folder", docs, tmp_path)
    sample = prep.sample_documents(prep.find_sources(src), 20_000)
    assert 15_000 < sum(len(d.encode()) for d in sample) <= 20_000
    assert len(sample) > 10  # a share of every file, not the first files only


def test_a_second_run_does_nothing(tmp_path, docs, tok_file, caplog):
    src, _ = write_source("jsonl", docs, tmp_path)
    out = tmp_path / "out"
    prepare(src, out, tokenizer=tok_file, workers=1)
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()}
    with caplog.at_level("INFO", logger="matryoshka_lm.data.prepare"):
        r = prepare(src, out, tokenizer=tok_file, workers=1)
    assert r.up_to_date and "nothing to do" in caplog.text
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.iterdir()} == before
    with pytest.raises(MatryoshkaError, match="other sources or settings"):
        prepare(src, out, tokenizer=tok_file, val_fraction=0.1)


def folder_of(docs, root, n=6):
    root.mkdir()
    for i in range(n):
        (root / f"{i}.txt").write_text("\n\n".join(docs[i::n]))
    return root


def test_an_interrupted_prepare_resumes_to_the_same_result(tmp_path, docs, monkeypatch):
    src = folder_of(docs, tmp_path / "src")
    prepare(src, tmp_path / "whole", vocab_size=300, workers=1, tokenizer_sample_bytes=100_000)
    real, calls = prep.encode_source, []

    def dies_after_three(job):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(job.source.key)
        return real(job)

    monkeypatch.setattr(prep, "encode_source", dies_after_three)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, vocab_size=300, workers=1, tokenizer_sample_bytes=100_000)
    assert not (out / "manifest.json").exists()
    calls.clear()
    monkeypatch.setattr(prep, "pack", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # dies while packing
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, vocab_size=300, workers=1, tokenizer_sample_bytes=100_000)
    assert calls == ["3.txt", "4.txt", "5.txt"]  # only what the first run had not finished
    monkeypatch.undo()
    monkeypatch.setattr(prep, "encode_source", dies_after_three)
    calls.clear()
    prepare(src, out, vocab_size=300, workers=1, tokenizer_sample_bytes=100_000)
    assert calls == []
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert got == whole  # same tokenizer, shards and checksums as the uninterrupted run
    assert all(
        (out / s["file"]).read_bytes() == (tmp_path / "whole" / s["file"]).read_bytes()
        for s in whole["shards"]["train"]
    )


def test_the_split_depends_neither_on_workers_nor_on_order(tmp_path, docs, tok_file):
    src = folder_of(docs, tmp_path / "src")
    one = prepare(src, tmp_path / "one", tokenizer=tok_file, workers=1).manifest
    two = prepare(src, tmp_path / "two", tokenizer=tok_file, workers=2).manifest
    assert one == two
    assert (tmp_path / "one" / "val-00000.bin").read_bytes() == (tmp_path / "two" / "val-00000.bin").read_bytes()
    rev = tmp_path / "rev.jsonl"
    rev.write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(docs)))
    fwd = tmp_path / "fwd.jsonl"
    fwd.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    _, _, v1, _ = open_prepared(prepare(fwd, tmp_path / "f", tokenizer=tok_file).manifest and tmp_path / "f")
    _, _, v2, _ = open_prepared(prepare(rev, tmp_path / "r", tokenizer=tok_file).manifest and tmp_path / "r")
    assert len(v1) == len(v2) > 0 and np.array_equal(np.sort(v1), np.sort(v2))


def test_is_val_holds_out_about_the_fraction():
    held = sum(is_val(f"piece {i}\n", 0.1) for i in range(20_000))
    assert 1800 < held < 2200
    assert is_val("same text", 0.3) == is_val("same text", 0.3)


def test_a_token_stream_slices_across_shards():
    parts = [np.arange(0, 5), np.arange(5, 5), np.arange(5, 12), np.arange(12, 13)]
    s, whole = TokenStream(parts), np.arange(13)
    assert len(s) == 13
    for a in range(14):
        for b in range(a, 14):
            assert np.array_equal(s[a:b], whole[a:b])


def test_clear_errors_name_the_file(tmp_path, tok_file):
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(MatryoshkaError, match=r"t\.csv: unknown format"):
        prepare(tmp_path / "t.csv", tmp_path / "o1", tokenizer=tok_file)
    (tmp_path / "t.jsonl").write_text('{"text": "hi"}\n{"body": "no text"}\n')
    with pytest.raises(MatryoshkaError, match=r"t\.jsonl:2: no 'text' field \(it has body\)"):
        prepare(tmp_path / "t.jsonl", tmp_path / "o2", tokenizer=tok_file)
    (tmp_path / "bad.jsonl").write_text('{"text": "hi"}\nnot json\n')
    with pytest.raises(MatryoshkaError, match=r"bad\.jsonl:2: not JSON"):
        prepare(tmp_path / "bad.jsonl", tmp_path / "o3", tokenizer=tok_file)
    (tmp_path / "tok.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(MatryoshkaError, match=r"tok\.json is not a Hugging Face tokenizers file"):
        prepare(tmp_path / "t.jsonl", tmp_path / "o4", tokenizer=tmp_path / "tok.json")
    with pytest.raises(MatryoshkaError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "o5", tokenizer=tok_file)


def test_a_file_that_is_not_utf8_is_skipped_as_read_corpus_skips_it(tmp_path, docs, tok_file):
    src = folder_of(docs, tmp_path / "src", n=2)
    (src / "binary.txt").write_bytes(b"\xff\xfe\x00 not text" * 100)
    m = prepare(src, tmp_path / "out", tokenizer=tok_file, workers=1).manifest
    assert [s.get("skipped") for s in m["sources"]] == [None, None, "not UTF-8 text"]
    tok, train, val, _ = open_prepared(tmp_path / "out")
    texts = read_corpus(src)
    assert np.array_equal(merge_back(tok, texts, train, val), encode_corpus(tok, texts))


def test_the_command_line_prepares_then_says_nothing_to_do(tmp_path, corpus_file, capsys):
    args = ["prepare", str(corpus_file), "-o", str(tmp_path / "d"), "--vocab-size", "300", "--workers", "1"]
    assert main(args) == 0
    assert "prepared" in capsys.readouterr().err
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "x.csv"), "-o", str(tmp_path / "e")]) == 2
    (tmp_path / "x.csv").write_text("a")
    assert main(["prepare", str(tmp_path / "x.csv"), "-o", str(tmp_path / "e")]) == 2
    assert "x.csv: unknown format" in capsys.readouterr().err
