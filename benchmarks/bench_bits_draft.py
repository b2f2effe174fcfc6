"""Lossless self-speculation from the same bit-planes: SmolLM2-135M at XL@int8 drafted by XL@int4 / @int3 / @int2,
the top planes of the very weights the target reads in full, sharing the target's KV cache.

Greedy, batch 1, 64 tokens after each of three chat prompts, interleaved repeats; every output is checked to be the
target's own. Per row: speedup over XL@int8 alone (same mode), acceptance, tokens per target pass, and the
arithmetic: with acceptance a, draft length γ and c = a draft step / a target step (measured here, eager), one
round yields (1 - a^(γ+1)) / (1 - a) tokens for γ·c + v target steps (v: the verify pass of γ+1 tokens, measured).
Writes the `bits-draft` section of BENCHMARKS.md.

Needs a quantized SmolLM2 checkpoint: --ckpt (default: the calibrated one bench_calibrate.py caches, else the
round-to-nearest one bench_quant_speed.py caches).
Run: .venv/bin/python benchmarks/bench_bits_draft.py [--ckpt DIR] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, generate_timer, machine, self_timed, speculative_rows, speculative_timer, write_section
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.chat import read_chat
from matryoshka_lm.core.spec import parse_spec
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.speculative import SpeculativeStats

PROMPTS = [
    "Write a short paragraph about the history of Paris.",
    "Explain in a few sentences why the sky is blue.",
    "Give three tips for learning a new language.",
]
CANDIDATES = [ROOT / "runs" / "calibrate" / "smollm2-calibrated", ROOT / "runs" / "quant_speed" / "smollm2-q8"]


def step_seconds(engine: Engine, spec, prompt: list[int], n: int) -> float:
    """Seconds per batch-1 decode step of `spec` (after the prefill)."""
    steps = engine.token_steps([prompt], spec, n + 1)
    next(steps)
    t0 = time.perf_counter()
    for _ in steps:
        pass
    return (time.perf_counter() - t0) / n


def verify_seconds(engine: Engine, spec, prompt: list[int], width: int) -> float:
    """Seconds of one forward over `width` new tokens after the prompt (a verify pass of γ+1 tokens)."""
    cache_len = engine.cache_slots(len(prompt) + width + 1)
    with engine.kv_cache(spec, 1, cache_len) as cache:
        model, s = engine.runner(spec)
        engine.forward_chunk(model, torch.tensor([prompt]), s, cache, 0)
        x = torch.tensor([prompt[-width:]])
        engine.forward_chunk(model, x, s, cache, len(prompt))  # warm
        t0 = time.perf_counter()
        for _ in range(5):
            engine.forward_chunk(model, x, s, cache, len(prompt))
        return (time.perf_counter() - t0) / 5


def arithmetic(stats: SpeculativeStats, gamma: float, c: float, v: float) -> str:
    a = stats.acceptance
    per_round = (1 - a ** (gamma + 1)) / (1 - a) if a < 1 else gamma + 1
    cost = gamma * c + v
    return f"a={a:.2f}, γ≈{gamma:.1f}, c={c:.2f}, v={v:.2f}: {per_round:.2f} / {cost:.2f} = {per_round / cost:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a quantized SmolLM2 checkpoint")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ckpt = Path(a.ckpt) if a.ckpt else next((p for p in CANDIDATES if (p / ck.WEIGHTS).is_file()), None)
    if ckpt is None:
        print(
            "skipped: no quantized SmolLM2 checkpoint (run bench_calibrate.py or bench_quant_speed.py)", file=sys.stderr
        )
        return
    model, tok, chat = ck.load_model(ckpt), ck.load_tokenizer(ckpt), read_chat(ckpt)
    prompts = [tok.encode(chat.render([{"role": "user", "content": p}])).ids for p in PROMPTS]
    cfg, n, engine = model.cfg, a.tokens, Engine(model)
    target = parse_spec(cfg, "XL@int8")
    want = [engine.generate([p], target, n)[0].tokens for p in prompts]
    fns, stats, plans = {"target alone, eager": generate_timer(engine, prompts, n)}, {}, {}
    for bits in (4, 3, 2):
        draft = parse_spec(cfg, f"XL@int{bits}")
        for gamma, adaptive in ((2, False), (4, False), (4, True)):
            key = f"XL@int{bits}, γ={gamma}{' adaptive' if adaptive else ''}, eager"
            stats[key], plans[key] = SpeculativeStats(), (bits, gamma)
            fns[key] = speculative_timer(model, engine, prompts, n, draft, want, stats[key], gamma=gamma,
                                         adaptive=adaptive)  # fmt: skip
    t = self_timed(fns, a.repeats)
    base = {"eager": t.pop("target alone, eager")}
    step8 = step_seconds(engine, target, prompts[0], 32)
    cost = {b: step_seconds(engine, parse_spec(cfg, f"XL@int{b}"), prompts[0], 32) / step8 for b in (4, 3, 2)}
    verify = {g: verify_seconds(engine, target, prompts[0], g + 1) / step8 for g in (2, 4)}
    rows = speculative_rows(t, stats, base, len(prompts) * n)
    lines = []
    for key, (bits, _) in plans.items():
        s = stats[key]
        g = s.drafted / max(s.rounds, 1)
        lines.append(f"- {key}: {arithmetic(s, g, cost[bits], verify[min(verify, key=lambda k: abs(k - g))])}")
    where = ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt
    body = [
        f"Machine: {machine()}, {a.threads} threads. Checkpoint: `{where}`"
        f" ({'calibrated' if 'calibrated' in ckpt.name else 'round-to-nearest'} int8 codes, groups of 32, token table"
        f" included). Target XL@int8 alone: {len(prompts) * n / base['eager']:.1f} tok/s eager (greedy, batch 1, "
        f"{n} tokens after each of {len(prompts)} chat prompts, median of {a.repeats} interleaved repeats, prefill "
        "included). Every output equals the target's.",
        "",
        *rows,
        "",
        "Draft step cost c (a draft step / a target step, measured): "
        + ", ".join(f"int{b} {c:.2f}" for b, c in cost.items())
        + "; verify pass v (γ+1 tokens, in target steps): "
        + ", ".join(f"γ={g} {v:.2f}" for g, v in verify.items())
        + ". Expected speedup per row, (1 - a^(γ+1)) / (1 - a) tokens per γ·c + v:",
        *lines,
    ]
    text = "\n".join(body)
    print(text)
    write_section("bits-draft", text)


if __name__ == "__main__":
    main()
