"""One exception type for every user-facing failure; the CLI turns it into a one-line error."""

from __future__ import annotations


class MatryoshkaError(ValueError):
    """Bad input or state that the user can fix: the message names the problem."""
