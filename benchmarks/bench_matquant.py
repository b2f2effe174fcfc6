"""Matryoshka Quantization grid study: every (size x bits) cell of one model, against the baselines.

From one fp32 demo checkpoint (runs/router-demo, trained on first use like bench_router.py), each run below
fine-tunes the same number of steps on the same batches:
  fp32       no quantization                     -> (a) round-to-nearest at each width (RTN)
  qat-int8/4/2  quantization-aware, that width alone  -> (b) QAT alone
  matquant   widths 8,4,2 jointly, every cell every step     -> (c) MatQuant, sliced from one set of int8 codes
  matquant-sampled  the same, 4 of the 12 cells per step (the widest always)
Then every cell's validation loss (in domain, and on Python documentation prose out of domain) and bytes of
weights; int6 and int3 are read from the same codes without being trained (MatQuant's interpolation claim).
Writes the `matquant` section of BENCHMARKS.md and docs/matquant_grid.png.

Run: .venv/bin/python benchmarks/bench_matquant.py [--steps 300]   (~40 minutes on 2 idle cores)
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine, write_section
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import quant
from matryoshka_lm.core.spec import size_names, uniform_spec
from matryoshka_lm.data import encode_corpus
from matryoshka_lm.report import figure, md_table
from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split
from matryoshka_lm.train.evaluate import evaluate_specs
from matryoshka_lm.train.loop import train

RUNS = {
    "fp32": {},
    "qat-int8": {"bits": [8]},
    "qat-int4": {"bits": [4]},
    "qat-int2": {"bits": [2]},
    "matquant": {"bits": [8, 4, 2]},
    "matquant-sampled": {"bits": [8, 4, 2], "sample_cells": 4},
}
EVAL_BITS = [None, 8, 6, 4, 3, 2]  # None = fp32 weights as trained


def base_checkpoint(ckpt: Path) -> Path:
    if not (ckpt / ck.WEIGHTS).exists():  # first run: the same demo model bench_router.py uses
        cmd = ["train", "--preset", "demo", "--out", str(ckpt), "--steps", "600", "--quiet"]
        subprocess.run([sys.executable, "-m", "matryoshka_lm.cli", *cmd], check=True)
    return ckpt


def fine_tune(base: Path, out: Path, steps: int, lr: float, settings: dict) -> tuple[Path, float]:
    """(checkpoint, seconds) of `steps` more steps from `base` with `settings`; cached when already done."""
    done = out / "done.json"
    if done.exists():
        return out, json.loads(done.read_text())["seconds"]
    model_cfg, tcfg = ck.read_config(base)
    tcfg.steps, tcfg.lr, tcfg.warmup_steps, tcfg.eval_every, tcfg.save_every = steps, lr, 10, steps, steps
    tcfg.seed = 1  # batches other than the base run's first ones
    for k, v in settings.items():
        setattr(tcfg, k, v)
    tcfg.__post_init__()
    t0 = time.perf_counter()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    train(model_cfg, tcfg, out, init=base)
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"seconds": seconds}))
    return out, seconds


def cell_losses(ckpt: Path, val, ood, n_batches: int) -> dict[str, dict[str, float]]:
    model = ck.load_model(ckpt)
    _, tcfg = ck.read_config(ckpt)
    model.precision.quant = quant.QuantConfig(tcfg.quant_group)
    cfg = model.cfg
    specs = {
        f"{n}@{'fp32' if b is None else f'int{b}'}": uniform_spec(cfg, n).at_bits(b)
        for n in size_names(cfg)
        for b in EVAL_BITS
    }
    with torch.no_grad():
        ind = evaluate_specs(model, val, specs, tcfg.seq_len, batch=8, n_batches=n_batches)
        out = evaluate_specs(model, ood, specs, tcfg.seq_len, batch=8, n_batches=n_batches)
    return {c: {"in": ind[c]["loss"], "ood": out[c]["loss"]} for c in specs}


def table(results: dict, cfg, qcfg) -> list[str]:
    """One row per cell: bytes, RTN / QAT-alone / MatQuant (all / sampled) losses, MatQuant's deltas."""
    head = ["cell", "MB (linear)", "RTN (a)", "QAT alone (b)", "MatQuant (c)", "c − a", "c − b", "MatQuant sampled",
            "OOD: a / b / c"]  # fmt: skip
    rows = []
    for name in size_names(cfg):
        spec = uniform_spec(cfg, name)
        for b in EVAL_BITS:
            cell = f"{name}@{'fp32' if b is None else f'int{b}'}"
            mb = quant.weight_bytes(cfg, spec, b, qcfg) / 1e6
            linear = mb - quant.weight_bytes(cfg, spec, None, qcfg) / 1e6 + linear_fp32(cfg, spec)
            a = results["fp32"][cell]
            alone = results.get(f"qat-int{b}", {}).get(cell) if b in (8, 4, 2) else None
            c, cs = results["matquant"][cell], results["matquant-sampled"][cell]
            fmt = lambda v: "—" if v is None else f"{v:.3f}"
            b_in = None if alone is None else alone["in"]
            b_ood = None if alone is None else alone["ood"]
            c_minus_b = "—" if b_in is None else f"{c['in'] - b_in:+.3f}"
            rows.append([cell, f"{mb:.2f} ({linear:.2f})", f"{a['in']:.3f}", fmt(b_in), f"{c['in']:.3f}",
                         f"{c['in'] - a['in']:+.3f}", c_minus_b, f"{cs['in']:.3f}",
                         f"{a['ood']:.2f} / {fmt(b_ood)} / {c['ood']:.2f}"])  # fmt: skip
    return md_table(head, rows, "lrrrrrrrl").split("\n")


def linear_fp32(cfg, spec) -> float:
    """MB of the quantized (linear) weights at fp32: all but the embeddings and norms."""
    from matryoshka_lm.core.spec import count_params

    return 4 * (count_params(cfg, spec)["non_embedding"] - spec.width * (2 * spec.depth + 1)) / 1e6


def plot(results: dict, cfg, qcfg, path: Path) -> None:
    styles = {"fp32": ("RTN of the fp32 model (a)", "o", "tab:gray"), "matquant": ("MatQuant (c)", "s", "tab:blue")}
    with figure(path, (8, 5), legend={"fontsize": 8}) as (_, ax):
        for run, (label, marker, color) in styles.items():
            xs, ys = [], []
            for name in size_names(cfg):
                for b in EVAL_BITS[1:]:
                    xs.append(quant.weight_bytes(cfg, uniform_spec(cfg, name), b, qcfg) / 1e6)
                    ys.append(results[run][f"{name}@int{b}"]["in"])
            ax.scatter(xs, ys, marker=marker, color=color, label=label, alpha=0.8)
        for b in (8, 4, 2):
            xs = [quant.weight_bytes(cfg, uniform_spec(cfg, n), b, qcfg) / 1e6 for n in size_names(cfg)]
            ys = [results[f"qat-int{b}"][f"{n}@int{b}"]["in"] for n in size_names(cfg)]
            ax.scatter(xs, ys, marker="^", label=f"QAT int{b} alone (b)", alpha=0.8)
        xs = [quant.weight_bytes(cfg, uniform_spec(cfg, n), None, qcfg) / 1e6 for n in size_names(cfg)]
        ys = [results["fp32"][f"{n}@fp32"]["in"] for n in size_names(cfg)]
        ax.plot(xs, ys, "k--", marker="D", label="fp32 sizes (reference)")
        for n, x, y in zip(size_names(cfg), xs, ys):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("bytes of weights per cell (MB, log scale)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Every size x bits cell of one model: memory vs loss")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=str(ROOT / "runs" / "router-demo"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "matquant"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-batches", type=int, default=24)
    a = ap.parse_args()
    base = base_checkpoint(Path(a.base))
    cfg, tcfg = ck.read_config(base)
    _, _, val = checkpoint_val_split(base)
    ood = encode_corpus(ck.load_tokenizer(base), ["\n\n".join(pydoc_data.topics.topics.values())])
    results, seconds = {}, {}
    for name, settings in RUNS.items():
        ckpt, seconds[name] = fine_tune(base, Path(a.out) / name, a.steps, a.lr, settings)
        results[name] = cell_losses(ckpt, val, ood, a.eval_batches)
        print(name, f"{seconds[name]:.0f}s", json.dumps({k: round(v["in"], 3) for k, v in results[name].items()}))
    Path(a.out, "results.json").write_text(json.dumps({"results": results, "seconds": seconds}, indent=1))
    qcfg = quant.QuantConfig(32)
    plot(results, cfg, qcfg, ROOT / "docs" / "matquant_grid.png")
    body = [
        "## Matryoshka Quantization: the size x bits grid (`benchmarks/bench_matquant.py`)",
        "",
        f"Machine: {machine()}. Base: demo preset ({cfg.d_model} wide, {cfg.n_layers} layers), {tcfg.steps} fp32 "
        f"steps; then each run fine-tunes {a.steps} more steps (lr {a.lr}, same batches). Groups of 32, fp16 "
        f"scales, embeddings fp32. Validation loss in nats/token on {a.eval_batches} x 8 windows of "
        f"{tcfg.seq_len} tokens; OOD = Python documentation prose. Fine-tune wall time: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
        + ".",
        "",
        *table(results, cfg, qcfg),
        "",
        "![memory vs loss](docs/matquant_grid.png)",
    ]
    write_section("matquant", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
