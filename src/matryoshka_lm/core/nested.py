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
from dataclasses import replace
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


def whole_groups(heads: int, group: int) -> bool:
    """Whether `heads` query heads are whole GQA groups (what a size may keep)."""
    return heads % group == 0


def kv_heads(heads: int, group: int) -> int:
    """KV heads that the first `heads` query heads read: heads / group (heads must be whole GQA groups)."""
    if not whole_groups(heads, group):
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


# ---------------------------------------------------------------- the one table of weight shapes

LAYER_WEIGHTS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w_gate", "ffn.w_up", "ffn.w_down")
LAYER_NORMS = ("attn_norm", "ffn_norm")


def layer_shapes(cfg: ModelConfig, layer: LayerShape, width: int) -> dict[str, tuple[int, int]]:
    """(rows, cols) of each matrix of one layer kept by a size of residual width `width`: the prefix it reads.
    Slicing, parameter counts, bytes and search costs all read this table."""
    C, q, f = width, layer.heads * cfg.head_dim, layer.ffn
    kv = kv_heads(layer.heads, cfg.group_size) * cfg.head_dim
    return {
        "attn.wq": (q, C),
        "attn.wk": (kv, C),
        "attn.wv": (kv, C),
        "attn.wo": (C, q),
        "ffn.w_gate": (f, C),
        "ffn.w_up": (f, C),
        "ffn.w_down": (C, f),
    }


def model_shapes(cfg: ModelConfig, spec: SpecShape, untied_head: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Every weight a submodel reads, named as in a standalone model, with the shape of its prefix.
    `untied_head` (default: the config's) lists lm_head.weight."""
    C = spec.width
    out: dict[str, tuple[int, ...]] = {"tok_emb.weight": (cfg.vocab_size, C), "norm.weight": (C,)}
    if (not cfg.tie_embeddings) if untied_head is None else untied_head:
        out["lm_head.weight"] = (cfg.vocab_size, C)
    for i, layer in enumerate(spec.layers):
        for name, shape in layer_shapes(cfg, layer, C).items():
            out[f"layers.{i}.{name}.weight"] = shape
        for norm in LAYER_NORMS:
            out[f"layers.{i}.{norm}.weight"] = (C,)
    return out


def prefix(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The leading `shape` block of `t` (a view)."""
    return t[tuple(slice(0, n) for n in shape)]


def slice_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, spec: SpecShape) -> dict[str, torch.Tensor]:
    """The weights a submodel reads, as contiguous copies: a standalone dense model of the spec's shape."""
    return {k: v.contiguous().clone() for k, v in slice_views(state, cfg, spec).items()}


def slice_views(state: dict[str, torch.Tensor], cfg: ModelConfig, spec: SpecShape) -> dict[str, torch.Tensor]:
    """The weights a submodel reads, as views of `state`'s tensors (no copy), named as in a standalone model."""
    shapes = model_shapes(cfg, spec, untied_head="lm_head.weight" in state)
    return {name: prefix(state[name], shape) for name, shape in shapes.items()}


def slice_quantized(codes: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], cfg: ModelConfig, spec: SpecShape):
    """Codes and their group scales a submodel reads (views): each weight's prefix, and the scales of its rows and
    of the groups its columns fall in. `scales` maps a weight's name to its scale tensor (rows, groups)."""
    out = slice_views(codes, cfg, spec)
    sliced = {}
    for name, s in scales.items():
        if name in out:
            c = out[name]
            group = codes[name].shape[1] // s.shape[1]  # whole rows are whole groups
            sliced[name] = prefix(s, (c.shape[0], -(-c.shape[1] // group)))
    return out, sliced


def lm_head(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits of hidden states (..., C) of any width: the head's first C columns."""
    return F.linear(h, weight[:, : h.shape[-1]])


def kv_prefix(
    k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], cfg: ModelConfig, spec: SpecShape
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A smaller size's view of a larger size's KV cache (B, kv, L, hd) per layer: its first layers, and in each
    the KV heads its query heads read (whole GQA groups are a prefix of the KV heads). No copy."""
    kv = [kv_heads(layer.heads, cfg.group_size) for layer in spec.layers]
    return [t[:, :n] for t, n in zip(k, kv)], [t[:, :n] for t, n in zip(v, kv)]


def first_layers(spec: SpecShape, depth: int):
    """The spec cut to its first `depth` layers (depth nests as a prefix of the layers), unnamed."""
    return replace(spec, layers=tuple(spec.layers[:depth]), name=None)  # type: ignore[type-var]


def depth_prefix_of(target: SpecShape, draft: SpecShape) -> int | None:
    """k when `draft` is exactly `target`'s first k < depth layers at its width (and bits), else None."""
    k = len(draft.layers)
    same = draft.width == target.width and getattr(draft, "bits", None) == getattr(target, "bits", None)
    return k if same and tuple(draft.layers) == tuple(target.layers[:k]) and k < len(target.layers) else None


def layers_from(modules: Sequence, spec: SpecShape, start: int) -> zip:
    """(module, layer spec) pairs of the spec's layers from `start` on (a resumed early exit starts past 0)."""
    return zip(modules[start : len(spec.layers)], spec.layers[start:])


def embedding_prefix(x, dim: int):
    """A Matryoshka embedding at `dim`: its first `dim` features, L2-normalised (torch or numpy, rows last)."""
    if isinstance(x, torch.Tensor):
        return F.normalize(x[..., :dim], p=2, dim=-1)
    import numpy as np  # the retrieval side works in numpy (FAISS)

    t = np.ascontiguousarray(np.asarray(x)[..., :dim], dtype=np.float32)
    return t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)


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


def top_bits(codes: torch.Tensor, bits: int, stored: int = CODE_BITS) -> torch.Tensor:
    """The `bits` most significant bits of `stored`-bit codes, as signed integers in [-2^(bits-1), 2^(bits-1) - 1]:
    exactly the top bits of each two's-complement code (floor(q / 2^(stored - bits)))."""
    if bits not in BIT_WIDTHS or bits > stored:
        raise ValueError(f"bits must be in {BIT_WIDTHS.start}..{min(stored, BIT_WIDTHS.stop - 1)}, got {bits}")
    return codes >> (stored - bits)


def nearest_level(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The r-bit level nearest to x (in int8 units: x = w / s), i.e. bit_levels of the rounded, clamped r-bit code:
    round-to-nearest on the r-bit grid of the nesting rule (what a weight would read if only width r mattered)."""
    k = CODE_BITS - bits
    half = 1 << (bits - 1)
    top = torch.round((x - ((1 << k) - 1) / 2) / (1 << k)).clamp(-half, half - 1)
    return bit_levels(top, bits)


def low_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The `bits` least significant bits of codes, in [0, 2^bits): q = 2^bits * top + low."""
    return codes & ((1 << bits) - 1)


def bit_levels(top: torch.Tensor, bits: int) -> torch.Tensor:
    """The int8-scale value of r-bit codes t: 2^k t + (2^k - 1) / 2 with k = 8 - r, the mean of the int8 codes
    whose top bits are t (so int8 itself reads t, and slicing the codes of a round-to-nearest int8 model is
    round-to-nearest on this r-bit grid). Multiply by the scale to get the weight."""
    k = CODE_BITS - bits
    return top.float() * (1 << k) + ((1 << k) - 1) / 2


# ---------------------------------------------------------------- bit-planes: how the top bits are read in memory

PLANE_BITS = 2  # resident codes are planes of 2 bits (core/planes.py): int2/4/6/8 read 1..4 planes exactly


def planes_read(bits: int) -> int:
    """The planes an r-bit cell reads: its top r bits lie in the top ceil(r / 2) planes (int3 reads 4 bits)."""
    return -(-bits // PLANE_BITS)


def code_plane(codes: torch.Tensor, p: int) -> torch.Tensor:
    """Plane p (0 = most significant) of the unsigned code u = q + 2^7: its bits 7-2p and 6-2p, in 0..3."""
    u_top = top_bits(codes.to(torch.int32), PLANE_BITS * (p + 1)) + (1 << (PLANE_BITS * (p + 1) - 1))
    return low_bits(u_top, PLANE_BITS)


def plane_masks(bits: int) -> list[int]:
    """Per plane read, the bits of u at that plane's position that the r-bit code keeps (odd r drops one)."""
    keep = (0xFF << (CODE_BITS - bits)) & 0xFF
    return [(3 << (CODE_BITS - PLANE_BITS * (p + 1))) & keep for p in range(planes_read(bits))]


def unsigned_top(plane_values: Sequence[torch.Tensor], bits: int) -> torch.Tensor:
    """c = u & (0xff << (8 - r)) from the planes' 2-bit values (most significant first): the r-bit value is
    s * (c - 2^7 + (2^(8-r) - 1) / 2), which equals s * bit_levels(top_bits(q, r), r)."""
    c = torch.zeros_like(plane_values[0], dtype=torch.int32)
    for p, (v, m) in enumerate(zip(plane_values, plane_masks(bits))):
        c |= (v.to(torch.int32) << (CODE_BITS - PLANE_BITS * (p + 1))) & m
    return c


def plane_offset(bits: int) -> float:
    """b_r = -2^7 + (2^(8-r) - 1) / 2: what turns c into the r-bit level (see unsigned_top)."""
    return -float(1 << (CODE_BITS - 1)) + ((1 << (CODE_BITS - bits)) - 1) / 2


def pack_fields(values: torch.Tensor) -> torch.Tensor:
    """(..., 4) values in 0..3 -> (...) uint8 bytes holding value f at bits 2f, 2f + 1."""
    out = torch.zeros(values.shape[:-1], dtype=torch.int32, device=values.device)
    for f in range(8 // PLANE_BITS):
        out |= values[..., f].to(torch.int32) << (PLANE_BITS * f)
    return out.to(torch.uint8)


def unpack_fields(b: torch.Tensor) -> torch.Tensor:
    """pack_fields' inverse: (...) uint8 -> (..., 4) values in 0..3."""
    b = b.to(torch.int32)
    return torch.stack([(b >> (PLANE_BITS * f)) & 3 for f in range(8 // PLANE_BITS)], dim=-1)


def plane_prefix(
    planes: torch.Tensor, scales: torch.Tensor, out_features: int, in_features: int, bits: int, tile: int, block: int
):
    """The views of planes (T, G, 4, B) and scales (T, G, tile) that the cell (out rows, in columns, r bits) reads:
    a prefix of the row tiles, of the column blocks in each, and of the planes."""
    nt, ng = -(-out_features // tile), -(-in_features // block)
    return planes[:nt, :ng, : planes_read(bits)], scales[:nt, :ng]


def widen_codes(codes: torch.Tensor, stored: int) -> torch.Tensor:
    """`stored`-bit codes as the int8 codes with the same top bits (low bits 0): what planes hold, so the top r
    bits of either are the same r-bit cell."""
    return (codes.to(torch.int32) << (CODE_BITS - stored)).to(torch.int8)
