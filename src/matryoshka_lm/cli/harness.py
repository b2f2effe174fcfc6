"""`matryoshka harness`: lm-evaluation-harness tasks at every size of a checkpoint, one table per task."""

from __future__ import annotations

import argparse
import logging

from matryoshka_lm.errors import MatryoshkaError

from .options import pick_device, positive_int, spec_list

DEFAULT_TASKS = "matryoshka_ppl,matryoshka_cloze"


def cmd_harness(a: argparse.Namespace) -> None:
    try:
        from matryoshka_lm.eval.harness import format_tables, run_harness
    except ImportError as e:  # lm-eval itself is checked in harness.py; this is one of its dependencies
        raise MatryoshkaError(f'lm-evaluation-harness is not usable ({e}): pip install "lm-eval>=0.4"') from None

    if not a.verbose:  # lm-eval warns about every task config it fills in; the tables are what this prints
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    res = run_harness(
        a.ckpt,
        spec_list(a.sizes),
        tasks,
        include_path=a.include_path,
        limit=a.limit,
        out_json=a.json,
        device=pick_device(a.device),
        batch_size=a.batch_size,
    )
    print(format_tables(res))


def limit(text: str) -> int | float:
    """--limit: a count of documents per task, or a fraction of them below 1 (as lm-eval takes it)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value if value < 1 else int(value)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser(
        "harness",
        help="lm-evaluation-harness tasks at every size of a checkpoint, without exporting",
        description="Evaluate sizes of one checkpoint with lm-evaluation-harness (pip install 'lm-eval>=0.4'). "
        "Shipped offline tasks: matryoshka_ppl (held-out perplexity), matryoshka_cloze (next-line choice).",
    )
    h.add_argument("ckpt")
    h.add_argument(
        "--sizes",
        help='sizes, specs or cells (default: every size). "XL,S" = two sizes; a per-layer spec in a list: '
        '"mix:S,M,L,XL", or \';\' between specs (e.g. "S,M,L,XL;M@int4")',
    )
    h.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated lm-eval tasks (default: {DEFAULT_TASKS})")
    h.add_argument("--include-path", action="append", metavar="DIR", help="another folder of task YAMLs (repeatable)")
    h.add_argument("--limit", type=limit, help="documents per task (a fraction if below 1), for quick runs")
    h.add_argument("--json", help="write every size's lm-eval results here")
    h.add_argument("--batch-size", type=positive_int, default=8)
    h.add_argument("--device", default="auto")
    h.set_defaults(func=cmd_harness)
