"""Training throughput: one joint G=4 Matryoshka step vs one full-size step vs four separate single-size steps.

The joint step does every size's forward and backward on the same batch; "sum of four" is what training the four
sizes as separate models costs per step of each. Writes the `training` section of BENCHMARKS.md.
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import interleaved_times, machine, write_section  # noqa: E402
from matryoshka_lm.config import preset
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.nested import submodel_config
from matryoshka_lm.core.spec import count_params, uniform_spec
from matryoshka_lm.report import md_table
from matryoshka_lm.train.loop import JointLoss, make_optimizer


def main(preset_name: str = "demo", repeats: int = 5) -> str:
    torch.manual_seed(0)
    cfg, tcfg = preset(preset_name)
    sizes = ["XL", "L", "M", "S"]
    specs = {s: uniform_spec(cfg, s) for s in sizes}
    model = MatryoshkaLM(cfg)
    joint = JointLoss(model, 0.0)
    opt = make_optimizer(model, tcfg, fused_ok=False)
    # independent dense models of each size's shape: what "train each size separately" runs
    dense = {s: MatryoshkaLM(submodel_config(cfg, specs[s])) for s in sizes}
    dense_opt = {s: make_optimizer(dense[s], tcfg, fused_ok=False) for s in sizes}
    B, T = tcfg.batch_size, tcfg.seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T))
    y = torch.randint(0, cfg.vocab_size, (B, T))

    def step(module, optim, spec_list):
        total, _ = module(x, y, spec_list, [1.0] * len(spec_list))
        total.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    fns = {
        "joint G=4": lambda: step(joint, opt, list(specs.values())),
        "full (XL) only": lambda: step(joint, opt, [specs["XL"]]),
    }
    for s in sizes:
        fns[f"dense {s}"] = lambda s=s: step(JointLoss(dense[s], 0.0), dense_opt[s], [dense[s].full])
    t = interleaved_times(fns, repeats=repeats)
    t["sum of four dense"] = sum(t[f"dense {s}"] for s in sizes)
    tokens = B * T
    rows = [
        [k, f"{t[k]:.3f}", f"{tokens / t[k]:,.0f}", f"{t[k] / t['full (XL) only']:.2f}x"]
        for k in ["full (XL) only", "joint G=4", "sum of four dense"] + [f"dense {s}" for s in sizes]
    ]
    params = {s: count_params(cfg, specs[s])["non_embedding"] for s in sizes}
    body = (
        f"## Training throughput (`benchmarks/bench_training.py`, preset `{preset_name}`)\n\n"
        f"Machine: {machine()}.\n\nBatch {B} x {T} tokens, fp32, AdamW step included; "
        f"median of {repeats}, interleaved. "
        f"Non-embedding params: "
        + ", ".join(f"{s} {params[s] / 1e6:.2f}M" for s in sizes)
        + ".\n\n"
        + md_table(["step", "s/step", "tokens/s", "vs full step"], rows)
        + "\n\n"
        f"One joint step costs {t['joint G=4'] / t['full (XL) only']:.2f}x a full-size step and "
        f"{t['joint G=4'] / t['sum of four dense']:.2f}x the four separate steps it replaces.\n"
    )
    write_section("training", body)
    return body


if __name__ == "__main__":
    print(main())
