"""`matryoshka train`: one library call, train(), with a progress bar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matryoshka_lm.errors import MatryoshkaError

from .options import float_list, int_list, nonnegative_int, pick_device, positive_int


def cmd_train(a: argparse.Namespace) -> None:
    from tqdm import tqdm

    from matryoshka_lm.config import preset
    from matryoshka_lm.train.loop import train

    model_cfg, tcfg = preset(a.preset)
    overrides = {
        "steps": a.steps,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "grad_accum": a.grad_accum,
        "lr": a.lr,
        "seed": a.seed,
        "only": a.only,
        "distill": a.distill,
        "teacher": a.teacher,
        "sample_sizes": a.sample_sizes,
        "max_corpus_chars": a.max_corpus_chars,
        "fsdp": a.fsdp or None,
        "dtype": a.dtype,
        "sizes": a.sizes.split(",") if a.sizes else None,
        "size_weights": float_list(a.size_weights, "--size-weights"),
        "save_every": a.save_every,
        "bits": int_list(a.bits, "--bits"),
        "bit_weights": float_list(a.bit_weights, "--bit-weights"),
        "quant_group": a.quant_group,
        "sample_cells": a.sample_cells,
        "sampling": a.sampling,
        "mixes": a.mixes,
    }
    for k, v in overrides.items():
        if v is not None:
            setattr(tcfg, k, v)
    tcfg.__post_init__()
    if a.nest is not None:
        axes = {x.strip() for x in a.nest.split(",") if x.strip()}
        bad = axes - {"width", "heads", "ffn", "depth"}
        if bad:
            raise MatryoshkaError(f"--nest: unknown axes {sorted(bad)}; choose from width, heads, ffn, depth")
        for axis in ("width", "heads", "ffn", "depth"):
            setattr(model_cfg, f"nest_{axis}", axis in axes)
            overrides[f"nest_{axis}"] = axis in axes  # typed: a resume refuses a different nesting
    out = Path(a.out or f"runs/{a.preset}")
    bar = tqdm(
        total=tcfg.steps,
        desc="train",
        unit="step",
        disable=a.quiet,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10,
    )

    def on_step(step: int, m: dict) -> None:
        if bar.n == 0 and step > 1:
            bar.update(step - 1)
        loss = " ".join(f"{n}={v:.3f}" for n, v in m["loss"].items())
        bar.set_postfix_str(f"{loss} tok/s={m['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        if "val_loss" in m:
            val = " ".join(f"{n}={v:.3f}" for n, v in m["val_loss"].items())
            bar.write(f"step {step}: val {val}")

    try:
        train(
            model_cfg,
            tcfg,
            out,
            data=a.data,
            resume=a.resume,
            init=a.init,
            device=pick_device(a.device),
            callback=on_step,
            changes=overrides if a.resume else None,  # on resume, only what was typed
            time_limit_s=None if a.time_limit is None else a.time_limit * 60,
            tokenizer=a.tokenizer,
        )
    finally:
        bar.close()
    if not a.quiet:
        print(f"checkpoint written to {out}", file=sys.stderr)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a Matryoshka model (all sizes jointly) or a dense baseline (--only)")
    t.add_argument("--preset", default="demo", help="tiny | demo | small (default: demo)")
    t.add_argument("--steps", type=positive_int, help="optimizer steps (default: the preset's)")
    t.add_argument("--out", help="checkpoint directory (default: runs/PRESET)")
    t.add_argument("--data", help="text file or folder (default: embedded Shakespeare + KJV corpus)")
    t.add_argument("--only", help="baseline mode: train one dense model with this size's shape, e.g. M")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--init", help="start from this checkpoint's weights and tokenizer")
    t.add_argument(
        "--tokenizer",
        help="a fresh model takes this checkpoint's tokenizer instead of a new BPE (a student shares its teacher's)",
    )
    t.add_argument(
        "--time-limit",
        type=float,
        metavar="MIN",
        help="train for at most this many minutes in this call: checkpoint and stop; --resume continues",
    )
    t.add_argument("--sizes", help="comma-separated sizes to train jointly (default: all)")
    t.add_argument(
        "--size-weights",
        help="loss weight per trained size, largest first, e.g. 1,2,1,2 (default: all 1); heavier early exits "
        "raise their acceptance as speculative drafts",
    )
    t.add_argument(
        "--sample-sizes",
        type=nonnegative_int,
        help="train the full size plus a random subset: this many sizes per step",
    )
    t.add_argument("--distill", type=float, help="weight of self-distillation from the full size (default 0)")
    t.add_argument(
        "--teacher",
        help="distil from this checkpoint's full model instead (frozen; same tokenizer): every size learns "
        "KL(teacher || size) with weight --distill, e.g. --init imported --teacher imported --distill 1",
    )
    t.add_argument(
        "--sampling",
        choices=["all", "sandwich", "mix"],
        help="what each step trains: all sizes (default); sandwich = full + smallest + --mixes random Mix'n'Match "
        "specs; mix = --mixes random specs only",
    )
    t.add_argument("--mixes", type=positive_int, help="random Mix'n'Match specs per step (default 2)")
    t.add_argument(
        "--bits",
        help="Matryoshka Quantization: train these bit widths jointly, e.g. 8,4,2 (every size at each; the top "
        "bits of one set of int8 codes); then `matryoshka quantize` stores the codes",
    )
    t.add_argument("--bit-weights", help="loss weight per --bits entry, e.g. 1,1,2 (default: all 1)")
    t.add_argument("--quant-group", type=nonnegative_int, help="input features per scale (default 32; 0 = per row)")
    t.add_argument(
        "--sample-cells", type=nonnegative_int, help="with --bits: train this many (size, bits) cells per step"
    )
    t.add_argument("--nest", help="axes to nest, comma-separated: width,heads,ffn,depth (default: all)")
    t.add_argument("--batch-size", type=positive_int, help="global sequences per step")
    t.add_argument("--seq-len", type=positive_int)
    t.add_argument("--grad-accum", type=positive_int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--save-every", type=positive_int)
    t.add_argument("--max-corpus-chars", type=nonnegative_int, help="use only this many characters of the corpus")
    t.add_argument("--dtype", choices=["auto", "fp32", "bf16"])
    t.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard under torchrun")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
