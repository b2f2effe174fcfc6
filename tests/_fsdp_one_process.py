"""Run under torchrun with ONE process (argv: cpu or cuda): `parallelize(..., fsdp=True)` joins a process group of
one (gloo, or NCCL on CUDA), shards every parameter with FSDP2, and then trains step for step like an unsharded
copy of the same model (losses and weights), fused AdamW on the DTensors included on CUDA. Prints OK at the end;
any difference raises. tests/train/test_distributed.py runs it on the CPU, tests/test_cuda.py on a GPU."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import uniform_spec
from matryoshka_lm.train.loop import JointLoss
from matryoshka_lm.train.optim import adamw
from matryoshka_lm.train.parallelize import init_distributed, parallelize


def main(device: str) -> None:
    d, device = init_distributed(device)
    assert d.world == 1 and not dist.is_initialized(), "one process: no group before parallelize"
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    plain = MatryoshkaLM(cfg).to(device)
    sharded = copy.deepcopy(plain)
    runner = parallelize(JointLoss(sharded, 0.0), sharded.layers, sharded, d, device, fsdp=True)
    assert dist.is_initialized() and dist.get_world_size() == 1
    backend = dist.get_backend()
    assert backend == ("nccl" if device.startswith("cuda") else "gloo"), backend
    assert all(isinstance(p, DTensor) for p in sharded.parameters()), "FSDP2 did not shard"
    fused = device.startswith("cuda")  # as the trainer builds it (make_optimizer)
    models, runners = (plain, sharded), (JointLoss(plain, 0.0), runner)
    opts = [adamw(m, 1e-2, 0.1, fused=fused) for m in models]
    specs = [uniform_spec(cfg, s) for s in ("XL", "S")]
    g = torch.Generator().manual_seed(0)
    with sdpa_kernel(SDPBackend.MATH):  # deterministic backward on CUDA: the comparison is tight
        for _ in range(3):
            x = torch.randint(0, cfg.vocab_size, (4, 17), generator=g).to(device)
            losses = []
            for model, run, opt in zip(models, runners, opts):
                total, per_size = run(x[:, :-1], x[:, 1:], specs, [1.0, 1.0])
                total.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(per_size)
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    moved = 0
    for (name, p), s in zip(plain.named_parameters(), sharded.parameters()):
        torch.testing.assert_close(s.full_tensor(), p.detach(), rtol=1e-5, atol=1e-5, msg=name)
        moved += 1
    assert moved == len(list(plain.parameters()))
    print("OK", backend)


if __name__ == "__main__":
    main(sys.argv[1])
