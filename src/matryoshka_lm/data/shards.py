"""A prepared data folder: token shards (raw uint16/uint32 arrays), manifest.json and tokenizer.json.

Shards are read by memory map; the train shards together read as one 1-D token stream (TokenStream), which is
all that batch sampling and evaluation need (len() and slices)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka_lm.errors import MatryoshkaError

from .corpus import EOT, MANIFEST

FORMAT = "matryoshka-prepared/1"
TOKENIZER = "tokenizer.json"
COUNTS = "counts.npy"  # (2, vocab) int64: how often each token id occurs in train, in val


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name beside `path`, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def write_counts(folder: Path, counts: np.ndarray) -> None:
    tmp = folder / (COUNTS + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, counts, allow_pickle=False)
    os.replace(tmp, folder / COUNTS)


def prepared_counts(folder: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(train, val) token counts that `prepare` wrote, or None for a folder prepared before it did."""
    m = read_manifest(Path(folder))
    if "counts" not in m:
        return None
    path = Path(folder) / m["counts"]["file"]
    try:
        counts = np.load(path, allow_pickle=False)  # a plain int64 array: nothing to unpickle
    except (OSError, ValueError) as e:
        raise MatryoshkaError(f"{path}: unreadable token counts ({e}); prepare the data again") from None
    if counts.ndim != 2 or len(counts) != 2:
        raise MatryoshkaError(f"{path}: token counts of shape {counts.shape}, expected (2, vocab); prepare again")
    return counts[0], counts[1]


def is_prepared(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MatryoshkaError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise MatryoshkaError(f"{path}: not a manifest of `matryoshka prepare` (format {FORMAT})")
    return m


def load_tokenizer_file(path: Path):
    """A Hugging Face `tokenizers` file that has the <|endoftext|> token documents are separated by."""
    from tokenizers import Tokenizer

    if path.is_dir():
        path = path / TOKENIZER
    if not path.is_file():
        raise MatryoshkaError(f"tokenizer {path} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on anything it cannot parse
        raise MatryoshkaError(f"{path} is not a Hugging Face tokenizers file ({str(e).splitlines()[0]})") from None
    if tok.token_to_id(EOT) is None:
        raise MatryoshkaError(f"{path}: the tokenizer has no {EOT} token, which matryoshka-lm uses between documents")
    return tok


class TokenStream:
    """Several 1-D token arrays read as their concatenation, without copying them: len() and slices."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = parts[0].dtype if parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenStream supports contiguous slices only")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.zeros(0, self.dtype)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            lo = start - int(self.starts[i])
            take = min(stop - start, len(self.parts[i]) - lo)
            pieces.append(self.parts[i][lo : lo + take])
            start += take
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _map(folder: Path, shard: dict, dtype: np.dtype) -> np.ndarray:
    path = folder / shard["file"]
    want = int(shard["tokens"]) * dtype.itemsize
    if not path.is_file() or path.stat().st_size != want:
        have = path.stat().st_size if path.is_file() else "no"
        raise MatryoshkaError(f"shard {path}: {have} bytes, the manifest says {want}; prepare the data again")
    return np.memmap(path, dtype=dtype, mode="r") if want else np.zeros(0, dtype)


def open_prepared(folder: str | Path) -> tuple[Any, np.ndarray | TokenStream, np.ndarray, dict]:
    """(tokenizer, train tokens, validation tokens, manifest) of a prepared folder, the tokens memory-mapped."""
    folder = Path(folder)
    m = read_manifest(folder)
    tok_path = folder / m["tokenizer"]["file"]
    if not tok_path.is_file() or hashlib.sha256(tok_path.read_bytes()).hexdigest() != m["tokenizer"]["sha256"]:
        raise MatryoshkaError(f"{tok_path} is missing or not the tokenizer the shards were made with")
    tok = load_tokenizer_file(tok_path)
    dtype = np.dtype(m["dtype"])
    train = [_map(folder, s, dtype) for s in m["shards"]["train"]]
    val = [_map(folder, s, dtype) for s in m["shards"]["val"]]
    return (
        tok,
        (train[0] if len(train) == 1 else TokenStream(train)),
        (val[0] if len(val) == 1 else TokenStream(val)),
        m,
    )


class ShardWriter:
    """Appends tokens to shards of at most `shard_tokens` tokens (None: one shard), each written under a
    temporary name and renamed when full; close() returns their manifest entries."""

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int | None):
        self.folder, self.prefix, self.dtype, self.limit = folder, prefix, dtype, shard_tokens
        self.done: list[dict] = []
        self.f = None

    def _open(self) -> None:
        self.name = f"{self.prefix}-{len(self.done):05d}.bin"
        self.f = open(self.folder / (self.name + ".tmp"), "wb")
        self.n, self.hash = 0, hashlib.sha256()

    def _finish(self) -> None:
        self.f.close()
        os.replace(self.folder / (self.name + ".tmp"), self.folder / self.name)
        self.done.append({"file": self.name, "tokens": self.n, "sha256": self.hash.hexdigest()})
        self.f = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.f is None:
                self._open()
            room = len(tokens) if self.limit is None else self.limit - self.n
            data = tokens[:room].astype(self.dtype, copy=False).tobytes()
            self.f.write(data)
            self.hash.update(data)
            self.n += min(room, len(tokens))
            tokens = tokens[room:]
            if self.limit is not None and self.n >= self.limit:
                self._finish()

    def close(self) -> list[dict]:
        if self.f is None and not self.done:
            self._open()  # an empty split still has its (empty) shard
        if self.f is not None:
            self._finish()
        return self.done
