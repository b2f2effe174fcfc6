"""One generation request, validated once: what every way of generating (plain, speculative, routed, batched by the
server) hands the engine (`Engine.run` / `Engine.stream_request`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from matryoshka_lm.core.spec import SubmodelSpec
from matryoshka_lm.errors import MatryoshkaError

from .sampling import GREEDY, Sampling
from .stops import Decode, StopRow


@dataclass(frozen=True)
class Stops:
    """Where a row ends: any of `tokens` (not returned), or a stop string (cut before it; needs `decode`)."""

    tokens: tuple[int, ...] = ()
    strings: tuple[str, ...] = ()
    decode: Decode | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        object.__setattr__(self, "strings", tuple(s for s in self.strings if s))
        if self.strings and self.decode is None:
            raise MatryoshkaError("stop strings need a decode function (token ids -> text)")

    def rows(self, n: int) -> list[StopRow]:
        """The stop state of n output rows."""
        return [StopRow(frozenset(self.tokens), self.strings, self.decode) for _ in range(n)]


class Speculation(Protocol):
    """How to decode speculatively (speculative.Speculation): the rounds of one prompt, each the tokens it adds."""

    def rounds(self, engine: Any, request: Request, stats: Any) -> Iterator[list[int]]: ...


@dataclass(frozen=True)
class Prefilled:
    """A prefill already run into `cache` (slots 0..start) for the request's spec, with its last slot's logits (1, V):
    the size router's, reused when it picks the size it prefilled with (routed.py). `release` frees the cache."""

    cache: Any
    logits: Any
    start: int
    release: Any = None  # Callable[[], None]


@dataclass(frozen=True)
class Request:
    prompts: tuple[tuple[int, ...], ...]  # token ids, one tuple per row (lengths may differ: left-padded)
    spec: SubmodelSpec | None = None  # the size or cell; None = the full model
    max_new_tokens: int = 64  # per row; fewer when the context fills first
    sampling: Sampling = GREEDY
    stops: Stops = field(default_factory=Stops)
    speculation: Speculation | None = None  # a draft to decode with (one prompt only)
    prefilled: Prefilled | None = None  # decode on from a prefill that already ran (one prompt only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(tuple(int(t) for t in p) for p in self.prompts))
        for what, given in (("speculative decoding", self.speculation), ("a prefilled request", self.prefilled)):
            if given is not None and len(self.prompts) != 1:
                raise MatryoshkaError(f"{what} takes one prompt, got {len(self.prompts)}")


def request(
    prompts: Sequence[Sequence[int]],
    spec: SubmodelSpec | None = None,
    max_new_tokens: int = 64,
    sampling: Sampling = GREEDY,
    stop_tokens: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Decode | None = None,
    speculation: Speculation | None = None,
) -> Request:
    """A Request from the keyword arguments the convenience functions take."""
    stops = Stops(tuple(stop_tokens), tuple(stop_strings), decode)
    return Request(tuple(map(tuple, prompts)), spec, max_new_tokens, sampling, stops, speculation)
