"""Texts in, unit vectors out, whatever made the embedding: our checkpoints (embedding.json) or Hugging Face
encoder folders (hf_encoder.HFEncoder); `embed_file` is the `matryoshka embed` command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import SubmodelSpec, format_spec, parse_spec
from matryoshka_lm.errors import MatryoshkaError

from .hf_encoder import HFEncoder, is_hf_encoder
from .loss import resolve_dims
from .model import Embedder, embed_texts, load_embedder
from .pairs import read_texts

log = logging.getLogger(__name__)


class TextEncoder:
    """What `embed`, `index build` and `search` need from an embedding checkpoint: texts in, unit vectors out.

    Our checkpoints (embedding.json) and Hugging Face encoder folders (hf_encoder.HFEncoder) both provide it.
    """

    def __init__(self, model: Embedder, tok: Any, meta: dict[str, Any]):
        self.model, self.tok, self.meta = model, tok, meta
        self.trained_dims = [int(m) for m in meta.get("matryoshka_dimensions") or [model.out_dim()]]

    def spec(self, size: str | None) -> SubmodelSpec:
        spec = parse_spec(self.model.lm.cfg, size) if size else self.model.lm.full
        if size and format_spec(spec) not in self.meta.get("sizes", []):
            log.warning("size %s was not among the trained sizes %s", size, self.meta.get("sizes"))
        return spec

    def out_dim(self, size: str | None = None) -> int:
        return self.model.out_dim(self.spec(size))

    def resolve_dims(self, size: str | None, dims: int | None) -> int:
        return resolve_dims(self.out_dim(size), self.trained_dims, dims, f"size {size}" if size else "the model")

    def size_name(self, size: str | None) -> str:
        return format_spec(self.spec(size))

    def encode(
        self, texts: list[str], size: str | None = None, dims: int | None = None, batch_size: int = 64
    ) -> np.ndarray:
        m = self.resolve_dims(size, dims)
        return embed_texts(
            self.model, self.tok, texts, self.spec(size), m, batch_size, self.meta.get("train", {}).get("max_tokens")
        )


def load_encoder(ckpt: str | Path, device: str = "cpu") -> TextEncoder | HFEncoder:
    """A TextEncoder for an embedding checkpoint, or an HFEncoder for a Hugging Face encoder folder."""
    if is_hf_encoder(ckpt):
        return HFEncoder(ckpt, device=device)
    return TextEncoder(*load_embedder(ckpt, device))


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise MatryoshkaError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def embed_file(
    ckpt: str | Path,
    path: str | Path,
    out: str | Path | None = None,
    size: str | None = None,
    dims: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """Embed every non-blank line of `path` (or each {"text"} of a .jsonl) with size `size` of the embedding
    checkpoint `ckpt`; returns (N, dims) unit vectors and writes them to `out` (.npy) if given."""
    check_batch_size(batch_size)  # dims are checked against the trained dims by the encoder
    texts = read_texts(path)
    encoder = load_encoder(ckpt, device)
    vecs = encoder.encode(texts, size, dims, batch_size)
    if out is not None:
        save_npy(out, vecs)
    return vecs


def save_npy(path: str | Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    ck.atomic_write(Path(path), write)
