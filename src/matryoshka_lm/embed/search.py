"""Text-level search: embed texts with an embedding checkpoint, index them, search the index with text queries.

The vector index itself (retrieval.py) knows nothing of texts or encoders; this module joins the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from matryoshka_lm.core import nested
from matryoshka_lm.errors import MatryoshkaError

from .encoders import check_batch_size, load_encoder
from .pairs import read_texts
from .retrieval import VectorIndex, build_index, exact_search, funnel_search, load_index


def index_texts(
    ckpt: str | Path,
    path: str | Path,
    out: str | Path,
    size: str | None = None,
    batch_size: int = 64,
    force: bool = False,
    device: str = "cpu",
    hnsw_dim: int | None = None,
) -> Path:
    """Embed every line of `path` with size `size` of embedding checkpoint `ckpt` (all its dims) and index them."""
    check_batch_size(batch_size)
    texts = read_texts(path)
    if Path(out).exists() and not force:  # fail before the slow part
        raise MatryoshkaError(f"index {out} already exists; pass --force to replace it")
    encoder = load_encoder(ckpt, device)
    vecs = encoder.encode(texts, size, None, batch_size)
    meta = {"checkpoint": str(Path(ckpt).resolve()), "size": encoder.size_name(size)}
    return build_index(vecs, out, encoder.trained_dims, texts, meta, force, hnsw_dim)


def search_texts(
    index_path: str | Path,
    queries: list[str] | None = None,
    vectors: np.ndarray | None = None,
    ckpt: str | Path | None = None,
    size: str | None = None,
    dims: int | None = None,
    k: int = 10,
    funnel: list[int] | None = None,
    shortlist: list[int] | None = None,
    exact: bool = False,
    device: str = "cpu",
    hnsw_ef: int = 0,
) -> list[list[dict[str, Any]]]:
    """Search an index with query texts (embedded by `ckpt` at `size`, default: the index's encoder) or with
    query vectors; per query a list of {"id", "score", "text"} best first."""
    index = load_index(index_path)
    if (queries is None) == (vectors is None):
        raise MatryoshkaError("give query texts or query vectors (one of them)")
    if queries is not None:
        vectors = embed_queries(index, queries, ckpt, size, dims, device)
    elif dims is not None:
        vectors = nested.embedding_prefix(vectors, dims)
    if exact:
        scores, ids = exact_search(index, vectors, k)
    else:
        scores, ids = funnel_search(index, vectors, k, funnel, shortlist, hnsw_ef=hnsw_ef)
    texts = index.texts
    return [
        [
            {"id": int(i), "score": float(s), **({"text": texts[i]} if texts else {})}
            for s, i in zip(srow, irow)
            if i >= 0
        ]
        for srow, irow in zip(scores, ids)
    ]


def embed_queries(
    index: VectorIndex, queries: list[str], ckpt: str | Path | None, size: str | None, dims: int | None, device: str
) -> np.ndarray:
    if not queries or not all(q.strip() for q in queries):
        raise MatryoshkaError("empty query")
    encoder_meta = index.meta.get("encoder") or {}
    ckpt = ckpt or encoder_meta.get("checkpoint")
    if not ckpt:
        raise MatryoshkaError("this index was built from vectors; pass --ckpt to embed text queries")
    encoder = load_encoder(ckpt, device)
    size = size or encoder_meta.get("size")
    if dims is None:  # the most trained dims both the query size and the index have
        fits = [m for m in encoder.trained_dims if m <= min(index.dim, encoder.out_dim(size))]
        dims = max(fits) if fits else None
    return encoder.encode(queries, size, dims)
