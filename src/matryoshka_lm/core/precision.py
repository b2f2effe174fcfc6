"""Precision, a handler applied to an ordinary model (as gpt-fast's quantize handlers or torchtitan's
parallelize(model)): how its weights are held, and where a cell at some bit width reads them.

A model holds one `Precision`. Full precision (native_bits None): fp32 weights; a cell at r bits reads the
round-to-nearest int8 codes of those weights, built once as bit-planes (core/planes.py) and rebuilt when the
weights change. A quantized checkpoint (native_bits = its stored width): the planes *are* the weights — every
quantized linear (and the token table, when quantized) is held once as planes and its fp32 parameter is left on
the meta device, so each bit width and size reads the same resident bytes. Every path that needs codes (GGUF,
extraction, export) takes them from `codes_of`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from matryoshka_lm.errors import MatryoshkaError

from . import nested, quant
from .nested import CODE_BITS
from .planes import Planes

# model.py imports this module, so the model is typed by what this module reads of it (imports point one way)
Model = torch.nn.Module


@dataclass
class Precision:
    native_bits: int | None = None  # the loaded weights' bit width; None: full precision
    quant: quant.QuantConfig = field(default_factory=quant.QuantConfig)  # how other widths are quantized
    code_bits: int = CODE_BITS  # the width of the stored codes (an extracted r-bit cell stores r)
    stored: bool = False  # the planes are the weights (a quantized checkpoint); False: built from fp32 weights
    planes_key: tuple | None = field(default=None, repr=False)  # the fp32 weights the planes were built from
    frozen: bool = False  # a view model: its planes are its parent's, never rebuilt here

    @property
    def has_codes(self) -> bool:
        return self.stored


def _module(model: Model, name: str) -> torch.nn.Module:
    return model.get_submodule(name.removesuffix(".weight"))


def hold_planes(model: Model, qstate: dict[str, torch.Tensor], qcfg: quant.QuantConfig, stored: int = CODE_BITS) -> int:
    """Build the planes of every quantized weight in `qstate` (codes at `stored` bits + NAME.scale) and attach each
    to its module (module.planes); returns their bytes."""
    total = 0
    for name, t in qstate.items():
        if name + quant.SCALE in qstate:
            p = Planes(nested.widen_codes(t, stored), qstate[name + quant.SCALE], qcfg.group_size).to(t.device)
            mod, old = _module(model, name), getattr(_module(model, name), "planes", None)
            if isinstance(old, Planes) and old.planes.shape == p.planes.shape:  # in place: view models share it
                old.planes.copy_(p.planes)
                old.scales.copy_(p.scales)
                p = old
            mod.planes = p
            total += p.nbytes()
    return total


def attach_codes(model: Model, qstate: dict[str, torch.Tensor], qcfg: quant.QuantConfig, bits: int) -> None:
    """The model now holds the codes of `qstate` (stored at `bits`) as planes, and no fp32 copy of those weights
    (their parameters move to the meta device); the other tensors are loaded as they are."""
    hold_planes(model, qstate, qcfg, bits)
    for name, t in qstate.items():
        if name.endswith(quant.SCALE):
            continue
        mod, attr = _module(model, name), name.rpartition(".")[2]
        if name + quant.SCALE in qstate:
            value = torch.empty(t.shape, device="meta")
        else:
            value = t
        setattr(mod, attr, torch.nn.Parameter(value, requires_grad=False))
    model.precision = Precision(native_bits=bits, quant=qcfg, code_bits=bits, stored=True)


def _key(model: Model) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in model.parameters())


def ensure_planes(model: Model) -> None:
    """Planes for every quantized weight (a full-precision model's: round-to-nearest of its current weights)."""
    p = model.precision
    if p.stored or p.frozen or torch.compiler.is_compiling():
        return
    key = _key(model)
    if p.planes_key == key:
        return
    with torch.no_grad():
        hold_planes(model, quant.quantize_state(model.state_dict(), p.quant), p.quant)
    p.planes_key = key


def codes_of(model: Model) -> tuple[dict[str, torch.Tensor], int]:
    """The model's quantized state (codes + NAME.scale, other tensors as they are) and the codes' width: a
    quantized checkpoint's own (read back from its planes, exactly), else round-to-nearest int8 of its weights."""
    p = model.precision
    if not p.stored:
        if p.native_bits is not None:
            raise MatryoshkaError(f"this int{p.native_bits} model has no codes to compute other bit widths from")
        with torch.no_grad():
            return quant.quantize_state(model.state_dict(), p.quant), CODE_BITS
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        planes = getattr(_module(model, name), "planes", None) if name.endswith(".weight") else None
        if isinstance(planes, Planes):
            q8, out[name + quant.SCALE] = planes.codes()
            out[name] = nested.top_bits(q8, p.code_bits).to(torch.int8)
        else:
            out[name] = t
    return out, p.code_bits


def dense_state(model: Model) -> dict[str, torch.Tensor]:
    """fp32 weights as the model computes with them at its own precision (dequantized codes for a quantized
    checkpoint): for consumers that need plain weights, e.g. a Hugging Face export."""
    p = model.precision
    if not p.stored:
        return model.state_dict()
    codes, stored = codes_of(model)
    return quant.dequantize_state(codes, p.quant, p.native_bits, stored)


def check_bits(model: Model, bits: int | None) -> None:
    """Whether `model` can compute at `bits` (MatryoshkaError naming why not)."""
    p = model.precision
    if bits is None or bits == p.native_bits:
        return
    quant.check_bits(bits)
    if p.native_bits is not None and not p.stored:
        raise MatryoshkaError(f"this int{p.native_bits} model has no codes to compute at int{bits} from")
    if p.stored and bits > p.code_bits:
        raise MatryoshkaError(f"the weights are stored at int{p.code_bits}: int{bits} is not available")


def resident_bytes(model: Model) -> dict[str, int]:
    """Bytes the model holds, by kind: planes (codes + scales) and real (non-meta) parameters and buffers."""
    planes = {id(m.planes): m.planes for m in model.modules() if isinstance(getattr(m, "planes", None), Planes)}
    dense = sum(t.nbytes for t in model.parameters() if t.device.type != "meta")
    bufs = sum(t.nbytes for n, t in model.named_buffers() if ".planes." not in f".{n}" and "planes" not in n)
    return {"planes": sum(p.nbytes() for p in planes.values()), "parameters": dense, "buffers": bufs}
