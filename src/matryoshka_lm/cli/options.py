"""Helpers every command group shares: device choice, argparse types for counts, comma-separated lists, and the
progress lines of long commands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from matryoshka_lm.errors import MatryoshkaError


def pick_device(name: str) -> str:
    """'auto' -> cuda when available, else cpu; any other name as given."""
    if name == "auto":
        import torch  # here, not at the top: `matryoshka --help` must not pay for importing torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1 (steps, batch sizes, k, dims...)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type for counts where 0 means 'none' or 'off' (--proj-dim 0, --hnsw-ef 0)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return value


def port(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {value}")
    return value


def _number_list(text: str | None, what: str, kind: type, words: str) -> list | None:
    if not text:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MatryoshkaError(f"{what} must be comma-separated {words}, got {text!r}") from None


def int_list(text: str | None, what: str) -> list[int] | None:
    """'8,16,64' -> [8, 16, 64]; None or '' -> None."""
    return _number_list(text, what, int, "integers")


def float_list(text: str | None, what: str) -> list[float] | None:
    """'1,1,2.5' -> [1.0, 1.0, 2.5]; None or '' -> None."""
    return _number_list(text, what, float, "numbers")


def spec_list(text: str | None) -> list[str] | None:
    """Sizes or Mix'n'Match specs by the one list rule (core.spec.split_specs: "XL,S" is two sizes)."""
    from matryoshka_lm.core.spec import split_specs  # here, not at the top: `matryoshka --help` imports no torch

    return split_specs(text)


@contextmanager
def progress(*loggers: str, stream: TextIO | None = None) -> Iterator[None]:
    """Print the INFO records of these library loggers as '[HH:MM:SS] message' lines on `stream` (default stderr)
    while the block runs: the library only logs, and a long command shows its progress here, in the CLI."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    saved = []
    for name in loggers:
        log = logging.getLogger(name)
        saved.append((log, log.level, log.propagate))
        log.addHandler(handler)
        log.setLevel(min(log.getEffectiveLevel(), logging.INFO))
        log.propagate = False  # once is enough: not again through the root logger's handler
    try:
        yield
    finally:
        for log, level, propagate in saved:
            log.removeHandler(handler)
            log.setLevel(level)
            log.propagate = propagate
