"""The trainer state: weights, optimizer moments and step in ONE atomic safetensors file, plus the inference
checkpoint files beside it. Works with plain, DDP and FSDP2 models (full state dicts gathered to rank 0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from matryoshka_lm.config import TrainConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.data import unigram_loss, unigram_loss_of_counts
from matryoshka_lm.data.shards import is_prepared, prepared_counts
from matryoshka_lm.errors import MatryoshkaError


def save_state(
    out: Path, model: MatryoshkaLM, opt: torch.optim.Optimizer, step: int, tcfg: TrainConfig, tok_json: str, main: bool
) -> None:
    """Gather the full state (a collective: every rank calls this); rank 0 (`main`) writes it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return
    tensors = {f"model.{k}": v for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{fqn}.{k}"] = torch.as_tensor(v)
    meta = {"step": str(step), "param_groups": json.dumps(osd["param_groups"])}
    ck.save_tensors(out / ck.STATE, tensors, metadata=meta)
    # inference artifacts (each atomic); the resume state above is self-contained
    ck.atomic_write(out / ck.TOKENIZER, lambda tmp: Path(tmp).write_text(tok_json))
    ck.save_tensors(out / ck.WEIGHTS, msd)
    trained = ck.sizes_trained_by(model.cfg, tcfg)
    ck.write_json(out / ck.CONFIG, {"model": model.cfg.to_dict(), "train": tcfg.to_dict(), "trained": trained})


def saved_step(out: Path) -> int:
    """The step of out/trainer_state.safetensors."""
    from safetensors import safe_open

    path = out / ck.STATE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "step" not in meta:
        raise MatryoshkaError(f"{path} has no step: not a matryoshka-lm trainer state")
    return int(meta["step"])


def load_state(out: Path, model: MatryoshkaLM, opt: torch.optim.Optimizer) -> int:
    """Restore weights and optimizer state (LRs are set again every step); returns the saved step."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = out / ck.STATE
    step = saved_step(out)
    tensors = ck.load_tensors(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    msd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            fqn, _, name = k[6:].rpartition(".")
            state.setdefault(fqn, {})[name] = v
    osd = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    ck.load_state(model, msd, path)  # clear errors on shape mismatch before the generic loader runs
    set_state_dict(
        model, opt, model_state_dict=msd, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True)
    )
    return step


def trim_metrics(path: Path, upto: int) -> None:
    """On resume, drop logged steps after the checkpoint so the log has each step once."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= upto]
    ck.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))


def split_unigram_loss(train: np.ndarray, val: np.ndarray, vocab: int, data: str | Path | None = None) -> float:
    """The unigram baseline of a split: from the counts `prepare` wrote when `data` is a prepared folder (reading a
    whole memory-mapped corpus would pull every page of it into this process), else by counting now."""
    counts = prepared_counts(data) if is_prepared(data) else None
    return unigram_loss_of_counts(*counts, vocab) if counts is not None else unigram_loss(train, val, vocab)


def write_split_stats(out: Path, train: np.ndarray, val: np.ndarray, vocab: int, data: str | None = None) -> None:
    if (out / "data.json").exists():
        return
    loss = split_unigram_loss(train, val, vocab, data)
    ck.write_json(
        out / "data.json", {"train_tokens": int(len(train)), "val_tokens": int(len(val)), "unigram_loss": loss}
    )
