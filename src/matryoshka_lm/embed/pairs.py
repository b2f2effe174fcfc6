"""Text inputs: texts to embed, (query, positive) training pairs from JSONL, self-supervised corpus pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from matryoshka_lm.errors import MatryoshkaError


def read_texts(path: str | Path) -> list[str]:
    """Texts to embed: one per non-blank line, or a JSONL file (.jsonl) of {"text": ...} objects."""
    p = Path(path)
    if not p.is_file():
        raise MatryoshkaError(f"input file {p} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MatryoshkaError(f"{p} is not UTF-8 text") from None
    if p.suffix == ".jsonl":
        texts = [_json_field(line, ("text",), p, i)[0] for i, line in enumerate(lines, 1) if line.strip()]
    else:
        texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise MatryoshkaError(f"{p} is empty (no non-blank lines)")
    return texts


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Training pairs from JSONL: one {"query": ..., "positive": ...} object per line ("anchor" also works)."""
    p = Path(path)
    if not p.is_file():
        raise MatryoshkaError(f"pairs file {p} does not exist")
    pairs = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            q, pos = _json_field(line, (("query", "anchor"), "positive"), p, i)
            pairs.append((q, pos))
    if not pairs:
        raise MatryoshkaError(f"pairs file {p} is empty")
    return pairs


def _json_field(line: str, keys: tuple, path: Path, lineno: int) -> list[str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise MatryoshkaError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise MatryoshkaError(f"{path}:{lineno}: expected a JSON object")
    values = []
    for key in keys:
        names = key if isinstance(key, tuple) else (key,)
        value = next((obj[k] for k in names if k in obj), None)
        if not isinstance(value, str) or not value.strip():
            raise MatryoshkaError(f"{path}:{lineno}: needs a non-empty string field {' or '.join(map(repr, names))}")
        values.append(value.strip())
    return values


def corpus_pairs(
    docs: list[str], passage_chars: int = 240, min_chars: int = 24, overlap: float = 0.0
) -> list[tuple[str, str]]:
    """Self-supervised pairs: consecutive lines grouped into passages of ~`passage_chars`, each cut into two
    halves (at the line boundary nearest the middle, else at a space): (first half, second half).

    overlap > 0 widens both halves towards each other so that they share that fraction of the passage's words
    (an easier task, learnable from scratch by a small model)."""
    pairs = []
    for doc in docs:
        buf: list[str] = []
        for line in doc.splitlines():
            line = " ".join(line.split())
            if line:
                buf.append(line)
            if sum(len(b) for b in buf) >= passage_chars:
                pair = _halves(buf)
                if pair and overlap > 0:
                    pair = _overlap(pair, overlap)
                if pair and min(len(pair[0]), len(pair[1])) >= min_chars:
                    pairs.append(pair)
                buf = []
    return pairs


def _halves(lines: list[str]) -> tuple[str, str] | None:
    text = " ".join(lines)
    half = len(text) / 2
    if len(lines) > 1:
        cuts = np.cumsum([len(b) + 1 for b in lines[:-1]])
        k = int(np.argmin(np.abs(cuts - half))) + 1
        return " ".join(lines[:k]), " ".join(lines[k:])
    cut = text.rfind(" ", 0, int(half) + 1)
    return (text[:cut], text[cut + 1 :]) if cut > 0 else None


def _overlap(pair: tuple[str, str], overlap: float) -> tuple[str, str]:
    a, b = pair[0].split(), pair[1].split()
    words, e = a + b, round(overlap * (len(a) + len(b)) / 2)
    return " ".join(words[: len(a) + e]), " ".join(words[max(0, len(a) - e) :])


def split_pairs(pairs: list[tuple[str, str]], n_eval: int, seed: int) -> tuple[list, list]:
    """Shuffle (seeded) and hold out `n_eval` pairs for evaluation."""
    if len(pairs) < 2:
        raise MatryoshkaError(f"need at least 2 pairs to train with in-batch negatives, got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(n_eval, len(pairs) // 5)
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]
