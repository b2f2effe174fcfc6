"""Data parallelism, applied to an ordinary single-process model (torchtitan's `parallelize` step).

One process: nothing changes, except that --fsdp under torchrun with one process joins a process group of one
and shards as with more (so FSDP2 runs, and is tested, on a single GPU). Under torchrun: DDP wraps the joint
loss module (one forward per backward, as DDP requires), or FSDP2 `fully_shard` shards each block and then the
whole model in place.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Dist, str]:
    """Join the torchrun process group if launched by torchrun; pick this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        join_group(device)
    return Dist(dist.get_rank(), dist.get_world_size(), local), device


def join_group(device: str) -> None:
    """Join torchrun's process group (NCCL on CUDA, gloo otherwise) and leave it at exit: a process that exits
    with the group alive can abort in the backend's thread teardown ("terminate called without an active
    exception", seen with gloo) and NCCL warns about it."""
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def launched_by_torchrun() -> bool:
    """Whether this process can join an env:// process group (torchrun sets these, one process or more)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def join_group_of_one(device: str) -> None:
    """A process group of this process alone (bound to the model's GPU first on CUDA; see join_group)."""
    if device.startswith("cuda"):
        index = torch.device(device).index
        torch.cuda.set_device(torch.cuda.current_device() if index is None else index)
    join_group(device)


def parallelize(
    loss_module: nn.Module, blocks: nn.ModuleList, model: nn.Module, d: Dist, device: str, fsdp: bool
) -> nn.Module:
    """The module to call for the loss: `loss_module` itself, or wrapped for data parallelism.

    With fsdp, `blocks` and then `model` (which `loss_module` calls) are sharded in place; the optimizer must be
    built after this call so that it holds the sharded parameters.
    """
    one = fsdp and d.world <= 1 and launched_by_torchrun()  # asked for FSDP under torchrun: shard, even alone
    if d.world <= 1 and not one:
        return loss_module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if one and not dist.is_initialized():
            join_group_of_one(device)
        # on the run's device: FSDP's default mesh is on the accelerator whenever there is one, even for a CPU run
        mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return loss_module
    return nn.parallel.DistributedDataParallel(
        loss_module, device_ids=[d.local_rank] if device.startswith("cuda") else None
    )


def no_sync_of(runner: nn.Module) -> Callable[[], AbstractContextManager] | None:
    """DDP's no_sync (skip the all-reduce on accumulation micro-steps); None where there is nothing to skip."""
    return runner.no_sync if isinstance(runner, nn.parallel.DistributedDataParallel) else None


def any_rank(flag: bool, d: Dist, device: str) -> bool:
    """True on every rank when `flag` is true on any (a stop decision that all ranks must take together)."""
    if d.world <= 1:
        return flag
    t = torch.tensor([float(flag)], device=device if device.startswith("cuda") else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def global_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean over ranks (in place): the global batch's loss, not rank 0's shard."""
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return t
