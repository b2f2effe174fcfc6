"""`matryoshka mixnmatch`: search per-layer granularities (and bit widths) for the best submodel under a budget."""

from __future__ import annotations

import argparse

from matryoshka_lm.errors import MatryoshkaError

from .options import nonnegative_int, pick_device, positive_int


def cmd_mixnmatch(a: argparse.Namespace) -> None:
    from matryoshka_lm.mixnmatch.search import run_mixnmatch

    best, table = run_mixnmatch(
        a.ckpt,
        a.budget,
        n_batches=a.batches,
        max_evals=a.max_evals,
        plot_path=a.plot,
        json_path=a.json,
        latency_tokens=a.latency_tokens,
        device=pick_device(a.device),
        bits=bit_widths(a.bits),
    )
    print(table)
    print(f"\nbest for {a.budget}: {best.text}")


def bit_widths(text: str | None) -> tuple[int | None, ...] | None:
    """'fp32,8,4,2' -> (None, 8, 4, 2); None -> None (the search's default)."""
    if not text:
        return None
    out: list[int | None] = []
    for x in (t.strip().lower() for t in text.split(",") if t.strip()):
        if x in ("fp32", "fp", "none"):
            out.append(None)
        elif x.removeprefix("int").isdigit():
            out.append(int(x.removeprefix("int")))
        else:
            raise MatryoshkaError(f"--bits: {x!r} is not a bit width; use e.g. fp32,8,4,2")
    return tuple(out)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("mixnmatch", help="search per-layer granularities for the best submodel under a budget")
    m.add_argument("ckpt")
    m.add_argument(
        "--budget",
        required=True,
        help="params=5M | flops=1.5G | latency=3ms (measured here) | memory=1.5MB (bytes of weights, size x bits)",
    )
    m.add_argument(
        "--bits",
        help="bit widths to try every candidate at, e.g. fp32,8,4,2 (default: those for a memory budget, else fp32)",
    )
    m.add_argument("--batches", type=positive_int, default=4, help="validation batches of 8 sequences per candidate")
    m.add_argument(
        "--max-evals", type=nonnegative_int, default=24, help="Mix'n'Match candidates to evaluate (plus the sizes)"
    )
    m.add_argument("--latency-tokens", type=positive_int, default=128, help="sequence length timed for latency budgets")
    m.add_argument("--plot", help="PNG path (default CKPT/mixnmatch.png)")
    m.add_argument("--json", help="JSON path (default CKPT/mixnmatch.json)")
    m.add_argument("--device", default="auto")
    m.set_defaults(func=cmd_mixnmatch)
