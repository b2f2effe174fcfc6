"""`matryoshka train`: one library call, train(), with a progress bar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matryoshka_lm.config import PREPARE_TEXT
from matryoshka_lm.errors import MatryoshkaError

from .options import float_list, int_list, nonnegative_int, pick_device, positive_float, positive_int, spec_list


def _list(kind, flag: str):
    """An argparse type for a comma-separated list flag whose error is options' own message."""

    def parse(text: str):
        try:
            return kind(text, flag)
        except MatryoshkaError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag}: ")) from None

    parse.__name__ = "list"
    return parse


# TrainConfig fields the command line sets, with their argparse settings: the flag is the field's name with dashes,
# and a flag not given (None) keeps the preset's value (on --resume: the run's).
TRAIN_FLAGS: dict[str, dict] = {
    "steps": dict(type=positive_int, help="optimizer steps (default: the preset's)"),
    "only": dict(help="baseline mode: train one dense model with this size's shape, e.g. M"),
    "sizes": dict(type=_list(lambda s, _: spec_list(s), "--sizes"), help="sizes to train jointly, e.g. XL,M,S"),
    "size_weights": dict(
        type=_list(float_list, "--size-weights"),
        help="loss weight per trained size, largest first, e.g. 1,2,1,2 (default: all 1); heavier early exits "
        "raise their acceptance as speculative drafts",
    ),
    "sample_sizes": dict(type=nonnegative_int, help="train the full size plus a random subset: this many per step"),
    "distill": dict(type=float, help="weight of self-distillation from the full size (default 0)"),
    "teacher": dict(
        help="distil from this checkpoint's full model instead (frozen; same tokenizer): every size learns "
        "KL(teacher || size) with weight --distill, e.g. --init imported --teacher imported --distill 1"
    ),
    "sampling": dict(
        choices=["all", "sandwich", "mix"],
        help="what each step trains: all sizes (default); sandwich = full + smallest + --mixes random Mix'n'Match "
        "specs; mix = --mixes random specs only",
    ),
    "mixes": dict(type=positive_int, help="random Mix'n'Match specs per step (default 2)"),
    "bits": dict(
        type=_list(int_list, "--bits"),
        help="Matryoshka Quantization: train these bit widths jointly, e.g. 8,4,2 (every size at each; the top "
        "bits of one set of int8 codes); then `matryoshka quantize` stores the codes",
    ),
    "bit_weights": dict(type=_list(float_list, "--bit-weights"), help="loss weight per --bits entry, e.g. 1,1,2"),
    "quant_group": dict(type=nonnegative_int, help="input features per scale (default 32; 0 = per row)"),
    "sample_cells": dict(type=nonnegative_int, help="with --bits: train this many (size, bits) cells per step"),
    "batch_size": dict(type=positive_int, help="global sequences per step"),
    "seq_len": dict(type=positive_int),
    "grad_accum": dict(type=positive_int),
    "lr": dict(type=float),
    "seed": dict(type=int),
    "save_every": dict(type=positive_int),
    "max_corpus_chars": dict(type=nonnegative_int, help="use only this many characters of the corpus"),
    "prepare_text": dict(
        choices=list(PREPARE_TEXT),
        help="text --data goes through `matryoshka prepare` into a cache ($MATRYOSHKA_CACHE, default "
        "~/.cache/matryoshka-lm) and trains from memory-mapped shards: auto (default) when over 256 MB or JSON/"
        "Parquet; always; never (encode in memory each run)",
    ),
    "dtype": dict(choices=["auto", "fp32", "bf16"]),
    "fsdp": dict(action="store_const", const=True, help="shard with FSDP2 fully_shard under torchrun"),
    "checkpointing": dict(
        action="store_const", const=True, help="activation checkpointing: recompute each block in the backward"
    ),
    "compile": dict(action="store_const", const=True, help="torch.compile every block (first steps compile)"),
    "fused_adamw": dict(choices=["auto", "on", "off"], help="fused AdamW kernel (default auto: on CUDA)"),
}


def progress(steps: int, quiet: bool):
    """A tqdm bar over the steps and the train() callback that moves it (losses, tokens/s, each evaluation)."""
    from tqdm import tqdm

    interval = 0.5 if sys.stderr.isatty() else 10
    bar = tqdm(total=steps, desc="train", unit="step", disable=quiet, dynamic_ncols=True, mininterval=interval)

    def on_step(step: int, m: dict) -> None:
        if bar.n == 0 and step > 1:
            bar.update(step - 1)
        loss = " ".join(f"{n}={v:.3f}" for n, v in m["loss"].items())
        mfu = f" MFU={m['mfu']:.1%}" if "mfu" in m else ""
        bar.set_postfix_str(f"{loss} tok/s={m['tokens_per_s']:.0f}{mfu}", refresh=False)
        bar.update(1)
        if "val_loss" in m:
            val = " ".join(f"{n}={v:.3f}" for n, v in m["val_loss"].items())
            bar.write(f"step {step}: val {val}")

    return bar, on_step


def cmd_train(a: argparse.Namespace) -> None:
    from matryoshka_lm.config import preset
    from matryoshka_lm.train.loop import train

    model_cfg, tcfg = preset(a.preset)
    overrides = {field: getattr(a, field) for field in TRAIN_FLAGS}  # None = not given
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
    if a.dry_run:
        from matryoshka_lm.train.dry_run import format_plan, run_plan

        print(format_plan(run_plan(model_cfg, tcfg)))
        return
    out = Path(a.out or f"runs/{a.preset}")
    bar, on_step = progress(tcfg.steps, a.quiet)
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
            peak_tflops=a.peak_tflops,
        )
    finally:
        bar.close()
    if not a.quiet:
        print(f"checkpoint written to {out}", file=sys.stderr)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a Matryoshka model (all sizes jointly) or a dense baseline (--only)")
    t.add_argument("--preset", default="demo", help="tiny | demo | small | memory (default: demo)")
    t.add_argument("--out", help="checkpoint directory (default: runs/PRESET)")
    t.add_argument(
        "--data",
        help="text file or folder, or a folder made by `matryoshka prepare` (default: embedded Shakespeare + KJV)",
    )
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
    t.add_argument("--nest", help="axes to nest, comma-separated: width,heads,ffn,depth (default: all)")
    for field, kw in TRAIN_FLAGS.items():
        t.add_argument("--" + field.replace("_", "-"), dest=field, **kw)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument(
        "--peak-tflops",
        type=positive_float,
        help="one device's peak TFLOP/s for the logged MFU (default: a known GPU's bf16 peak, else measured)",
    )
    t.add_argument(
        "--dry-run", action="store_true", help="print the plan (parameters, tokens, FLOPs, hours) and do not train"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
