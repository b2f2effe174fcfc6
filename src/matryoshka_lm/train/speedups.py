"""Throughput options of a training run, each the same math as the plain path (tests compare the losses):
activation checkpointing, torch.compile of the blocks, the fused AdamW kernel."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from matryoshka_lm.config import TrainConfig
from matryoshka_lm.core.model import MatryoshkaLM


def use_fused_adamw(tcfg: TrainConfig, device: str) -> bool:
    """auto: on CUDA (one kernel for every parameter); CPU has a fused kernel too, asked for with "on"."""
    return tcfg.fused_adamw == "on" or (tcfg.fused_adamw == "auto" and device.startswith("cuda"))


def apply_speedups(model: MatryoshkaLM, tcfg: TrainConfig) -> None:
    """Before parallelize(): wrap each block's forward in place, so names, state dicts and checkpoints are the
    plain model's. Checkpointing inside compile: the recomputation is part of each block's compiled graph."""
    for block in model.layers:
        forward = block.forward
        if tcfg.checkpointing:
            # non-reentrant: works with keyword-free calls of non-tensor args (specs, caches) and under DDP/FSDP
            forward = partial(checkpoint, forward, use_reentrant=False)
        if tcfg.compile:
            forward = torch.compile(forward, dynamic=False)
        block.forward = forward
