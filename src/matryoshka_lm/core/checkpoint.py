"""Checkpoints: weights in safetensors, config and tokenizer as JSON, every file written atomically.

A checkpoint directory holds
  config.json          {"model": ModelConfig, "train": TrainConfig}
  tokenizer.json       Hugging Face `tokenizers` BPE
  model.safetensors    the weights (all sizes share them); in a quantized checkpoint (config "quant" section:
                       group_size, embeddings, bits) int8 codes under each quantized weight's name plus
                       NAME.scale (core/quant.py), and every narrower bit width is read from their top bits
  trainer_state.safetensors  (training runs only) weights + optimizer moments + step, in ONE file so a resume
                       never sees weights and optimizer state from different steps
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from matryoshka_lm.config import ModelConfig, TrainConfig, load_json
from matryoshka_lm.errors import MatryoshkaError

from . import precision, quant
from .model import MatryoshkaLM, rope_tables

CONFIG, TOKENIZER, WEIGHTS, STATE = "config.json", "tokenizer.json", "model.safetensors", "trainer_state.safetensors"


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path), then rename over `path`: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MatryoshkaError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MatryoshkaError(f"corrupt weights file {path}: {e}") from None


def save_model(
    out: Path, model: MatryoshkaLM, train_cfg: TrainConfig | None = None, tokenizer_json: str | None = None
) -> None:
    out = Path(out)
    if tokenizer_json is not None:
        atomic_write(out / TOKENIZER, lambda tmp: Path(tmp).write_text(tokenizer_json))
    cfg = {"model": model.cfg.to_dict(), "train": train_cfg.to_dict() if train_cfg else None}
    save_tensors(out / WEIGHTS, model.state_dict())
    write_json(out / CONFIG, cfg)


def read_config(ckpt: Path) -> tuple[ModelConfig, TrainConfig | None]:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise MatryoshkaError(f"checkpoint {ckpt} does not exist (expected a directory with {CONFIG} and {WEIGHTS})")
    raw = load_json(ckpt / CONFIG)
    if not isinstance(raw, dict) or "model" not in raw:
        raise MatryoshkaError(f"{ckpt / CONFIG} is not a matryoshka-lm config (no 'model' section)")
    try:
        model_cfg = ModelConfig.from_dict(raw["model"])
        train_cfg = TrainConfig.from_dict(raw["train"]) if raw.get("train") else None
    except TypeError as e:
        raise MatryoshkaError(f"bad config in {ckpt / CONFIG}: {e}") from None
    return model_cfg, train_cfg


def trained_sizes(ckpt: str | Path, cfg: ModelConfig | None = None) -> list[str]:
    """The named sizes that are models: trained, or the pretrained model itself. config.json's "trained" when written
    (an import: the full size only, its slices are not models until fine-tuned; a fine-tune: the sizes it trained),
    else every size (checkpoints from before the field)."""
    raw = load_json(Path(ckpt) / CONFIG)
    cfg = cfg or read_config(Path(ckpt))[0]
    names = [n for n in cfg.sizes]
    if "trained" in raw and raw["trained"] is not None:
        return [n for n in names if n in set(raw["trained"])]
    return names


def sizes_trained_by(cfg: ModelConfig, tcfg: TrainConfig) -> list[str]:
    """What a run with `tcfg` trains, by name: --only's size, --sizes, or all of them."""
    if tcfg.only:
        return list(cfg.sizes)  # a dense baseline of one shape: its one size is the whole model
    return [n for n in cfg.sizes if not tcfg.sizes or n in tcfg.sizes]


def read_quant(ckpt: Path) -> tuple[quant.QuantConfig, int] | None:
    """(quantization settings, stored bit width) of a quantized checkpoint; None for a full-precision one."""
    raw = load_json(Path(ckpt) / CONFIG)
    q = raw.get("quant") if isinstance(raw, dict) else None
    if not q:
        return None
    q = dict(q)
    bits = q.pop("bits", 8)
    try:
        return quant.QuantConfig.from_dict(q), quant.check_bits(int(bits))
    except (TypeError, ValueError) as e:
        raise MatryoshkaError(f"bad quant section in {Path(ckpt) / CONFIG}: {e}") from None


def save_quantized(
    out: Path,
    cfg: ModelConfig,
    qstate: dict[str, torch.Tensor],
    qcfg: quant.QuantConfig,
    bits: int = 8,
    train_cfg: TrainConfig | None = None,
    tokenizer_json: str | None = None,
    trained: list[str] | None = None,
) -> None:
    """A quantized checkpoint: codes and scales (quant.quantize_state) stored at `bits`; `trained`: its sizes that
    are models (trained_sizes; None: all)."""
    out = Path(out)
    if tokenizer_json is not None:
        atomic_write(out / TOKENIZER, lambda tmp: Path(tmp).write_text(tokenizer_json))
    save_tensors(out / WEIGHTS, qstate)
    conf = {"model": cfg.to_dict(), "train": train_cfg.to_dict() if train_cfg else None, "trained": trained}
    write_json(out / CONFIG, {**conf, "quant": {**qcfg.to_dict(), "bits": bits}})


def load_model(ckpt: Path, device: str | torch.device = "cpu") -> MatryoshkaLM:
    """Build the model from config.json and load model.safetensors (strict: every key, every shape). A quantized
    checkpoint loads at its stored bit width, its codes held once as bit-planes that every narrower width and
    every size reads (precision.attach_codes): no fp32 copy of a quantized weight is made."""
    cfg, tcfg = read_config(ckpt)
    state = load_tensors(Path(ckpt) / WEIGHTS)
    q = read_quant(ckpt)
    if q is None:
        model = MatryoshkaLM(cfg, init=False)
    else:
        rope = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # for real; the weights come from the file
        with torch.device("meta"):
            model = MatryoshkaLM(cfg, rope=rope, init=False)
    if tcfg is not None:  # its cells quantize as its training did
        model.precision.quant = quant.QuantConfig(group_size=tcfg.quant_group)
    if q is None:
        load_state(model, state, Path(ckpt) / WEIGHTS)
        return model.to(device).eval()
    qcfg, bits = q
    expected = quant.quantize_state(model.state_dict(), qcfg)
    check_state(expected, state, Path(ckpt) / WEIGHTS)
    for k, v in expected.items():
        if v.dtype == torch.int8 and state[k].dtype != torch.int8:
            raise MatryoshkaError(f"{Path(ckpt) / WEIGHTS}: {k} should hold int8 codes, not {state[k].dtype}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise MatryoshkaError(f"{Path(ckpt) / WEIGHTS} has unexpected weights {extra[:3]}")
    precision.attach_codes(model, {k: state[k].to(device) for k in expected}, qcfg, bits)
    model.rope_cos, model.rope_sin = model.rope_cos.to(device), model.rope_sin.to(device)
    return model.eval()


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: Path) -> None:
    """Every expected weight is in `state` with its shape; the error names the first problem."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise MatryoshkaError(f"{where} lacks weights {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise MatryoshkaError(f"{where}: {k} has shape {tuple(state[k].shape)}, config says {tuple(v.shape)}")


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    check_state(expected, state, where)
    model.load_state_dict({k: state[k] for k in expected})


def load_tokenizer(ckpt: Path):
    from tokenizers import Tokenizer

    path = Path(ckpt) / TOKENIZER
    if not path.is_file():
        raise MatryoshkaError(f"missing tokenizer {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise MatryoshkaError(f"corrupt tokenizer {path}: {e}") from None
