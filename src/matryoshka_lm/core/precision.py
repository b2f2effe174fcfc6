"""Precision, a handler applied to an ordinary model (as gpt-fast's quantize handlers or torchtitan's
parallelize(model)): how its weights are held, and the model that computes a cell at another bit width.

A model holds one `Precision`: full precision (native_bits None), or the dequantized weights of int codes stored at
`code_bits` bits (a quantized checkpoint keeps its codes, so the narrower widths are their top bits). Every path that
needs codes (another bit width, packed kernels, GGUF, extraction) takes them from `codes_of`, the one place that
quantizes a model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from matryoshka_lm.errors import MatryoshkaError

from . import quant
from .nested import CODE_BITS

# model.py imports this module, so the model is typed by what this module reads of it (imports point one way)
Model = torch.nn.Module


@dataclass
class Precision:
    native_bits: int | None = None  # the loaded weights' bit width; None: full precision
    quant: quant.QuantConfig = field(default_factory=quant.QuantConfig)  # how other widths are quantized
    codes: dict[str, torch.Tensor] | None = None  # the stored codes, when loaded from a quantized checkpoint
    code_bits: int = CODE_BITS  # the width of the stored codes (an extracted r-bit cell stores r)
    # r-bit models built from these weights: {bits: (the weights' identity and versions, model)}
    built: dict[int, tuple[tuple, Model]] = field(default_factory=dict, repr=False)


def attach_codes(model: Model, codes: dict[str, torch.Tensor], qcfg: quant.QuantConfig, bits: int) -> None:
    """The model now holds the dequantized weights of `codes` (stored at `bits`) and keeps the codes."""
    model.precision = Precision(native_bits=bits, quant=qcfg, codes=codes, code_bits=bits)


def codes_of(model: Model) -> tuple[dict[str, torch.Tensor], int]:
    """The model's codes and their width: a quantized checkpoint's own, else round-to-nearest int8 of its weights."""
    p = model.precision
    if p.codes is not None:
        return p.codes, p.code_bits
    if p.native_bits is not None:
        raise MatryoshkaError(f"this int{p.native_bits} model has no codes to compute other bit widths from")
    with torch.no_grad():
        return quant.quantize_state(model.state_dict(), p.quant), CODE_BITS


def check_bits(model: Model, bits: int | None) -> None:
    """Whether `model` can compute at `bits` (MatryoshkaError naming why not)."""
    p = model.precision
    if bits is None or bits == p.native_bits:
        return
    quant.check_bits(bits)
    if p.native_bits is not None and p.codes is None:
        raise MatryoshkaError(f"this int{p.native_bits} model has no codes to compute at int{bits} from")
    if p.codes is not None and bits > p.code_bits:
        raise MatryoshkaError(f"the weights are stored at int{p.code_bits}: int{bits} is not available")


def at_bits(model: Model, bits: int | None) -> Model:
    """The model that computes at `bits` (None or the loaded precision: `model` itself), built once from the codes
    and rebuilt when the weights change. It shares the RoPE tables and holds dequantized fp32 weights."""
    p = model.precision
    if bits is None or bits == p.native_bits:
        return model
    check_bits(model, bits)
    key = tuple((t.data_ptr(), t._version) for t in model.parameters())
    hit = p.built.get(bits)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        codes, stored = codes_of(model)
        state = quant.dequantize_state(codes, p.quant, bits, stored)
        with torch.device("meta"):
            sib = type(model)(model.cfg, rope=(model.rope_cos, model.rope_sin), init=False)
        sib.load_state_dict({k: v.to(model.rope_cos.device) for k, v in state.items()}, assign=True)
    sib.precision = Precision(native_bits=bits, quant=p.quant)
    sib.requires_grad_(False).train(model.training)
    p.built[bits] = (key, sib)
    return sib
