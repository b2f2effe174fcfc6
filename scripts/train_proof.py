"""One command that proves the scale-out training path on a device: prepare shards, train, report.

    python3 scripts/train_proof.py --out DIR [--device cuda] [--preset small] [--steps 400] [--time-limit 7]

1. `matryoshka prepare` of the embedded corpus (Shakespeare + KJV) into DIR/data (token shards, 8192-token BPE
   trained on a bounded sample);
2. `matryoshka train --data DIR/data --dtype bf16 --compile` of the preset (every size jointly) for --steps steps or
   --time-limit minutes, whichever ends first (the run checkpoints where it stops);
3. DIR/proof.json and DIR/proof.md: steady tokens/s and MFU (the median over the second half of the steps, after
   compilation), the loss of every size at the first and last logged step, wall time of each stage; DIR/loss.png,
   the loss curve of every size.

Sized for the lent H200 (one command of at most 10 minutes): the defaults take ~8 minutes there. On CPU the tests
run it with `--device cpu --preset tiny --steps 4` (docs/cluster.md)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "matryoshka_lm.cli"]


def run(cmd: list[str], log: Path) -> float:
    """Run a stage with its output in `log` (and echoed), returning its wall seconds; a failure ends the proof."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    print(log.read_text()[-2000:], end="", flush=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed ({p.returncode}); see {log}")
    return time.perf_counter() - t0


def summary(rows: list[dict], seconds: dict) -> dict:
    """Steady-state rates from metrics.jsonl rows (cumulative since step 1, so per-step rates are differences)."""
    steps = [r for r in rows if "tokens_per_s" in r]
    late = steps[len(steps) // 2 :] or steps
    last = steps[-1]

    def median(key: str) -> float | None:
        vals = [r[key] for r in late if key in r]
        return statistics.median(vals) if vals else None

    return {
        "steps": last["step"],
        "tokens_per_s": median("tokens_per_s"),
        "mfu": median("mfu"),
        "flops_per_s": median("flops_per_s"),
        "loss_first": {n: next(r["loss"][n] for r in steps if n in r["loss"]) for n in sizes(steps)},
        "loss_last": {n: next(r["loss"][n] for r in reversed(steps) if n in r["loss"]) for n in sizes(steps)},
        "val_loss_last": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None),
        "seconds": seconds,
    }


def report(res: dict, args) -> str:
    mfu = f"{res['mfu']:.1%}" if res["mfu"] is not None else "n/a (no peak known: pass --peak-tflops)"
    lines = [
        f"# Training proof: preset {args.preset} on {args.device}, {' + '.join(args.modes)}, prepared shards",
        "",
        f"- steps: {res['steps']} in {res['seconds']['train']:.0f} s (prepare {res['seconds']['prepare']:.0f} s)",
        f"- steady tokens/s (median, second half): {res['tokens_per_s']:,.0f}",
        f"- MFU (median, second half): {mfu}",
        "",
        "| size | loss at first step | loss at last step | val loss at last eval |",
        "|---|---:|---:|---:|",
    ]
    val = res["val_loss_last"] or {}
    for name, first in res["loss_first"].items():
        v = f"{val[name]:.3f}" if name in val else ""
        lines.append(f"| {name} | {first:.3f} | {res['loss_last'][name]:.3f} | {v} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    from matryoshka_lm.plots import figure

    with figure(path, (7, 4)) as (_, ax):
        for name in sizes(rows):  # a size sampled on some steps only has a point on those
            pts = [(r["step"], r["loss"][name]) for r in rows if name in r["loss"]]
            ax.plot(*zip(*pts), label=name)
        ax.set(xlabel="step", ylabel="training loss (nats/token)", title=title)


def sizes(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(n for r in rows for n in r["loss"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--time-limit", type=float, default=7.0, help="minutes of training at most")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--no-compile", action="store_true", help="eager steps (the CPU test: compiling takes ~30 s)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data, ckpt = args.out / "data", args.out / "run"
    seconds = {"prepare": run([*CLI, "prepare", "default", "-o", str(data), "--vocab-size", str(args.vocab_size)],
                              args.out / "prepare.log")}  # fmt: skip
    train = [*CLI, "train", "--preset", args.preset, "--data", str(data), "--out", str(ckpt), "--device", args.device,
             "--steps", str(args.steps), "--time-limit", str(args.time_limit), "--quiet"]  # fmt: skip
    args.modes = ["bf16" if args.device != "cpu" else "fp32"] + ([] if args.no_compile else ["torch.compile"])
    train += ["--dtype", args.modes[0]] + ([] if args.no_compile else ["--compile"])  # CPU bf16 autocast is slow
    seconds["train"] = run(train, args.out / "train.log")
    rows = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines() if line.strip()]
    res = summary(rows, seconds)
    (args.out / "proof.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "proof.md").write_text(text := report(res, args))
    plot(rows, args.out / "loss.png", f"{args.preset} on {args.device}: every size, trained jointly")
    print(text)


if __name__ == "__main__":
    main()
