"""Text given to `train --data` prepared once into token shards in a cache, so a corpus of any size trains (and is
evaluated) in bounded memory, and the second run on it tokenizes nothing.

Which text goes through the cache (TrainConfig.prepare_text):
  auto    JSON Lines, JSON or Parquet (which plain-text reading would take as prose), or text over AUTO_BYTES
          unless max_corpus_chars limits it; other text is encoded in memory as before (split: corpus.split_tokens)
  always  every source, the embedded default corpus too
  never   encode in memory every run (the path of runs made before the cache)
A cached folder is an ordinary `matryoshka prepare` folder (its split: prepare.SPLIT_RULE), one per source and
tokenizer, in $MATRYOSHKA_CACHE (default ~/.cache/matryoshka-lm) under prepared/. When the source's files change, the
folder is prepared again. A lock file serialises the ranks of a torchrun job on one node; for a multi-node job run
`matryoshka prepare` once before it and pass the folder (docs/cluster.md)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from matryoshka_lm.config import PREPARE_TEXT
from matryoshka_lm.errors import MatryoshkaError

from .corpus import LARGE_TEXT_BYTES, MANIFEST
from .prepare import prepare
from .shards import TOKENIZER, load_tokenizer_file
from .sources import format_of

log = logging.getLogger(__name__)

CACHE_ENV = "MATRYOSHKA_CACHE"
AUTO_BYTES = LARGE_TEXT_BYTES  # `auto` prepares text larger than this


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "matryoshka-lm"
    return Path(base) / "prepared"


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    hidden = lambda f: any(part.startswith(".") for part in f.relative_to(path).parts)  # as prepare skips them
    return sorted(f for f in path.rglob("*") if f.is_file() and not hidden(f))


def uses_cache(data: str | Path | None, mode: str, max_corpus_chars: int = 0) -> bool:
    """Whether `data` (text, not a prepared folder) is trained on through the cache under this mode."""
    if mode not in PREPARE_TEXT:
        raise MatryoshkaError(f"prepare_text must be one of {', '.join(PREPARE_TEXT)}, got {mode!r}")
    if mode == "never" or (data is not None and (Path(data) / MANIFEST).is_file()):
        return False
    if mode == "always":
        if max_corpus_chars:
            raise MatryoshkaError(
                "--max-corpus-chars limits text encoded in memory; prepared text is used whole "
                "(drop the limit, or use --prepare-text never)"
            )
        return True
    if data is None or not Path(data).exists():
        return False
    files = _files(Path(data))
    if any(format_of(f) not in (None, "text") for f in files):  # records plain-text reading would take as prose
        if max_corpus_chars:
            log.warning("%s is prepared whole: --max-corpus-chars limits text read in memory only", data)
        return True
    return not max_corpus_chars and sum(f.stat().st_size for f in files if format_of(f) == "text") > AUTO_BYTES


def _folder(source: str, key: dict[str, Any]) -> Path:
    digest = hashlib.blake2b(json.dumps({"source": source, **key}, sort_keys=True).encode(), digest_size=8)
    return cache_root() / f"{Path(source).name or 'default'}-{digest.hexdigest()}"


def _same_tokenizer(folder: Path, tok) -> bool:
    try:
        return (folder / MANIFEST).is_file() and load_tokenizer_file(folder / TOKENIZER).to_str() == tok.to_str()
    except MatryoshkaError:
        return False


@contextmanager
def _locked(folder: Path):
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another rank preparing the same folder: wait, then find it up to date
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_prepare(source: str | Path | None, tokenizer=None, vocab_size: int = 2048, val_fraction: float = 0.05):
    """The cache folder holding `source` prepared (prepared now unless up to date): with `tokenizer` (a loaded
    tokenizers.Tokenizer), or a BPE of `vocab_size` trained on a sample. A folder whose BPE a run trained is reused
    by later callers holding that run's tokenizer (its eval, its resume)."""
    src = "default" if source is None else str(Path(source).resolve())
    bpe = _folder(src, {"vocab_size": vocab_size, "val_fraction": val_fraction})
    tok_file = None
    folder = bpe
    if tokenizer is not None and not _same_tokenizer(bpe, tokenizer):
        sha = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
        folder = _folder(src, {"tokenizer": sha, "val_fraction": val_fraction})
        tok_file = folder.parent / f"{folder.name}.tokenizer.json"
    with _locked(folder):
        if tok_file is not None:
            tok_file.write_text(tokenizer.to_str())
        done = (folder / MANIFEST).is_file()
        log.info("%s %s in the cache: %s", "checking" if done else "preparing", source or "the default corpus", folder)
        prepare(source, folder, tokenizer=tok_file, vocab_size=vocab_size, val_fraction=val_fraction, stale="replace")
    return folder
