"""SubmodelSpec: which prefix of every nested axis a submodel keeps, its string form, params and FLOPs.

String form (Mix'n'Match):
    "XL" | "L" | "M" | "S"              a trained uniform size
    "M,M,L,XL"                          one granularity per layer; depth = number of entries
    "f128h4,f256h4,L@d144"              explicit FFN width (f) and query heads (h) per layer, optional @width
    "S,M,M@M"                           residual width taken from a named size (default: the widest listed)
    "M@int4" | "S,M,L,XL@int2"          any of the above at a bit width (2..8): the top bits of the int8 codes
                                        (core/quant.py); no suffix = the weights as loaded
    "mix:S,M,L,XL"                      the explicit form of a per-layer spec (what a list of specs needs)

Lists of specs (every --sizes / --candidates, split_specs): "XL,S" is two sizes. Specs are separated by ';' when the
text has one, else by ','; so a per-layer spec inside a list is written "mix:S,M,L,XL" or with ';' ("S,M,L,XL;M").
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core.nested import BIT_WIDTHS, model_shapes, whole_groups
from matryoshka_lm.errors import MatryoshkaError


@dataclass(frozen=True)
class LayerSpec:
    ffn: int  # SwiGLU hidden units kept (a prefix)
    heads: int  # query heads kept (a prefix of whole GQA groups)


@dataclass(frozen=True)
class SubmodelSpec:
    width: int  # residual width C kept
    layers: tuple[LayerSpec, ...]  # one entry per kept layer (depth = len)
    name: str | None = None  # set for the trained uniform sizes
    bits: int | None = None  # weight precision (a cell of the size x bits grid); None = the weights as loaded

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def shape(self) -> SubmodelSpec:
        """The same submodel at the loaded precision (what slicing needs; bits are applied by the model)."""
        return self if self.bits is None else replace(self, bits=None)

    def at_bits(self, bits: int | None) -> SubmodelSpec:
        return replace(self, bits=bits)

    def __str__(self) -> str:
        return format_spec(self)


def _scaled(total: int, frac: Fraction, what: str, size: str) -> int:
    value = total * frac
    if value.denominator != 1 or value < 1:
        raise MatryoshkaError(f"size {size!r}: {what} fraction {frac} does not divide {what}={total}")
    return int(value)


def size_extent(cfg: ModelConfig, size: str) -> tuple[int, int]:
    """(width, depth) of the uniform size `size`: uniform_spec's without building its layers."""
    width = _scaled(cfg.d_model, cfg.fraction(size, "width"), "width", size)
    return width, _scaled(cfg.n_layers, cfg.fraction(size, "depth"), "depth", size)


def uniform_spec(cfg: ModelConfig, size: str) -> SubmodelSpec:
    """The trained uniform size `size` (e.g. "M") as a spec."""
    width, depth = size_extent(cfg, size)
    hf, ff = cfg.fraction(size, "heads"), cfg.fraction(size, "ffn")
    layers = []
    for h, f in zip(cfg.layer_heads[:depth], cfg.layer_ffn[:depth]):
        heads = _scaled(h, hf, "heads", size)
        if not whole_groups(heads, cfg.group_size):
            raise MatryoshkaError(
                f"size {size!r}: {heads} heads is not a whole number of GQA groups of {cfg.group_size}"
            )
        layers.append(LayerSpec(ffn=_scaled(f, ff, "ffn", size), heads=heads))
    return SubmodelSpec(width=width, layers=tuple(layers), name=size)


def full_spec(cfg: ModelConfig) -> SubmodelSpec:
    layers = tuple(LayerSpec(ffn=f, heads=h) for f, h in zip(cfg.layer_ffn, cfg.layer_heads))
    return SubmodelSpec(width=cfg.d_model, layers=layers, name=None)


def size_names(cfg: ModelConfig) -> list[str]:
    """Named sizes from largest to smallest (by parameter count)."""
    return sorted(cfg.sizes, key=lambda s: -count_params(cfg, uniform_spec(cfg, s))["total"])


MIX = "mix:"  # the explicit prefix of a per-layer Mix'n'Match spec
LIST_RULE = (
    "a list separates specs with ',' (\"XL,S\" is two sizes), or with ';' when a spec has commas: write a per-layer "
    'spec in a list as "mix:S,M,L,XL" or "S,M,L,XL;M"'
)


def split_specs(text: str | None) -> list[str] | None:
    """The one rule for a list of specs (module doc): split on ';' when the text has one, else on ','; a text that
    is one explicit "mix:" spec stays whole. None/empty: None (the caller's default)."""
    text = (text or "").strip()
    if not text:
        return None
    if text.startswith(MIX) and ";" not in text:
        return [text]
    return [s.strip() for s in text.split(";" if ";" in text else ",") if s.strip()]


def parse_spec_list(cfg: ModelConfig, text: str | Sequence[str] | None) -> list[SubmodelSpec] | None:
    """split_specs then parse_spec of each; an error names the item and the list rule."""
    items = split_specs(text) if isinstance(text, str) or text is None else list(text)
    if items is None:
        return None
    out = []
    for item in items:
        try:
            out.append(parse_spec(cfg, item))
        except MatryoshkaError as e:
            raise MatryoshkaError(f"{e} (in the list {text!r}; {LIST_RULE})") from None
    return out


_LAYER_RE = re.compile(r"^f(\d+)h(\d+)$")
_BITS_RE = re.compile(r"^(.*)@int(\d+)$")


def parse_spec(cfg: ModelConfig, text: str) -> SubmodelSpec:
    """Parse a size name or a Mix'n'Match string, optionally @int<bits> (see module doc); errors name the bad
    part."""
    text = (text or "").strip()
    if m := _BITS_RE.match(text):
        bits = int(m.group(2))
        if bits not in BIT_WIDTHS:
            raise MatryoshkaError(
                f"bad bit width in {text!r}: int{bits}; the weights are int8 codes whose top bits give "
                f"int{BIT_WIDTHS.start}..int{BIT_WIDTHS.stop - 1}"
            )
        return parse_spec(cfg, m.group(1)).at_bits(bits)
    if text.startswith(MIX):
        body = text[len(MIX) :].strip()
        if not body or body in cfg.sizes or "," not in body and not _LAYER_RE.match(body.partition("@")[0]):
            raise MatryoshkaError(f"{text!r}: after 'mix:' give one granularity per layer, e.g. 'mix:S,M,L,XL'")
        text = body
    if not text:
        raise MatryoshkaError("empty size spec")
    if text in cfg.sizes:
        return uniform_spec(cfg, text)
    body, _, width_part = text.partition("@")
    tokens = [t.strip() for t in body.split(",")]
    if len(tokens) == 1 and not width_part and tokens[0] not in cfg.sizes and not _LAYER_RE.match(tokens[0]):
        raise MatryoshkaError(
            f"unknown size {text!r}: this model has sizes {', '.join(cfg.sizes)}, "
            "or give a Mix'n'Match spec such as 'S,M,L,XL' or 'f128h4,f256h4@d144'"
        )
    if len(tokens) > cfg.n_layers:
        raise MatryoshkaError(f"spec {text!r} lists {len(tokens)} layers but the model has {cfg.n_layers}")
    layers, widths, width_of = [], [], {}  # width_of: each named size's width, computed once (not per layer)
    for i, tok in enumerate(tokens):
        if tok in cfg.sizes:
            if tok not in width_of:
                width_of[tok] = size_extent(cfg, tok)[0]
            layers.append(_named_layer(cfg, tok, i))
            widths.append(width_of[tok])
        elif m := _LAYER_RE.match(tok):
            layers.append(LayerSpec(ffn=int(m.group(1)), heads=int(m.group(2))))
        else:
            raise MatryoshkaError(
                f"bad layer {i} {tok!r} in spec {text!r}: use a size name ({', '.join(cfg.sizes)}) or f<ffn>h<heads>"
            )
    if width_part:
        if width_part in cfg.sizes:
            width = size_extent(cfg, width_part)[0]
        elif re.fullmatch(r"d\d+", width_part):
            width = int(width_part[1:])
        else:
            raise MatryoshkaError(f"bad width {width_part!r} in spec {text!r}: use @<size name> or @d<int>")
    else:
        width = max(widths) if widths else cfg.d_model
    spec = SubmodelSpec(width=width, layers=tuple(layers))
    validate_spec(cfg, spec)
    return _with_name(cfg, spec)


def _named_layer(cfg: ModelConfig, size: str, i: int) -> LayerSpec:
    # a named size applied at layer i (even if that size is shallower than i)
    hf, ff = cfg.fraction(size, "heads"), cfg.fraction(size, "ffn")
    return LayerSpec(
        ffn=_scaled(cfg.layer_ffn[i], ff, "ffn", size), heads=_scaled(cfg.layer_heads[i], hf, "heads", size)
    )


def _with_name(cfg: ModelConfig, spec: SubmodelSpec) -> SubmodelSpec:
    for name in cfg.sizes:
        try:
            if size_extent(cfg, name) != (spec.width, spec.depth):  # cheap: most sizes differ here
                continue
            u = uniform_spec(cfg, name)
        except MatryoshkaError:
            continue
        if (u.width, u.layers) == (spec.width, spec.layers):
            return u
    return spec


def validate_spec(cfg: ModelConfig, spec: SubmodelSpec) -> None:
    """Check a spec fits the model: prefixes no larger than the model, whole GQA groups, nested axes only."""
    if not 1 <= spec.width <= cfg.d_model:
        raise MatryoshkaError(f"width {spec.width} is outside 1..{cfg.d_model}")
    if spec.width != cfg.d_model and not cfg.nest_width:
        raise MatryoshkaError(f"width {spec.width}: this model was not trained with a nested residual width")
    if not 1 <= spec.depth <= cfg.n_layers:
        raise MatryoshkaError(f"depth {spec.depth} is outside 1..{cfg.n_layers}")
    if spec.depth != cfg.n_layers and not cfg.nest_depth:
        raise MatryoshkaError(f"depth {spec.depth}: this model was not trained with nested depth")
    for i, layer in enumerate(spec.layers):
        f_max, h_max = cfg.layer_ffn[i], cfg.layer_heads[i]
        if not 1 <= layer.ffn <= f_max:
            raise MatryoshkaError(f"layer {i}: ffn {layer.ffn} is outside 1..{f_max}")
        if layer.ffn != f_max and not cfg.nest_ffn:
            raise MatryoshkaError(f"layer {i}: ffn {layer.ffn}: this model was not trained with a nested FFN")
        if not 1 <= layer.heads <= h_max or not whole_groups(layer.heads, cfg.group_size):
            raise MatryoshkaError(
                f"layer {i}: heads {layer.heads} must be a multiple of the GQA group {cfg.group_size} in 1..{h_max}"
            )
        if layer.heads != h_max and not cfg.nest_heads:
            raise MatryoshkaError(f"layer {i}: heads {layer.heads}: this model was not trained with nested heads")


def format_spec(spec: SubmodelSpec) -> str:
    """Canonical string form; parse_spec(cfg, format_spec(s)) == s."""
    bits = "" if spec.bits is None else f"@int{spec.bits}"
    if spec.name:
        return spec.name + bits
    return ",".join(f"f{l.ffn}h{l.heads}" for l in spec.layers) + f"@d{spec.width}" + bits


def count_params(cfg: ModelConfig, spec: SubmodelSpec) -> dict[str, int]:
    """Parameters the submodel uses: total, embedding (token table + untied head) and non-embedding."""
    sizes = {name: math.prod(shape) for name, shape in model_shapes(cfg, spec).items()}
    emb = sizes.pop("tok_emb.weight") + sizes.pop("lm_head.weight", 0)
    body = sum(sizes.values())
    return {"total": body + emb, "embedding": emb, "non_embedding": body}


def flops_per_token(cfg: ModelConfig, spec: SubmodelSpec, context: int | None = None) -> int:
    """Forward FLOPs per token: 2 per matmul weight (incl. the LM head) plus attention scores and values
    over an average context of `context`/2 tokens (default: max_seq_len)."""
    context = cfg.max_seq_len if context is None else context
    p = count_params(cfg, spec)
    matmul = p["non_embedding"] - _norm_params(spec) + cfg.vocab_size * spec.width
    attn = sum(2 * 2 * layer.heads * cfg.head_dim * (context / 2) for layer in spec.layers)
    return int(2 * matmul + attn)


def _norm_params(spec: SubmodelSpec) -> int:
    """Norm weights are not matmul weights."""
    return spec.width * (2 * spec.depth + 1)
