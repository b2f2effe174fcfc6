"""Stop conditions of one output row: stop tokens, stop strings, and the text a stream may already send."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

Decode = Callable[[list[int]], str]


@dataclass
class Completion:
    tokens: list[int]          # new tokens, without a stop token / the tokens of a stop string
    text: str | None = None    # decoded, cut before a stop string (None when no decode function was given)
    finish_reason: str = "length"  # "stop" (stop token or string) | "length" (max_new_tokens or the context)


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in text, -1 if none."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might begin a stop string (or an unfinished UTF-8 character): a stream
    holds them back until the next token decides."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def cut_at_stop(tokens: list[int], text: str, decode: Decode) -> list[int]:
    """The longest prefix of `tokens` whose text lies within `text` (the text before a stop string)."""
    k = len(tokens)
    while k > 0 and not text.startswith(decode(tokens[:k])):
        k -= 1
    return tokens[:k]


@dataclass
class StopRow:
    """One sequence's output and stop state."""
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    decode: Decode | None
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    done: bool = False
    reason: str = "length"

    def add(self, tok: int) -> None:
        if self.done:
            return
        if tok in self.stop_tokens:
            self.done, self.reason = True, "stop"
            return
        self.tokens.append(tok)
        if self.stop_strings:
            text = self.decode(self.tokens)
            i = find_stop(text, self.stop_strings)
            if i >= 0:
                self.text = text[:i]
                self.tokens = cut_at_stop(self.tokens, self.text, self.decode)
                self.done, self.reason = True, "stop"

    def completion(self) -> Completion:
        text = self.text if self.text is not None else (self.decode(self.tokens) if self.decode else None)
        return Completion(self.tokens, text, self.reason)


def stream_rows(steps: Iterator[list[int]], row: StopRow) -> Iterator[int | str]:
    """Feed one row token batches (lists of ids) and yield what becomes final: ids, or text pieces if it decodes."""
    sent = 0
    for toks in steps:
        before = len(row.tokens)
        for t in toks:
            row.add(t)
            if row.done:
                break
        if row.decode is None:
            yield from row.tokens[before:]
        else:
            text = row.text if row.text is not None else row.decode(row.tokens)
            end = len(text) if row.done else len(text) - held_back(text, row.stop_strings)
            if end > sent:
                yield text[sent:end]
                sent = end
        if row.done:
            return
    if row.decode is not None:
        text = row.decode(row.tokens)
        if len(text) > sent:
            yield text[sent:]
