"""`matryoshka quantize`: a checkpoint's weights stored once as int8 codes (core/quant.py) whose top bits are
every narrower model, and the codes of one cell (size x bits) for extraction."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import quant
from matryoshka_lm.core.nested import CODE_BITS
from matryoshka_lm.core.spec import SubmodelSpec
from matryoshka_lm.errors import MatryoshkaError

from .extract import check_shapes, staged_dir


def stored_codes(ckpt: Path, group_size: int | None = None, embeddings: bool = False):
    """(codes and scales, their QuantConfig, their bit width) of a checkpoint: as stored when it is quantized,
    else round-to-nearest int8 of its weights with `group_size` (default: the training run's, else 32)."""
    cfg, tcfg = ck.read_config(ckpt)
    state = ck.load_tensors(ckpt / ck.WEIGHTS)
    q = ck.read_quant(ckpt)
    if q is not None:
        qcfg, bits = q
        if group_size is not None and group_size != qcfg.group_size:
            raise MatryoshkaError(f"{ckpt} is already quantized with groups of {qcfg.group_size}, not {group_size}")
        return state, qcfg, bits
    check_shapes(cfg, state, ckpt / ck.WEIGHTS)
    if group_size is None:
        group_size = tcfg.quant_group if tcfg is not None else quant.QuantConfig().group_size
    qcfg = quant.QuantConfig(group_size=group_size, embeddings=embeddings)
    quant.check_groups(cfg, qcfg)
    return quant.quantize_state(state, qcfg), qcfg, CODE_BITS


def cell_codes(
    qstate: dict[str, torch.Tensor], qcfg: quant.QuantConfig, stored: int, cfg: ModelConfig, spec: SubmodelSpec
) -> tuple[dict[str, torch.Tensor], int]:
    """The codes a standalone model of `spec` stores, and their width: its slice of the codes, kept to the
    spec's top bits when it names fewer bits than are stored."""
    bits = spec.bits or stored
    quant.check_bits(bits)
    if bits > stored:
        raise MatryoshkaError(f"the checkpoint stores int{stored} codes; int{bits} cannot be extracted from them")
    out = {}
    for name, t in quant.slice_qstate(qstate, cfg, spec.shape).items():
        if t.dtype == torch.int8 and not name.endswith(quant.SCALE):
            t = t >> (stored - bits)  # the top bits of the stored codes
        out[name] = t.contiguous().clone()
    return out, bits


def quantize_checkpoint(
    ckpt: str | Path, out: str | Path, group_size: int | None = None, embeddings: bool = False, force: bool = False
) -> Path:
    """Write `ckpt` as a quantized checkpoint in `out`: int8 codes + fp16-valued scales (round-to-nearest of
    the weights, which for a model trained with --bits is exactly what its training saw)."""
    ckpt = Path(ckpt)
    cfg, tcfg = ck.read_config(ckpt)
    if ck.read_quant(ckpt) is not None:
        raise MatryoshkaError(f"{ckpt} is already quantized")
    qstate, qcfg, bits = stored_codes(ckpt, group_size, embeddings)
    with staged_dir(out, force, source=ckpt) as tmp:
        shutil.copyfile(ckpt / ck.TOKENIZER, tmp / ck.TOKENIZER)
        ck.save_quantized(tmp, cfg, qstate, qcfg, bits, tcfg)
    return Path(out)
