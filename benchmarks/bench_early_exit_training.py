"""Does training raise an early exit's acceptance as a speculative draft? (issue #13)

From the trained `memory` preset (runs/memory, see bench_speculative_memory.py) fine-tunes of 100 steps each,
identical but for the loss: `control` (the preset's recipe: every size weighted 1), `distill` (plus in-place
distillation of each size towards the full size's distribution, --distill 1) and, with --arms, `exits2x` (the early
exits E4 and E2 weighted 2, --size-weights 1,2,1,2). Each is measured on held-out text: val loss per size, top-1
agreement of each exit with the full size (teacher-forced), and the greedy acceptance rate of E2 / E4 drafting
for XL (γ = 4, fixed) with the speedup-relevant tokens per target pass. These counts do not depend on the
machine's speed or load.
Writes the `early-exit-training` section of BENCHMARKS.md.

Run: .venv/bin/python benchmarks/bench_early_exit_training.py   (the fine-tunes: runs/ft_exits.sh, ~10 min each)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, speculative_timer, write_section
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import size_names, uniform_spec
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.speculative import SpeculativeStats
from matryoshka_lm.report import md_table
from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split
from matryoshka_lm.train.evaluate import evaluate_specs

ARMS = {"control": [], "distill": ["--distill", "1.0"], "exits2x": ["--size-weights", "1,2,1,2"]}
FT = ["--steps", "100", "--lr", "5e-4", "--save-every", "50", "--quiet"]


def fine_tuned(base: Path, arm: str) -> Path:
    out = base.parent / f"{base.name}-ft-{arm}"
    if not (out / ck.WEIGHTS).exists():
        cmd = ["train", "--preset", "memory", "--init", str(base), "--out", str(out), *FT, *ARMS[arm]]
        subprocess.run([sys.executable, "-m", "matryoshka_lm.cli", *cmd], check=True)
    return out


def measure(path: Path, prompts: list[list[int]], n: int, val) -> dict:
    model = ck.load_model(path)
    cfg = model.cfg
    specs = {s: uniform_spec(cfg, s) for s in size_names(cfg)}
    ev = evaluate_specs(model, val, specs, 128, 8, 16)
    engine, out = Engine(model), {"loss": {s: r["loss"] for s, r in ev.items()}, "agree": {}, "spec": {}}
    want = [engine.generate([p], None, n)[0].tokens for p in prompts]
    for exit_ in ("E2", "E4"):
        out["agree"][exit_] = ev[exit_]["agree"]
        stats = SpeculativeStats()
        speculative_timer(model, engine, prompts, n, specs[exit_], want, stats, gamma=4, adaptive=False)()
        out["spec"][exit_] = (stats.acceptance, stats.tokens_per_round)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=str(ROOT / "runs" / "memory"))
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--arms", default="control,distill", help=f"which fine-tunes, of {', '.join(ARMS)}")
    a = ap.parse_args()
    torch.set_num_threads(2)
    base = Path(a.base)
    _, _, val = checkpoint_val_split(base)
    step = (len(val) - 64) // a.prompts
    prompts = [val[i * step : i * step + 32].tolist() for i in range(a.prompts)]
    res = {"before (700 steps)": measure(base, prompts, a.tokens, val)}
    for arm in a.arms.split(","):
        res[f"+100 steps, {arm}"] = measure(fine_tuned(base, arm), prompts, a.tokens, val)
    names = list(next(iter(res.values()))["loss"])
    head = ["model", *(f"val loss {s}" for s in names), "agreement E2 / E4 with XL", "acceptance E2 / E4 (γ=4)",
            "tokens per target pass E2 / E4"]  # fmt: skip
    cells = []
    for label, r in res.items():
        loss = [f"{r['loss'][s]:.3f}" for s in names]
        agree = f"{r['agree']['E2']:.3f} / {r['agree']['E4']:.3f}"
        acc = f"{r['spec']['E2'][0]:.2f} / {r['spec']['E4'][0]:.2f}"
        tpp = f"{r['spec']['E2'][1]:.2f} / {r['spec']['E4'][1]:.2f}"
        cells.append([label, *loss, agree, acc, tpp])
    rows = md_table(head, cells).split("\n")
    body = [
        "## Training for early-exit drafts (`benchmarks/bench_early_exit_training.py`)",
        "",
        f"The `memory` preset after 700 steps, then 100 more steps per arm ({' '.join(FT[:4])}; same batches). "
        f"Greedy speculative decoding of {a.tokens} tokens after {a.prompts} held-out 32-token prompts, target XL; "
        "agreement is teacher-forced top-1 agreement on 16 x 8 x 128 held-out tokens. Counts, not timings.",
        "",
        *rows,
    ]
    write_section("early-exit-training", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
