"""The two kinds of draft a speculative round runs, behind one interface (prefill, draft, verify, accepted):

SeparateDraft: a smaller size with its own KV cache, or a view of the target's (shared cache, MatFormer).
EarlyExitDraft: the target's own first k layers, writing into the target's cache; verification resumes from the
draft's saved states at layer k (exact reuse, as LayerSkip).
"""

from __future__ import annotations

import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core import nested, quant
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, count_params
from matryoshka_lm.errors import MatryoshkaError

from .acceptance import accept, draw, next_draft
from .engine import Engine, prefill
from .sampling import Sampling, logits_to_probs


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


def read_bits(engine: Engine, spec: SubmodelSpec) -> int | None:
    """The bits a spec's weights are read at: its own, else the loaded weights' (None: fp32)."""
    return spec.bits or engine.model.precision.native_bits


def is_bits_draft(target: SubmodelSpec, draft: SubmodelSpec) -> bool:
    """The draft is the target's own shape (at fewer bits: it reads the top planes of the very weights the target
    reads in full): its KV cache has the target's shapes, so it always shares it."""
    return draft.shape == target.shape


def draft_cost(engine: Engine, target: SubmodelSpec, draft: SubmodelSpec) -> float:
    """A draft step's cost relative to a target step before any is timed: the bytes of weights each reads
    (quant.weight_bytes: what a batch-1 step is bound by), which for two fp32 sizes is their parameter ratio."""
    cfg, qcfg = engine.cfg, engine.model.precision.quant
    d, t = read_bits(engine, draft), read_bits(engine, target)
    return quant.weight_bytes(cfg, draft, d, qcfg) / quant.weight_bytes(cfg, target, t, qcfg)


def early_exit_depth(target: SubmodelSpec, draft: SubmodelSpec) -> int | None:
    """k when the draft is the target's first k layers exactly (so its work can be reused), else None."""
    return nested.depth_prefix_of(target, draft)


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


class SeparateDraft:
    """A smaller size drafting from its own cache (or a view of the target's: `share`)."""

    def __init__(
        self,
        engine: Engine,
        target: SubmodelSpec,
        draft: SubmodelSpec,
        t_cache: KVCache,
        d_cache: KVCache,
        share: bool,
        sampling: Sampling,
        gen: torch.Generator | None,
    ):
        self.engine, self.t_cache, self.d_cache, self.share = engine, t_cache, d_cache, share
        (self.t_model, self.t_spec), (self.d_model, self.d_spec) = engine.runner(target), engine.runner(draft)
        self.sampling, self.gen = sampling, gen
        self.default_cost = draft_cost(engine, target, draft)
        self.pending: torch.Tensor | None = None  # tokens the draft cache lacks, ending with the last one

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """The first new token (1,): from the target alone; the draft's cache is filled too unless shared."""
        probs = logits_to_probs(prefill(self.t_model, idx, self.t_spec, self.t_cache), self.sampling)
        if not self.share:
            prefill(self.d_model, idx, self.d_spec, self.d_cache)
        self.pending = draw(probs, self.sampling.greedy, self.gen)
        return self.pending

    def draft(self, last: torch.Tensor, pos: int, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return draft_tokens(
            self.engine, self.d_model, self.d_spec, self.d_cache, self.pending, pos, g, self.sampling, self.gen
        )

    def verify(self, last: torch.Tensor, drafted: torch.Tensor, q: torch.Tensor | None, pos: int):
        return verify(
            self.engine, self.t_model, self.t_spec, self.t_cache, last, drafted, q, pos, self.sampling, self.gen
        )

    def accepted(self, drafted: torch.Tensor, n: int, nxt: torch.Tensor) -> None:
        # the target cache now holds `last` and the n accepted drafts; the draft's own cache lacks the γ-th draft
        # when all were accepted (it was never fed back)
        self.pending = torch.cat([drafted[-1:], nxt]) if n == len(drafted) and not self.share else nxt


class EarlyExitDraft:
    """The target's first k layers drafting into the target's own cache; verification resumes at layer k."""

    def __init__(
        self,
        engine: Engine,
        target: SubmodelSpec,
        k: int,
        cache: KVCache,
        sampling: Sampling,
        gen: torch.Generator | None,
    ):
        self.engine, self.cache, self.k, self.sampling, self.gen = engine, cache, k, sampling, gen
        self.model, self.spec = engine.runner(target)
        self.exit = nested.first_layers(self.spec, k)  # the same layers, on the module that runs the target
        self.default_cost = k / self.spec.depth
        self.states: list[torch.Tensor] = []

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        probs = logits_to_probs(prefill(self.model, idx, self.spec, self.cache), self.sampling)
        return draw(probs, self.sampling.greedy, self.gen)

    def draft(self, last: torch.Tensor, pos: int, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers 1..k of each token, into the target's cache: the draft's work is the target's."""
        self.states, drafted, qs, x = [], [], [], last
        for j in range(g):
            state, logits = self.engine.exit_step(self.model, x, self.exit, self.cache, pos + j, logits=True)
            self.states.append(state)
            x = next_draft(logits, self.sampling, self.gen, qs)
            drafted.append(x)
        return torch.cat(drafted), (torch.cat(qs) if qs else None)

    def verify(self, last: torch.Tensor, drafted: torch.Tensor, q: torch.Tensor | None, pos: int):
        """The last draft through layers 1..k, then layers k+1..L for all γ+1 tokens at once."""
        g = len(drafted)
        self.states.append(
            self.engine.exit_step(self.model, drafted[-1:], self.exit, self.cache, pos + g, logits=False)
        )
        h = torch.cat(self.states, dim=1)
        logits = self.engine.resume_chunk(self.model, h, self.spec, self.cache, pos, self.k)
        return accept(logits[0], drafted, q, self.sampling, self.gen)

    def accepted(self, drafted: torch.Tensor, n: int, nxt: torch.Tensor) -> None:
        """Every layer's cache already holds `last` and the accepted drafts."""
