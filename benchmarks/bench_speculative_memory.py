"""Speculative decoding where it can pay: a memory-bound model (the `memory` preset, 109 MB of fp32 weights, past
this CPU's caches) and batch-1 decode against the bandwidth roofline.

Model: runs/memory (trained here on first use: `matryoshka train --preset memory --out runs/memory --steps 700`,
about 35 minutes on 2 idle cores); its sizes are the full model XL, early exits E4 / E2 (its first 4 / 2 of 8
layers) and W (half the heads, a quarter of the FFN, all layers).

1. Read bandwidth (a 512 MB fp32 sum) and every size's batch-1 decode (eager and compiled) as tokens/s and as a
   fraction of the roofline: bytes of weights read per token (the head included) over the bandwidth.
2. Elastic size vs its extracted dense copy (same engine settings).
3. Speculative decoding, target XL, greedy (the output is checked to be the target's): early-exit drafts with
   the verifier reusing their cache and states (and without, for comparison), the width-nested draft and a
   Mix'n'Match draft; fixed and adaptive γ; eager and compiled (torch.compile of the static-shape steps: the
   early-exit draft step, the resumed verify chunk). Acceptance, tokens per target pass, the draft/verify time
   split, and the speedup over the target alone in the same mode (prefill included in both), interleaved in one run.
Writes the `speculative-memory` section of BENCHMARKS.md.

Run: .venv/bin/python benchmarks/bench_speculative_memory.py [--tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    ROOT,
    generate_timer,
    machine,
    read_bandwidth,
    self_timed,
    speculative_rows,
    speculative_timer,
    write_section,
)
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.nested import slice_state_dict, submodel_config
from matryoshka_lm.core.quant import weight_bytes
from matryoshka_lm.core.spec import parse_spec, size_names, uniform_spec
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.speculative import SpeculativeStats
from matryoshka_lm.report import md_table
from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split

DRAFTS = {  # name: (draft spec, speculative_decode settings)
    "early exit E2, reuse": ("E2", {"reuse": True}),
    "early exit E2, no reuse": ("E2", {"reuse": False}),
    "early exit E4, reuse": ("E4", {"reuse": True}),
    "early exit E4, no reuse": ("E4", {"reuse": False}),
    "width W": ("W", {}),
    "Mix'n'Match W,W,XL,XL": ("W,W,XL,XL", {}),
}


def model_checkpoint(path: Path) -> Path:
    if not (path / ck.WEIGHTS).exists():
        cmd = ["train", "--preset", "memory", "--out", str(path), "--steps", "700", "--quiet"]
        subprocess.run([sys.executable, "-m", "matryoshka_lm.cli", *cmd], check=True)
    return path


def decode(engine: Engine, spec, prompt: list[int], n: int) -> Callable[[], float]:
    """Seconds per decoded token (after the prefill's token)."""

    def run() -> float:
        steps = engine.token_steps([prompt], spec, n)
        next(steps)
        t0 = time.perf_counter()
        k = sum(1 for _ in steps)
        return (time.perf_counter() - t0) / max(k, 1)

    return run


def extracted(model: MatryoshkaLM, name: str) -> MatryoshkaLM:
    spec = uniform_spec(model.cfg, name)
    small = MatryoshkaLM(submodel_config(model.cfg, spec))
    small.load_state_dict(slice_state_dict(model.state_dict(), model.cfg, spec))
    return small.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(ROOT / "runs" / "memory"))
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ckpt = model_checkpoint(Path(a.ckpt))
    model = ck.load_model(ckpt)
    cfg, (_, tcfg) = model.cfg, ck.read_config(ckpt)
    _, _, val = checkpoint_val_split(ckpt)
    prompts = [val[i : i + 32].tolist() for i in (0, 5000, 10000)]
    names = size_names(cfg)
    n = a.tokens

    # 1. decode vs the roofline
    eager, compiled = Engine(model), Engine(model, compile=True)
    fns = {"bandwidth": read_bandwidth()}
    for name in names:
        spec = uniform_spec(cfg, name)
        fns[f"{name} eager"] = decode(eager, spec, prompts[0], n)
        fns[f"{name} compiled"] = decode(compiled, spec, prompts[0], n)
    for name in ("E4", "W"):
        fns[f"{name} extracted"] = decode(Engine(extracted(model, name)), None, prompts[0], n)
    t = self_timed(fns, a.repeats)
    gbs = 1 / t.pop("bandwidth") / 1e9
    rows = [
        f"Read bandwidth: {gbs:.1f} GB/s ({a.threads} threads, 512 MB fp32 sum).",
        "",
    ]
    cells = []
    for name in names:
        spec = uniform_spec(cfg, name)
        mb = weight_bytes(cfg, spec, None, model.precision.quant) / 1e6
        roof = gbs * 1e3 / mb
        e, c = 1 / t[f"{name} eager"], 1 / t[f"{name} compiled"]
        cells.append([name, f"{mb / 4:.1f} M", f"{mb:.0f}", f"{e:.1f}", f"{c:.1f}", f"{roof:.0f}", f"{c / roof:.0%}"])
    head = [
        "size",
        "params",
        "MB read / token",
        "eager tok/s",
        "compiled tok/s",
        "roofline tok/s",
        "compiled / roofline",
    ]
    rows += [md_table(head, cells), ""]
    copies = []
    for name in ("E4", "W"):
        e, x = 1 / t[f"{name} eager"], 1 / t[f"{name} extracted"]
        copies.append([name, f"{e:.1f}", f"{x:.1f}", f"{e / x:.2f}x"])
    rows.append(md_table(["size", "elastic (eager) tok/s", "extracted copy tok/s", "elastic / extracted"], copies))

    # 3. speculative decoding, greedy; every timing includes the prefill, target alone too
    fns, stats = {}, {}
    for mode, engine in (("eager", eager), ("compiled", compiled)):
        want = [engine.generate([p], None, n)[0].tokens for p in prompts]  # compiled may break a near-tie apart
        fns[f"target alone, {mode}"] = generate_timer(engine, prompts, n)
        for label, (draft, kw) in DRAFTS.items():
            for gamma, adaptive in ((4, False), (4, True)) if mode == "eager" else ((4, False),):
                if mode == "compiled" and "no reuse" in label:
                    continue
                key = f"{label}, γ={'adaptive' if adaptive else gamma}, {mode}"
                stats[key] = SpeculativeStats()
                draft_spec = parse_spec(cfg, draft)
                fns[key] = speculative_timer(
                    model, engine, prompts, n, draft_spec, want, stats[key], gamma=gamma, adaptive=adaptive, **kw
                )
    ts = self_timed(fns, a.repeats)
    base = {mode: ts.pop(f"target alone, {mode}") for mode in ("eager", "compiled")}
    spec_rows = [
        f"Target alone: {len(prompts) * n / base['eager']:.1f} tok/s eager, "
        f"{len(prompts) * n / base['compiled']:.1f} tok/s compiled.",
        "",
        *speculative_rows(ts, stats, base, len(prompts) * n),
    ]
    body = [
        "## Speculative decoding on a memory-bound model (`benchmarks/bench_speculative_memory.py`)",
        "",
        f"Machine: {machine()}. Model: the `memory` preset ({cfg.d_model} wide, {cfg.n_layers} layers, "
        f"{weight_bytes(cfg, model.full, None, model.precision.quant) / 1e6:.0f} MB fp32), {tcfg.steps} steps of "
        f"{tcfg.batch_size} x {tcfg.seq_len} tokens. Batch 1, {n} new tokens after 32-token held-out prompts, "
        f"median of {a.repeats} interleaved rounds.",
        "",
        *rows,
        "",
        "Speculative decoding (greedy; every output checked equal to the target's; target XL; prefill included):",
        "",
        *spec_rows,
    ]
    write_section("speculative-memory", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
