"""The `matryoshka` command line: one module per command group, each command calling one library function."""

from matryoshka_lm.cli.main import main

__all__ = ["main"]
