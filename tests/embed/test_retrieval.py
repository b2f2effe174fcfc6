"""Funnel retrieval over FAISS: exact when the shortlist is everything, index round trips, CLI, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _embed_ckpt import embedding_checkpoints
from matryoshka_lm.cli import main
from matryoshka_lm.embed import (
    build_index,
    exact_search,
    funnel_search,
    load_index,
    overlap_at_k,
    search_texts,
    unit_rows,
)
from matryoshka_lm.errors import MatryoshkaError

pytest.importorskip("faiss")


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    scale = (1 + np.arange(64)) ** -0.5  # MRL-like: the leading dims carry most of the variance
    return (rng.standard_normal((500, 64)) * scale).astype(np.float32)


@pytest.fixture
def index(vectors, tmp_path):
    return load_index(build_index(vectors, tmp_path / "idx", dims=[4, 8, 16, 32, 64]))


def queries_near(vectors, n=20, seed=1):
    rng = np.random.default_rng(seed)
    return vectors[:n] + 0.05 * rng.standard_normal((n, vectors.shape[1])).astype(np.float32)


def test_funnel_with_whole_set_shortlist_equals_exact(index, vectors):
    q = queries_near(vectors)
    s_exact, i_exact = exact_search(index, q, k=10)
    for dims, shortlist in (([4, 64], [500]), ([4, 16, 64], [10_000, 500]), ([8, 32], [500])):
        s, i = funnel_search(index, q[:, : dims[-1]], k=10, dims=dims, shortlist=shortlist)
        truth_s, truth_i = exact_search(index, q[:, : dims[-1]], k=10)
        np.testing.assert_array_equal(i, truth_i)
        np.testing.assert_allclose(s, truth_s, atol=1e-5)
    # at the full dims, the funnel's top 10 are the exact top 10; a shortlist of k at 4 dims loses some of them
    whole = funnel_search(index, q, k=10, dims=[4, 64], shortlist=[500])[1]
    narrow = funnel_search(index, q, k=10, dims=[4, 64], shortlist=[10])[1]
    assert overlap_at_k(whole, i_exact) == 1.0
    assert overlap_at_k(narrow, i_exact) < 1.0


def test_overlap_at_k_is_the_fraction_of_the_true_top_k_found():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])  # row 0: 2 of 4 (order ignored), row 1: all
    assert overlap_at_k(found, truth) == pytest.approx(0.75)
    assert overlap_at_k(truth[:, ::-1], truth) == 1.0


def test_funnel_shortlist_recall_grows_with_shortlist(index, vectors):
    q = queries_near(vectors, 50)
    _, truth = exact_search(index, q, k=10)
    small = overlap_at_k(funnel_search(index, q, 10, [4, 64], [10])[1], truth)
    big = overlap_at_k(funnel_search(index, q, 10, [4, 64], [200])[1], truth)
    assert big >= small and big > 0.9


def test_index_round_trip(index, vectors, tmp_path):
    assert (index.count, index.dim, index.dims) == (500, 64, [4, 8, 16, 32, 64])
    np.testing.assert_allclose(index.vectors, unit_rows(vectors), atol=1e-6)
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["normalized"] == "after_truncation" and meta["count"] == 500
    s, i = exact_search(index, vectors[:3], k=1)
    assert i[:, 0].tolist() == [0, 1, 2] and np.allclose(s[:, 0], 1, atol=1e-5)
    with pytest.raises(MatryoshkaError, match="already exists"):
        build_index(vectors, tmp_path / "idx")


def test_cross_size_queries_use_the_index_prefix(index, vectors):
    q = vectors[:5, :16]  # a smaller encoder's 16-dim embeddings against the full 64-dim index
    _, i = exact_search(index, q, k=1)
    assert i[:, 0].tolist() == list(range(5))


def test_search_errors(index, vectors, tmp_path):
    with pytest.raises(MatryoshkaError, match="queries have 65 dims but the index has 64"):
        exact_search(index, np.ones((1, 65), np.float32))
    with pytest.raises(MatryoshkaError, match="queries have 12 dims, not a Matryoshka dim"):
        exact_search(index, np.ones((1, 12), np.float32))
    with pytest.raises(MatryoshkaError, match="funnel dim 12 is not a Matryoshka dim"):
        funnel_search(index, vectors[:1], dims=[12, 64], shortlist=[50])
    with pytest.raises(MatryoshkaError, match="must increase"):
        funnel_search(index, vectors[:1], dims=[64, 8], shortlist=[50])
    with pytest.raises(MatryoshkaError, match="at least k=10"):
        funnel_search(index, vectors[:1], dims=[8, 64], shortlist=[5])
    with pytest.raises(MatryoshkaError, match="does not exist"):
        load_index(tmp_path / "missing")
    with pytest.raises(MatryoshkaError, match="non-empty"):
        build_index(np.zeros((0, 8), np.float32), tmp_path / "empty")


# ---------------------------------------------------------------- with a real (tiny) embedding checkpoint, via the CLI


def test_cli_index_build_and_search_round_trip(tmp_path_factory, corpus_file, tmp_path, capsys):
    _, emb = embedding_checkpoints(tmp_path_factory, corpus_file)
    docs = tmp_path / "docs.txt"
    lines = [
        "the cat sat on the mat",
        "a dog barked at night",
        "ships sail on the sea",
        "bread and butter",
        "stars shine in the sky",
        "rain falls on the roof",
    ]
    docs.write_text("\n".join(lines) + "\n")
    idx = tmp_path / "idx"
    assert main(["index", "build", str(emb), str(docs), "-o", str(idx), "--device", "cpu"]) == 0
    # each text finds itself first, by funnel (default) and exact search
    for extra in ([], ["--exact"], ["--funnel", "8,32", "--shortlist", "6"]):
        assert main(["search", str(idx), lines[2], lines[4], "-k", "3", "--json", "--device", "cpu", *extra]) == 0
        hits = json.loads(capsys.readouterr().out)
        assert [h[0]["text"] for h in hits] == [lines[2], lines[4]] and len(hits[0]) == 3
    # cross-size: queries embedded by size M (24 dims) against the full model's 32-dim index
    assert main(["search", str(idx), lines[1], "--size", "M", "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]) == 6
    res = search_texts(idx, [lines[0]], size="M", k=2, exact=True)
    assert len(res[0]) == 2
    # plain output: rank, id, score, text
    assert main(["search", str(idx), lines[5], "-k", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split("\t")[3].strip() == lines[5]


def test_cli_index_from_vectors_and_errors(tmp_path, vectors, capsys):
    np.save(tmp_path / "v.npy", vectors)
    np.save(tmp_path / "q.npy", vectors[:2, :16])
    np.save(tmp_path / "bad.npy", np.ones((2, 80), np.float32))
    idx = tmp_path / "vidx"
    assert main(["index", "build", "--vectors", str(tmp_path / "v.npy"), "--dims", "8,16,64", "-o", str(idx)]) == 0
    assert main(["search", str(idx), "--vectors", str(tmp_path / "q.npy"), "-k", "1", "--json"]) == 0
    assert [h[0]["id"] for h in json.loads(capsys.readouterr().out)] == [0, 1]
    hidx = tmp_path / "hidx"
    assert (
        main(
            [
                "index",
                "build",
                "--vectors",
                str(tmp_path / "v.npy"),
                "--dims",
                "8,16,64",
                "--hnsw-dim",
                "8",
                "-o",
                str(hidx),
            ]
        )
        == 0
    )
    assert load_index(hidx).meta["hnsw_dims"] == [8]
    assert (
        main(
            [
                "search",
                str(hidx),
                "--vectors",
                str(tmp_path / "v.npy"),
                "-k",
                "1",
                "--json",
                "--hnsw-ef",
                "32",
                "--funnel",
                "8,64",
                "--shortlist",
                "50",
            ]
        )
        == 0
    )
    assert [h[0]["id"] for h in json.loads(capsys.readouterr().out)] == list(range(500))
    for args, message in (
        (["search", str(idx), "--vectors", str(tmp_path / "bad.npy")], "queries have 80 dims but the index has 64"),
        (["search", str(tmp_path / "nope"), "--vectors", str(tmp_path / "q.npy")], "does not exist"),
        (["search", str(idx), "some text"], "pass --ckpt"),
        (["index", "build", "-o", str(tmp_path / "x")], "needs CKPT FILE"),
        (["index", "build", "--vectors", str(tmp_path / "v.npy"), "-o", str(idx)], "already exists"),
        (
            [
                "index",
                "build",
                "--vectors",
                str(tmp_path / "v.npy"),
                "--dims",
                "8,64",
                "--hnsw-dim",
                "12",
                "-o",
                str(tmp_path / "h2"),
            ],
            "--hnsw-dim 12 must be one of the index's dims",
        ),
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (args, err)
