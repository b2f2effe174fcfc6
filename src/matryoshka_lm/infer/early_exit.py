"""Per-token early exit on the depth axis (CALM: Schuster et al., "Confident Adaptive Language Modeling", 2022).

Each decoded token runs the layers up to the first exit point (a trained size of full width and fewer layers, such
as the `memory` preset's E2 and E4) and asks a confidence rule whether to stop there; if not, on to the next point,
and at the last layer it always stops. The rule is CALM's softmax margin: the exit's own next-token distribution,
top-1 minus top-2 probability, at least `threshold`. Asking costs one LM head at that point (counted). A token that
exits skips the rest of the layers, and their keys and values for it are computed from its exit state
(MatryoshkaLM.fill_cache: CALM's state propagation, one K and one V projection per skipped layer), so later tokens,
which may run deeper, attend to something at every layer.

threshold > 1 never asks: the output is the full model's, token for token. threshold 0 stops at the first point.
The same step serves a batch (teacher-forced evaluation over many queries at once): rows that have exited keep
their exit state while the others run on, and the skipped layers still compute their keys and values from that
state, exactly as `fill_cache` does for a batch of one, where the layers are really skipped.

Cost (ExitCost): forward FLOPs per token of the layers run, the heads asked, and the K/V projections of the layers
skipped, against one full-size token (core/spec.flops_per_token) at the same context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core import nested
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.scoring import log_probs
from matryoshka_lm.core.spec import SubmodelSpec, flops_per_token, full_spec, size_names, uniform_spec
from matryoshka_lm.errors import MatryoshkaError

NEVER = 1.01  # a margin threshold no distribution reaches: the full model


def depth_spec(cfg: ModelConfig, k: int) -> SubmodelSpec:
    """The full model's first k layers at full width (an exit after layer k)."""
    return nested.first_layers(full_spec(cfg), k)


def exit_points(cfg: ModelConfig) -> list[int]:
    """Depths of the trained sizes that are the full model cut short (full width, heads and FFN), ascending, and the
    full depth last: where a token may stop."""
    full = full_spec(cfg)
    depths = {nested.depth_prefix_of(full, uniform_spec(cfg, name)) for name in size_names(cfg)}
    return sorted(d for d in depths if d) + [full.depth]


@dataclass(frozen=True)
class ExitCost:
    """Forward FLOPs per token of each part of an early-exit step, at one context length."""

    layer: list[float]  # layer l run in full
    kv: list[float]  # layer l's keys and values only (a skipped layer)
    head: float  # one LM head (final norm included in nothing: norms are not matmuls)
    full: float  # a token of the full model

    @classmethod
    def of(cls, cfg: ModelConfig, context: int) -> ExitCost:
        f = [flops_per_token(cfg, depth_spec(cfg, k), context) for k in range(cfg.n_layers + 1)]
        head = float(f[0])  # depth 0: the head on the embedding, nothing else
        kv_dims = [2 * nested.kv_heads(lay.heads, cfg.group_size) * cfg.head_dim for lay in full_spec(cfg).layers]
        return cls(
            [float(b - a) for a, b in zip(f, f[1:])], [2.0 * cfg.d_model * d for d in kv_dims], head, float(f[-1])
        )


@dataclass
class ExitCounter:
    """What early-exit steps ran, per batch row: layers in full, heads, layers reduced to their keys and values,
    tokens. Its FLOPs are the sum of those parts (ExitCost)."""

    layers: torch.Tensor
    heads: torch.Tensor
    kv: torch.Tensor
    tokens: int = 0
    exits: dict[int, int] = field(default_factory=dict)  # exit depth -> tokens that stopped there

    @classmethod
    def zeros(cls, batch: int, n_layers: int) -> ExitCounter:
        z = torch.zeros(batch, n_layers, dtype=torch.long)
        return cls(z, torch.zeros(batch, dtype=torch.long), z.clone())

    def flops(self, cost: ExitCost) -> torch.Tensor:
        """(B,) FLOPs of everything counted, per row."""
        layer, kv = torch.tensor(cost.layer, dtype=torch.float64), torch.tensor(cost.kv, dtype=torch.float64)
        return self.layers.double() @ layer + self.kv.double() @ kv + self.heads.double() * cost.head

    def relative(self, cost: ExitCost) -> float:
        """Mean FLOPs per counted token over a full-size token's."""
        return float(self.flops(cost).sum() / (max(self.tokens, 1) * cost.full))


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability of each row of next-token logits (..., V)."""
    top = log_probs(logits).exp().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def exit_step(
    model: MatryoshkaLM,
    ids: torch.Tensor,
    cache: KVCache,
    start: int,
    threshold: float,
    points: list[int] | None = None,
    counter: ExitCounter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of ids (B, 1) at cache slot `start`: (next-token logits (B, V), exit depth (B,))."""
    cfg = model.cfg
    points = points or exit_points(cfg)
    if points[-1] != cfg.n_layers or any(not 0 < p <= cfg.n_layers for p in points):
        raise MatryoshkaError(f"exit points {points} must be depths in 1..{cfg.n_layers} ending at the full depth")
    B = ids.shape[0]
    h = model.hidden_states(ids, depth_spec(cfg, 0), cache, start, norm=False)  # the embedding
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    depth = torch.full((B,), cfg.n_layers, dtype=torch.long, device=ids.device)
    logits = torch.zeros(B, cfg.vocab_size, device=ids.device)
    asks = [p for p in points[:-1] if threshold <= 1.0]
    for lay in range(cfg.n_layers):
        if bool(done.all()):  # nothing runs on: the rest of the layers are keys and values only
            model.fill_cache(h, model.full, lay, cache, start)
            if counter is not None:
                counter.kv[:, lay:] += 1
            break
        out = model.hidden_states(None, depth_spec(cfg, lay + 1), cache, start, h=h, first_layer=lay, norm=False)
        if counter is not None:
            counter.layers[:, lay] += (~done).long().cpu()
            counter.kv[:, lay] += done.long().cpu()
        h = torch.where(done[:, None, None], h, out)  # an exited row keeps its state: its K/V came from it
        if lay + 1 in asks or lay + 1 == cfg.n_layers:
            z = model.logits(model.norm(h))[:, -1]
            live = ~done
            if counter is not None:
                counter.heads += live.long().cpu()
            stop = live & ((margin(z) >= threshold) if lay + 1 < cfg.n_layers else torch.ones_like(live))
            logits = torch.where(stop[:, None], z, logits)
            depth = torch.where(stop, torch.full_like(depth, lay + 1), depth)
            done = done | stop
    if counter is not None:
        counter.tokens += B
        for d in depth.tolist():
            counter.exits[d] = counter.exits.get(d, 0) + 1
    return logits, depth


@torch.no_grad()
def exit_generate(
    model: MatryoshkaLM, prompt: list[int], max_new: int, threshold: float, points: list[int] | None = None
) -> tuple[list[int], ExitCounter]:
    """Greedy decoding with per-token early exit (batch 1): the prompt is prefilled by the full model, then each
    new token by exit_step. Returns the new tokens and what ran for them."""
    cfg = model.cfg
    if not prompt:
        raise MatryoshkaError("early-exit generation needs a prompt of at least one token")
    if len(prompt) + max_new > cfg.max_seq_len:
        raise MatryoshkaError(f"{len(prompt)} prompt + {max_new} new tokens exceed max_seq_len={cfg.max_seq_len}")
    device = next(model.parameters()).device
    cache = KVCache.allocate(cfg, model.full, 1, len(prompt) + max_new, device)
    ids = torch.tensor([prompt], device=device)
    counter = ExitCounter.zeros(1, cfg.n_layers)
    if len(prompt) > 1:  # the prompt but its last token: only its keys and values are needed
        model.hidden_states(ids[:, :-1], model.full, cache, 0)
    out, tok, pos = [], ids[:, -1:], len(prompt) - 1
    for _ in range(max_new):
        logits, _ = exit_step(model, tok, cache, pos, threshold, points, counter)
        tok = logits.argmax(-1, keepdim=True)
        out.append(int(tok))
        pos += 1
    return out, counter
