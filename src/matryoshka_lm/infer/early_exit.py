"""Per-token early exit on the depth axis (CALM: Schuster et al., "Confident Adaptive Language Modeling", 2022).

Each decoded token runs the layers up to the first exit point (a trained size of full width and fewer layers, such
as the `memory` preset's E2 and E4) and asks a confidence rule whether to stop there; if not, on to the next point,
and at the last layer it always stops. The rule is CALM's softmax margin (the exit's own next-token distribution,
top-1 minus top-2 probability, at least `threshold`; asking costs one LM head at that point) or, with an ExitProbe,
a learned prediction of the token's NLL gap to the full model (at most `threshold` nats; asking costs 4·C FLOPs, and
the head runs once, where the token stops). A token that exits skips the rest of the layers, and their keys and
values for it are computed from its exit state (MatryoshkaLM.fill_cache: CALM's state propagation, one K and one V
projection per skipped layer), so later tokens, which may run deeper, attend to something at every layer.

A margin threshold > 1 (or a probe's -inf) never asks: the output is the full model's, token for token; a margin
threshold of 0 (or a probe's +inf) stops every token at the first point.
Every token decides, the prompt's too, so a policy pays its own compute for the whole query as a fixed size does.
One pass serves many tokens (a prompt, or a teacher-forced batch of queries): tokens that stopped keep their exit
state while the others run on, and the skipped layers still compute keys and values from that state, exactly as
`fill_cache` does when every token has stopped and the layers are really skipped. By causality this equals feeding
the tokens one at a time.

Cost (ExitCost): forward FLOPs per token of the layers run, the heads and probes asked, and the K/V projections of
the layers skipped, against one full-size token (core/spec.flops_per_token) at the same context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core import nested
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.scoring import log_probs
from matryoshka_lm.core.spec import SubmodelSpec, flops_per_token, full_spec, size_names, uniform_spec
from matryoshka_lm.errors import MatryoshkaError

from .exit_probe import NEVER_TAU, ExitProbe
from .sampling import GREEDY, Sampling, sample

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
    probe: float = 0.0  # one exit probe asked (standardise and dot product: exit_probe.py)

    @classmethod
    def of(cls, cfg: ModelConfig, context: int) -> ExitCost:
        f = [flops_per_token(cfg, depth_spec(cfg, k), context) for k in range(cfg.n_layers + 1)]
        head = float(f[0])  # depth 0: the head on the embedding, nothing else
        kv_dims = [2 * nested.kv_heads(lay.heads, cfg.group_size) * cfg.head_dim for lay in full_spec(cfg).layers]
        layers = [float(b - a) for a, b in zip(f, f[1:])]
        return cls(layers, [2.0 * cfg.d_model * d for d in kv_dims], head, float(f[-1]), 4.0 * cfg.d_model)


@dataclass
class ExitResult:
    """What one early-exit forward of tokens (B, T) gave and ran, per token."""

    logits: torch.Tensor  # (B, T, V) next-token logits, from the depth each token stopped at
    depth: torch.Tensor  # (B, T) that depth
    ran: torch.Tensor  # (B, T, L) bool: layer l ran in full for the token (else: its keys and values only)
    asked: torch.Tensor  # (B, T) LM heads evaluated for the token (one per exit point reached, the last included)
    probed: torch.Tensor  # (B, T) exit probes asked (the learned rule: then one head, where the token stops)

    def flops(self, cost: ExitCost) -> torch.Tensor:
        """(B, T) forward FLOPs of each token."""
        ran = self.ran.double()
        layers = ran @ torch.tensor(cost.layer, dtype=torch.float64)
        kv = (1 - ran) @ torch.tensor(cost.kv, dtype=torch.float64)
        return layers + kv + self.asked.double() * cost.head + self.probed.double() * cost.probe


@dataclass
class ExitCounter:
    """Totals over early-exit forwards, per batch row: tokens that ran each layer in full, that reduced it to keys
    and values, heads evaluated, tokens, and how many stopped at each depth."""

    layers: torch.Tensor  # (B, L)
    kv: torch.Tensor  # (B, L)
    heads: torch.Tensor  # (B,)
    probes: torch.Tensor  # (B,)
    tokens: int = 0
    exits: dict[int, int] = field(default_factory=dict)

    @classmethod
    def zeros(cls, batch: int, n_layers: int) -> ExitCounter:
        z = torch.zeros(batch, n_layers, dtype=torch.long)
        return cls(z, z.clone(), torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long))

    def add(self, res: ExitResult) -> None:
        ran = res.ran.cpu().long()
        self.layers += ran.sum(1)
        self.kv += (1 - ran).sum(1)
        self.heads += res.asked.cpu().sum(1)
        self.probes += res.probed.cpu().sum(1)
        self.tokens += res.depth.numel()
        for d in res.depth.flatten().tolist():
            self.exits[d] = self.exits.get(d, 0) + 1

    def flops(self, cost: ExitCost) -> torch.Tensor:
        """(B,) FLOPs of everything counted, per row."""
        layer, kv = torch.tensor(cost.layer, dtype=torch.float64), torch.tensor(cost.kv, dtype=torch.float64)
        heads = self.heads.double() * cost.head + self.probes.double() * cost.probe
        return self.layers.double() @ layer + self.kv.double() @ kv + heads

    def relative(self, cost: ExitCost) -> float:
        """Mean FLOPs per counted token over a full-size token's."""
        return float(self.flops(cost).sum() / (max(self.tokens, 1) * cost.full))


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability of each row of next-token logits (..., V)."""
    top = log_probs(logits).exp().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def check_points(cfg: ModelConfig, points: list[int] | None) -> list[int]:
    points = points or exit_points(cfg)
    if points[-1] != cfg.n_layers or any(not 0 < p <= cfg.n_layers for p in points) or points != sorted(set(points)):
        raise MatryoshkaError(f"exit points {points} must be ascending depths in 1..{cfg.n_layers} ending at the full")
    return points


def exit_forward(
    model: MatryoshkaLM,
    ids: torch.Tensor,
    threshold: float,
    cache: KVCache | None = None,
    start: int = 0,
    points: list[int] | None = None,
    probe: ExitProbe | None = None,
) -> ExitResult:
    """Tokens ids (B, T) through the layers with per-token early exit, at cache slots start.. (or no cache: a
    teacher-forced pass). The rule: the softmax margin at least `threshold`, or with a `probe` (exit_probe.py) its
    predicted gap at most `threshold` nats (at the probe's points). A stopped token keeps its state, and the layers
    after still compute its keys and values from it (running on it, their outputs for it discarded); when every
    token has stopped, fill_cache computes only those. Causality makes this pass equal to feeding the tokens one at
    a time."""
    cfg = model.cfg
    points = check_points(cfg, [*probe.points, cfg.n_layers] if probe is not None else points)
    L, (B, T) = cfg.n_layers, ids.shape
    h = model.hidden_states(ids, depth_spec(cfg, 0), cache, start, norm=False)  # the embedding
    done = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
    ran = torch.zeros(B, T, L, dtype=torch.bool, device=ids.device)
    asked, probed = (torch.zeros(B, T, dtype=torch.long, device=ids.device) for _ in range(2))
    depth = torch.full((B, T), L, dtype=torch.long, device=ids.device)
    logits = None
    asking = threshold <= 1.0 if probe is None else threshold > NEVER_TAU
    asks = {p: i for i, p in enumerate(points[:-1])} if asking else {}
    for lay in range(L):
        if bool(done.all()):  # nothing runs on: the rest of the layers are keys and values only
            if cache is not None:
                model.fill_cache(h, model.full, lay, cache, start)
            break
        out = model.hidden_states(None, depth_spec(cfg, lay + 1), cache, start, h=h, first_layer=lay, norm=False)
        ran[:, :, lay] = ~done
        h = torch.where(done[..., None], h, out)  # a stopped token keeps its state: its K/V came from it
        if lay + 1 not in asks and lay + 1 < L:
            continue
        live, hn = ~done, model.norm(h)
        if lay + 1 == L:
            stop = live
        elif probe is not None:
            probed += live.long()
            stop = live & (probe.gap(asks[lay + 1], hn) <= threshold)
        else:
            z = model.logits(hn)
            asked += live.long()
            stop = live & (margin(z) >= threshold)
        if lay + 1 == L or probe is not None:  # the learned rule computes a head only where a token stops
            if not bool(stop.any()):
                continue
            z = model.logits(hn)
            asked += stop.long()
        logits = z if logits is None else torch.where(stop[..., None], z, logits)
        depth = torch.where(stop, lay + 1, depth)
        done = done | stop
    return ExitResult(logits, depth, ran, asked, probed)


@torch.no_grad()
def exit_generate(
    model: MatryoshkaLM,
    prompt: list[int],
    max_new: int,
    threshold: float,
    points: list[int] | None = None,
    probe: ExitProbe | None = None,
    prefill: str = "batched",
    sampling: Sampling = GREEDY,
    stop_tokens: Sequence[int] = (),
) -> tuple[list[int], ExitCounter]:
    """Decoding with per-token early exit at batch 1 (greedy, or `sampling`; a token of `stop_tokens` ends it and is
    not returned); the prompt's tokens decide as the new ones do.

    prefill "batched": the prompt in one exit_forward pass (what a batch-1 server wants: one read of the weights
    for the whole prompt; its stopped tokens still go through the later layers there, their outputs discarded, so
    for the prompt the counter is the policy's work, not this pass's). "tokens": each prompt token fed alone, so
    every skipped layer is really skipped and the counter is exactly what ran (the same tokens come out: causality).
    New tokens are always fed alone. Returns them and the counts over every token fed (the prompt and the new ones
    but the last)."""
    cfg = model.cfg
    if not prompt:
        raise MatryoshkaError("early-exit generation needs a prompt of at least one token")
    if len(prompt) + max_new > cfg.max_seq_len:
        raise MatryoshkaError(f"{len(prompt)} prompt + {max_new} new tokens exceed max_seq_len={cfg.max_seq_len}")
    if prefill not in ("batched", "tokens"):
        raise MatryoshkaError(f"prefill must be 'batched' or 'tokens', got {prefill!r}")
    device = next(model.parameters()).device
    cache = KVCache.allocate(cfg, model.full, 1, len(prompt) + max_new, device)
    counter = ExitCounter.zeros(1, cfg.n_layers)
    points = None if probe is not None else check_points(cfg, points)  # once, not per token (it parses the sizes)

    def feed(tokens: list[int], pos: int) -> torch.Tensor:
        res = exit_forward(model, torch.tensor([tokens], device=device), threshold, cache, pos, points, probe)
        counter.add(res)
        return res.logits[0, -1]

    gen = sampling.generator(device)
    if prefill == "batched":
        last = feed(prompt, 0)
    else:
        last = [feed([t], i) for i, t in enumerate(prompt)][-1]
    out: list[int] = []
    for pos in range(len(prompt), len(prompt) + max_new):
        tok = int(sample(last[None], sampling, gen)[0])
        if tok in stop_tokens:
            break
        out.append(tok)
        if pos + 1 < len(prompt) + max_new:
            last = feed([tok], pos)
    return out, counter
