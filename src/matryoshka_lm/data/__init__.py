"""Text corpora and tokens: reading and encoding text (corpus.py), and `matryoshka prepare`'s token shards.

corpus.py    text files and the default corpus, the byte-level BPE, the train/val split, batch sampling
sources.py   what `prepare` reads: text, JSON Lines (optionally gzipped), JSON, Parquet, the default corpus
shards.py    the prepared folder: manifest, memory-mapped shards read as one token stream
prepare.py   prepare(): source files -> token shards, in worker processes, resumable
cache.py     text given to `train --data` prepared once into such shards in a cache folder
"""

from .corpus import (
    EOT,
    MANIFEST,
    SECTION_LINES,
    SPECIAL,
    TEXT_SUFFIXES,
    default_corpus,
    encode_corpus,
    eval_batches,
    kjv_text,
    limit_chars,
    read_corpus,
    sample_batch,
    sections,
    shakespeare_text,
    split_tokens,
    token_counts,
    train_split_tokens,
    train_tokenizer,
    unigram_loss,
    unigram_loss_of_counts,
)

__all__ = [
    "EOT",
    "MANIFEST",
    "SECTION_LINES",
    "SPECIAL",
    "TEXT_SUFFIXES",
    "default_corpus",
    "encode_corpus",
    "eval_batches",
    "kjv_text",
    "limit_chars",
    "read_corpus",
    "sample_batch",
    "sections",
    "shakespeare_text",
    "split_tokens",
    "train_split_tokens",
    "token_counts",
    "train_tokenizer",
    "unigram_loss",
    "unigram_loss_of_counts",
]
