"""One prompt in, new token ids out: a thin wrapper over engine.Engine (batching, top-k/p, stops, streaming
and speculative decoding live in engine.py and speculative.py)."""
from __future__ import annotations

from .engine import Engine, Sampling
from .model import MatryoshkaLM
from .spec import SubmodelSpec


def generate(model: MatryoshkaLM, prompt: list[int], spec: SubmodelSpec | None = None, max_new_tokens: int = 64,
             temperature: float = 0.8, seed: int | None = None, stop_token: int | None = None) -> list[int]:
    """Continue `prompt` (token ids) with the submodel `spec`; returns only the new tokens (a stop token ends the
    output and is not included)."""
    stops = [] if stop_token is None else [stop_token]
    done = Engine(model).generate([prompt], spec, max_new_tokens, Sampling(temperature, seed=seed), stops)
    return done[0].tokens
