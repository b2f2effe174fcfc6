"""Lossless speculative decoding inside one nested model: a small size drafts, a larger size verifies.

Both specs read the same weights (nested.py slices them), so the draft model costs no memory beyond its KV cache.
Each round the draft proposes γ tokens one at a time; the target scores all of them in ONE forward pass; token i
is accepted with probability min(1, p_i / q_i) and the first rejected one is resampled from normalize(max(0, p - q))
(Leviathan et al. 2023, Chen et al. 2023), which makes every output token distributed exactly as the target's own
sampling would draw it. Under greedy decoding p and q are one-hot, so this reduces to "keep the draft tokens while
they equal the target's argmax, then take the target's token": the output is the target's greedy output.

Adaptive γ: from the running acceptance rate α and the cost c of a draft step relative to a verify pass, each
round picks the γ that maximises expected tokens per unit time, E(γ) / (γ·c + 1) with E(γ) = 1 + α + … + α^γ.
c is measured (wall clock) under greedy decoding, whose output cannot depend on γ. Under sampling each γ draws
different random numbers, so a measured (noisy) c would make the text depend on the machine's load: there c is
fixed (`draft_cost`, default the draft/target parameter ratio) and a seed fixes the output.

Shared cache (MatFormer, Devvrit et al. 2023): the draft can read the target's KV cache instead of keeping its
own: the draft's KV heads are a prefix of the target's and its layers a prefix of the target's layers, so a view of
the target cache has the draft's shapes. The draft then skips its prefill and its catch-up steps, but attends to
keys/values computed by the target rather than by itself (the output stays exact; only acceptance can change).
BENCHMARKS.md measures both.

Early exit with exact reuse (self-speculation, as LayerSkip: Elhoushi et al. 2024): when the draft is the target's
own first k layers (same width, same heads and FFN in those layers, e.g. draft "XL,XL" for target XL), the draft's
KV cache *is* the target's for layers 1..k and its hidden state after layer k is the target's. The draft writes
into the target cache; the verifier runs layers 1..k only for the one token the draft has not seen, then layers
k+1..L on all γ+1 tokens from the saved states. Nothing is recomputed, and the output is the target's (greedy: token
for token; sampled: its distribution). `reuse=False` runs such a draft like any other (for comparison).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Protocol

import torch

from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec
from matryoshka_lm.errors import MatryoshkaError

from .acceptance import GammaController, SpeculativeStats, accept_reject, best_gamma  # noqa: F401 (re-exported)
from .drafts import (  # noqa: F401 (re-exported)
    EarlyExitDraft,
    SeparateDraft,
    can_share_cache,
    check_draft,
    early_exit_depth,
    is_bits_draft,
    shared_cache,
)
from .engine import Engine
from .request import Request, request
from .sampling import GREEDY, Sampling
from .stops import Completion, Decode


class Draft(Protocol):
    """What a round needs of a draft (drafts.py has the two kinds)."""

    default_cost: float

    def prefill(self, idx: torch.Tensor) -> torch.Tensor: ...
    def draft(self, last: torch.Tensor, pos: int, g: int) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def verify(self, last: torch.Tensor, drafted: torch.Tensor, q: torch.Tensor | None, pos: int): ...
    def accepted(self, drafted: torch.Tensor, n: int, nxt: torch.Tensor) -> None: ...


def speculative_round(
    drafter: Draft, last: torch.Tensor, pos: int, g: int
) -> tuple[torch.Tensor, int, torch.Tensor, float, float]:
    """One round: γ drafts after `last` (at slot `pos`), one verification -> (drafts, n accepted, the token after
    them (1,), draft seconds, verify seconds). The same for every kind of draft and cache."""
    t0 = time.perf_counter()
    drafted, q = drafter.draft(last, pos, g)
    t1 = time.perf_counter()
    n, nxt = drafter.verify(last, drafted, q, pos)
    t2 = time.perf_counter()
    drafter.accepted(drafted, n, nxt)
    return drafted, n, nxt, t1 - t0, t2 - t1


def _rounds(
    drafter: Draft,
    idx: torch.Tensor,
    n_new: int,
    slots: int,
    sampling: Sampling,
    gamma: int,
    adaptive: bool,
    max_gamma: int,
    draft_cost: float | None,
    stats: SpeculativeStats,
) -> Iterator[list[int]]:
    """The prefill, then rounds until n_new tokens: yield what each adds."""
    last = drafter.prefill(idx)  # (1,): the first new token comes from the target alone
    yield [int(last)]
    produced, pos = 1, idx.shape[1]  # `last` goes into slot `pos` next
    if draft_cost is None and not sampling.greedy:
        draft_cost = drafter.default_cost
    control = GammaController(max_gamma, draft_cost)
    while produced < n_new:
        g = min(gamma, slots - pos - 1)
        drafted, n, nxt, t_draft, t_verify = speculative_round(drafter, last, pos, g)
        pos, last = pos + n + 1, nxt
        stats.add_round(g, n, t_draft, t_verify)
        new = (drafted[:n].tolist() + [int(nxt)])[: n_new - produced]
        produced += len(new)
        yield new
        if adaptive:
            gamma = control.update(g, n, t_draft, t_verify)


@torch.no_grad()
def speculative_steps(
    model: MatryoshkaLM,
    prompt: Sequence[int],
    target: SubmodelSpec | None,
    draft: SubmodelSpec,
    max_new_tokens: int = 64,
    sampling: Sampling = GREEDY,
    gamma: int = 4,
    adaptive: bool = True,
    max_gamma: int = 8,
    share_cache: bool = False,
    draft_cost: float | None = None,
    stats: SpeculativeStats | None = None,
    engine: Engine | None = None,
    reuse: bool = True,
) -> Iterator[list[int]]:
    """Yield the tokens each round adds (1 to γ+1 of them) until max_new_tokens (or the context) is reached.
    `reuse`: an early-exit draft (the target's first layers) shares the target's cache and states (module doc)."""
    engine = engine or Engine(model)
    cfg = model.cfg
    target, draft = engine.check_spec(target), engine.check_spec(draft)
    check_draft(cfg, target, draft)
    if not 1 <= gamma <= max_gamma:
        raise MatryoshkaError(f"gamma must be in 1..{max_gamma}, got {gamma}")
    prompt = engine.check_prompts([prompt], max_new_tokens)[0]
    stats = stats if stats is not None else SpeculativeStats()
    P = len(prompt)
    n_new = min(max_new_tokens, cfg.max_seq_len - P)
    L = engine.cache_slots(min(cfg.max_seq_len, P + n_new + max_gamma + 1))  # slack for the last drafts
    gen = sampling.generator(engine.device)
    idx = torch.tensor([prompt], device=engine.device)
    k = early_exit_depth(target, draft) if reuse else None
    share = (share_cache or is_bits_draft(target, draft)) and can_share_cache(cfg, target, draft)
    with ExitStack() as caches:
        t_cache = caches.enter_context(engine.kv_cache(target, 1, L))
        if k is not None:
            drafter: Draft = EarlyExitDraft(engine, target, k, t_cache, sampling, gen)
        else:
            d_cache = shared_cache(cfg, t_cache, draft) if share else caches.enter_context(engine.kv_cache(draft, 1, L))
            drafter = SeparateDraft(engine, target, draft, t_cache, d_cache, share, sampling, gen)
        yield from _rounds(drafter, idx, n_new, L, sampling, gamma, adaptive, max_gamma, draft_cost, stats)


@dataclass(frozen=True)
class Speculation:
    """Decode a Request speculatively with the smaller `draft` (Engine.run / stream_request; module doc)."""

    draft: SubmodelSpec
    gamma: int = 4  # draft tokens per round (the first round's, when adaptive)
    adaptive: bool = True  # re-pick γ in 1..max_gamma each round from the acceptance rate and the draft's cost
    max_gamma: int = 8
    share_cache: bool = False  # the draft reads the target's KV cache (MatFormer; always for a bits draft)
    draft_cost: float | None = None  # a draft step / a verify pass; None: measured when greedy, else param ratio
    reuse: bool = True  # an early-exit draft (the target's first k layers) reuses its cache and states

    def rounds(self, engine: Engine, req: Request, stats: SpeculativeStats | None) -> Iterator[list[int]]:
        return speculative_steps(
            engine.model,
            req.prompts[0],
            req.spec,
            self.draft,
            req.max_new_tokens,
            req.sampling,
            self.gamma,
            self.adaptive,
            self.max_gamma,
            self.share_cache,
            self.draft_cost,
            stats,
            engine,
            self.reuse,
        )


def speculative_decode(
    model: MatryoshkaLM,
    prompt: Sequence[int],
    target: SubmodelSpec | None,
    draft: SubmodelSpec,
    max_new_tokens: int = 64,
    sampling: Sampling = GREEDY,
    gamma: int = 4,
    adaptive: bool = True,
    max_gamma: int = 8,
    share_cache: bool = False,
    draft_cost: float | None = None,
    stop_tokens: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Decode | None = None,
    engine: Engine | None = None,
    reuse: bool = True,
) -> tuple[Completion, SpeculativeStats]:
    """Continue `prompt` with the target spec's distribution (None = the full model), drafting with the smaller
    `draft` spec: Engine.run of that Request (Speculation says what each option does). Returns the completion
    and the acceptance statistics."""
    engine = engine or Engine(model)
    plan = Speculation(draft, gamma, adaptive, max_gamma, share_cache, draft_cost, reuse)
    stats = SpeculativeStats()
    req = request([prompt], target, max_new_tokens, sampling, stop_tokens, stop_strings, decode, plan)
    return engine.run(req, stats)[0], stats


def speculative_stream(
    model: MatryoshkaLM,
    prompt: Sequence[int],
    target: SubmodelSpec | None,
    draft: SubmodelSpec,
    max_new_tokens: int = 64,
    sampling: Sampling = GREEDY,
    stop_tokens: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Decode | None = None,
    engine: Engine | None = None,
    stats: SpeculativeStats | None = None,
    **kw,
) -> Iterator[int | str]:
    """Like Engine.stream, with speculative decoding: ids or text pieces as each round is verified (`kw`: the
    Speculation's options)."""
    engine = engine or Engine(model)
    req = request(
        [prompt], target, max_new_tokens, sampling, stop_tokens, stop_strings, decode, Speculation(draft, **kw)
    )
    yield from engine.stream_request(req, stats)
