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

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core import nested
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, count_params
from matryoshka_lm.errors import MatryoshkaError

from .engine import Engine, prefill
from .sampling import GREEDY, Sampling, logits_to_probs, sample_from
from .stops import Completion, Decode, stream_rows

log = logging.getLogger(__name__)


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


def check_draft(cfg: ModelConfig, target: SubmodelSpec, draft: SubmodelSpec) -> None:
    t, d = count_params(cfg, target)["total"], count_params(cfg, draft)["total"]
    if d > t:
        raise MatryoshkaError(
            f"draft {draft} ({d:,} params) is larger than target {target} ({t:,} params); "
            "the draft must be the smaller model"
        )


def can_share_cache(cfg: ModelConfig, target: SubmodelSpec, draft: SubmodelSpec) -> bool:
    """The draft's cache is a view of the target's when its layers and KV heads are prefixes of the target's."""
    return draft.depth <= target.depth and all(d.heads <= t.heads for d, t in zip(draft.layers, target.layers))


def shared_cache(cfg: ModelConfig, cache: KVCache, draft: SubmodelSpec) -> KVCache:
    """The draft's view of the target's cache: its first KV heads of its first layers (no copy)."""
    return KVCache(*nested.kv_prefix(cache.k, cache.v, cfg, draft))


def best_gamma(alpha: float, t_draft: float, t_verify: float, max_gamma: int) -> int:
    """argmax over γ of expected tokens per round / cost of a round."""

    def rate(g: int) -> float:
        expected = g + 1 if alpha >= 1 else (1 - alpha ** (g + 1)) / (1 - alpha)
        return expected / (g * t_draft + t_verify)

    return max(range(1, max_gamma + 1), key=rate)


def param_ratio(cfg: ModelConfig, target: SubmodelSpec, draft: SubmodelSpec) -> float:
    return count_params(cfg, draft)["total"] / count_params(cfg, target)["total"]


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


def draft_tokens(
    engine: Engine,
    model: MatryoshkaLM,
    draft: SubmodelSpec,
    cache: KVCache,
    pending: torch.Tensor,
    pos: int,
    gamma: int,
    sampling: Sampling,
    gen: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """γ draft tokens (γ,) and, when sampling, their draft distributions q (γ, V). `pending` are the tokens the
    draft cache lacks, ending with the one that goes into slot `pos`; (model, draft) from Engine.runner."""
    drafted, qs, x, start = [], [], pending, pos - pending.numel() + 1
    for _ in range(gamma):
        if x.numel() == 1:
            logits = engine.decode_step(model, x, draft, cache, start)
        else:  # catching up on the previous round's last draft too
            logits = engine.forward_chunk(model, x.view(1, -1), draft, cache, start)[:, -1]
        x_next = next_draft(logits, sampling, gen, qs)
        start += x.numel()
        x = x_next
        drafted.append(x)
    return torch.cat(drafted), (torch.cat(qs) if qs else None)


def verify(
    engine: Engine,
    model: MatryoshkaLM,
    target: SubmodelSpec,
    cache: KVCache,
    last: torch.Tensor,
    drafted: torch.Tensor,
    q: torch.Tensor | None,
    pos: int,
    sampling: Sampling,
    gen: torch.Generator | None,
) -> tuple[int, torch.Tensor]:
    """One target pass over [last, drafts] at slots pos.. -> (drafts accepted, the token after them (1,))."""
    logits = engine.forward_chunk(model, torch.cat([last, drafted]).view(1, -1), target, cache, pos)[0]
    return accept(logits, drafted, q, sampling, gen)


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


def early_exit_depth(target: SubmodelSpec, draft: SubmodelSpec) -> int | None:
    """k when the draft is the target's first k layers exactly (so its work can be reused), else None."""
    return nested.depth_prefix_of(target, draft)


def early_exit_rounds(
    engine: Engine,
    prompt: list[int],
    target: SubmodelSpec,
    k: int,
    cache: KVCache,
    n_new: int,
    sampling: Sampling,
    gamma: int,
    adaptive: bool,
    max_gamma: int,
    draft_cost: float | None,
    stats: SpeculativeStats,
) -> Iterator[list[int]]:
    """speculative rounds of the early-exit draft (the target's first k layers) with exact reuse (module doc)."""
    model, spec = engine.runner(target)
    draft = nested.first_layers(spec, k)  # the same layers, on the module that runs the target
    dev, P, L = engine.device, len(prompt), cache.length
    gen = sampling.generator(dev)
    probs = logits_to_probs(prefill(model, torch.tensor([prompt], device=dev), spec, cache), sampling)
    last = draw(probs, sampling.greedy, gen)
    yield [int(last)]
    produced, pos = 1, P
    control = GammaController(max_gamma, draft_cost if draft_cost is not None or sampling.greedy else k / spec.depth)
    while produced < n_new:
        g = min(gamma, L - pos - 1)
        t0 = time.perf_counter()
        states, drafted, qs, x = [], [], [], last
        for j in range(g):  # layers 1..k of each token, into the target's cache: the draft's work is the target's
            state, logits = engine.exit_step(model, x, draft, cache, pos + j, logits=True)
            states.append(state)
            x = next_draft(logits, sampling, gen, qs)
            drafted.append(x)
        drafted_t = torch.cat(drafted)
        t1 = time.perf_counter()
        # the last draft has not been through layers 1..k; then layers k+1..L for all γ+1 tokens at once
        states.append(engine.exit_step(model, drafted_t[-1:], draft, cache, pos + g, logits=False))
        logits = engine.resume_chunk(model, torch.cat(states, dim=1), spec, cache, pos, k)
        n, nxt = accept(logits[0], drafted_t, torch.cat(qs) if qs else None, sampling, gen)
        t2 = time.perf_counter()
        pos, last = pos + n + 1, nxt  # every layer's cache holds `last` and the accepted drafts
        stats.add_round(g, n, t1 - t0, t2 - t1)
        new = (drafted_t[:n].tolist() + [int(nxt)])[: n_new - produced]
        produced += len(new)
        yield new
        if adaptive:
            gamma = control.update(g, n, t1 - t0, t2 - t1)


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
    k = early_exit_depth(target, draft) if reuse else None
    if k is not None:
        with engine.kv_cache(target, 1, L) as cache:
            yield from early_exit_rounds(
                engine, prompt, target, k, cache, n_new, sampling, gamma, adaptive, max_gamma, draft_cost, stats
            )
        return
    share = share_cache and can_share_cache(cfg, target, draft)
    with ExitStack() as caches:
        t_cache = caches.enter_context(engine.kv_cache(target, 1, L))
        d_cache = shared_cache(cfg, t_cache, draft) if share else caches.enter_context(engine.kv_cache(draft, 1, L))
        yield from _rounds(
            engine,
            prompt,
            target,
            draft,
            t_cache,
            d_cache,
            share,
            n_new,
            sampling,
            gamma,
            adaptive,
            max_gamma,
            draft_cost,
            stats,
        )


def _rounds(
    engine: Engine,
    prompt: list[int],
    target: SubmodelSpec,
    draft: SubmodelSpec,
    t_cache: KVCache,
    d_cache: KVCache,
    share: bool,
    n_new: int,
    sampling: Sampling,
    gamma: int,
    adaptive: bool,
    max_gamma: int,
    draft_cost: float | None,
    stats: SpeculativeStats,
) -> Iterator[list[int]]:
    """speculative_steps with its caches: the prefill, then draft and verify rounds."""
    cfg, dev, P, L = engine.cfg, engine.device, len(prompt), t_cache.length
    (t_model, t_spec), (d_model, d_spec) = engine.runner(target), engine.runner(draft)
    gen = sampling.generator(dev)
    idx = torch.tensor([prompt], device=dev)
    probs = logits_to_probs(prefill(t_model, idx, t_spec, t_cache), sampling)
    if not share:
        prefill(d_model, idx, d_spec, d_cache)
    last = draw(probs, sampling.greedy, gen)  # (1,): the first new token comes from the target alone
    yield [int(last)]
    produced, pos = 1, P  # `last` goes into slot `pos` next
    pending = last  # tokens the draft cache lacks, ending with `last`
    if draft_cost is None and not sampling.greedy:
        draft_cost = param_ratio(cfg, target, draft)
    control = GammaController(max_gamma, draft_cost)
    while produced < n_new:
        g = min(gamma, L - pos - 1)
        t0 = time.perf_counter()
        drafted, q = draft_tokens(engine, d_model, d_spec, d_cache, pending, pos, g, sampling, gen)
        t1 = time.perf_counter()
        n, nxt = verify(engine, t_model, t_spec, t_cache, last, drafted, q, pos, sampling, gen)
        t2 = time.perf_counter()
        # the target cache now holds `last` and the n accepted drafts; the draft's own cache lacks the γ-th
        # draft when all were accepted (it was never fed back)
        pending = torch.cat([drafted[-1:], nxt]) if n == g and not share else nxt
        pos, last = pos + n + 1, nxt
        stats.add_round(g, n, t1 - t0, t2 - t1)
        new = (drafted[:n].tolist() + [int(nxt)])[: n_new - produced]
        produced += len(new)
        yield new
        if adaptive:
            gamma = control.update(g, n, t1 - t0, t2 - t1)


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
    """Continue `prompt` with the target spec's distribution, drafting with the smaller `draft` spec.

    Args:
        model: the nested model; target and draft are two of its sizes (None = the full model).
        gamma: draft tokens per round (the first round's, when adaptive).
        adaptive: re-pick γ in 1..max_gamma each round from the acceptance rate and the draft's relative cost.
        share_cache: the draft reads the target's KV cache (MatFormer) instead of its own.
        draft_cost: cost of a draft step / a verify pass for adaptive γ; None = measured when greedy, the
            parameter ratio when sampling (see the module doc).
        stop_tokens, stop_strings, decode: as in Engine.generate.
        reuse: an early-exit draft (the target's first k layers) reuses its cache and states in verification.
    Returns the completion and acceptance statistics.
    """
    engine = engine or Engine(model)
    row = engine.stop_rows(1, stop_tokens, stop_strings, decode)[0]
    stats = SpeculativeStats()
    for toks in speculative_steps(
        model,
        prompt,
        target,
        draft,
        max_new_tokens,
        sampling,
        gamma,
        adaptive,
        max_gamma,
        share_cache,
        draft_cost,
        stats,
        engine,
        reuse,
    ):
        for t in toks:
            row.add(t)
            if row.done:
                break
        if row.done:
            break
    return row.completion(), stats


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
    """Like Engine.stream, with speculative decoding: ids or text pieces as each round is verified."""
    engine = engine or Engine(model)
    row = engine.stop_rows(1, stop_tokens, stop_strings, decode)[0]
    steps = speculative_steps(model, prompt, target, draft, max_new_tokens, sampling, stats=stats, engine=engine, **kw)
    yield from stream_rows(steps, row)
