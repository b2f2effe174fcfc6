"""The tokens a run trains on: a folder of `matryoshka prepare` shards (memory-mapped), text prepared into such a
folder in the cache (data/cache.py), or text encoded now."""

from __future__ import annotations

from pathlib import Path

from matryoshka_lm.config import TrainConfig
from matryoshka_lm.data import encode_corpus, limit_chars, read_corpus, split_tokens, train_tokenizer
from matryoshka_lm.data.cache import cached_prepare, uses_cache
from matryoshka_lm.data.shards import is_prepared, open_prepared
from matryoshka_lm.errors import MatryoshkaError


def data_source(tcfg: TrainConfig, data: str | None, tokenizer=None) -> str | None:
    """What the run reads: `data` itself, or the cache folder its text is prepared into (prepared now if need be)."""
    if not uses_cache(data, tcfg.prepare_text, tcfg.max_corpus_chars):
        return data
    return str(cached_prepare(data, tokenizer, tcfg.vocab_size, tcfg.val_fraction))


def prepare_data(tcfg: TrainConfig, data: str | None, tokenizer=None):
    """(tokenizer, train tokens, val tokens): a prepared folder's memory-mapped shards, or text encoded now."""
    if is_prepared(data):
        tok, train, val = prepared_data(data, tokenizer)
    else:
        docs = limit_chars(read_corpus(data), tcfg.max_corpus_chars)
        tok = tokenizer or train_tokenizer(docs, tcfg.vocab_size)
        train, val = split_tokens(encode_corpus(tok, docs), tcfg.val_fraction)
    if len(train) <= tcfg.seq_len + 1 or len(val) <= tcfg.seq_len + 1:
        raise MatryoshkaError(
            f"corpus too small: {len(train)} train and {len(val)} val tokens for sequences of {tcfg.seq_len}"
        )
    return tok, train, val


def prepared_data(data: str | Path, tokenizer=None):
    """The shards of `matryoshka prepare`, checked to be in the run's tokens (from --init, --resume, --tokenizer)."""
    tok, train, val, _ = open_prepared(data)
    if tokenizer is not None and tokenizer.to_str() != tok.to_str():
        raise MatryoshkaError(
            f"{data} was prepared with another tokenizer than the model's (from --init, --resume or --tokenizer); "
            "prepare it again with --tokenizer CHECKPOINT/tokenizer.json"
        )
    return tok, train, val
