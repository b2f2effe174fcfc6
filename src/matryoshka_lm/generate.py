"""Simple KV-cached sampling at any size: prefill the prompt, then decode one token at a time."""
from __future__ import annotations

import torch

from .errors import MatryoshkaError
from .model import KVCache, MatryoshkaLM
from .spec import SubmodelSpec


def sample_next(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> (B,) token ids; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MatryoshkaLM, prompt: list[int], spec: SubmodelSpec | None = None, max_new_tokens: int = 64,
             temperature: float = 0.8, seed: int | None = None, stop_token: int | None = None) -> list[int]:
    """Continue `prompt` (token ids) with the submodel `spec`; returns only the new tokens."""
    if not prompt:
        raise MatryoshkaError("empty prompt")
    if max_new_tokens <= 0:
        raise MatryoshkaError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise MatryoshkaError(f"temperature must be >= 0, got {temperature}")
    limit = model.cfg.max_seq_len
    if len(prompt) >= limit:
        raise MatryoshkaError(f"prompt has {len(prompt)} tokens; the context holds {limit}")
    spec = spec or model.full
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    n_new = min(max_new_tokens, limit - len(prompt))
    cache = KVCache.allocate(model.cfg, spec, 1, len(prompt) + n_new, device, next(model.parameters()).dtype)
    logits = model(torch.tensor([prompt], device=device), spec, cache, 0)[:, -1]
    out: list[int] = []
    pos = len(prompt)
    for _ in range(n_new):
        tok = sample_next(logits, temperature, gen)
        out.append(int(tok))
        if stop_token is not None and out[-1] == stop_token or len(out) == n_new:
            break
        logits = model(tok.view(1, 1), spec, cache, pos)[:, -1]
        pos += 1
    return out
