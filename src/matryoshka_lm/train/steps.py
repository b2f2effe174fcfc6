"""One optimizer step, the same for every training loop: set the LR, accumulate gradients over micro-batches,
clip, step, zero. Plus the metrics log (a JSONL file and/or a per-step callback)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .optim import Schedule, lr_at, set_lr

# a micro-batch: runs the forward pass, returns (the loss to backpropagate, what to report, detached)
MicroStep = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def optimizer_step(
    opt: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    lr: float,
    micro_steps: Sequence[MicroStep],
    grad_clip: float,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (the mean of the micro-steps' reports, the gradient norm before clipping).

    Each micro-step's loss is scaled by 1/len(micro_steps), so the gradient is that of the mean loss.
    `no_sync` (DDP) skips the gradient all-reduce on every micro-step but the last.
    """
    set_lr(opt, lr)
    n = len(micro_steps)
    report: torch.Tensor | None = None
    for m, micro in enumerate(micro_steps):
        ctx = no_sync() if (no_sync is not None and m < n - 1) else nullcontext()
        with ctx, autocast():
            loss, rep = micro()
        with ctx:
            (loss / n).backward()
        report = (torch.zeros_like(rep) if report is None else report) + rep / n
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return report, grad_norm


@dataclass
class MetricsLog:
    """Per-step metrics to a JSONL file (when `path` is set and this process writes) and to a callback."""

    path: Path | None = None
    callback: Callable[[int, dict], None] | None = None
    writer: bool = True  # False on ranks other than 0

    def __call__(self, step: int, metrics: dict) -> None:
        if not self.writer:
            return
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if self.callback:
            self.callback(step, metrics)


def fit(
    opt: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    schedule: Schedule,
    micro_steps: Callable[[int], Sequence[MicroStep]],
    start: int = 0,
    after_step: Callable[[int, dict], bool] | None = None,
    report: Callable[[int, float, torch.Tensor, torch.Tensor], dict] | None = None,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> int:
    """The one training loop (LM, embedding and HF-encoder training): steps start..schedule.steps, each an
    optimizer_step over `micro_steps(step)` at lr_at(step). `report(step, lr, losses, grad_norm)` makes the step's
    metrics (default: loss and lr); `after_step(done, metrics)` logs, evaluates or saves them, and returning True
    stops the loop there. Returns the number of steps done."""
    done = start
    for step in range(start, schedule.steps):
        lr = lr_at(step, schedule)
        losses, grad_norm = optimizer_step(opt, params, lr, micro_steps(step), schedule.grad_clip, no_sync, autocast)
        done = step + 1
        metrics = report(step, lr, losses, grad_norm) if report else {"loss": losses.item(), "lr": lr}
        if after_step is not None and after_step(done, metrics):
            break
    return done


def whole_batch(loss_fn: Callable[[], torch.Tensor]) -> list[MicroStep]:
    """One micro-step computing the whole batch's loss, reported as itself (for contrastive losses, whose
    in-batch negatives make the batch indivisible)."""

    def micro() -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_fn()
        return loss, loss.detach()

    return [micro]
