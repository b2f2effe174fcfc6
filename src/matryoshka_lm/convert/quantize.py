"""`matryoshka quantize`: a checkpoint's weights stored once as int8 codes (core/quant.py) whose top bits are
every narrower model, and the codes of one cell (size x bits) for extraction."""

from __future__ import annotations

import shutil
from pathlib import Path

from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.chat import copy_chat
from matryoshka_lm.errors import MatryoshkaError

from .extract import staged_dir, stored_codes


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
        copy_chat(ckpt, tmp)
        ck.save_quantized(tmp, cfg, qstate, qcfg, bits, tcfg, trained=ck.trained_sizes(ckpt, cfg))
    return Path(out)
