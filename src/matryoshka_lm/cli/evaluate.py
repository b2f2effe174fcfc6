"""`matryoshka eval`: the per-size table of one checkpoint."""

from __future__ import annotations

import argparse

from .options import pick_device, positive_int


def cmd_eval(a: argparse.Namespace) -> None:
    from matryoshka_lm.train.eval_checkpoint import evaluate_checkpoint

    rows, text = evaluate_checkpoint(
        a.ckpt,
        sizes=a.sizes,
        data=a.data,
        n_batches=a.batches,
        json_path=a.json,
        plot_path=a.plot,
        device=pick_device(a.device),
    )
    print(text)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="per-size table: params, FLOPs/token, val loss, perplexity, agreement")
    e.add_argument("ckpt")
    e.add_argument(
        "--sizes",
        help='sizes, specs or cells (default: every trained size). "XL,S" = two sizes; a per-layer spec in a list: '
        '"mix:S,M,L,XL", or \';\' between specs (e.g. "S,M,L,XL;M@int4")',
    )
    e.add_argument("--data", help="evaluate on this text instead of the checkpoint's validation split")
    e.add_argument(
        "--batches", type=positive_int, default=None, help="validation batches (default: the run's eval_batches)"
    )
    e.add_argument("--json", help="write the table as JSON here (default CKPT/eval.json)")
    e.add_argument("--plot", help="write params-vs-loss PNG here (default CKPT/eval.png)")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)
