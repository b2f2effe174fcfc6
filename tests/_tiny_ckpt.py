"""A tiny Matryoshka checkpoint on disk, built without training (random weights, a real BPE tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import tiny_config, tiny_train_config
from matryoshka_lm.core.checkpoint import save_model
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.data import limit_chars, read_corpus, train_tokenizer


def make_checkpoint(path: Path, corpus_file: Path, seed: int = 0, **cfg_kw) -> Path:
    """Random weights (norm weights too, so permutations of them are tested) and a 300-token BPE."""
    tok = train_tokenizer(limit_chars(read_corpus(corpus_file), 60_000), 300)
    cfg = tiny_config(vocab_size=tok.get_vocab_size(), **cfg_kw)
    torch.manual_seed(seed)
    model = MatryoshkaLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    save_model(path, model, tiny_train_config(data=str(corpus_file), seq_len=32), tok.to_str())
    return path
