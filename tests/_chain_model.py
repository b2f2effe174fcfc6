"""A tiny model with every size briefly trained on a noisy chain (x_t = x_t-1 + 5 x_t-2 mod 97, 20% random): half
learnt, so speculative drafts are often but not always accepted and both the accept and the reject path run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import tiny_config
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import uniform_spec


def chain_trained_model(device: str = "cpu") -> MatryoshkaLM:
    torch.manual_seed(0)
    m = MatryoshkaLM(tiny_config()).to(device)
    specs = [uniform_spec(m.cfg, s) for s in ("XL", "L", "M", "S")]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)  # the data is drawn on the CPU: the same batches on every device
    for _ in range(20):
        x = torch.empty(16, 33, dtype=torch.long)
        x[:, :2] = torch.randint(0, 97, (16, 2), generator=g)
        for t in range(2, 33):
            noise = torch.rand(16, generator=g) < 0.2
            x[:, t] = torch.where(noise, torch.randint(0, 97, (16,), generator=g), (x[:, t - 1] + 5 * x[:, t - 2]) % 97)
        x = x.to(device)
        loss = sum(F.cross_entropy(m(x[:, :-1], s).flatten(0, 1), x[:, 1:].flatten()) for s in specs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()
