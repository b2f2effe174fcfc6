"""What `matryoshka elastify` measures of a model at each of its sizes: loss on each token set (held-out corpus
text, out-of-domain prose) and greedy samples. Shared by the elastic model's eval stage and the student's."""

from __future__ import annotations

from typing import Any

import numpy as np

from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, count_params, uniform_spec
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.train.evaluate import evaluate_specs

from .preset import ElastifyPreset


def size_rows(model: MatryoshkaLM, specs: dict[str, SubmodelSpec]) -> dict[str, dict[str, int]]:
    """Parameters of each size, total and without the embedding."""
    counts = {n: count_params(model.cfg, s) for n, s in specs.items()}
    return {n: {"params": c["total"], "non_embedding": c["non_embedding"]} for n, c in counts.items()}


def scores(
    model: MatryoshkaLM,
    specs: dict[str, SubmodelSpec],
    token_sets: dict[str, np.ndarray],
    seq_len: int,
    p: ElastifyPreset,
    device: str,
    reference: tuple[MatryoshkaLM, SubmodelSpec] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{token set: {size: {"loss", "agree", "kl"}}} on the same fixed windows of each set (agreement and KL
    against `reference`, default the model's full size)."""
    return {
        key: evaluate_specs(
            model, tokens, specs, seq_len, batch=8, n_batches=p.eval_batches, device=device, reference=reference
        )  # fmt: skip
        for key, tokens in token_sets.items()
    }


def greedy_samples(model: MatryoshkaLM, tok: Any, names: list[str], p: ElastifyPreset) -> dict[str, list[str]]:
    """Each size's greedy continuation of every prompt of the preset."""
    engine = Engine(model)
    prompts = [tok.encode(t).ids for t in p.prompts]
    out = {}
    for n in names:
        done = engine.generate(prompts, uniform_spec(model.cfg, n), p.sample_tokens)
        out[n] = [tok.decode(c.tokens) for c in done]
    return out
