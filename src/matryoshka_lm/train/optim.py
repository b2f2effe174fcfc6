"""The optimizer and LR schedule every training loop shares (LM pre-training and both embedding trainers)."""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn

from matryoshka_lm.config import TrainConfig


class Schedule(Protocol):
    """What the schedule reads from a config (TrainConfig and EmbedTrainConfig both have these fields)."""

    steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float


def lr_at(step: int, cfg: Schedule) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at cfg.steps (step counts from 0).

    The decay depends on the total steps: a run extended on resume decays over its new length from there on.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    decay_matrices_only: bool = True,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW; with decay_matrices_only, norms and other vectors are not decayed (two parameter groups)."""
    if not decay_matrices_only:
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused_ok: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    return adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=fused_ok)
