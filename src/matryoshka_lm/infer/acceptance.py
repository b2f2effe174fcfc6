"""The arithmetic of a speculative round: drawing, accepting or rejecting drafts (Leviathan et al. 2023), the
acceptance statistics and the adaptive choice of γ (speculative.py's module doc explains each)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import Sampling, logits_to_probs, sample_from


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of them, accepted by the target
    gammas: list[int] = field(default_factory=list)  # γ used in each round
    draft_s: float = 0.0  # wall time in draft forwards
    verify_s: float = 0.0  # wall time in target forwards (verification)

    def add_round(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.rounds, self.drafted, self.accepted = self.rounds + 1, self.drafted + drafted, self.accepted + accepted
        self.gammas.append(drafted)
        self.draft_s, self.verify_s = self.draft_s + draft_s, self.verify_s + verify_s

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def best_gamma(alpha: float, t_draft: float, t_verify: float, max_gamma: int) -> int:
    """argmax over γ of expected tokens per round / cost of a round."""

    def rate(g: int) -> float:
        expected = g + 1 if alpha >= 1 else (1 - alpha ** (g + 1)) / (1 - alpha)
        return expected / (g * t_draft + t_verify)

    return max(range(1, max_gamma + 1), key=rate)


class GammaController:
    """Running acceptance rate (decayed counts, prior 2/3) and step costs -> the next round's γ."""

    def __init__(self, max_gamma: int, draft_cost: float | None):
        self.max_gamma, self.fixed_cost = max_gamma, draft_cost
        self.hits, self.misses = 2.0, 1.0
        self.t_draft: float | None = None
        self.t_verify: float | None = None

    def update(self, gamma: int, accepted: int, t_draft: float, t_verify: float) -> int:
        self.hits, self.misses = 0.9 * self.hits + accepted, 0.9 * self.misses + (accepted < gamma)
        ema = lambda old, new: new if old is None else 0.8 * old + 0.2 * new
        self.t_draft, self.t_verify = ema(self.t_draft, t_draft / gamma), ema(self.t_verify, t_verify)
        cost = self.fixed_cost if self.fixed_cost is not None else self.t_draft / max(self.t_verify, 1e-9)
        return best_gamma(self.hits / (self.hits + self.misses), cost, 1.0, self.max_gamma)


def draw(probs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) -> (B,); greedy probabilities are one-hot, so argmax draws the same token without randomness."""
    return probs.argmax(-1) if greedy else sample_from(probs, generator)


def accept_reject(
    p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, greedy: bool, generator: torch.Generator | None
) -> tuple[int, torch.Tensor]:
    """p (γ+1, V) target probs, q (γ, V) draft probs, drafted (γ,) tokens -> (n accepted, next token (1,))."""
    g = drafted.numel()
    i = torch.arange(g, device=p.device)
    ratio = p[i, drafted] / q[i, drafted]
    # q >= p: accept with probability p/q; q < p: always accept (ratio >= 1 > any uniform draw)
    accept = ratio >= 1 if greedy else torch.rand(g, generator=generator, device=p.device) < ratio
    rejected = (~accept).nonzero()
    if len(rejected) == 0:  # all accepted: a bonus token from the target's last distribution
        return g, draw(p[g:], greedy, generator)
    n = int(rejected[0])
    residual = (p[n] - q[n]).clamp(min=0)  # rejected: resample from where the target exceeds the draft
    total = residual.sum()
    dist = residual / total if total > 0 else p[n]  # total == 0 only through rounding (p == q)
    return n, draw(dist.view(1, -1), greedy, generator)


def next_draft(
    logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None, qs: list[torch.Tensor]
) -> torch.Tensor:
    """The draft's next token (1,) from its logits (1, V); when sampling, its distribution is appended to qs."""
    if sampling.greedy:
        return logits.argmax(-1)
    qs.append(logits_to_probs(logits, sampling))
    return sample_from(qs[-1], gen)


def accept(
    logits: torch.Tensor, drafted: torch.Tensor, q: torch.Tensor | None, sampling: Sampling, gen
) -> tuple[int, torch.Tensor]:
    """The target's logits (γ+1, V) over [last, drafts] -> (drafts accepted, the token after them (1,))."""
    if sampling.greedy:  # accept_reject with one-hot p and q, without building them
        best = logits.argmax(-1).tolist()
        n = next((i for i, (d, b) in enumerate(zip(drafted.tolist(), best)) if d != b), len(best) - 1)
        return n, torch.tensor([best[n]], device=logits.device)
    return accept_reject(logits_to_probs(logits, sampling), q, drafted, False, gen)
