"""Prompt inputs to token ids, checked once: a string, strings, token ids or arrays of token ids (completions'
`prompt`, embeddings' `input`), each within the context and the vocabulary."""

from __future__ import annotations

from .errors import APIError
from .protocol import MAX_INPUTS
from .state import State


def encode(state: State, text: str, param: str) -> list[int]:
    try:
        return state.tok.encode(text).ids
    except (TypeError, ValueError):  # a lone UTF-16 surrogate ("\ud800") passes json.loads, not the tokenizer
        raise APIError(400, f"'{param}' is not valid Unicode text.", param, "invalid_value") from None


def check_ids(state: State, ids: list[int], param: str, generate: bool = True) -> list[int]:
    """Token ids of one prompt (generate: an empty one starts a new document; one slot is left to generate) or of
    one embedding input."""
    if not ids and generate:
        ids = list(state.eot)
    if not ids:
        raise APIError(400, f"'{param}' is empty.", param, "invalid_value")
    ctx, vocab = state.cfg.max_seq_len, state.cfg.vocab_size
    if len(ids) > ctx - generate:
        room = f" (at most {ctx - 1} leave room to generate)" if generate else ""
        raise APIError(
            400,
            f"This model's context is {ctx} tokens; '{param}' has {len(ids)} tokens{room}.",
            param,
            "context_length_exceeded",
        )
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400, f"'{param}' has token id {bad}, outside the vocabulary 0..{vocab - 1}.", param, "invalid_value"
        )
    return ids


def prompt_ids(state: State, prompt: str | list, param: str = "prompt", generate: bool = True) -> list[list[int]]:
    """A prompt or input field (string, strings, ids, arrays of ids) -> checked token ids, one list each."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, f"'{param}' is an empty array.", param, "invalid_value")
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"'{param}' has {len(items)} entries; the limit is {MAX_INPUTS}.", param, "invalid_value")
    names = [param if len(items) == 1 else f"{param}[{i}]" for i in range(len(items))]
    return [
        check_ids(state, encode(state, p, name) if isinstance(p, str) else list(p), name, generate)
        for p, name in zip(items, names)
    ]
