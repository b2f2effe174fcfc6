"""How the next token is drawn from logits: logit bias, then greedy, or temperature, top-k, top-p (nucleus) and
min-p. Safe for every valid setting: no temperature or top_p, however extreme, yields NaN."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from matryoshka_lm.errors import MatryoshkaError


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits; temperature 0 is greedy (top_k / top_p / min_p then ignored).
    logit_bias is added to the logits first, greedy or not."""

    temperature: float = 0.0
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # seeds a torch.Generator: same seed, same output
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, added to the logits

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise MatryoshkaError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise MatryoshkaError(f"top_k must be positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MatryoshkaError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise MatryoshkaError(f"min_p must be in [0, 1], got {self.min_p}")
        for tok, bias in self.logit_bias:
            if tok < 0 or not math.isfinite(bias):
                raise MatryoshkaError(f"logit_bias needs token ids >= 0 and finite biases, got {tok}: {bias}")

    @property
    def greedy(self) -> bool:
        """argmax of the raw logits. Temperature 0 with a logit_bias is not: callers that shortcut greedy to
        logits.argmax would drop the bias, so it goes through logits_to_probs (a one-hot of the biased argmax)."""
        return self.temperature == 0 and not self.logit_bias

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


GREEDY = Sampling()


def _biased(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    logits = logits.float()
    if not s.logit_bias:
        return logits
    ids, bias = zip(*s.logit_bias)
    if max(ids) >= logits.shape[-1]:
        raise MatryoshkaError(f"logit_bias token id {max(ids)} is outside the vocabulary of {logits.shape[-1]}")
    b = torch.zeros(logits.shape[-1], device=logits.device)
    b[list(ids)] = torch.tensor(bias, device=logits.device)
    return logits + b


def logits_to_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """(..., V) logits -> the distribution sampling draws from: one-hot argmax when temperature is 0, else
    softmax(logits / T) restricted to the top-k, then the top-p nucleus, then the min-p set."""
    logits = _biased(logits, s)
    if s.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    scaled = logits / s.temperature
    # a tiny T overflows logits / T to +-inf (softmax then gives NaN). Where it does, every token below the max
    # is at least ~2^-24 * 3e38 nats behind, so the limit is exact: uniform over the max set. Other rows keep
    # the values they always had.
    top = logits.amax(-1, keepdim=True)
    overflow = ~torch.isfinite(scaled.amax(-1, keepdim=True))
    logits = torch.where(overflow, torch.where(logits == top, 0.0, float("-inf")), scaled)
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if s.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
        drop = before >= s.top_p
        drop[..., 0] = False  # the most likely token always stays, even when top_p rounds to 0 in float32
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    if s.min_p > 0:
        probs = probs.masked_fill(probs < s.min_p * probs.amax(-1, keepdim=True), 0.0)  # the max always stays
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) probabilities -> (B,) token ids."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if s.greedy:
        return logits.argmax(-1)
    if s.temperature == 0:
        return _biased(logits, s).argmax(-1)
    return sample_from(logits_to_probs(logits, s), generator)
