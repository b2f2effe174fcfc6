"""How the next token is drawn from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from matryoshka_lm.errors import MatryoshkaError


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits; temperature 0 is greedy (top_k / top_p then ignored)."""

    temperature: float = 0.0
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # seeds a torch.Generator: same seed, same output

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise MatryoshkaError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise MatryoshkaError(f"top_k must be positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MatryoshkaError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


GREEDY = Sampling()


def logits_to_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """(..., V) logits -> the distribution sampling draws from: one-hot argmax when greedy, else
    softmax(logits / T) restricted to the top-k and then the top-p nucleus."""
    logits = logits.float()
    if s.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if s.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= s.top_p, 0.0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) probabilities -> (B,) token ids."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if s.greedy:
        return logits.argmax(-1)
    return sample_from(logits_to_probs(logits, s), generator)
