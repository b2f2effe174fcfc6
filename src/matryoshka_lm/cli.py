"""`matryoshka` command line: one subcommand per library function. Errors print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import MatryoshkaError


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cmd_train(a: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .config import preset
    from .train import train

    model_cfg, tcfg = preset(a.preset)
    overrides = {"steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "grad_accum": a.grad_accum,
                 "lr": a.lr, "seed": a.seed, "only": a.only, "distill": a.distill, "sample_sizes": a.sample_sizes,
                 "max_corpus_chars": a.max_corpus_chars, "fsdp": a.fsdp or None, "dtype": a.dtype,
                 "sizes": a.sizes.split(",") if a.sizes else None, "save_every": a.save_every}
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
    out = Path(a.out or f"runs/{a.preset}")
    bar = tqdm(total=tcfg.steps, desc="train", unit="step", disable=a.quiet, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 10)

    def on_step(step: int, m: dict) -> None:
        if bar.n == 0 and step > 1:
            bar.update(step - 1)
        loss = " ".join(f"{n}={v:.3f}" for n, v in m["loss"].items())
        bar.set_postfix_str(f"{loss} tok/s={m['tokens_per_s']:.0f}")
        bar.update(1)
        if "val_loss" in m:
            val = " ".join(f"{n}={v:.3f}" for n, v in m["val_loss"].items())
            bar.write(f"step {step}: val {val}")

    try:
        train(model_cfg, tcfg, out, data=a.data, resume=a.resume, init=a.init, device=_device(a.device),
              callback=on_step)
    finally:
        bar.close()
    if not a.quiet:
        print(f"checkpoint written to {out}", file=sys.stderr)


def cmd_eval(a: argparse.Namespace) -> None:
    from .report import evaluate_checkpoint

    rows, text = evaluate_checkpoint(a.ckpt, sizes=a.sizes, data=a.data, n_batches=a.batches,
                                     json_path=a.json, plot_path=a.plot, device=_device(a.device))
    print(text)


def cmd_generate(a: argparse.Namespace) -> None:
    from .checkpoint import load_model, load_tokenizer
    from .generate import generate
    from .spec import parse_spec, size_names

    model = load_model(a.ckpt, _device(a.device))
    tok = load_tokenizer(a.ckpt)
    if not a.prompt:
        raise MatryoshkaError("empty prompt")
    ids = tok.encode(a.prompt).ids
    sizes = size_names(model.cfg) if a.size == "all" else [a.size]
    for size in sizes:
        spec = parse_spec(model.cfg, size)
        new = generate(model, ids, spec, a.max_new_tokens, a.temperature, a.seed, tok.token_to_id("<|endoftext|>"))
        text = tok.decode(new)
        print(f"[{size}] {a.prompt}{text}" if len(sizes) > 1 else a.prompt + text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="matryoshka", description="Train, evaluate and run nested (Matryoshka) LMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a Matryoshka model (all sizes jointly) or a dense baseline (--only)")
    t.add_argument("--preset", default="demo", help="tiny | demo | small (default: demo)")
    t.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    t.add_argument("--out", help="checkpoint directory (default: runs/PRESET)")
    t.add_argument("--data", help="text file or folder (default: embedded Shakespeare + KJV corpus)")
    t.add_argument("--only", help="baseline mode: train one dense model with this size's shape, e.g. M")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--init", help="start from this checkpoint's weights and tokenizer")
    t.add_argument("--sizes", help="comma-separated sizes to train jointly (default: all)")
    t.add_argument("--sample-sizes", type=int, help="train the full size plus a random subset: this many sizes per step")
    t.add_argument("--distill", type=float, help="weight of self-distillation from the full size (default 0)")
    t.add_argument("--nest", help="axes to nest, comma-separated: width,heads,ffn,depth (default: all)")
    t.add_argument("--batch-size", type=int, help="global sequences per step")
    t.add_argument("--seq-len", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--save-every", type=int)
    t.add_argument("--max-corpus-chars", type=int, help="use only this many characters of the corpus")
    t.add_argument("--dtype", choices=["auto", "fp32", "bf16"])
    t.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard under torchrun")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="per-size table: params, FLOPs/token, val loss, perplexity, agreement")
    e.add_argument("ckpt")
    e.add_argument("--sizes", help="comma-separated sizes or Mix'n'Match specs; ';' separates specs with commas")
    e.add_argument("--data", help="evaluate on this text instead of the checkpoint's validation split")
    e.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's eval_batches)")
    e.add_argument("--json", help="write the table as JSON here (default CKPT/eval.json)")
    e.add_argument("--plot", help="write params-vs-loss PNG here (default CKPT/eval.png)")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="sample text at one size (or --size all)")
    g.add_argument("ckpt")
    g.add_argument("--size", default="XL", help="size name, Mix'n'Match spec, or 'all'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except MatryoshkaError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
