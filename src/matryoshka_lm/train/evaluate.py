"""Per-size evaluation: params, FLOPs/token, val loss, perplexity, agreement with the full model; table and plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.quant import QuantConfig, weight_bytes
from matryoshka_lm.core.scoring import log_probs, token_logprobs
from matryoshka_lm.core.spec import SubmodelSpec, count_params, flops_per_token
from matryoshka_lm.data import eval_batches
from matryoshka_lm.report import figure, md_table


@torch.no_grad()
def evaluate_specs(
    model: MatryoshkaLM,
    val: np.ndarray,
    specs: dict[str, SubmodelSpec],
    seq_len: int,
    batch: int = 8,
    n_batches: int = 16,
    device: str | torch.device = "cpu",
    reference: tuple[MatryoshkaLM, SubmodelSpec] | None = None,
) -> dict[str, dict[str, float]]:
    """Val loss of each spec on fixed windows, plus top-1 agreement and KL(ref || spec) against `reference`
    (a model and its spec; default: this model's full size), computed on the same tokens."""
    model.eval()
    ref_model, ref_spec = reference or (model, model.full)
    ref_model.eval()
    sums: dict[str, dict[str, float]] = {n: {"loss": 0.0, "agree": 0.0, "kl": 0.0} for n in specs}
    tokens = 0
    for x, y in eval_batches(val, batch, seq_len, n_batches):
        x, y = x.to(device), y.to(device)
        ref_logp = log_probs(ref_model(x, ref_spec))
        ref_top = ref_logp.argmax(-1)
        n = y.numel()
        tokens += n
        for name, spec in specs.items():
            logp = log_probs(model(x, spec))
            sums[name]["loss"] -= token_logprobs(logp, y).sum().item()
            sums[name]["agree"] += (logp.argmax(-1) == ref_top).sum().item()
            sums[name]["kl"] += (ref_logp.exp() * (ref_logp - logp)).sum().item()
    return {n: {k: v / tokens for k, v in s.items()} for n, s in sums.items()}


def size_table(
    cfg: ModelConfig,
    specs: dict[str, SubmodelSpec],
    results: dict[str, dict[str, float]],
    qcfg: QuantConfig | None = None,
    native_bits: int | None = None,
) -> list[dict[str, Any]]:
    """One row per spec; `qcfg`/`native_bits`: how the model's cells are quantized and the loaded precision (for
    the bytes of weights each row reads)."""
    rows = []
    for name, spec in specs.items():
        p = count_params(cfg, spec)
        r = results[name]
        rows.append(
            {
                "size": name,
                "spec": str(spec),
                "params": p["total"],
                "non_embedding_params": p["non_embedding"],
                "flops_per_token": flops_per_token(cfg, spec),
                "bits": spec.bits or native_bits,
                "weight_bytes": weight_bytes(cfg, spec, spec.bits or native_bits, qcfg or QuantConfig()),
                "val_loss": r["loss"],
                "perplexity": math.exp(r["loss"]),
                "top1_agreement": r["agree"],
                "kl_from_full": r["kl"],
            }
        )
    return rows


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _label(row: dict[str, Any]) -> str:
    return row["size"] + ("" if row.get("trained", True) else " (untrained)")


def format_table(rows: list[dict[str, Any]], unigram: float | None = None) -> str:
    """A Markdown table (renders in the README and reads fine in a terminal)."""
    head = ["size", "params", "non-emb params", "FLOPs/token", "val loss", "ppl", "top-1 agree w/ full", "KL from full"]
    cells = [
        [_label(r), human(r["params"]), human(r["non_embedding_params"]), human(r["flops_per_token"]),
         f"{r['val_loss']:.3f}", f"{r['perplexity']:.1f}", f"{r['top1_agreement']:.3f}", f"{r['kl_from_full']:.3f}"]
        for r in rows
    ]  # fmt: skip
    table = md_table(head, cells)
    if unigram is not None:
        table += f"\n\nunigram loss on the same split: {unigram:.3f} nats/token"
    if any(not r.get("trained", True) for r in rows):
        table += "\n(untrained): a slice of the weights no training has made a model yet (e.g. after an import)"
    return table


def plot_size_vs_loss(
    rows: list[dict[str, Any]], path: Path, title: str = "size vs validation loss", unigram: float | None = None
) -> None:
    with figure(path, (6, 4)) as (fig, ax):
        xs = [r["non_embedding_params"] for r in rows]
        ys = [r["val_loss"] for r in rows]
        ax.plot(xs, ys, "o-", label="Matryoshka sizes")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["size"], (x, y), textcoords="offset points", xytext=(4, 4))
        if unigram is not None:
            ax.axhline(unigram, color="gray", ls="--", label=f"unigram ({unigram:.2f})")
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(title)


def write_json_report(path: Path, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    from matryoshka_lm.core.checkpoint import write_json

    write_json(path, {"sizes": rows, **extra})
