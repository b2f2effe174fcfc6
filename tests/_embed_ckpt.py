"""A tiny LM checkpoint and an embedding checkpoint trained from it, built once per test session."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import tiny_config
from matryoshka_lm.core.checkpoint import save_model
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.data import limit_chars, read_corpus, train_tokenizer
from matryoshka_lm.embed import EmbedTrainConfig, train_embedding

_CACHE: dict[str, tuple[Path, Path]] = {}


def embedding_checkpoints(tmp_path_factory, corpus_file: Path) -> tuple[Path, Path]:
    """(LM checkpoint with random weights, embedding checkpoint after 4 MRL steps with sizes M and depth 2)."""
    if "paths" not in _CACHE:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: a second thread only adds spin-waits on a busy 2-core machine
        try:
            _CACHE["paths"] = _build(tmp_path_factory.mktemp("embed_ckpts"), corpus_file)
        finally:
            torch.set_num_threads(threads)
    return _CACHE["paths"]


def _build(root: Path, corpus_file: Path) -> tuple[Path, Path]:
    tok = train_tokenizer(limit_chars(read_corpus(corpus_file), 60_000), 300)
    torch.manual_seed(0)
    save_model(root / "lm", MatryoshkaLM(tiny_config(vocab_size=tok.get_vocab_size())), None, tok.to_str())
    cfg = EmbedTrainConfig(
        steps=4,
        batch_size=8,
        lr=1e-3,
        warmup_steps=1,
        sizes=["M"],
        depths=[2],
        data=str(corpus_file),
        max_corpus_chars=60_000,
        max_tokens=24,
        n_eval=24,
    )
    train_embedding(root / "lm", root / "emb", cfg)
    return root / "lm", root / "emb"
