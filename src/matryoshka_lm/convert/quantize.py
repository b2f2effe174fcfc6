"""`matryoshka quantize`: a checkpoint's weights stored once as int8 codes (core/quant.py) whose top bits are
every narrower model, and the codes of one cell (size x bits) for extraction."""

from __future__ import annotations

import shutil
from pathlib import Path

from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.chat import copy_chat
from matryoshka_lm.errors import MatryoshkaError

from .calibrate import REPORT, Calibration, calibrated_qstate
from .extract import staged_dir, stored_codes


def quantize_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    group_size: int | None = None,
    embeddings: bool = False,
    force: bool = False,
    calibrate: int | Calibration = 0,
    hessians: dict | None = None,
) -> Path:
    """Write `ckpt` as a quantized checkpoint in `out`: int8 codes + fp16-valued scales. Round-to-nearest of the
    weights by default (for a model trained with --bits, exactly what its training saw); `calibrate`: N windows
    (or a Calibration) of the corpus from which nested GPTQ chooses the linears' codes (convert/calibrate.py);
    `hessians`: that calibration's input_hessians, computed before (to compare settings on the same windows)."""
    ckpt = Path(ckpt)
    cfg, tcfg = ck.read_config(ckpt)
    if ck.read_quant(ckpt) is not None:
        raise MatryoshkaError(f"{ckpt} is already quantized")
    qstate, qcfg, bits = stored_codes(ckpt, group_size, embeddings)
    report = None
    if calibrate:
        cal = calibrate if isinstance(calibrate, Calibration) else Calibration(windows=calibrate)
        qstate, report = calibrated_qstate(ck.load_model(ckpt), ck.load_tokenizer(ckpt), qstate, qcfg, cal, hessians)
    with staged_dir(out, force, source=ckpt) as tmp:
        shutil.copyfile(ckpt / ck.TOKENIZER, tmp / ck.TOKENIZER)
        copy_chat(ckpt, tmp)
        ck.save_quantized(tmp, cfg, qstate, qcfg, bits, tcfg, trained=ck.trained_sizes(ckpt, cfg))
        if report is not None:
            ck.write_json(tmp / REPORT, report)
    return Path(out)
