"""`train --dry-run`: what a run would do and cost, without training: parameters per trained size, tokens, training
FLOPs (plan.run_flops: every trained size, forward + backward, a teacher's forward) and the hours that takes at an
assumed MFU on known GPUs and on this machine's measured peak."""

from __future__ import annotations

from typing import Any

from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.core.spec import count_params
from matryoshka_lm.machine import GPU_PEAK_TFLOPS, matmul_peak
from matryoshka_lm.report import md_table

from .plan import run_flops, size_plan

ASSUMED_MFU = 0.4  # a well-tuned dense bf16 run reaches about this on one of these GPUs (CPUs: of the fp32 peak)


def run_plan(cfg: ModelConfig, tcfg: TrainConfig, mfu: float = ASSUMED_MFU, cpu_peak: float | None = None) -> dict:
    """The plan as numbers: {sizes: {name: params}, tokens_per_step, tokens, flops, hours: {device: hours}}."""
    names, _, specs = size_plan(cfg, tcfg)
    flops = run_flops(cfg, tcfg)
    per_step = tcfg.batch_size * tcfg.seq_len
    hours: dict[str, Any] = {
        f"1x {gpu} at {mfu:.0%} MFU": flops / (tflops * 1e12 * mfu) / 3600 for gpu, tflops in GPU_PEAK_TFLOPS.items()
    }
    peak = cpu_peak if cpu_peak is not None else matmul_peak()
    hours[f"this CPU at {mfu:.0%} of its measured {peak / 1e9:.0f} GFLOP/s"] = flops / (peak * mfu) / 3600
    return {
        "sizes": {n: count_params(cfg, specs[n]) for n in names},
        "steps": tcfg.steps,
        "tokens_per_step": per_step,
        "tokens": per_step * tcfg.steps,
        "flops": flops,
        "hours": hours,
    }


def format_plan(plan: dict) -> str:
    sizes = md_table(
        ["size", "parameters", "non-embedding"],
        [[n, f"{p['total']:,}", f"{p['non_embedding']:,}"] for n, p in plan["sizes"].items()],
    )
    head = (
        f"{plan['steps']:,} steps x {plan['tokens_per_step']:,} tokens = {plan['tokens']:,} tokens; "
        f"training FLOPs {plan['flops']:.3g} (every trained size, forward + backward)"
    )
    hours = md_table(["device", "hours"], [[k, f"{h:.3g}"] for k, h in plan["hours"].items()])
    return f"{sizes}\n\n{head}\n\n{hours}"
