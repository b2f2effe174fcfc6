"""Labelling queries for the size router (issue 11): every candidate size on every held-out query (the oracle).

Queries. Held-out text is cut into windows of `window` tokens; query i's prompt is the first P_i tokens (P_i drawn
uniformly) and its reference continuation the next `cont` tokens. Causality makes one forward of the window per
candidate enough: its logits at P_i-1 .. P_i+cont-2 score the continuation, and its first P_i positions equal a
prefill of the prompt alone (the router's features).

Oracle labels. Every candidate runs on every query: NLL[i, k], the mean NLL per token of query i's continuation at
candidate k. The gap to the full size, NLL[i, k] - NLL[i, full], is what the learned router regresses. That is the
default, "scoring" quality. The issue's other one, "generation" (`label_generation`), puts in NLL[i, k] the FULL
size's mean NLL of candidate k's greedy continuation of the prompt (N tokens), so the gap is how much worse the full
model finds k's continuation than its own greedy one (0 for the full size; it can dip below 0, greedy not being
NLL-optimal over a sequence). Everything downstream (fit, calibration, curves, metrics) takes either kind of labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from matryoshka_lm.core import precision
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.quant import weight_bytes
from matryoshka_lm.core.scoring import log_probs, next_token_logprobs, token_logprobs
from matryoshka_lm.core.spec import SubmodelSpec, flops_per_token, full_spec, parse_spec, size_names, uniform_spec
from matryoshka_lm.errors import MatryoshkaError

from .engine import Engine
from .router import cheap_feature_names, cheap_features, prompt_features
from .sampling import GREEDY

log = logging.getLogger(__name__)


@dataclass
class Queries:
    windows: torch.Tensor  # (N, W) token ids
    prompt_lens: torch.Tensor  # (N,)
    cont: int  # continuation tokens scored per query

    def __len__(self) -> int:
        return self.windows.shape[0]

    def subset(self, idx: np.ndarray) -> Queries:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return Queries(self.windows[idx_t], self.prompt_lens[idx_t], self.cont)


def make_queries(
    tokens: np.ndarray, n: int, window: int = 128, cont: int = 32, min_prompt: int = 8, seed: int = 0
) -> Queries:
    """Up to `n` non-overlapping windows spread evenly over `tokens`, each with a random prompt length."""
    if window - cont < min_prompt:
        raise MatryoshkaError(f"window {window} leaves no room for a prompt of {min_prompt} and {cont} scored tokens")
    fits = len(tokens) // window
    if fits < 1:
        raise MatryoshkaError(f"text has {len(tokens)} tokens, fewer than one query window of {window}")
    count = min(n, fits)
    starts = (np.arange(count) * (fits // count)) * window
    windows = torch.from_numpy(np.stack([tokens[s : s + window].astype(np.int64) for s in starts]))
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_prompt, window - cont + 1, (count,), generator=g)
    return Queries(windows, lens, cont)


def candidate_specs(model: MatryoshkaLM, candidates: list[str] | None = None) -> list[SubmodelSpec]:
    """The trained sizes, smallest first, ending with the full size; or the given specs or cells ("S@int2",
    "M@int4", "XL"), cheapest first (relative_costs)."""
    cfg = model.cfg
    if candidates:
        specs = [parse_spec(cfg, c) for c in candidates]
        for spec in specs:
            precision.check_bits(model, spec.bits)
        if len(set(specs)) != len(specs) or len(specs) < 2:
            raise MatryoshkaError(f"router candidates must be at least two distinct specs, got {candidates}")
        costs = relative_costs(model, specs)
        return [s for _, s in sorted(zip(costs, specs), key=lambda cs: cs[0])]
    specs = [uniform_spec(cfg, s) for s in reversed(size_names(cfg))]
    full = full_spec(cfg)
    if (specs[-1].width, specs[-1].layers) != (full.width, full.layers):
        specs.append(full)
    return specs


def relative_costs(model: MatryoshkaLM, specs: list[SubmodelSpec], context: int | None = None) -> list[float]:
    """Each candidate's cost relative to the full model: FLOPs per token (over `context`), or, when any
    candidate names a bit width, bytes of weights read per token (weight-only quantization leaves the FLOPs as
    they are; batch-1 decoding is bound by the bytes)."""
    cfg = model.cfg
    if any(s.bits is not None for s in specs):
        full = weight_bytes(cfg, full_spec(cfg), model.precision.native_bits, model.precision.quant)
        return [
            weight_bytes(cfg, s, s.bits or model.precision.native_bits, model.precision.quant) / full for s in specs
        ]
    f_full = flops_per_token(cfg, full_spec(cfg), context)
    return [flops_per_token(cfg, s, context) / f_full for s in specs]


@dataclass
class Labels:
    nll: np.ndarray  # (N, K) continuation NLL per query and candidate, candidates smallest first
    features: np.ndarray  # (N, F) from the smallest candidate's prefill
    prompt_lens: np.ndarray  # (N,)
    cont: int
    halves: np.ndarray | None = None  # (N, K, 2) the NLL of each half of the continuation (scoring labels)
    cheap: np.ndarray | None = None  # (N, F_cheap) router.cheap_features: no layer run

    def subset(self, idx: np.ndarray) -> Labels:
        halves = None if self.halves is None else self.halves[idx]
        cheap = None if self.cheap is None else self.cheap[idx]
        return Labels(self.nll[idx], self.features[idx], self.prompt_lens[idx], self.cont, halves, cheap)

    @property
    def gaps(self) -> np.ndarray:
        return self.nll - self.nll[:, -1:]

    def reliability(self) -> list[float] | None:
        """Split-half reliability of each non-full candidate's gap: the correlation of the gap measured on the first
        half of the continuation with the gap on the second, stepped up to the whole (Spearman-Brown, 2r / (1 + r)).
        How much of a query's gap is the query's and not the noise of a short continuation: the ceiling of any
        predictor's R^2 is about this value, and the oracle's advantage above it is noise it was told."""
        if self.halves is None or len(self.nll) < 3:
            return None
        gaps = self.halves - self.halves[:, -1:, :]
        out = []
        for k in range(gaps.shape[1] - 1):
            a, b = gaps[:, k, 0], gaps[:, k, 1]
            r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
            out.append(2 * r / (1 + r) if r > -1 else float("nan"))
        return out


@torch.no_grad()
def label(model: MatryoshkaLM, queries: Queries, specs: list[SubmodelSpec], batch: int = 32) -> Labels:
    """The oracle's labels: every candidate on every query (progress logged per candidate)."""
    n, cont = len(queries), queries.cont
    lens = queries.prompt_lens
    nll = np.zeros((n, len(specs)))
    halves = np.zeros((n, len(specs), 2))
    feats: list[torch.Tensor] = []
    cheap: list[torch.Tensor] = []
    device = model.norm.weight.device  # not head_weight(): a quantized model keeps its weights as planes (meta)
    for k, spec in enumerate(specs):
        log.info("oracle labels: candidate %d of %d, %d queries", k + 1, len(specs), n)
        for a in range(0, n, batch):
            ids, p = queries.windows[a : a + batch].to(device), lens[a : a + batch].to(device)
            hidden = model.hidden_states(ids, spec)
            logits = model.logits(hidden)
            tok = -next_token_logprobs(logits, ids)
            pos = torch.arange(ids.shape[1] - 1, device=device)[None]
            mask = (pos >= p[:, None] - 1) & (pos < p[:, None] - 1 + cont)
            nll[a : a + batch, k] = ((tok * mask).sum(1) / cont).cpu().numpy()
            first = mask & (pos < p[:, None] - 1 + cont // 2)
            halves[a : a + batch, k, 0] = ((tok * first).sum(1) / (cont // 2)).cpu().numpy()
            halves[a : a + batch, k, 1] = ((tok * (mask & ~first)).sum(1) / (cont - cont // 2)).cpu().numpy()
            if k == 0:
                for j in range(ids.shape[0]):
                    pj = int(p[j])
                    feats.append(prompt_features(ids[j, :pj], logits[j, :pj], hidden[j, :pj]))
                    cheap.append(cheap_features(model, ids[j, :pj], spec))
    halves_or_none = halves if cont >= 2 else None
    return Labels(nll, _np(feats), lens.numpy(), cont, halves_or_none, _np(cheap))


def _np(rows: list[torch.Tensor]) -> np.ndarray:
    return torch.stack(rows).cpu().numpy()


@torch.no_grad()
def label_generation(model: MatryoshkaLM, queries: Queries, specs: list[SubmodelSpec], new_tokens: int = 16) -> Labels:
    """The oracle's labels under the generation quality: nll[i, k] is the FULL size's mean NLL per token of
    candidate k's greedy continuation of `new_tokens` tokens from query i's prompt (the reference continuation is
    not used). The gap to the full size is then that minus the full size's NLL of its own greedy continuation: 0 for
    the full size by construction, usually > 0 for the others, but it can be negative (greedy decoding is not
    NLL-optimal over a sequence). Queries of equal prompt length are batched (no padding). Features are those of
    `label`: the smallest candidate's prefill of the prompt."""
    n, lens = len(queries), queries.prompt_lens
    if int(lens.max()) + new_tokens > model.cfg.max_seq_len:
        raise MatryoshkaError(
            f"a prompt of {int(lens.max())} tokens + {new_tokens} generated exceeds the context {model.cfg.max_seq_len}"
        )
    engine = Engine(model)
    device = engine.device
    nll = np.zeros((n, len(specs)))
    feats = torch.zeros(n, 3 + specs[0].width)
    cheap = torch.zeros(n, len(cheap_feature_names(specs[0].width)))
    groups = [np.nonzero(lens.numpy() == p)[0] for p in np.unique(lens.numpy())]
    for g, idx in enumerate(groups):
        log.info("generation labels: prompt length group %d of %d", g + 1, len(groups))
        p = int(lens[idx[0]])
        prompts = queries.windows[torch.as_tensor(idx), :p].to(device)
        hidden = model.hidden_states(prompts, specs[0])
        logits = model.logits(hidden)
        for j in range(len(idx)):
            feats[idx[j]] = prompt_features(prompts[j], logits[j], hidden[j]).cpu()
            cheap[idx[j]] = cheap_features(model, prompts[j], specs[0]).cpu()
        for k, spec in enumerate(specs):
            outs = engine.generate(prompts.tolist(), spec, new_tokens, GREEDY)
            gen = torch.tensor([o.tokens for o in outs], device=device)  # no stops: exactly new_tokens each
            ids = torch.cat([prompts, gen], 1)
            full_logits = model(ids[:, :-1])[:, p - 1 :]
            tok = -token_logprobs(log_probs(full_logits), gen)
            nll[idx, k] = tok.mean(1).cpu().numpy()
    return Labels(nll, feats.numpy(), lens.numpy(), new_tokens, cheap=cheap.numpy())


def model_queries(model: MatryoshkaLM, tokens: np.ndarray, n: int, window: int, cont: int, seed: int = 0) -> Queries:
    """The queries label_tokens labels: windows clipped to the model's context, at most half of one scored."""
    window = min(window, model.cfg.max_seq_len)
    return make_queries(tokens, n, window, min(cont, window // 2), seed=seed)


def label_tokens(
    model: MatryoshkaLM,
    tokens: np.ndarray,
    n: int,
    window: int,
    cont: int,
    seed: int = 0,
    quality: str = "scoring",
    new_tokens: int = 16,
    candidates: list[str] | None = None,
) -> tuple[list[SubmodelSpec], Labels]:
    """Queries cut from `tokens` (window clipped to the model's context), labelled by every candidate.

    quality: "scoring" (the default: NLL of the reference continuation, `label`) or "generation" (the full size's
    NLL of each candidate's greedy continuation of `new_tokens`, `label_generation`; same prompts).
    candidates: specs or cells to route between (candidate_specs; default: the trained sizes)."""
    specs = candidate_specs(model, candidates)
    queries = model_queries(model, tokens, n, window, cont, seed)
    if quality == "scoring":
        return specs, label(model, queries, specs)
    if quality == "generation":
        return specs, label_generation(model, queries, specs, min(new_tokens, cont))
    raise MatryoshkaError(f"quality must be 'scoring' or 'generation', got {quality!r}")
