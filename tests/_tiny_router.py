"""A hand-made size router whose choice is a known function of prompt length, for generation and server tests."""

from __future__ import annotations

import math

import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core.spec import parse_spec
from matryoshka_lm.infer.router import Predictor, Router, feature_names

CANDIDATES = ("S", "M", "XL")
SHORT = 6  # prompts shorter than this many tokens: S at any τ > 0


def predicted_gaps(n_tokens: int) -> tuple[float, float]:
    """The gaps to XL this router predicts for S and M: log(P / SHORT), and one nat less for M."""
    g = math.log(n_tokens / SHORT)
    return g, g - 1.0


def length_router(cfg: ModelConfig) -> Router:
    """Candidates S, M, XL. A prompt of P tokens goes to S when log(P/6) < τ, else to M when log(P/6) - 1 < τ,
    else to XL: e.g. at τ = 0.1, 3 tokens -> S and 20 tokens -> XL; at τ = 0.5, 20 tokens -> M.
    Calibrated so that a budget of 1 means τ = 0, 0.7 means τ = 0.5 and 0.3 means τ = 1e9."""
    names = feature_names(parse_spec(cfg, CANDIDATES[0]).width)
    weight = torch.zeros(len(CANDIDATES) - 1, len(names))
    weight[:, names.index("log_len")] = 1.0
    bias = torch.tensor([-math.log(SHORT), -math.log(SHORT) - 1.0])
    predictor = Predictor(weight, bias, torch.zeros(len(names)), torch.ones(len(names)))
    return Router(
        list(CANDIDATES),
        [0.25, 0.5, 1.0],
        names,
        {"learned": predictor},
        tolerance=0.1,
        calibration={"learned": {"tau": [0.0, 0.5, 1e9], "compute": [1.0, 0.7, 0.3], "nll": [3.0, 3.1, 3.5]}},
    )
