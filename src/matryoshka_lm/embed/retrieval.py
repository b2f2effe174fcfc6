"""Adaptive (funnel) retrieval over Matryoshka embeddings with FAISS.

An index directory holds
  index.faiss    a FAISS IndexFlatIP over the full-dims unit vectors (faiss.write_index; nothing pickled)
  index.json     count, dims, the trained Matryoshka dims, the encoder (checkpoint and size) that made it
  texts.jsonl    (optional) the text of each vector, one JSON string per line
  hnsw_{m}.faiss (optional) an HNSW graph over the first m dims, for an approximate first funnel stage
Search is exact (one flat inner-product scan at the query's dims) or a funnel (MRL "adaptive retrieval"):
shortlist with the first m1 dims over the whole index, then re-rank the shortlist with m2 > m1 dims, and so on.
Prefixes are re-normalized (truncate, then L2-normalize), so every stage ranks by cosine at its dims.
The first stage scans all N vectors (flat) or walks an HNSW graph of the low-dim prefix, as the MRL paper's
adaptive retrieval does; either way later stages touch only the shortlist.

This module is vectors only; embedding texts and searching with text queries is search.py.

Queries may have fewer dims than the index (cross-size retrieval: an index built with the full model, queried
with a smaller submodel's embeddings): the index's vectors are then compared on the queries' prefix.

Shapes: N indexed vectors, D their dims, Q queries, m a prefix (stage) dim, s a shortlist size, k results.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka_lm.config import load_json
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import nested
from matryoshka_lm.errors import MatryoshkaError

log = logging.getLogger(__name__)

INDEX_FILE, META_FILE, TEXTS_FILE, HNSW_FILE = "index.faiss", "index.json", "texts.jsonl", "hnsw_{m}.faiss"
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 80
FORMAT = "matryoshka-index/1"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MatryoshkaError("retrieval needs FAISS: pip install faiss-cpu") from None
    return faiss


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalized, float32, C-contiguous."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pair_recall(q: np.ndarray, p: np.ndarray, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """recall@k of query i's positive p[i] among all rows of p (cosine): {"r@1": ..., "r@10": ...}."""
    sims = unit_rows(q) @ unit_rows(p).T  # (N, N)
    rank = (sims > np.diag(sims)[:, None]).sum(1)  # 0 = the positive is first
    return {f"r@{k}": float((rank < k).mean()) for k in ks}


# ---------------------------------------------------------------- build / load


def _check_vectors(vectors: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(vectors)
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise MatryoshkaError(f"{what} must be a non-empty (count, dims) matrix, got shape {v.shape}")
    if not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all():
        raise MatryoshkaError(f"{what} must be finite floating-point numbers")
    return unit_rows(v)


def build_index(
    vectors: np.ndarray,
    out: str | Path,
    dims: list[int] | None = None,
    texts: list[str] | None = None,
    encoder: dict[str, Any] | None = None,
    force: bool = False,
    hnsw_dim: int | None = None,
) -> Path:
    """Write an index directory for `vectors` (N, D) (re-normalized here); `dims` are the Matryoshka dims the
    encoder was trained at (funnel stages must use them), `encoder` says how to embed queries for it,
    `hnsw_dim` adds an HNSW graph over that prefix for the first funnel stage."""
    faiss = _faiss()
    x = _check_vectors(vectors, "index vectors")
    N, D = x.shape
    if dims is not None:
        dims = sorted({int(m) for m in dims if 0 < int(m) <= D})
    if texts is not None and len(texts) != N:
        raise MatryoshkaError(f"{len(texts)} texts for {N} vectors")
    out = Path(out)
    if out.exists():
        if not force:
            raise MatryoshkaError(f"index {out} already exists; pass --force to replace it")
        if not (out / META_FILE).is_file() and any(out.iterdir()):
            raise MatryoshkaError(f"{out} exists and is not an index; refusing to replace it")
        shutil.rmtree(out)
    flat = faiss.IndexFlatIP(D)
    flat.add(x)
    out.mkdir(parents=True)
    ck.atomic_write(out / INDEX_FILE, lambda tmp: faiss.write_index(flat, tmp))
    if texts is not None:
        ck.atomic_write(
            out / TEXTS_FILE,
            lambda tmp: Path(tmp).write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8"),
        )
    meta = {
        "format": FORMAT,
        "count": N,
        "dim": D,
        "metric": "cosine (inner product of unit vectors)",
        "matryoshka_dimensions": dims,
        "normalized": "after_truncation",
        "encoder": encoder,
        "texts": texts is not None,
    }
    if hnsw_dim:
        if not 0 < hnsw_dim <= D or (dims and hnsw_dim not in dims):
            raise MatryoshkaError(f"--hnsw-dim {hnsw_dim} must be one of the index's dims {dims or [D]}")
        graph = VectorIndex(flat, {"dim": D}).hnsw(hnsw_dim)
        ck.atomic_write(out / HNSW_FILE.format(m=hnsw_dim), lambda tmp: faiss.write_index(graph, tmp))
        meta["hnsw_dims"] = [hnsw_dim]
    ck.write_json(out / META_FILE, meta)  # written last: its presence marks a complete index
    return out


class VectorIndex:
    """A loaded index: the flat FAISS index, its unit vectors (N, D), metadata and (optionally) texts."""

    def __init__(self, flat: Any, meta: dict[str, Any], texts: list[str] | None = None):
        faiss = _faiss()
        self.flat, self.meta, self.texts = flat, meta, texts
        self.vectors = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
        self._prefix: dict[int, tuple[np.ndarray, Any]] = {}
        self._hnsw: dict[int, Any] = {}

    @property
    def count(self) -> int:
        return self.flat.ntotal

    @property
    def dim(self) -> int:
        return self.flat.d

    @property
    def dims(self) -> list[int] | None:
        return self.meta.get("matryoshka_dimensions")

    def prefix(self, m: int) -> tuple[np.ndarray, Any]:
        """(unit vectors of the first m dims (N, m), a flat index over them); the full dims need no copy."""
        if m == self.dim:
            return self.vectors, self.flat
        if m not in self._prefix:
            faiss = _faiss()
            p = nested.embedding_prefix(self.vectors, m)
            idx = faiss.IndexFlatIP(m)
            idx.add(p)
            self._prefix[m] = (p, idx)
        return self._prefix[m]

    def hnsw(self, m: int) -> Any:
        """An HNSW graph (inner product) over the unit first-m-dims vectors: loaded if saved, else built here."""
        if m not in self._hnsw:
            faiss = _faiss()
            graph = faiss.IndexHNSWFlat(m, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            graph.add(self.prefix(m)[0])
            self._hnsw[m] = graph
        return self._hnsw[m]


def load_index(path: str | Path) -> VectorIndex:
    faiss = _faiss()
    path = Path(path)
    if not (path / META_FILE).is_file():
        hint = "" if path.exists() else " (build one with `matryoshka index build`)"
        raise MatryoshkaError(f"index {path} does not exist or is incomplete (no {META_FILE}){hint}")
    meta = load_json(path / META_FILE)
    if meta.get("format") != FORMAT:
        raise MatryoshkaError(f"{path / META_FILE} is not a {FORMAT} index")
    try:
        flat = faiss.read_index(str(path / INDEX_FILE))
    except RuntimeError as e:
        raise MatryoshkaError(f"cannot read {path / INDEX_FILE}: {str(e).splitlines()[0]}") from None
    if (flat.ntotal, flat.d) != (meta["count"], meta["dim"]):
        raise MatryoshkaError(
            f"{path}: index holds {flat.ntotal} x {flat.d}, index.json says {meta['count']} x {meta['dim']}"
        )
    texts = None
    if (path / TEXTS_FILE).is_file():
        texts = [json.loads(line) for line in (path / TEXTS_FILE).read_text(encoding="utf-8").splitlines()]
    index = VectorIndex(flat, meta, texts)
    for m in meta.get("hnsw_dims") or []:
        index._hnsw[m] = faiss.read_index(str(path / HNSW_FILE.format(m=m)))
    return index


# ---------------------------------------------------------------- search


def check_queries(index: VectorIndex, queries: np.ndarray) -> np.ndarray:
    q = _check_vectors(queries, "query vectors")
    m = q.shape[1]
    if m > index.dim:
        raise MatryoshkaError(
            f"queries have {m} dims but the index has {index.dim}; embed the queries at --dims {index.dim} or less"
        )
    if m < index.dim and index.dims and m not in index.dims:
        raise MatryoshkaError(
            f"queries have {m} dims, not a Matryoshka dim of this index {index.dims}: prefixes "
            f"of other lengths were never trained to be comparable"
        )
    return q


def exact_search(index: VectorIndex, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive cosine search at the queries' dims: (scores (Q, k), ids (Q, k)), best first."""
    q = check_queries(index, queries)
    k = _check_k(k, index)
    _, flat = index.prefix(q.shape[1])
    return flat.search(q, k)


def funnel_search(
    index: VectorIndex,
    queries: np.ndarray,
    k: int = 10,
    dims: list[int] | None = None,
    shortlist: list[int] | None = None,
    batch: int = 256,
    hnsw_ef: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive retrieval: search all N with dims[0], keep shortlist[0]; re-rank those with dims[1], keep
    shortlist[1]; ... the last stage (dims[-1]) keeps k. Returns (scores at dims[-1] (Q, k), ids (Q, k)).

    With shortlist[0] >= N the first stage keeps everything and the result is exact search at dims[-1].
    hnsw_ef > 0 makes the first stage approximate: an HNSW graph over the dims[0] prefix, searched with
    efSearch = max(hnsw_ef, shortlist[0]).
    """
    q = check_queries(index, queries)
    k = _check_k(k, index)
    dims, shortlist = default_funnel(index, q.shape[1], k) if dims is None else (list(dims), shortlist)
    dims, shortlist = check_funnel(index, q.shape[1], k, dims, shortlist)
    _, first = index.prefix(dims[0])
    if hnsw_ef > 0:
        first = index.hnsw(dims[0])
        first.hnsw.efSearch = max(hnsw_ef, shortlist[0] if len(dims) > 1 else k)
    if len(dims) == 1:  # one stage: search at that prefix
        return first.search(nested.embedding_prefix(q, dims[0]), k)
    _, ids = first.search(nested.embedding_prefix(q, dims[0]), shortlist[0])  # (Q, s0); -1 where HNSW came back short
    scores = np.empty((len(q), k), np.float32)
    out_ids = np.empty((len(q), k), np.int64)
    for i in range(0, len(q), batch):  # re-rank in query batches: the gather is (batch, s, m) floats
        scores[i : i + batch], out_ids[i : i + batch] = _rerank(
            index, q[i : i + batch], ids[i : i + batch], dims[1:], shortlist[1:] + [k]
        )
    return scores, out_ids


def _rerank(
    index: VectorIndex, q: np.ndarray, cand: np.ndarray, dims: list[int], keeps: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidates (b, s) at each of `dims` in turn, keeping the best `keeps[j]` after stage j."""
    for m, keep in zip(dims, keeps):
        vecs, _ = index.prefix(m)
        s = np.matmul(vecs[np.maximum(cand, 0)], nested.embedding_prefix(q, m)[:, :, None])[
            :, :, 0
        ]  # (b, s) cosine at m
        s[cand < 0] = -np.inf
        if keep < s.shape[1]:
            top = np.argpartition(-s, keep - 1, axis=1)[:, :keep]
            s, cand = np.take_along_axis(s, top, 1), np.take_along_axis(cand, top, 1)
        order = np.argsort(-s, axis=1, kind="stable")
        s, cand = np.take_along_axis(s, order, 1), np.take_along_axis(cand, order, 1)
    return s, np.where(np.isfinite(s), cand, -1)


def default_funnel(index: VectorIndex, qdim: int, k: int) -> tuple[list[int], list[int]]:
    """Two stages: shortlist max(200, 20 k) candidates at the largest trained dim <= qdim/8, re-rank at qdim."""
    allowed = [m for m in (index.dims or []) if m <= qdim] or [qdim]
    low = max([m for m in allowed if m <= qdim // 8] or [min(allowed)])
    if low == qdim:
        return [qdim], []
    return [low, qdim], [min(index.count, max(200, 20 * k))]


def check_funnel(
    index: VectorIndex, qdim: int, k: int, dims: list[int], shortlist: list[int] | None
) -> tuple[list[int], list[int]]:
    if not dims:
        raise MatryoshkaError("a funnel needs at least one stage dim")
    if any(b <= a for a, b in zip(dims, dims[1:])):
        raise MatryoshkaError(f"funnel dims {dims} must increase")
    for m in dims:
        if not 0 < m <= qdim:
            raise MatryoshkaError(f"funnel dim {m} is outside 1..{qdim} (the queries' dims)")
        if index.dims and m != index.dim and m not in index.dims:
            raise MatryoshkaError(f"funnel dim {m} is not a Matryoshka dim of this index {index.dims}")
    shortlist = list(shortlist or [])
    if len(shortlist) != len(dims) - 1:
        raise MatryoshkaError(f"{len(dims)} funnel dims need {len(dims) - 1} shortlist sizes, got {len(shortlist)}")
    shortlist = [min(int(s), index.count) for s in shortlist]
    if any(s < k for s in shortlist) or any(b > a for a, b in zip(shortlist, shortlist[1:])):
        raise MatryoshkaError(f"shortlist sizes {shortlist} must not increase and must be at least k={k}")
    return dims, shortlist


def _check_k(k: int, index: VectorIndex) -> int:
    if k <= 0:
        raise MatryoshkaError(f"k must be positive, got {k}")
    return min(k, index.count)


def overlap_at_k(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of truth's top-k ids (per row) found in ids' top-k: recall@k against exact search."""
    k = truth.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(ids, truth)]))
