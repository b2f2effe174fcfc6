"""Evaluate a checkpoint on its own validation split: the per-size table, JSON and plot behind `matryoshka eval`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from matryoshka_lm.config import TrainConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import parse_spec_list, size_names, split_specs
from matryoshka_lm.data import encode_corpus, limit_chars, read_corpus, split_tokens
from matryoshka_lm.data.shards import is_prepared, open_prepared
from matryoshka_lm.errors import MatryoshkaError

from .evaluate import evaluate_specs, format_table, plot_size_vs_loss, size_table, write_json_report
from .state import split_unigram_loss
from .tokens import data_source


def checkpoint_source(ckpt: Path, data: str | None = None):
    """(train config, tokenizer, what to split): `data` if given, else what the run read (its cache folder too)."""
    _, tcfg = ck.read_config(ckpt)
    tcfg = tcfg or TrainConfig()
    tok = ck.load_tokenizer(ckpt)
    if data is None:
        return tcfg, tok, data_source(tcfg, tcfg.data, tok)
    return tcfg, tok, data_source(dataclasses.replace(tcfg, max_corpus_chars=0), data, tok)  # given data: all of it


def checkpoint_val_split(ckpt: Path, data: str | None = None):
    """Re-create the run's deterministic split with the checkpoint's tokenizer (or split `data` if given)."""
    return split_source(ckpt, *checkpoint_source(ckpt, data), limit=data is None)


def split_source(ckpt: Path, tcfg: TrainConfig, tok, source: str | None, limit: bool):
    """(tcfg, train, val) of `source`: a prepared folder's own split, or text split as training splits it (with the
    run's max_corpus_chars when `limit`)."""
    if is_prepared(source):  # the shards of `matryoshka prepare`: their own split
        prepared, train, val, _ = open_prepared(source)
        if prepared.to_str() != tok.to_str():
            raise MatryoshkaError(f"{source} was prepared with another tokenizer than {ckpt}'s")
        return tcfg, train, val
    docs = read_corpus(source)
    if limit:
        docs = limit_chars(docs, tcfg.max_corpus_chars)
    train, val = split_tokens(encode_corpus(tok, docs), tcfg.val_fraction)
    return tcfg, train, val


def evaluate_checkpoint(
    ckpt: str | Path,
    sizes: str | None = None,
    data: str | None = None,
    n_batches: int | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    device: str = "cpu",
) -> tuple[list[dict[str, Any]], str]:
    ckpt = Path(ckpt)
    model = ck.load_model(ckpt, device)
    tcfg, tok, source = checkpoint_source(ckpt, data)
    _, train, val = split_source(ckpt, tcfg, tok, source, limit=data is None)
    names = split_specs(sizes) or size_names(model.cfg)
    specs = dict(zip(names, parse_spec_list(model.cfg, names)))
    seq_len = min(tcfg.seq_len, model.cfg.max_seq_len)
    res = evaluate_specs(model, val, specs, seq_len, batch=8, n_batches=n_batches or tcfg.eval_batches, device=device)
    rows = size_table(model.cfg, specs, res, model.precision.quant, model.precision.native_bits)
    trained = set(ck.trained_sizes(ckpt, model.cfg))
    for row, spec in zip(rows, specs.values()):  # a slice nothing trained is listed, and marked, not passed off
        row["trained"] = spec.name in trained if spec.name else trained == set(model.cfg.sizes)
    unigram = split_unigram_loss(train, val, model.cfg.vocab_size, source)
    write_json_report(
        Path(json_path or ckpt / "eval.json"),
        rows,
        {"unigram_loss": unigram, "val_tokens": int(len(val)), "checkpoint": str(ckpt)},
    )
    plot_size_vs_loss(
        rows, Path(plot_path or ckpt / "eval.png"), title=f"{ckpt.name}: size vs val loss", unigram=unigram
    )
    return rows, format_table(rows, unigram)
