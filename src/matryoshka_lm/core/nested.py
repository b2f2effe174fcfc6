"""The one place that knows a smaller size is a prefix slice of the full weights.

Every weight is laid out so that a submodel reads the leading rows/columns:
  Linear weight (out, in): a size keeps weight[:out_k, :in_k]  (zero-copy views)
  RMSNorm weight (C,):     weight[:C_k]; the norm is taken over those C_k features only
  Embedding (V, C):        table[:, :C_k]
Query heads are grouped (GQA): query head j reads KV head j // group, so the first k query heads use the first
k / group KV heads, and a size keeps whole groups only (kv_heads).

Precision nests the same way (Matryoshka Quantization): a weight stored as a signed int8 code q with a scale s
(dequantized s*q) is, at r bits, the r most significant bits of q, t = q >> (8 - r) (an arithmetic shift: floor),
read back as the mean of the 2^(8-r) int8 levels that share those bits (top_bits, bit_levels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from matryoshka_lm.config import ModelConfig


# What the slicing rules read of a spec. spec.SubmodelSpec has this shape; nested.py does not import spec.py, because
# spec.py imports kv_heads from here to count parameters (imports point one way).
class LayerShape(Protocol):
    ffn: int
    heads: int


class SpecShape(Protocol):
    width: int
    layers: Sequence[LayerShape]


def kv_heads(heads: int, group: int) -> int:
    """KV heads that the first `heads` query heads read: heads / group (heads must be whole GQA groups)."""
    if heads % group:
        raise ValueError(f"{heads} query heads is not a whole number of GQA groups of {group}")
    return heads // group


def kv_head_of(q_head: torch.Tensor, group: int) -> torch.Tensor:
    """The KV head each query head reads (GQA): query head j -> KV head j // group."""
    return q_head // group


def linear(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """y = x @ W[:out, :in].T where `in` is x's (possibly sliced) feature count."""
    return F.linear(x, weight[:out_features, : x.shape[-1]])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the features present, exactly as a standalone model of that width computes it."""
    C = x.shape[-1]
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight[:C].float()).to(x.dtype)


def embed(idx: torch.Tensor, table: torch.Tensor, width: int) -> torch.Tensor:
    return F.embedding(idx, table[:, :width])


def slice_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, spec: SpecShape) -> dict[str, torch.Tensor]:
    """The weights a submodel reads, as contiguous copies: a standalone dense model of the spec's shape."""
    return {k: v.contiguous().clone() for k, v in slice_views(state, cfg, spec).items()}


def slice_views(state: dict[str, torch.Tensor], cfg: ModelConfig, spec: SpecShape) -> dict[str, torch.Tensor]:
    """The weights a submodel reads, as views of `state`'s tensors (no copy), named as in a standalone model."""
    C, hd, g = spec.width, cfg.head_dim, cfg.group_size
    out: dict[str, torch.Tensor] = {}
    out["tok_emb.weight"] = state["tok_emb.weight"][:, :C]
    out["norm.weight"] = state["norm.weight"][:C]
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"][:, :C]
    for i, layer in enumerate(spec.layers):
        p = f"layers.{i}."
        q, kv, f = layer.heads * hd, kv_heads(layer.heads, g) * hd, layer.ffn
        rows = {
            "attn.wq": (q, C),
            "attn.wk": (kv, C),
            "attn.wv": (kv, C),
            "attn.wo": (C, q),
            "ffn.w_gate": (f, C),
            "ffn.w_up": (f, C),
            "ffn.w_down": (C, f),
        }
        for name, (r, c) in rows.items():
            out[p + name + ".weight"] = state[p + name + ".weight"][:r, :c]
        for norm in ("attn_norm", "ffn_norm"):
            out[p + norm + ".weight"] = state[p + norm + ".weight"][:C]
    return out


def submodel_config(cfg: ModelConfig, spec: SpecShape) -> ModelConfig:
    """Config of a standalone dense model with exactly the spec's shape (per-layer widths where they differ)."""
    heads = [l.heads for l in spec.layers]
    ffn = [l.ffn for l in spec.layers]
    kv = [kv_heads(h, cfg.group_size) for h in heads]
    d = cfg.to_dict()
    d.update(
        d_model=spec.width,
        n_layers=spec.depth,
        head_dim=cfg.head_dim,
        n_heads=heads[0] if len(set(heads)) == 1 else heads,
        n_kv_heads=kv[0] if len(set(kv)) == 1 else kv,
        ffn_dim=ffn[0] if len(set(ffn)) == 1 else ffn,
        nest_width=False,
        nest_heads=False,
        nest_ffn=False,
        nest_depth=False,
        sizes={"XL": {a: "1" for a in ("width", "heads", "ffn", "depth")}},
    )
    return ModelConfig.from_dict(d)


# ---------------------------------------------------------------- precision: the top bits of int8 codes

CODE_BITS = 8  # codes are stored at this precision; every narrower one is a prefix of their bits
BIT_WIDTHS = range(2, CODE_BITS + 1)  # 1 bit would keep a single level per sign: not a model


def top_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The `bits` most significant bits of int8 codes, as signed integers in [-2^(bits-1), 2^(bits-1) - 1]:
    exactly the top bits of each two's-complement byte (floor(q / 2^(8 - bits)))."""
    if bits not in BIT_WIDTHS:
        raise ValueError(f"bits must be in {BIT_WIDTHS.start}..{BIT_WIDTHS.stop - 1}, got {bits}")
    return codes >> (CODE_BITS - bits)


def bit_levels(top: torch.Tensor, bits: int) -> torch.Tensor:
    """The int8-scale value of r-bit codes t: 2^k t + (2^k - 1) / 2 with k = 8 - r, the mean of the int8 codes
    whose top bits are t (so int8 itself reads t, and slicing the codes of a round-to-nearest int8 model is
    round-to-nearest on this r-bit grid). Multiply by the scale to get the weight."""
    k = CODE_BITS - bits
    return top.float() * (1 << k) + ((1 << k) - 1) / 2
