"""Sampling settings: every value a caller may pass gives a finite distribution and a valid token, and each
setting does what it says."""

from __future__ import annotations

import sys

import pytest
import torch

from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.sampling import Sampling, logits_to_probs, sample

V = 50
TEMPERATURES = [1e-38, 1e-45, 1e-300, 1e-10, 1.0, 2.0, 1e10, sys.float_info.max, float("inf")]
TOP_PS = [1e-300, 1e-10, 0.5, 1.0]
TOP_KS = [None, 1, V, V + 7]


def logits() -> torch.Tensor:
    x = torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 8
    x[1] -= 1000  # all negative: a tiny T sends every logit / T to -inf
    x[2, :3] = x[2].max() + 1  # a three-way tie for the top
    return x


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("top_p", TOP_PS)
@pytest.mark.parametrize("top_k", TOP_KS)
@pytest.mark.parametrize("min_p", [0.0, 0.5, 1.0])
def test_every_valid_setting_gives_a_distribution_and_a_token(temperature, top_p, top_k, min_p):
    x = logits()
    s = Sampling(temperature, top_k, top_p, 3, min_p)
    p = logits_to_probs(x, s)
    assert torch.isfinite(p).all() and (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(len(x), dtype=p.dtype))
    tok = sample(x, s, s.generator("cpu"))
    assert ((tok >= 0) & (tok < V)).all()
    assert (p.gather(-1, tok[:, None]) > 0).all()  # drawn from where the mass is


def test_a_vanishing_temperature_is_greedy_over_the_top_set():
    x = logits()
    p = logits_to_probs(x, Sampling(1e-38))
    top = x == x.amax(-1, keepdim=True)
    assert torch.allclose(p, top.float() / top.sum(-1, keepdim=True))
    assert torch.allclose(p[2, :3], torch.full((3,), 1 / 3))


def _old_probs(x: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution before the extreme-value fixes, for settings where it was finite."""
    x = x / s.temperature
    if s.top_k is not None and s.top_k < x.shape[-1]:
        x = x.masked_fill(x < torch.topk(x, s.top_k, dim=-1).values[..., -1:], float("-inf"))
    probs = torch.softmax(x, -1)
    if s.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= s.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@pytest.mark.parametrize("s", [Sampling(0.7, top_p=0.9), Sampling(1.3, top_k=5), Sampling(1e-30), Sampling(1.0)])
def test_ordinary_settings_keep_their_exact_distribution(s):
    """Same seed, same output as before: the fixes only touch rows that used to give NaN."""
    assert torch.equal(logits_to_probs(logits(), s), _old_probs(logits(), s))


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_top():
    x = logits()
    full = logits_to_probs(x, Sampling(1.0))
    p = logits_to_probs(x, Sampling(1.0, min_p=0.1))
    keep = full >= 0.1 * full.amax(-1, keepdim=True)
    assert torch.equal(p > 0, keep)
    assert torch.allclose(p, full * keep / (full * keep).sum(-1, keepdim=True))


def test_logit_bias_moves_greedy_and_sampled_tokens():
    x = logits()
    best = x.argmax(-1)
    banned = Sampling(0.0, logit_bias=((int(best[0]), -100.0),))
    assert not banned.greedy  # so no caller shortcuts it to argmax of the raw logits
    assert sample(x[:1], banned, None).item() != best[0]
    assert logits_to_probs(x[:1], banned)[0, best[0]] == 0
    forced = Sampling(1.0, seed=1, logit_bias=((7, 100.0),))
    assert (sample(x[[0, 3]], forced, forced.generator("cpu")) == 7).all()
    with pytest.raises(MatryoshkaError, match="vocabulary"):
        sample(x, Sampling(0.0, logit_bias=((V, 1.0),)), None)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -1},
        {"temperature": float("nan")},
        {"top_p": 0},
        {"top_k": 0},
        {"min_p": 1.5},
        {"min_p": float("nan")},
        {"logit_bias": ((-1, 1.0),)},
        {"logit_bias": ((1, float("inf")),)},
    ],
)
def test_bad_settings_raise(kw):
    with pytest.raises(MatryoshkaError):
        Sampling(**kw)
