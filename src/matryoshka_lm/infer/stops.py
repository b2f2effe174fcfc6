"""Stop conditions of one output row: stop tokens, stop strings, and the text a stream may already send.

One implementation for every caller, linear in the output: the engine pulls tokens through `StopRow.add` /
`stream_rows`; the server's batcher pushes them through the same `StopRow`. Per token it decodes only a few recent
tokens (`Detokenizer`) and searches stop strings only in the text not yet released (at most the longest stop
string minus one character, plus the new text).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from matryoshka_lm.errors import MatryoshkaError

Decode = Callable[[list[int]], str]

UNFINISHED = "\ufffd"  # what a byte-level BPE decodes an incomplete UTF-8 character to
MAX_WINDOW = 16  # unsettled tokens after which the Detokenizer tries to shorten its window


@dataclass
class Completion:
    tokens: list[int]  # new tokens, without a stop token / the tokens of a stop string
    text: str | None = None  # decoded, cut before a stop string (None when no decode function was given)
    finish_reason: str = "length"  # "stop" (stop token or string) | "length" (max_new_tokens or the context)


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in text, -1 if none."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop string: it may begin one."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might begin a stop string (or an unfinished UTF-8 character): a stream
    holds them back until the next token decides."""
    unfinished = len(text) - len(text.rstrip(UNFINISHED))
    return max(unfinished, stop_prefix(text, stops))


class Detokenizer:
    """Token ids in, settled text out, decoding only a small window of recent tokens per token.

    The prefix/read-offset technique of text-generation-inference and vLLM: tokens[:read] are settled; the text
    of tokens[read:] is decode(tokens[prefix:]) minus decode(tokens[prefix:read]) (the prefix gives decoders that
    depend on neighbours, e.g. one stripping a leading space, their context). That text (`tail`) stays unsettled
    while it is empty or ends in U+FFFD, an unfinished UTF-8 character that the next token may complete. For
    byte-level BPE the settled pieces plus the tail equal decode(all tokens) at every step.
    """

    def __init__(self, decode: Decode):
        self.decode = decode
        self.tokens: list[int] = []
        self.prefix = self.read = 0
        self.prefix_text = ""  # decode(tokens[prefix:read])
        self.tail = ""  # the text of tokens[read:], not settled yet

    def add(self, tok: int) -> str:
        """Append one token; return the text it settled ('' while the tail is held)."""
        self.tokens.append(tok)
        window = self.decode(self.tokens[self.prefix :])
        self.tail = window[len(self.prefix_text) :]
        if self.tail and not self.tail.endswith(UNFINISHED):
            piece, self.tail = self.tail, ""
            self.prefix, self.read = self.read, len(self.tokens)
            self.prefix_text = self.decode(self.tokens[self.prefix : self.read])
            return piece
        if len(self.tokens) - self.read > MAX_WINDOW:
            return self._shorten(window)
        return ""

    def _shorten(self, window: str) -> str:
        """Settle all but the last 4 tokens of a long unsettled tail (garbage bytes from an untrained model keep
        it ending in U+FFFD), so that a step's work stays bounded. Only where the split is provably exact for
        byte-level BPE: >= 3 characters after it finish any character begun before it, and the two halves join
        to the whole."""
        k = len(self.tokens) - 4
        left, right = self.decode(self.tokens[self.prefix : k]), self.decode(self.tokens[k:])
        if len(right) < 3 or left + right != window or not left.startswith(self.prefix_text):
            return ""
        piece = left[len(self.prefix_text) :]
        self.prefix = self.read = k
        self.prefix_text, self.tail = "", right
        return piece


@dataclass
class StopRow:
    """One sequence's output and stop state.

    `add` takes the row's next token; `take` returns the text that became final since the last call (text that
    might begin a stop string, or an unfinished character, waits until the next token decides); `flush` ends the
    row by length and returns the rest. A stop token ends the row and is not output; a stop string ends it and
    cuts the text before it, keeping the tokens whose text lies entirely before it.
    """

    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    decode: Decode | None
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # the text cut before a stop string, once one was found
    done: bool = False
    reason: str = "length"
    _det: Detokenizer | None = field(default=None, init=False, repr=False)
    _out: list[str] = field(default_factory=list, init=False, repr=False)  # final text, in pieces
    _taken: int = field(default=0, init=False, repr=False)  # pieces of _out taken
    _unsent: str = field(default="", init=False, repr=False)  # settled, not yet final
    _settled: int = field(default=0, init=False, repr=False)  # characters settled
    _ends: list[tuple[int, str]] = field(default_factory=list, init=False, repr=False)  # per token: see add
    _closed: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.decode is not None:
            self._det = Detokenizer(self.decode)
        elif self.stop_strings:
            raise MatryoshkaError("stop strings need a decode function (token ids -> text)")

    def add(self, tok: int) -> None:
        if self.done:
            return
        if tok in self.stop_tokens:
            self.done, self.reason = True, "stop"
            self._close()
            return
        self.tokens.append(tok)
        if self._det is None:
            return
        piece = self._det.add(tok)
        if self.stop_strings:
            # this token's text, decode(tokens[:k+1]), is the settled text + `new`: a cut may keep the token
            # only if `new` lies within the text before the stop
            new = piece + self._det.tail
            self._ends.append((self._settled + len(new), new))
        self._settled += len(piece)
        self._unsent += piece
        self._match()

    def _match(self) -> None:
        """Find a stop string in the text not yet final (nothing final can begin one), or release what can't."""
        window = self._unsent + self._det.tail
        j = find_stop(window, self.stop_strings) if self.stop_strings else -1
        if j >= 0:
            self._release(window[:j])
            self._unsent, self._closed = "", True
            self.text = "".join(self._out)
            self.tokens = self.tokens[: self._keep()]
            self.done, self.reason = True, "stop"
            return
        final = len(self._unsent) - stop_prefix(self._unsent, self.stop_strings)
        self._release(self._unsent[:final])
        self._unsent = self._unsent[final:]

    def _keep(self) -> int:
        """The largest k whose decode(tokens[:k]) is a prefix of the cut text (its tokens lie before the stop)."""
        text = self.text or ""
        for k in range(len(self._ends), 0, -1):
            end, new = self._ends[k - 1]
            if end <= len(text) and text[end - len(new) : end] == new:
                return k
        return 0

    def _release(self, piece: str) -> None:
        if piece:
            self._out.append(piece)

    def _close(self) -> None:
        """Everything left is final (the row ended without a stop string)."""
        if not self._closed:
            self._release(self._unsent + (self._det.tail if self._det is not None else ""))
            self._unsent, self._closed = "", True

    def take(self) -> str:
        """The text that became final since the last take (all of the rest once the row is done)."""
        piece = "".join(self._out[self._taken :])
        self._taken = len(self._out)
        return piece

    def flush(self) -> str:
        """End the row by length: release what was held back and return the untaken text."""
        self.done = True
        self._close()
        return self.take()

    def completion(self) -> Completion:
        if self._det is None:
            return Completion(self.tokens, None, self.reason)
        rest = "" if self._closed else self._unsent + self._det.tail
        return Completion(self.tokens, "".join(self._out) + rest, self.reason)


def stream_rows(steps: Iterator[list[int]], row: StopRow) -> Iterator[int | str]:
    """Feed one row token batches (lists of ids) and yield what becomes final: ids, or text pieces if it decodes."""
    for toks in steps:
        before = len(row.tokens)
        for t in toks:
            row.add(t)
            if row.done:
                break
        if row.decode is None:
            yield from row.tokens[before:]
        elif piece := row.take():
            yield piece
        if row.done:
            return
    if row.decode is not None and (piece := row.flush()):
        yield piece
