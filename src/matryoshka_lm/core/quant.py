"""Weight-only quantization whose precisions nest (Matryoshka Quantization, Nair et al. 2025).

Every quantized weight W (out, in) is stored once, as int8 codes with one scale per group of `group_size`
consecutive input features of a row (0: one scale per output row):

    s = fp16(max |W_group| / 127)           round-to-nearest int8:  q = clamp(round(W / s), -128, 127)
    at r bits (nested.top_bits):            t = q >> (8 - r)        (the r most significant bits of q)
    dequantized (nested.bit_levels):        W_r = s * (2^(8-r) * t + (2^(8-r) - 1) / 2)

so int8 reads W_8 = s*q and every narrower width reads the mean of the int8 levels under its code: for the
codes of a round-to-nearest model that is round-to-nearest on the r-bit grid. MatQuant's paper rounds the code
instead (clamp(round(q / 2^(8-r))) * 2^(8-r)): its levels include 0 but the top one is clamped away (at int2 it
keeps -128, -64, 0, 64 of 127); ours keep the bits exactly and use all 2^r levels symmetrically.

The default group of 32 is what GGUF's Q8_0/Q4_1 blocks use (export writes our codes as they are) and what
keeps int4/int2 usable: one scale per row spreads 4 levels over a whole row's outliers.
Quantized: every linear layer; the token embedding (and the untied LM head) only with embeddings=True.
Norm gains stay fp32. Training sees the quantizer through a straight-through estimator (fake_quant).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.errors import MatryoshkaError

from .nested import (
    BIT_WIDTHS,
    CODE_BITS,
    LAYER_WEIGHTS,
    PLANE_BITS,
    SpecShape,
    bit_levels,
    layer_shapes,
    planes_read,
    slice_quantized,
    top_bits,
)

SCALE = ".scale"  # state-dict suffix of a quantized weight's scales (the codes keep the weight's own name)
LINEAR = LAYER_WEIGHTS
EMBEDDINGS = ("tok_emb.weight", "lm_head.weight")


@dataclass(frozen=True)
class QuantConfig:
    group_size: int = 32  # input features per scale; 0 = one scale per output row
    embeddings: bool = False  # also quantize the token embedding (and an untied LM head)

    def __post_init__(self) -> None:
        if self.group_size < 0:
            raise MatryoshkaError(f"group_size must be >= 0 (0 = per output row), got {self.group_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        unknown = set(d) - {"group_size", "embeddings"}
        if unknown:
            raise MatryoshkaError(f"unknown quantization settings {sorted(unknown)}")
        return cls(**d)


def check_bits(bits: int) -> int:
    if bits not in BIT_WIDTHS:
        raise MatryoshkaError(
            f"bit width {bits} is not supported: weights are int8 codes whose top 2..8 bits are the narrower models"
        )
    return bits


def is_quantized(name: str, qcfg: QuantConfig) -> bool:
    """Whether the state-dict entry `name` is quantized under `qcfg`."""
    if name in EMBEDDINGS:
        return qcfg.embeddings
    return name.endswith(".weight") and any(name.endswith(f"{lin}.weight") for lin in LINEAR)


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """(out, in) -> (out, in/group, group); group 0 = the whole row."""
    out, n_in = w.shape
    g = group or n_in
    if n_in % g:
        raise MatryoshkaError(f"a weight with {n_in} input features does not split into groups of {g}")
    return w.reshape(out, n_in // g, g)


def scales_of(w: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group scales (out, in/group): absmax / 127, stored as fp16 (as GGUF stores them), never 0."""
    amax = _grouped(w.detach().float(), group).abs().amax(-1)
    s = (amax / 127).to(torch.float16).float()
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int8: (codes int8 (out, in), scales fp32 (out, in/group))."""
    s = scales_of(w, group)
    q = torch.round(_grouped(w.detach().float(), group) / s[..., None]).clamp(-128, 127)
    return q.reshape(w.shape).to(torch.int8), s


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, group: int, bits: int = CODE_BITS, stored: int = CODE_BITS
) -> torch.Tensor:
    """W_r = s * level(top r bits of the codes), fp32, shaped like the codes (a column prefix of a quantized
    weight may end inside a group: its scales are those of the groups its columns fall in). `stored`: the codes'
    own width (an extracted r-bit cell stores only its top bits; the top bits of those are the narrower cells)."""
    if bits > stored:
        raise MatryoshkaError(f"weights stored at int{stored} cannot be read at int{bits}")
    n_in = codes.shape[1]
    # codes of width `stored` shifted right by stored - bits: the top bits of the top bits
    levels = bit_levels(top_bits(codes, bits, stored), bits)
    return levels * scales.repeat_interleave(group or n_in, dim=1)[:, :n_in]


def fake_quant(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """`w` as its r-bit model computes with it, with the straight-through estimator: the forward value is
    dequantize(top r bits of quantize(w)); the gradient passes to `w` unchanged (no code is clamped: the
    scale covers every weight of its group)."""
    codes, s = quantize(w, group)
    return w + (dequantize(codes, s, group, bits).to(w.dtype) - w).detach()


def quantize_state(state: dict[str, torch.Tensor], qcfg: QuantConfig) -> dict[str, torch.Tensor]:
    """A model's weights as stored quantized: codes (int8) under the weight's name plus NAME.scale; the rest
    unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        if is_quantized(name, qcfg):
            out[name], out[name + SCALE] = quantize(w, qcfg.group_size)
        else:
            out[name] = w
    return out


def dequantize_state(
    qstate: dict[str, torch.Tensor], qcfg: QuantConfig, bits: int, stored: int = CODE_BITS
) -> dict[str, torch.Tensor]:
    """The fp32 weights of the r-bit model from stored codes and scales."""
    out: dict[str, torch.Tensor] = {}
    for name, t in qstate.items():
        if name.endswith(SCALE):
            continue
        out[name] = dequantize(t, qstate[name + SCALE], qcfg.group_size, bits, stored) if name + SCALE in qstate else t
    return out


def slice_qstate(qstate: dict[str, torch.Tensor], cfg: ModelConfig, spec: SpecShape) -> dict[str, torch.Tensor]:
    """The codes and scales a submodel reads (views), named as in a standalone model: each weight's prefix
    (nested.slice_views) and the scales of its rows and of the groups its columns fall in."""
    codes = {k: v for k, v in qstate.items() if not k.endswith(SCALE)}
    scales = {k.removesuffix(SCALE): v for k, v in qstate.items() if k.endswith(SCALE)}
    out, sliced = slice_quantized(codes, scales, cfg, spec)
    return {**out, **{name + SCALE: s for name, s in sliced.items()}}


def fake_quant_params(params: dict[str, torch.Tensor], bits: int, qcfg: QuantConfig) -> dict[str, torch.Tensor]:
    """Every quantized parameter replaced by fake_quant(param) (for torch.func.functional_call in training)."""
    return {n: fake_quant(p, bits, qcfg.group_size) for n, p in params.items() if is_quantized(n, qcfg)}


def check_groups(cfg: ModelConfig, qcfg: QuantConfig) -> None:
    """Every quantized weight's input width divides into groups (the error names the first that does not)."""
    g = qcfg.group_size
    if not g:
        return
    for what, n_in in (("d_model", cfg.d_model), ("n_heads * head_dim", min(cfg.layer_heads) * cfg.head_dim)):
        if n_in % g:
            raise MatryoshkaError(f"{what} = {n_in} does not split into quantization groups of {g}; choose another")
    for i, f in enumerate(cfg.layer_ffn):
        if f % g:
            raise MatryoshkaError(f"layer {i}: ffn_dim = {f} does not split into quantization groups of {g}")


def weight_bytes(cfg: ModelConfig, spec: SpecShape, bits: int | None, qcfg: QuantConfig) -> int:
    """Bytes of weights a cell reads: its bit-planes (core/planes.py: r bits read ceil(r/2) planes of 2 bits) and
    fp16 scales for the quantized weights, fp32 for the rest; `bits` None = fp32 throughout."""
    C = spec.width
    read_bits = None if bits is None else PLANE_BITS * planes_read(bits)  # odd widths read their top planes whole

    def mat(rows: int, cols: int, quantized: bool) -> float:
        if bits is None or not quantized:
            return 4.0 * rows * cols
        per_row = (cols + (qcfg.group_size or cols) - 1) // (qcfg.group_size or cols)
        return rows * cols * read_bits / 8 + 2.0 * rows * per_row

    total = 4.0 * C * (2 * len(spec.layers) + 1)  # norms
    for layer in spec.layers:
        total += sum(mat(r, c, True) for r, c in layer_shapes(cfg, layer, C).values())
    total += mat(cfg.vocab_size, C, qcfg.embeddings) * (1 if cfg.tie_embeddings else 2)
    return int(total)
