"""The Matryoshka (MRL) objective: nested dims, truncate-then-normalize, in-batch-negatives InfoNCE.

    >>> q, p = torch.randn(8, 64), torch.randn(8, 64)
    >>> loss = mrl_contrastive_loss(q, p, dims=[4, 8, 16, 32, 64])

Every embedding is L2-normalized *after* truncation: `shrink(t, m)` = slice, then normalize. Servers disagree
on the order (see docs/embeddings.md), so vectors from here are always unit-norm at the dims asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from matryoshka_lm.core import nested
from matryoshka_lm.errors import MatryoshkaError

MRL_FRACTIONS = (16, 8, 4, 2, 1)  # the MRL nesting: d/16, d/8, d/4, d/2, d


def default_dims(d: int) -> list[int]:
    """The MRL nesting {d/16, d/8, d/4, d/2, d} (rounded down, at least 1, without repeats)."""
    return sorted({max(1, d // f) for f in MRL_FRACTIONS})


def check_dims(dims: list[int] | tuple[int, ...], max_dim: int, trained: list[int] | None = None) -> list[int]:
    """Validate embedding dims: integers in 1..max_dim and, when `trained` is given, among the trained dims."""
    dims = [int(m) for m in dims]
    if not dims:
        raise MatryoshkaError("no embedding dims given")
    for m in dims:
        if not 0 < m <= max_dim:
            raise MatryoshkaError(f"embedding dim {m} is outside 1..{max_dim} (the embedding has {max_dim} dims)")
        if trained is not None and m not in trained:
            ok = [t for t in trained if t <= max_dim]
            raise MatryoshkaError(f"embedding dim {m} was not trained; this model's Matryoshka dims are {ok}")
    return sorted(set(dims))


def spec_dims(dims: list[int], out_dim: int) -> list[int]:
    """The nested dims a spec of `out_dim` dims trains: those that fit, plus its own full dims."""
    return sorted({m for m in dims if m <= out_dim} | {out_dim})


def resolve_dims(out_dim: int, trained: list[int], dims: int | None, what: str = "this size") -> int:
    """The dims to emit: validated against the trained set; default the largest trained dim that fits."""
    if dims is None:
        fits = [m for m in trained if m <= out_dim]
        if not fits:
            raise MatryoshkaError(f"no trained dims fit {what} ({out_dim} dims); trained: {trained}")
        return max(fits)
    return check_dims([dims], out_dim, trained)[0]


def shrink(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` features, L2-normalized (truncate, then normalize)."""
    if not 0 < dim <= t.shape[-1]:
        raise MatryoshkaError(f"embedding dim {dim} is outside 1..{t.shape[-1]}")
    return nested.embedding_prefix(t, dim)


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float, symmetric: bool = False) -> torch.Tensor:
    """In-batch-negatives contrastive loss for unit vectors q, p (B, D): row i's positive is p[i]."""
    logits = q @ p.T / temperature  # (B, B) cosine similarities / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:  # also passages -> queries; the two directions averaged
        loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
    return loss


def mrl_contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    dims: list[int],
    weights: list[float] | None = None,
    temperature: float = 0.05,
    symmetric: bool = False,
) -> torch.Tensor:
    """Matryoshka loss: sum over m in `dims` of weight_m * InfoNCE(shrink(q, m), shrink(p, m)).

    q, p: (B, D) unnormalized embeddings of the queries and their positives. Weights default to 1 (the MRL
    paper and sentence-transformers' MatryoshkaLoss both sum with unit weights).
    """
    dims = list(dims)
    if not dims:
        raise MatryoshkaError("no embedding dims given")
    weights = [1.0] * len(dims) if weights is None else list(weights)
    if len(weights) != len(dims):
        raise MatryoshkaError(f"{len(weights)} dim weights for {len(dims)} dims")
    total = q.new_zeros(())
    for m, w in zip(dims, weights):  # shrink() rejects dims outside 1..D
        total = total + w * info_nce(shrink(q, m), shrink(p, m), temperature, symmetric)
    return total
