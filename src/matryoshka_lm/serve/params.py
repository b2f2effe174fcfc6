"""A generation request's settings, checked once against the server's limits: how many tokens, how to sample,
where to stop, how many choices."""

from __future__ import annotations

from dataclasses import dataclass

from matryoshka_lm.infer.sampling import Sampling

from .errors import APIError, invalid
from .protocol import MAX_INPUTS, MAX_STOPS, GenerationRequest
from .state import State


@dataclass(frozen=True)
class GenParams:
    n: int  # choices per prompt
    max_tokens: int  # 0: score the prompt only (completions' echo)
    sampling: Sampling
    stops: tuple[str, ...]
    stop_tokens: frozenset[int]


def gen_params(
    state: State,
    req: GenerationRequest,
    max_tokens: int | None,
    default_max: int,
    n_prompts: int,
    extra_stops: tuple[str, ...] = (),
) -> GenParams:
    """The settings of a request with n_prompts prompts; extra_stops end every row too (chat's next turn)."""
    n_tokens = default_max if max_tokens is None else max_tokens
    if n_tokens > state.max_tokens_limit:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise invalid(param, f"{n_tokens} is above this server's limit of {state.max_tokens_limit}")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOPS:
        raise invalid("stop", f"at most {MAX_STOPS} strings, got {len(stop)}")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0:
        temperature = 0.0  # only the most likely token is left
    seed = None if req.seed is None else req.seed % 2**64
    top_k = req.top_k if req.top_k and req.top_k > 0 else None  # 0 and -1 mean off
    sampling = Sampling(temperature, top_k, top_p or 1.0, seed, req.min_p or 0.0, _logit_bias(state, req))
    extra = [_token_id(state, t, "stop_token_ids") for t in req.stop_token_ids or []]
    stop_tokens = frozenset(([] if req.ignore_eos else state.eot) + extra)  # <|endoftext|> unless ignore_eos
    n = req.n or 1
    if n * n_prompts > MAX_INPUTS:
        raise APIError(
            400, f"{n_prompts} prompts x n={n} asks for more than {MAX_INPUTS} choices.", "n", "invalid_value"
        )
    return GenParams(n, n_tokens, sampling, tuple(s for s in stop if s) + extra_stops, stop_tokens)


def _token_id(state: State, key: str | int, param: str) -> int:
    if isinstance(key, str) and not (key.isascii() and key.isdigit()):
        raise invalid(param, f"{key!r} is not a token id")
    tok, vocab = int(key), state.cfg.vocab_size
    if not 0 <= tok < vocab:
        raise invalid(param, f"token id {tok} is outside the vocabulary 0..{vocab - 1}")
    return tok


def _logit_bias(state: State, req: GenerationRequest) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs: equal settings give equal batching keys."""
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        tok = _token_id(state, key, "logit_bias")
        if tok in bias:
            raise invalid("logit_bias", f"token id {tok} appears twice")
        bias[tok] = float(value)
    return tuple(sorted((t, b) for t, b in bias.items() if b != 0))
