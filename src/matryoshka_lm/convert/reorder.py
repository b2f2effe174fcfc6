"""Reorder a pretrained model's neurons, heads and residual features by importance, so that prefixes are the
most useful parts before Matryoshka fine-tuning turns the prefixes into submodels.

Permuting hidden units is function-preserving when applied consistently:
  FFN hidden units    rows of w_gate and w_up, columns of w_down (per layer)
  attention heads     KV heads permute as whole GQA groups, carrying their query heads along (rows of wk/wv,
                      rows of wq, columns of wo); query heads may also permute within their group
  residual features   columns of the embedding, of every input projection and of the untied head, rows of
                      wo and w_down, and every RMSNorm weight (RMSNorm is permutation-equivariant)
so the full model's logits do not change (tests/convert/test_reorder.py), only which features a prefix keeps.
Depth is not reordered: layers do not commute.

Importance is measured with the full model on corpus windows (activation-based, no gradients), read by
forward hooks on the model's own hook points (Attention.heads_out, FeedForward.hidden), so the scores see
exactly what the model computes:
  FFN unit j      E|a_j| * ||w_down[:, j]||, with a = silu(x W_gate^T) * (x W_up^T)  (its output contribution)
  query head j    E||y_j W_o[:, j]^T||, the norm of the head's contribution to the residual stream;
                  a GQA group scores the sum of its query heads
  feature c       E[x_c^2] of the residual stream, summed over every layer input and the final norm input
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.nested import kv_head_of
from matryoshka_lm.data import eval_batches
from matryoshka_lm.errors import MatryoshkaError

log = logging.getLogger(__name__)

REORDER_AXES = ("width", "heads", "ffn")


@dataclass
class Importance:
    ffn: list[torch.Tensor]  # per layer, (ffn_i,)
    heads: list[torch.Tensor]  # per layer, (heads_i,) query-head scores
    width: torch.Tensor  # (C,)


@dataclass
class Permutation:
    """New position -> old index, per axis (None = unchanged)."""

    ffn: list[torch.Tensor] | None = None
    heads: list[torch.Tensor] | None = None  # query-head order; whole GQA groups stay together
    width: torch.Tensor | None = None


@torch.no_grad()
def measure_importance(
    model: MatryoshkaLM,
    tokens: np.ndarray,
    seq_len: int = 128,
    batch: int = 8,
    n_batches: int = 8,
    device: str | torch.device = "cpu",
) -> Importance:
    """Accumulate the importance scores of the module doc over fixed windows of `tokens` (full model)."""
    cfg = model.cfg
    model.eval()
    imp = Importance(
        ffn=[torch.zeros(f, dtype=torch.float64) for f in cfg.layer_ffn],
        heads=[torch.zeros(h, dtype=torch.float64) for h in cfg.layer_heads],
        width=torch.zeros(cfg.d_model, dtype=torch.float64),
    )
    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.register_forward_pre_hook(lambda m, args: _add_width(imp.width, args[0])))
        attn, ffn = block.attn, block.ffn
        hooks.append(
            attn.heads_out.register_forward_hook(
                lambda m, args, y, acc=imp.heads[i], attn=attn: _add_heads(acc, y, attn.wo.weight, attn.hd)
            )
        )
        hooks.append(
            ffn.hidden.register_forward_hook(
                lambda m, args, a, acc=imp.ffn[i], ffn=ffn: _add_ffn(acc, a, ffn.w_down.weight)
            )
        )
    hooks.append(model.norm.register_forward_pre_hook(lambda m, args: _add_width(imp.width, args[0])))
    try:
        for x, _ in eval_batches(tokens, batch, min(seq_len, cfg.max_seq_len), n_batches):
            model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    return imp


def _add_width(acc: torch.Tensor, x: torch.Tensor) -> None:
    acc += x.double().pow(2).flatten(0, 1).sum(0).cpu()


def _add_ffn(acc: torch.Tensor, a: torch.Tensor, w_down: torch.Tensor) -> None:
    """a: (B, T, ffn) SwiGLU activations the model feeds to w_down (its `hidden` hook point)."""
    acc += (a.abs().flatten(0, 1).sum(0) * w_down.norm(dim=0)).double().cpu()


def _add_heads(acc: torch.Tensor, y: torch.Tensor, wo: torch.Tensor, hd: int) -> None:
    """y: (B, T, h*hd) per-head outputs the model feeds to wo (its `heads_out` hook point)."""
    B, T, _ = y.shape
    heads = acc.numel()
    contrib = torch.einsum("bthd,chd->bhtc", y.reshape(B, T, heads, hd), wo.view(-1, heads, hd))  # (B, h, T, C)
    acc += contrib.norm(dim=-1).sum((0, 2)).double().cpu()


def importance_order(imp: Importance, cfg: ModelConfig, axes: tuple[str, ...]) -> Permutation:
    """Most important first on each axis in `axes`; heads keep whole GQA groups (groups ranked by the sum)."""
    unknown = set(axes) - set(REORDER_AXES)
    if unknown:
        raise MatryoshkaError(f"cannot reorder axes {sorted(unknown)}; reorderable axes are {list(REORDER_AXES)}")
    perm = Permutation()
    if "ffn" in axes:
        perm.ffn = [torch.argsort(s, descending=True, stable=True) for s in imp.ffn]
    if "heads" in axes:
        perm.heads = [_head_order(s, cfg.group_size) for s in imp.heads]
    if "width" in axes:
        perm.width = torch.argsort(imp.width, descending=True, stable=True)
    return perm


def _head_order(scores: torch.Tensor, group: int) -> torch.Tensor:
    per_group = scores.view(-1, group)  # (kv, group)
    groups = torch.argsort(per_group.sum(1), descending=True, stable=True)
    within = torch.argsort(per_group, dim=1, descending=True, stable=True)
    return torch.cat([g * group + within[g] for g in groups])


def permute_state(state: dict[str, torch.Tensor], cfg: ModelConfig, perm: Permutation) -> dict[str, torch.Tensor]:
    """Apply `perm` to a state dict in our naming; returns new tensors (the input is not modified)."""
    s = dict(state)
    hd, g = cfg.head_dim, cfg.group_size
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        if perm.ffn is not None:
            idx = perm.ffn[i]
            s[p + "ffn.w_gate.weight"] = s[p + "ffn.w_gate.weight"][idx]
            s[p + "ffn.w_up.weight"] = s[p + "ffn.w_up.weight"][idx]
            s[p + "ffn.w_down.weight"] = s[p + "ffn.w_down.weight"][:, idx]
        if perm.heads is not None:
            q_heads = perm.heads[i]
            kv_heads = kv_head_of(q_heads[::g], g)
            if not torch.equal(kv_head_of(q_heads.view(-1, g), g), kv_heads[:, None].expand(-1, g)):
                raise MatryoshkaError(f"layer {i}: a head permutation must move whole GQA groups of {g}")
            q_rows, kv_rows = _rows(q_heads, hd), _rows(kv_heads, hd)
            s[p + "attn.wq.weight"] = s[p + "attn.wq.weight"][q_rows]
            s[p + "attn.wk.weight"] = s[p + "attn.wk.weight"][kv_rows]
            s[p + "attn.wv.weight"] = s[p + "attn.wv.weight"][kv_rows]
            s[p + "attn.wo.weight"] = s[p + "attn.wo.weight"][:, q_rows]
    if perm.width is not None:
        r = perm.width
        for k in list(s):
            if k in ("tok_emb.weight", "lm_head.weight") or k.endswith(
                ("wq.weight", "wk.weight", "wv.weight", "w_gate.weight", "w_up.weight")
            ):
                s[k] = s[k][:, r]
            elif k.endswith(("wo.weight", "w_down.weight", "norm.weight")):
                s[k] = s[k][r]
    return {k: v.contiguous() for k, v in s.items()}


def _rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return (heads[:, None] * hd + torch.arange(hd)).flatten()


def reorder_model(
    model: MatryoshkaLM,
    tokens: np.ndarray,
    axes: tuple[str, ...] | None = None,
    seq_len: int = 128,
    batch: int = 8,
    n_batches: int = 8,
    device: str | torch.device = "cpu",
) -> Permutation:
    """Measure importance on `tokens` and permute `model` in place (most important first).

    Args:
        model: the full model (e.g. just imported from Hugging Face).
        tokens: a token stream (the training split of the fine-tuning corpus).
        axes: which of width / heads / ffn to reorder; default: the model's nested ones.
    Returns the permutation applied.
    """
    cfg = model.cfg
    if axes is None:
        axes = tuple(a for a in REORDER_AXES if cfg.nested(a))
    if not axes:
        return Permutation()
    imp = measure_importance(model, tokens, seq_len, batch, n_batches, device)
    perm = importance_order(imp, cfg, axes)
    state = permute_state(model.state_dict(), cfg, perm)
    model.load_state_dict(state)
    log.info("reordered %s by importance on %d windows", ", ".join(axes), batch * n_batches)
    return perm
