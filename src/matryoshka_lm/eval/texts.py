"""Out-of-domain text: prose unlike the training corpus, to check that the ordering of sizes holds off it."""

from __future__ import annotations

from typing import Any

import numpy as np

from matryoshka_lm.data import encode_corpus


def ood_text() -> str:
    """Out-of-domain prose: the topic help of Python's documentation (stdlib pydoc_data), 0.46 M characters."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def ood_tokens(tok: Any) -> np.ndarray:
    return encode_corpus(tok, [ood_text()])
