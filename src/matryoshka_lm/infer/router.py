"""The size router (issue 11): serve each prompt at the smallest size it needs.

What "needs" means. For a prompt and a tolerance τ (nats per token), the size a query needs is the smallest candidate
whose quality on it is within τ of the full size's. Quality is the *scoring* definition: the mean NLL per token of a
reference continuation (held-out text cut into prompt + continuation). The issue's generation-based quality (how far
a candidate's greedy continuation is from the full size's) is not implemented yet: scoring is the only labeller.

How it decides. ONE prefill of the smallest candidate over the prompt gives cheap features: the mean-pooled final
hidden state, the next-token entropy at the last position, the prompt's own mean NLL, and log(prompt length). A
linear predictor per candidate maps the standardised features to the candidate's predicted quality gap to the full
size (nats/token); the router picks the smallest candidate whose predicted gap (floored at 0) is below τ, and the full
size when none is. Predicting the *gap* rather than a yes/no per τ keeps τ a run-time knob without refitting:
τ = 0 always gives the full size, a huge τ always the smallest. A compute budget (target mean compute as a fraction of
always-full) is the other knob: the fit saves a calibration table (τ → mean compute on a held-out split), and a budget
maps to the smallest τ that meets it.

Three predictors share that code: "learned" (ridge regression on every feature, fitted in infer/router_fit.py with
scikit-learn), "confidence" (training-free ordering: only the small size's prompt NLL, with a 1-D linear map per
candidate fitted so that τ keeps its meaning), and "cheap": a ridge on features that run no transformer layer at all
(cheap_features: the prompt's length, its token ids' statistics, how much of it repeats, and its mean token
embedding), so routing costs ~1e-5 of a full prefill (memory preset), not the small prefill; nothing is reused.
router.json names the default; inference needs no scikit-learn, only dot products. Files: CKPT/router.json
(candidates, feature names, default, calibration) and CKPT/router.safetensors (weights, bias and feature
normalisation per predictor). Never pickle.

The routing call returns the small size's prefill (logits, hidden states, and the KV cache if one was passed), so a
caller that is routed to the smallest size reuses it instead of running a second prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka_lm.config import ModelConfig, load_json
from matryoshka_lm.core.checkpoint import load_tensors, save_tensors, write_json
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.scoring import log_probs, token_logprobs
from matryoshka_lm.core.spec import SubmodelSpec, flops_per_token, full_spec, parse_spec
from matryoshka_lm.errors import MatryoshkaError

ROUTER_JSON, ROUTER_WEIGHTS = "router.json", "router.safetensors"
KINDS = ("learned", "confidence", "cheap")
CHEAP = "cheap"
SCALAR_FEATURES = ("entropy", "prompt_nll", "log_len")  # then h0..h{C-1}: the pooled hidden state
CHEAP_SCALARS = ("log_len", "mean_log_id", "std_log_id", "repeat_frac")  # then e0..e{C-1}: the pooled embedding
CONFIDENCE_FEATURE = "prompt_nll"
FORMAT_VERSION = 1


def feature_names(width: int) -> list[str]:
    return list(SCALAR_FEATURES) + [f"h{i}" for i in range(width)]


def cheap_feature_names(width: int) -> list[str]:
    return list(CHEAP_SCALARS) + [f"e{i}" for i in range(width)]


def cheap_features(model: MatryoshkaLM, ids: torch.Tensor, spec: SubmodelSpec) -> torch.Tensor:
    """Features of one prompt (P,) that run no layer -> (4 + C_spec,): log length; the mean and spread of log(1 + id)
    (a byte-level BPE numbers its merges in order, so larger ids are rarer tokens: rarity for free); the share of
    tokens already seen earlier in the prompt (copying is easy at every size); the mean of its token embeddings."""
    ids = ids.reshape(-1)
    lid = torch.log1p(ids.float())
    seen = (ids[:, None] == ids[None, :]).triu(1).any(0)  # seen[t]: token t occurred before position t
    emb = model.embed(ids[None], spec)[0].float().mean(0)
    P = torch.tensor(math.log(ids.numel()), device=emb.device)
    return torch.cat([torch.stack([P, lid.mean(), lid.std(correction=0), seen.float().mean()]), emb])


def prompt_features(ids: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Features of one prompt from the small size's prefill: ids (P,), logits (P, V), hidden (P, C) -> (3 + C,)."""
    logp = log_probs(logits)
    last = logp[-1]
    entropy = -(last.exp() * last).sum()
    if ids.numel() > 1:  # position t predicts token t+1; a one-token prompt has no NLL of its own
        nll = -token_logprobs(logp[:-1], ids[1:]).mean()
    else:
        nll = torch.zeros((), dtype=logp.dtype, device=logp.device)
    scalars = torch.stack([entropy, nll, torch.tensor(math.log(ids.numel()), dtype=logp.dtype, device=logp.device)])
    return torch.cat([scalars, hidden.float().mean(0)])


@dataclass
class Predictor:
    """Predicted gap to the full size per non-full candidate: ((x - mean) / scale) @ weight.T + bias."""

    weight: torch.Tensor  # (K - 1, F)
    bias: torch.Tensor  # (K - 1,)
    mean: torch.Tensor  # (F,)
    scale: torch.Tensor  # (F,)

    def gaps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) features -> (B, K) predicted gaps, the full size's column 0."""
        if x.shape[-1] != self.mean.numel():
            raise MatryoshkaError(f"router expects {self.mean.numel()} features, got {x.shape[-1]}")
        # the predictor loads on the CPU; the features come from the model's device (a no-op on the CPU)
        w, b, mean, scale = (t.to(x.device) for t in (self.weight, self.bias, self.mean, self.scale))
        z = (x.float() - mean) / scale
        pred = z @ w.T + b
        return torch.cat([pred, pred.new_zeros(pred.shape[0], 1)], dim=1)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": getattr(self, k).float() for k in ("weight", "bias", "mean", "scale")}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str) -> Predictor:
        try:
            return cls(*(t[f"{prefix}.{k}"].float() for k in ("weight", "bias", "mean", "scale")))
        except KeyError as e:
            raise MatryoshkaError(f"router weights lack {e.args[0]}") from None


def check_tolerance(tau: float) -> float:
    if not isinstance(tau, (int, float)) or math.isnan(tau) or tau < 0:
        raise MatryoshkaError(f"tolerance must be a number >= 0 (nats per token), got {tau!r}")
    return float(tau)


def check_budget(budget: float) -> float:
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise MatryoshkaError(f"budget must be a mean compute fraction > 0 (1 = always full), got {budget!r}")
    return float(budget)


def choose(gaps: torch.Tensor, tau: float) -> torch.Tensor:
    """Index of the smallest candidate whose predicted gap (floored at 0) is below τ; the full size (last) if none.
    Candidates are ordered smallest first, so the first qualifying column wins."""
    tau = check_tolerance(tau)
    ok = gaps.clamp_min(0) < tau
    ok[:, -1] = True
    return ok.float().argmax(dim=1)


@dataclass
class Router:
    candidates: list[str]  # spec strings, smallest first, the full size last
    costs: list[float]  # FLOPs per token relative to the full size, same order
    features: list[str]
    predictors: dict[str, Predictor]  # "cheap" reads cheap_features, the others features
    default: str = "learned"
    tolerance: float = 0.05  # default τ when neither τ nor a budget is given
    calibration: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # kind -> {tau, compute, nll}
    info: dict[str, Any] = field(default_factory=dict)  # how it was fitted (split sizes, scores), for the record
    cheap_features: list[str] = field(default_factory=list)

    def predictor(self, kind: str | None) -> Predictor:
        kind = kind or self.default
        if kind not in self.predictors:
            raise MatryoshkaError(f"unknown router kind {kind!r}; this router has {sorted(self.predictors)}")
        return self.predictors[kind]

    def tau_for_budget(self, budget: float, kind: str | None = None) -> float:
        """The smallest calibrated τ whose mean compute on the calibration split is within `budget`."""
        budget = check_budget(budget)
        cal = self.calibration.get(kind or self.default)
        if not cal:
            raise MatryoshkaError(f"router has no calibration for {kind or self.default!r}; refit it")
        taus, compute = np.asarray(cal["tau"]), np.asarray(cal["compute"])
        ok = compute <= budget + 1e-12
        if not ok.any():
            raise MatryoshkaError(
                f"budget {budget:g} is below the smallest mean compute this router reaches ({compute.min():.3f})"
            )
        return float(taus[ok].min())

    def resolve_tau(self, tolerance: float | None, budget: float | None, kind: str | None = None) -> float:
        if tolerance is not None and budget is not None:
            raise MatryoshkaError("give a tolerance or a budget, not both")
        if budget is not None:
            return self.tau_for_budget(budget, kind)
        return check_tolerance(self.tolerance if tolerance is None else tolerance)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        tensors: dict[str, torch.Tensor] = {}
        for kind, p in self.predictors.items():
            tensors |= p.tensors(kind)
        save_tensors(d / ROUTER_WEIGHTS, tensors)
        meta = {
            "version": FORMAT_VERSION,
            "quality": "scoring: mean NLL per token of the reference continuation",
            "candidates": self.candidates,
            "costs": self.costs,
            "features": self.features,
            "cheap_features": self.cheap_features,
            "kinds": sorted(self.predictors),
            "default": self.default,
            "tolerance": self.tolerance,
            "calibration": self.calibration,
            "info": self.info,
        }
        write_json(d / ROUTER_JSON, meta)

    @classmethod
    def load(cls, directory: str | Path) -> Router:
        d = Path(directory)
        if not (d / ROUTER_JSON).is_file():
            raise MatryoshkaError(f"no router at {d} (expected {ROUTER_JSON}; run `matryoshka route fit`)")
        meta = load_json(d / ROUTER_JSON)
        if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
            raise MatryoshkaError(f"{d / ROUTER_JSON} is not a version-{FORMAT_VERSION} router")
        t = load_tensors(d / ROUTER_WEIGHTS)
        try:
            predictors = {k: Predictor.from_tensors(t, k) for k in meta["kinds"]}
            router = cls(
                candidates=list(meta["candidates"]),
                costs=[float(c) for c in meta["costs"]],
                features=list(meta["features"]),
                predictors=predictors,
                default=meta["default"],
                tolerance=float(meta["tolerance"]),
                calibration=meta.get("calibration", {}),
                info=meta.get("info", {}),
                cheap_features=list(meta.get("cheap_features", [])),
            )
        except KeyError as e:
            raise MatryoshkaError(f"{d / ROUTER_JSON} lacks {e.args[0]!r}") from None
        router.predictor(router.default)  # the default must exist
        return router

    def specs(self, cfg: ModelConfig) -> list[SubmodelSpec]:
        return [parse_spec(cfg, c) for c in self.candidates]


@dataclass
class Decision:
    """Where a prompt goes, and the small size's prefill to reuse when that is where it goes."""

    index: int  # into router.candidates
    spec: SubmodelSpec
    tau: float
    kind: str
    gaps: torch.Tensor  # (K,) predicted gap per candidate
    features: torch.Tensor  # (F,)
    small_spec: SubmodelSpec
    small_logits: torch.Tensor | None  # (1, P, V) of the small size; None: the cheap router ran no prefill
    small_hidden: torch.Tensor | None  # (1, P, C_small)
    small_cache: KVCache | None  # the caller's cache, now holding the small size's prefill

    @property
    def reuses_prefill(self) -> bool:
        """True when the chosen size is the small one and its prefill (logits, cache) is already done."""
        return self.index == 0 and self.small_logits is not None


@torch.no_grad()
def route(
    model: MatryoshkaLM,
    ids: torch.Tensor,
    router: Router,
    tolerance: float | None = None,
    budget: float | None = None,
    kind: str | None = None,
    cache: KVCache | None = None,
) -> Decision:
    """Route one prompt (P,) or (1, P): one prefill of the smallest candidate (into `cache` if given), then the
    predictor. The returned Decision carries that prefill. The cheap kind runs no layer and leaves `cache` empty."""
    tau = router.resolve_tau(tolerance, budget, kind)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.shape[0] != 1 or ids.shape[1] < 1:
        raise MatryoshkaError(f"route takes one non-empty prompt, got ids of shape {tuple(ids.shape)}")
    specs = router.specs(model.cfg)
    small = specs[0]
    kind = kind or router.default
    if kind == CHEAP:
        x = cheap_features(model, ids[0], small)
        gaps = router.predictor(kind).gaps(x[None])
        i = int(choose(gaps, tau)[0])
        return Decision(i, specs[i], tau, kind, gaps[0], x, small, None, None, None)
    hidden = model.hidden_states(ids, small, cache, 0)
    logits = model.logits(hidden)
    x = prompt_features(ids[0], logits[0], hidden[0])
    gaps = router.predictor(kind).gaps(x[None])
    i = int(choose(gaps, tau)[0])
    return Decision(i, specs[i], tau, kind, gaps[0], x, small, logits, hidden, cache)


def router_flops(cfg: ModelConfig, small: SubmodelSpec, prompt_len: int, n_features: int, n_predicted: int) -> dict:
    """FLOPs of routing one prompt of `prompt_len` tokens, split into the predictor's own work (pooling, entropy,
    prompt NLL, standardising, one dot product per predicted candidate) and the small size's prefill (shared: reused
    when the small size is chosen), next to one full-size prefill of the same prompt."""
    P, V, C = prompt_len, cfg.vocab_size, small.width
    features = P * C + 4 * V + 3 * V * max(P - 1, 0)  # mean pool; softmax entropy; log-softmax + gather
    predictor = features + 2 * n_features + 2 * n_features * n_predicted
    return {
        "predictor": int(predictor),
        "small_prefill": int(flops_per_token(cfg, small, P) * P),
        "full_prefill": int(flops_per_token(cfg, full_spec(cfg), P) * P),
    }


def cheap_router_flops(cfg: ModelConfig, small: SubmodelSpec, prompt_len: int, n_features: int, n_predicted: int):
    """FLOPs of the cheap router on one prompt (pooling the embeddings, the ids' log / mean / spread, the repeat test
    over pairs of positions, standardising, one dot product per predicted candidate) beside a full prefill."""
    P, C = prompt_len, small.width
    features = P * C + 4 * P + P * (P - 1) // 2
    return {
        "predictor": int(features + 2 * n_features + 2 * n_features * n_predicted),
        "full_prefill": int(flops_per_token(cfg, full_spec(cfg), P) * P),
    }
