"""Matryoshka embeddings: the MRL loss, shrink, training an embedding checkpoint, `embed` from Python and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from _embed_ckpt import embedding_checkpoints
from matryoshka_lm.cli import main
from matryoshka_lm.core.spec import parse_spec
from matryoshka_lm.embed import (
    EmbedTrainConfig,
    corpus_pairs,
    default_dims,
    embed_file,
    embed_ids,
    embed_texts,
    load_embedder,
    mrl_contrastive_loss,
    pair_recall,
    read_pairs,
    shrink,
)
from matryoshka_lm.errors import MatryoshkaError


def test_shrink_is_truncate_then_normalize():
    t = torch.randn(5, 32)
    s = shrink(t, 8)
    assert s.shape == (5, 8)
    torch.testing.assert_close(s.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(s, t[:, :8] / t[:, :8].norm(dim=-1, keepdim=True))
    for bad in (0, -1, 33):
        with pytest.raises(MatryoshkaError, match="outside 1..32"):
            shrink(t, bad)


def test_default_dims_is_the_mrl_nesting():
    assert default_dims(384) == [24, 48, 96, 192, 384]
    assert default_dims(32) == [2, 4, 8, 16, 32]


def test_mrl_loss_matches_sum_of_per_dim_infonce():
    torch.manual_seed(0)
    q, p = torch.randn(6, 16), torch.randn(6, 16)
    expected = sum(
        w * nn.functional.cross_entropy(shrink(q, m) @ shrink(p, m).T / 0.05, torch.arange(6))
        for m, w in [(4, 1.0), (16, 0.5)]
    )
    torch.testing.assert_close(mrl_contrastive_loss(q, p, [4, 16], [1.0, 0.5]), expected)


def test_mrl_makes_low_dim_prefixes_better_than_plain_truncation():
    """Toy problem: two noisy views of a 16-d latent in 32-d. Trained at the full dims only, the information
    spreads over all 32 dims and a 4-dim prefix loses most of it; the MRL loss packs it into the prefix."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 32, generator=g)

    def views(n):
        z = torch.randn(n, 16, generator=g)
        return z @ mix + 0.5 * torch.randn(n, 32, generator=g), z @ mix + 0.5 * torch.randn(n, 32, generator=g)

    (xa, xb), (ta, tb) = views(2048), views(500)

    def train(dims):
        torch.manual_seed(1)
        enc = nn.Linear(32, 32)
        opt = torch.optim.Adam(enc.parameters(), 1e-2)
        for _ in range(60):
            i = torch.randperm(2048)[:64]
            loss = mrl_contrastive_loss(enc(xa[i]), enc(xb[i]), dims, temperature=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return enc(ta).numpy(), enc(tb).numpy()

    plain, mrl = train([32]), train([2, 4, 8, 16, 32])
    r = {
        name: {m: pair_recall(q[:, :m], p[:, :m], (1,))["r@1"] for m in (4, 32)}
        for name, (q, p) in (("plain", plain), ("mrl", mrl))
    }
    assert r["mrl"][4] > r["plain"][4] + 0.1, r
    assert r["mrl"][32] > 0.95 and r["plain"][32] > 0.95, r


def test_corpus_pairs_are_two_halves_of_a_passage():
    doc = "\n".join(f"line {i} of the passage with some words" for i in range(40))
    pairs = corpus_pairs([doc], passage_chars=200)
    assert len(pairs) >= 5
    for a, b in pairs:
        assert a and b and a.startswith("line") and b.startswith("line")
        assert abs(len(a) - len(b)) < 60
    unique = "\n".join(" ".join(f"w{i}x{j}" for j in range(8)) for i in range(40))  # every word distinct
    a, b = corpus_pairs([unique], passage_chars=200)[0]
    assert not set(a.split()) & set(b.split())
    a, b = corpus_pairs([unique], passage_chars=200, overlap=0.5)[0]
    n = len(set(a.split()) | set(b.split()))
    assert len(set(a.split()) & set(b.split())) == round(0.5 * n / 2) * 2  # half the passage's words, shared


def test_read_pairs_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(MatryoshkaError, match="empty"):
        read_pairs(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n{"query": "a"}\n')
    with pytest.raises(MatryoshkaError, match=r"bad.jsonl:2: needs a non-empty string field 'positive'"):
        read_pairs(bad)
    with pytest.raises(MatryoshkaError, match="does not exist"):
        read_pairs(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- a real (tiny) embedding checkpoint


@pytest.fixture
def lm_ckpt(tmp_path_factory, corpus_file):
    return embedding_checkpoints(tmp_path_factory, corpus_file)[0]


@pytest.fixture
def emb_ckpt(tmp_path_factory, corpus_file):
    return embedding_checkpoints(tmp_path_factory, corpus_file)[1]


def test_train_embedding_writes_a_matryoshka_checkpoint(emb_ckpt):
    meta = json.loads((emb_ckpt / "embedding.json").read_text())
    assert meta["is_matryoshka"] is True and meta["pooling"] == "mean"
    # full width 32 -> 2..32; size M has width 24, which joins the trained set
    assert meta["matryoshka_dimensions"] == [2, 4, 8, 16, 24, 32]
    assert meta["sizes"] == ["XL", "M", "f64h4,f64h4@d32"]  # the full model, size M, the depth-2 cut
    assert set(meta["recall_after"]["M"]) == {"2", "4", "8", "16", "24"}
    # the metadata servers look for, in config.json itself
    cfg = json.loads((emb_ckpt / "config.json").read_text())
    assert cfg["is_matryoshka"] is True and cfg["matryoshka_dimensions"] == meta["matryoshka_dimensions"]


def test_embed_texts_unit_norm_and_prefix_consistent(emb_ckpt):
    model, tok, meta = load_embedder(emb_ckpt)
    texts = ["to be or not to be", "the quick brown fox", "x"]
    full = embed_texts(model, tok, texts)
    assert full.shape == (3, 32) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1, atol=1e-5)
    e8 = embed_texts(model, tok, texts, dims=8)
    np.testing.assert_allclose(e8, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True), atol=1e-5)
    # batching and padding do not change a text's embedding
    one = embed_texts(model, tok, texts[:1])
    np.testing.assert_allclose(one[0], full[0], atol=1e-5)
    m = embed_texts(model, tok, texts, parse_spec(model.lm.cfg, "M"))
    assert m.shape == (3, 24)


def test_embed_ids_is_what_embed_texts_computes(emb_ckpt):
    """The id-level entry point (the server tokenizes itself) gives embed_texts' vectors, whatever the pad id."""
    model, tok, _ = load_embedder(emb_ckpt)
    texts = ["to be or not to be", "x", "the quick brown fox jumps"]
    ids = [e.ids for e in tok.encode_batch(texts)]
    spec = parse_spec(model.lm.cfg, "M")
    expected = embed_texts(model, tok, texts, spec, dims=8)
    for pad_id in (0, 5):
        np.testing.assert_allclose(embed_ids(model, ids, spec, 8, batch_size=2, pad_id=pad_id), expected, atol=1e-5)
    with pytest.raises(MatryoshkaError, match="batch_size must be positive"):
        embed_ids(model, ids, spec, 8, batch_size=0)
    with pytest.raises(MatryoshkaError, match="no tokens"):
        embed_ids(model, [[1], []])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_eval", -1, "n_eval must be >= 0, got -1"),
        ("warmup_steps", -2, "warmup_steps must be >= 0, got -2"),
        ("proj_dim", -8, "proj_dim must be >= 0, got -8"),
        ("max_corpus_chars", -1, "max_corpus_chars must be >= 0"),
        ("lr", 0.0, "lr must be positive"),
        ("batch_size", 0, "batch_size must be positive, got 0"),
    ],
)
def test_embed_train_config_rejects_bad_numbers(field, value, message):
    with pytest.raises(MatryoshkaError, match=message):
        EmbedTrainConfig(**{field: value})


def test_embed_file_rejects_a_bad_batch_size(emb_ckpt, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello\n")
    for bad in (0, -3):
        with pytest.raises(MatryoshkaError, match=f"batch_size must be a positive integer, got {bad}"):
            embed_file(emb_ckpt, f, batch_size=bad)


def test_embed_file_and_cli(emb_ckpt, tmp_path, capsys):
    f = tmp_path / "texts.txt"
    f.write_text("first text\n\nsecond text here\nthird\n")
    vecs = embed_file(emb_ckpt, f, tmp_path / "a.npy", size="M", dims=16)
    assert vecs.shape == (3, 16)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), vecs)
    assert main(["embed", str(emb_ckpt), str(f), "-o", str(tmp_path / "b.npy"), "--dims", "8", "--device", "cpu"]) == 0
    b = np.load(tmp_path / "b.npy")
    assert b.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dims", "12"], "embedding dim 12 was not trained; this model's Matryoshka dims are"),
        (["--dims", "64"], "embedding dim 64 is outside 1..32"),
        (["--size", "M", "--dims", "32"], "embedding dim 32 is outside 1..24"),
        (["--size", "XXL"], "unknown size 'XXL'"),
    ],
)
def test_embed_cli_bad_dims(emb_ckpt, tmp_path, capsys, args, message):
    f = tmp_path / "t.txt"
    f.write_text("hello\n")
    assert main(["embed", str(emb_ckpt), str(f), "-o", str(tmp_path / "x.npy"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_embed_cli_bad_inputs(emb_ckpt, lm_ckpt, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["embed", str(emb_ckpt), str(empty), "-o", str(tmp_path / "x.npy")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["embed", str(lm_ckpt), str(empty), "-o", str(tmp_path / "x.npy")]) == 2
    assert "is empty" in capsys.readouterr().err
    f = tmp_path / "t.txt"
    f.write_text("hello\n")
    assert main(["embed", str(lm_ckpt), str(f), "-o", str(tmp_path / "x.npy")]) == 2
    assert "not an embedding checkpoint" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "nope"), str(f), "-o", str(tmp_path / "x.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_embed_cli(lm_ckpt, corpus_file, tmp_path, capsys):
    out = tmp_path / "emb"
    common = [
        str(lm_ckpt),
        "--data",
        str(corpus_file),
        "--max-corpus-chars",
        "30000",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--max-tokens",
        "16",
        "--n-eval",
        "8",
        "--device",
        "cpu",
    ]
    assert main(["train-embed", *common, "-o", str(out), "--dims", "64"]) == 2
    assert "embedding dim 64 is outside 1..32" in capsys.readouterr().err
    assert main(["train-embed", *common, "-o", str(tmp_path / "x"), "--depths", "9"]) == 2
    assert "depth 9 is outside 1..4" in capsys.readouterr().err
    assert main(["train-embed", *common, "-o", str(out), "--dims", "4,32", "--proj-dim", "16", "--quiet"]) == 2
    assert "outside 1..16" in capsys.readouterr().err  # with a projection, D is the projection's width
    assert main(["train-embed", *common, "-o", str(out), "--dims", "4,16", "--proj-dim", "16", "--quiet"]) == 0
    meta = json.loads((out / "embedding.json").read_text())
    assert meta["matryoshka_dimensions"] == [4, 16] and meta["projection"] == 16
    assert main(["train-embed", *common, "-o", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "projection.safetensors").is_file()
    model, tok, _ = load_embedder(out)
    assert embed_texts(model, tok, ["hello"], parse_spec(model.lm.cfg, "M")).shape == (1, 16)


def test_export_embed_loads_in_transformers_with_matryoshka_metadata(emb_ckpt, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "st"
    assert main(["export-embed", str(emb_ckpt), "--size", "M", "-o", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["is_matryoshka"] is True and cfg["matryoshka_dimensions"] == [2, 4, 8, 16, 24]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModel.from_pretrained(out).eval()
    texts = ["the quick brown fox", "to be"]
    b = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**b).last_hidden_state
    pooled = (h * b["attention_mask"][..., None]).sum(1) / b["attention_mask"].sum(1, keepdim=True)
    model, etok, _ = load_embedder(emb_ckpt)
    ours = embed_texts(model, etok, texts, parse_spec(model.lm.cfg, "M"), dims=8)
    np.testing.assert_allclose(shrink(pooled, 8).numpy(), ours, atol=1e-4)
    with_proj = tmp_path / "x"
    assert main(["export-embed", str(emb_ckpt), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export-embed", str(tmp_path), "-o", str(with_proj)]) == 2
    assert "not an embedding checkpoint" in capsys.readouterr().err
