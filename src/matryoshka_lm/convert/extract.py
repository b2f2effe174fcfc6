"""Extraction: one size of a Matryoshka checkpoint as a standalone dense checkpoint holding only its weights.

The sliced weights come from nested.slice_state_dict and the shape from nested.submodel_config, so the
extracted model is the same MatryoshkaLM class with a smaller (possibly per-layer) config, and its logits
equal the elastic execution of the spec inside the full model.

Every command that writes a directory writes it into a temporary sibling and renames it into place at the
end (`staged_dir`): a failure or Ctrl-C leaves no half-written output.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import nested, quant
from matryoshka_lm.core.chat import copy_chat
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.nested import CODE_BITS, slice_state_dict, submodel_config
from matryoshka_lm.core.spec import SubmodelSpec, count_params, format_spec, parse_spec
from matryoshka_lm.errors import MatryoshkaError

log = logging.getLogger(__name__)


@contextmanager
def staged_dir(target: str | Path, force: bool = False, source: str | Path | None = None) -> Iterator[Path]:
    """Yield an empty temp dir beside `target`; when the block succeeds, rename it to `target`.

    An existing `target` is refused unless `force` (then it is replaced only after the new one is complete).
    `source`, if given, is an input that `target` must not be (so --force cannot overwrite what it reads).
    """
    target = Path(target)
    if source is not None and target.resolve() == Path(source).resolve():
        raise MatryoshkaError(f"output {target} is the input; pick another output directory")
    if target.exists() and not force:
        raise MatryoshkaError(f"output {target} already exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary directory
    try:
        yield tmp
        if target.exists():  # --force: swap in the finished directory, then drop the old one
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sliced_checkpoint(
    ckpt: str | Path, size: str
) -> tuple[ModelConfig, SubmodelSpec, ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint and slice out `size`: (full config, spec, standalone config, standalone weights)."""
    ckpt = Path(ckpt)
    cfg, _ = ck.read_config(ckpt)
    spec = parse_spec(cfg, size)  # a bad spec fails before the weights are read
    state = ck.load_tensors(ckpt / ck.WEIGHTS)
    check_shapes(cfg, state, ckpt / ck.WEIGHTS)
    return cfg, spec, submodel_config(cfg, spec), slice_state_dict(state, cfg, spec)


def check_shapes(cfg: ModelConfig, state: dict[str, torch.Tensor], where: Path) -> None:
    """Every weight the config implies is present with its shape (checked on the meta device: no memory)."""
    with torch.device("meta"):
        expected = MatryoshkaLM(cfg).state_dict()
    ck.check_state(expected, state, where)


def extract_submodel(ckpt: str | Path, size: str, out: str | Path, force: bool = False) -> Path:
    """Write `size` of the Matryoshka checkpoint `ckpt` as a standalone dense checkpoint in `out`.

    Args:
        ckpt: a Matryoshka checkpoint directory.
        size: a size name ("M") or a Mix'n'Match spec ("S,M,M,L", "f128h4,f256h4@d144").
        out: the new checkpoint directory; refused if it exists unless `force`.
        force: replace an existing `out`.
    Returns the path written. The result loads with checkpoint.load_model and runs with spec "XL" (its only size).
    A spec with a bit width ("M@int4"), or any spec of a quantized checkpoint, writes a quantized checkpoint
    holding the cell's codes only (convert/quantize.py).
    """
    ckpt = Path(ckpt)
    cfg, tcfg = ck.read_config(ckpt)
    tok_path = ckpt / ck.TOKENIZER
    if not tok_path.is_file():
        raise MatryoshkaError(f"missing tokenizer {tok_path}")
    if ck.read_quant(ckpt) is not None or parse_spec(cfg, size).bits is not None:
        return _extract_cell(ckpt, size, out, force)
    cfg, spec, sub_cfg, state = sliced_checkpoint(ckpt, size)
    n_params = sum(t.numel() for t in state.values())
    want = count_params(cfg, spec)["total"]
    if n_params != want:  # the invariant that defines extraction; a mismatch is a bug, not bad input
        raise AssertionError(f"extracted {n_params} parameters, the spec's formula says {want}")
    source = {"checkpoint": str(ckpt), "spec": format_spec(spec), "size": size, "params": n_params}
    train = _standalone_train_config(tcfg)
    with staged_dir(out, force, source=ckpt) as tmp:
        shutil.copyfile(tok_path, tmp / ck.TOKENIZER)
        copy_chat(ckpt, tmp)
        ck.save_tensors(tmp / ck.WEIGHTS, state, metadata={"format": "pt", "spec": format_spec(spec)})
        raw = {"model": sub_cfg.to_dict(), "train": train, "trained": _trained(ckpt, cfg, spec, sub_cfg)}
        ck.write_json(tmp / ck.CONFIG, {**raw, "extracted_from": source})
    log.info("extracted %s (%d params) from %s into %s", format_spec(spec), n_params, ckpt, out)
    return Path(out)


def _trained(ckpt: Path, cfg: ModelConfig, spec: SubmodelSpec, sub_cfg: ModelConfig) -> list[str]:
    """The standalone model's one size is a model if the source trained that size (a Mix'n'Match spec: if the
    source trained every size it mixes; conservatively, all of them)."""
    trained = set(ck.trained_sizes(ckpt, cfg))
    ok = spec.name in trained if spec.name else trained == set(cfg.sizes)
    return list(sub_cfg.sizes) if ok else []


def _standalone_train_config(tcfg: TrainConfig | None) -> dict | None:
    """Keep the data settings (so `eval` finds the same validation split); drop the size selection."""
    if tcfg is None:
        return None
    d = tcfg.to_dict()
    d.update(sizes=None, size_weights=None, only=None, sample_sizes=0)
    return d


def _extract_cell(ckpt: Path, size: str, out: str | Path, force: bool) -> Path:
    cfg, tcfg = ck.read_config(ckpt)
    spec = parse_spec(cfg, size)
    sub_cfg = submodel_config(cfg, spec)
    qstate, qcfg, stored = stored_codes(ckpt)
    try:
        quant.check_groups(sub_cfg, qcfg)
    except MatryoshkaError as e:
        raise MatryoshkaError(f"{format_spec(spec)} cuts quantization groups: {e}") from None
    codes, bits = cell_codes(qstate, qcfg, stored, cfg, spec)
    source = {"checkpoint": str(ckpt), "spec": format_spec(spec.at_bits(bits)), "size": size}
    with staged_dir(out, force, source=ckpt) as tmp:
        shutil.copyfile(ckpt / ck.TOKENIZER, tmp / ck.TOKENIZER)
        copy_chat(ckpt, tmp)
        ck.save_quantized(tmp, sub_cfg, codes, qcfg, bits)
        raw = {"model": sub_cfg.to_dict(), "train": _standalone_train_config(tcfg), "extracted_from": source}
        raw["trained"] = _trained(ckpt, cfg, spec, sub_cfg)
        ck.write_json(tmp / ck.CONFIG, {**raw, "quant": {**qcfg.to_dict(), "bits": bits}})
    log.info("extracted %s from %s into %s", source["spec"], ckpt, out)
    return Path(out)


# ---------------------------------------------------------------- quantized cells (size x bits)


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
            t = nested.top_bits(t, bits, stored)
        out[name] = t.contiguous().clone()
    return out, bits
