"""What a resumed run trains with: the saved settings, plus the changes the user asked for that may change.

May change on resume (applied from the checkpoint's step on, and logged):
  steps (the cosine schedule then decays over the new total from there on), eval_every, save_every,
  eval_batches; lr, min_lr_ratio, warmup_steps, grad_clip (set afresh every step); grad_accum (the same global
  batch, split differently); dtype (autocast only: weights and optimizer state stay fp32); fsdp (the state is
  saved unsharded); checkpointing, compile and fused_adamw (the same math, computed differently).
Refused (MatryoshkaError, one line naming each setting with its saved and given values): everything else, i.e.
  what fixes the data stream (data, prepare_text, max_corpus_chars, vocab_size, val_fraction, seq_len,
  batch_size, seed), the model and objective (sizes, only, size_weights, sample_sizes, distill, any model config
  field such as nest_width), and the Adam hyperparameters already folded into the saved moments (weight_decay,
  beta1, beta2).
A setting added to TrainConfig later is refused until it is listed in RESUMABLE.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.errors import MatryoshkaError

from .state import saved_step

log = logging.getLogger(__name__)

RESUMABLE = frozenset(
    {
        "steps",
        "eval_every",
        "save_every",
        "eval_batches",
        "lr",
        "min_lr_ratio",
        "warmup_steps",
        "grad_clip",
        "grad_accum",
        "dtype",
        "fsdp",
        "checkpointing",
        "compile",
        "fused_adamw",
    }
)
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


def given_changes(
    saved: TrainConfig, tcfg: TrainConfig, changes: dict[str, Any] | None, data: str | None
) -> dict[str, Any]:
    """The settings the caller asked for: `changes` without its None (= not given) values, or, when `changes`
    is None, every field where `tcfg` differs from the saved config (tcfg.data=None meaning "not given")."""
    if changes is None:
        asked = {k: getattr(tcfg, k) for k in sorted(TRAIN_FIELDS) if getattr(tcfg, k) != getattr(saved, k)}
        if tcfg.data is None:
            asked.pop("data", None)
    else:
        asked = {k: v for k, v in changes.items() if v is not None}
    if data is not None:
        asked["data"] = str(data)
    unknown = sorted(set(asked) - TRAIN_FIELDS - MODEL_FIELDS)
    if unknown:
        raise MatryoshkaError(f"unknown training settings {unknown}")
    return asked


def _same(key: str, saved: Any, given: Any) -> bool:
    if key == "data" and saved is not None and given is not None:
        return Path(saved).resolve() == Path(given).resolve()
    return saved == given


def resume_settings(
    out: Path, tcfg: TrainConfig, changes: dict[str, Any] | None = None, data: str | None = None
) -> tuple[ModelConfig, TrainConfig, int]:
    """(model config, train config, step) to resume the run in `out` with; see the module docstring."""
    model_cfg, saved = ck.read_config(out)
    saved = saved or tcfg  # a state without train settings: take the caller's
    step = saved_step(out)
    asked = given_changes(saved, tcfg, changes, data)
    refused, applied = [], {}
    for key, value in sorted(asked.items()):
        old = getattr(saved if key in TRAIN_FIELDS else model_cfg, key)  # vocab_size: the BPE target
        if _same(key, old, value):
            continue
        if key in RESUMABLE:
            applied[key] = value
        else:
            refused.append(f"{key} (saved {old!r}, given {value!r})")
    if refused:
        raise MatryoshkaError(
            f"cannot resume {out} with a different {', '.join(refused)}: these cannot change "
            "mid-run; start a new run in a new --out"
        )
    merged = dataclasses.replace(saved, **applied)  # re-validates (e.g. batch_size % grad_accum)
    if merged.steps <= step:
        raise MatryoshkaError(
            f"nothing to resume: {out} is already at step {step} and steps={merged.steps}; "
            f"pass steps greater than {step} to train further"
        )
    for key, value in applied.items():
        log.info("resume %s: %s %r -> %r", out, key, getattr(saved, key), value)
    return model_cfg, merged, step
