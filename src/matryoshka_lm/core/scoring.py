"""Scoring tokens: the one log-probability function that evaluation, the server's logprobs, the router's features
and labels, and the lm-eval adapter all use (so a loss, a logprob and a router label of the same tokens agree)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary in fp32 (bf16 logits would round the small probabilities away)."""
    return F.log_softmax(logits.float(), dim=-1)


def token_logprobs(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[..., j]) from log-probabilities logp[..., j, :] (log_probs; aligned: shift them first for
    next-token scoring), (..., T)."""
    return logp.gather(-1, targets[..., None].long()).squeeze(-1)


def next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[..., t+1] | ids[..., :t+1]) from logits over ids (..., T, V): (..., T-1), position t scoring t+1."""
    return token_logprobs(log_probs(logits[..., :-1, :]), ids[..., 1:])
