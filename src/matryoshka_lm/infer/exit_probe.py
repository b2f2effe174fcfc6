"""A learned per-token exit rule: at each exit point, a linear map of the token's normed state there predicts how
much worse (nats) that exit's prediction of the next token is than the full model's; the token stops at the first
point whose predicted gap is at most τ. CALM's "classifier" confidence measure, regressing the gap instead of a
yes/no so that τ stays a run-time knob (as the per-query router does with its gaps).

It costs a standardise and a dot product per point asked (4·C FLOPs) instead of the softmax margin's LM head, so a
token that runs on pays almost nothing for having asked. Fitted with ridge regression (scikit-learn, alpha by
cross-validation) on teacher-forced tokens of the training text: features are the normed states of the plain full
forward at each exit point, targets the NLL at that exit minus the NLL of the full model, token by token.
Saved beside the router: exit_probe.json (points, format) and exit_probe.safetensors. Never pickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from matryoshka_lm.config import load_json
from matryoshka_lm.core.checkpoint import load_tensors, save_tensors, write_json
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.scoring import next_token_logprobs
from matryoshka_lm.errors import MatryoshkaError

PROBE_JSON, PROBE_WEIGHTS = "exit_probe.json", "exit_probe.safetensors"
NEVER_TAU = -math.inf  # no predicted gap is at most this: the full model
FORMAT_VERSION = 1


@dataclass
class ExitProbe:
    points: list[int]  # exit depths asked, ascending; the full depth is not among them
    weight: torch.Tensor  # (E, C)
    bias: torch.Tensor  # (E,)
    mean: torch.Tensor  # (E, C)
    scale: torch.Tensor  # (E, C)

    def gap(self, i: int, hn: torch.Tensor) -> torch.Tensor:
        """Predicted gap (nats) at the i-th point for normed states hn (..., C)."""
        return ((hn - self.mean[i]) / self.scale[i]) @ self.weight[i] + self.bias[i]

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale}
        save_tensors(d / PROBE_WEIGHTS, tensors)
        write_json(d / PROBE_JSON, {"version": FORMAT_VERSION, "points": self.points, "target": "nll gap to full"})

    @classmethod
    def load(cls, directory: str | Path) -> ExitProbe | None:
        """The probe saved in `directory`, or None when there is none."""
        d = Path(directory)
        if not (d / PROBE_JSON).is_file():
            return None
        meta = load_json(d / PROBE_JSON)
        if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
            raise MatryoshkaError(f"{d / PROBE_JSON} is not a version-{FORMAT_VERSION} exit probe")
        t = load_tensors(d / PROBE_WEIGHTS)
        try:
            probe = cls(list(meta["points"]), t["weight"], t["bias"], t["mean"], t["scale"])
        except KeyError as e:
            raise MatryoshkaError(f"{d / PROBE_WEIGHTS} lacks {e.args[0]!r}") from None
        if probe.weight.shape[0] != len(probe.points):
            raise MatryoshkaError(f"{d / PROBE_WEIGHTS}: {probe.weight.shape[0]} maps for points {probe.points}")
        return probe

    def check(self, model: MatryoshkaLM) -> None:
        if self.weight.shape[1] != model.cfg.d_model or not all(0 < p < model.cfg.n_layers for p in self.points):
            raise MatryoshkaError(f"the exit probe (points {self.points}) was fitted for another model")


@torch.no_grad()
def probe_data(model: MatryoshkaLM, windows: torch.Tensor, points: list[int], batch: int = 16):
    """(features (E, N, C), gaps (E, N)) over every predicting position of every window."""
    feats: list[list[torch.Tensor]] = [[] for _ in points]
    gaps: list[list[torch.Tensor]] = [[] for _ in points]
    states: dict[int, torch.Tensor] = {}
    hooks = [model.layers[p - 1].register_forward_hook(lambda m, i, o, p=p: states.__setitem__(p, o)) for p in points]
    try:
        for a in range(0, len(windows), batch):
            ids = windows[a : a + batch]
            full = -next_token_logprobs(model(ids), ids)
            for i, p in enumerate(points):
                hn = model.norm(states[p])
                gaps[i].append((-next_token_logprobs(model.logits(hn), ids) - full).flatten())
                feats[i].append(hn[:, :-1].reshape(-1, hn.shape[-1]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([torch.cat(f) for f in feats]), torch.stack([torch.cat(g) for g in gaps])


def fit_exit_probe(
    model: MatryoshkaLM, windows: torch.Tensor, points: list[int], max_tokens: int = 60_000
) -> ExitProbe:
    """Ridge of each point's per-token gap on its standardised normed state (scikit-learn), on at most
    `max_tokens` positions drawn at random (seed 0) from the windows."""
    from sklearn.linear_model import RidgeCV

    if not points:
        raise MatryoshkaError("an exit probe needs at least one exit point short of the full depth")
    x, y = probe_data(model, windows, points)
    if x.shape[1] > max_tokens:
        keep = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(0))[:max_tokens]
        x, y = x[:, keep], y[:, keep]
    ws, bs, means, scales = [], [], [], []
    for i in range(len(points)):
        xi = x[i].double().numpy()
        mean, scale = xi.mean(0), xi.std(0)
        scale = np.where(scale > 1e-6, scale, 1.0)
        r = RidgeCV(alphas=(1.0, 10.0, 100.0, 1e3, 1e4)).fit((xi - mean) / scale, y[i].double().numpy())
        ws.append(r.coef_)
        bs.append(float(r.intercept_))
        means.append(mean)
        scales.append(scale)

    def t(a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=torch.float32).contiguous()

    return ExitProbe(list(points), t(ws), t(bs), t(means), t(scales))
