"""`matryoshka` command line: the parser assembled from one module per command group, and main().

Errors print one line: a MatryoshkaError (bad input) as `error: ...` with exit 2; anything unexpected as
`error: ...` plus a hint to rerun with -v (which shows the traceback) with exit 1; bad options as argparse's
usage error with exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from matryoshka_lm.errors import MatryoshkaError

from . import (
    convert,
    demo,
    elastify,
    embed,
    evaluate,
    generate,
    harness,
    mixnmatch,
    prepare,
    quantize,
    route,
    serve,
    study,
    train,
)

# the order of `matryoshka --help`
GROUPS = (
    prepare,
    train,
    evaluate,
    generate,
    convert,
    quantize,
    elastify,
    mixnmatch,
    study,
    harness,
    embed,
    serve,
    route,
    demo,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="matryoshka", description="Train, evaluate and run nested (Matryoshka) LMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def _first_line(e: BaseException) -> str:
    """'RuntimeError: first line of the message': a traceback's last line, kept to one line."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


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
    except Exception as e:  # a bug or an input the library did not foresee: still one line, unless -v
        if args.verbose:
            raise
        print(f"error: {_first_line(e)} (rerun with -v for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
