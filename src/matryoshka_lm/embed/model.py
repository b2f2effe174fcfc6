"""Matryoshka embeddings (MRL, Kusupati et al. 2022): one vector whose first m dims are themselves an embedding.

An embedding is the mean of a submodel's final-normed hidden states over the real tokens (right padding is
invisible to a causal model), optionally followed by a linear projection; it is cut to the dims asked for and
L2-normalized after the cut (loss.shrink). Training is in training.py, the objective in loss.py.

Shapes: B batch, T tokens, C hidden width of the spec, D embedding dims (C, or the projection's width).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from matryoshka_lm.config import load_json
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import nested
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec
from matryoshka_lm.data import EOT
from matryoshka_lm.errors import MatryoshkaError

from .loss import check_dims, shrink

EMBEDDING_JSON = "embedding.json"
PROJECTION = "projection.safetensors"

__all__ = [
    "Embedder",
    "mean_pool",
    "tokenize",
    "embed_ids",
    "embed_texts",
    "save_embedding",
    "load_embedder",
    "EMBEDDING_JSON",
    "PROJECTION",
    "shrink",
]


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: h (B, T, C), mask (B, T) of 0/1 -> (B, C)."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class Embedder(nn.Module):
    """Our LM, mean pooling and an optional projection. A spec picks the submodel; the embedding of a spec has
    spec.width dims, or `proj_dim` with a projection (whose input columns are sliced to the spec's width)."""

    def __init__(self, lm: MatryoshkaLM, proj_dim: int = 0):
        super().__init__()
        self.lm = lm
        self.proj = nn.Linear(lm.cfg.d_model, proj_dim, bias=False) if proj_dim else None
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=lm.cfg.d_model**-0.5)

    def out_dim(self, spec: SubmodelSpec | None = None) -> int:
        return self.proj.out_features if self.proj is not None else (spec or self.lm.full).width

    def forward(self, idx: torch.Tensor, mask: torch.Tensor, spec: SubmodelSpec | None = None) -> torch.Tensor:
        h = self.lm.hidden_states(idx, spec)  # (B, T, C)
        e = mean_pool(h.float(), mask)  # (B, C)
        if self.proj is not None:
            e = nested.linear(e, self.proj.weight, self.proj.out_features)  # (B, D)
        return e


def encode_texts(tok: Any, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text, truncated to `max_tokens`; a text without tokens is an error."""
    ids = [e.ids[:max_tokens] for e in tok.encode_batch(list(texts))]
    for i, row in enumerate(ids):
        if not row:
            raise MatryoshkaError(f"text {i} ({texts[i][:40]!r}) has no tokens")
    return ids


def pad_batch(
    ids: list[list[int]], pad_id: int = 0, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and mask (B, T) of 0/1."""
    T = max(len(r) for r in ids)
    idx = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), T)
    for i, row in enumerate(ids):
        idx[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return idx.to(device), mask.to(device)


def tokenize(
    tok: Any, texts: list[str], max_tokens: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and mask (B, T); each text truncated to `max_tokens`."""
    return pad_batch(encode_texts(tok, texts, max_tokens), tok.token_to_id(EOT) or 0, device)


@torch.inference_mode()
def embed_ids(
    model: Embedder,
    ids: list[list[int]],
    spec: SubmodelSpec | None = None,
    dims: int | None = None,
    batch_size: int = 64,
    pad_id: int = 0,
) -> np.ndarray:
    """L2-normalized embeddings (N, dims) float32 of token id lists from submodel `spec` (default: the full
    model, all dims). Batched by length (less padding), returned in input order."""
    if not ids:
        raise MatryoshkaError("no texts to embed")
    if batch_size <= 0:
        raise MatryoshkaError(f"batch_size must be positive, got {batch_size}")
    if any(len(row) == 0 for row in ids):
        raise MatryoshkaError("an input has no tokens")
    spec = spec or model.lm.full
    D = model.out_dim(spec)
    dims = D if dims is None else check_dims([dims], D)[0]
    device = next(model.parameters()).device
    order = np.argsort([len(row) for row in ids], kind="stable")
    out = np.empty((len(ids), dims), dtype=np.float32)
    model.eval()
    for i in range(0, len(ids), batch_size):
        rows = order[i : i + batch_size]
        idx, mask = pad_batch([ids[j] for j in rows], pad_id, device)
        out[rows] = shrink(model(idx, mask, spec), dims).float().cpu().numpy()
    return out


def embed_texts(
    model: Embedder,
    tok: Any,
    texts: list[str],
    spec: SubmodelSpec | None = None,
    dims: int | None = None,
    batch_size: int = 64,
    max_tokens: int | None = None,
) -> np.ndarray:
    """L2-normalized embeddings (N, dims) float32 of `texts` from submodel `spec` (default: full model, all dims),
    each text truncated to `max_tokens` (at most the model's context)."""
    if not texts:
        raise MatryoshkaError("no texts to embed")
    max_tokens = min(max_tokens or model.lm.cfg.max_seq_len, model.lm.cfg.max_seq_len)
    return embed_ids(model, encode_texts(tok, texts, max_tokens), spec, dims, batch_size, tok.token_to_id(EOT) or 0)


def save_embedding(out: str | Path, model: Embedder, tokenizer_json: str, meta: dict[str, Any]) -> Path:
    """Write the LM checkpoint files, the projection and embedding.json (last: its presence marks completion).

    config.json also carries `is_matryoshka` and `matryoshka_dimensions` at its top level, the keys vLLM and
    TEI read before they accept a `dimensions` request parameter.
    """
    out = Path(out)
    (out / EMBEDDING_JSON).unlink(missing_ok=True)
    ck.save_model(out, model.lm, None, tokenizer_json)
    raw = json.loads((out / ck.CONFIG).read_text())
    raw.update(is_matryoshka=meta["is_matryoshka"], matryoshka_dimensions=meta["matryoshka_dimensions"])
    ck.write_json(out / ck.CONFIG, raw)
    if model.proj is not None:
        ck.save_tensors(out / PROJECTION, {"weight": model.proj.weight})
    ck.write_json(out / EMBEDDING_JSON, meta)
    return out


def load_embedder(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[Embedder, Any, dict[str, Any]]:
    """(Embedder, tokenizer, embedding.json) of an embedding checkpoint written by train_embedding."""
    ckpt = Path(ckpt)
    if not (ckpt / EMBEDDING_JSON).is_file():
        if ckpt.is_dir():
            raise MatryoshkaError(
                f"{ckpt} is not an embedding checkpoint (no {EMBEDDING_JSON}); make one with `matryoshka train-embed`"
            )
        raise MatryoshkaError(f"checkpoint {ckpt} does not exist")
    meta = load_json(ckpt / EMBEDDING_JSON)
    lm = ck.load_model(ckpt, device)
    model = Embedder(lm, meta.get("projection") or 0)
    if model.proj is not None:
        state = ck.load_tensors(ckpt / PROJECTION)
        ck.load_state(model.proj, state, ckpt / PROJECTION)
    return model.to(device).eval(), ck.load_tokenizer(ckpt), meta
