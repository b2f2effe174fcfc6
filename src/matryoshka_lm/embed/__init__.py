"""Matryoshka embeddings and retrieval. Import from here; the modules, each importing only those before it:

loss        dims, shrink (truncate then normalize), InfoNCE, the MRL loss
model       Embedder, pooling, embed_ids / embed_texts, embedding checkpoints
pairs       texts and training pairs from files and corpora
retrieval   the vector index: build, load, exact and funnel search (no texts, no encoders)
training    EmbedTrainConfig, train_embedding
hf_encoder  Hugging Face encoders: MRL fine-tuning, export to sentence-transformers
encoders    TextEncoder, load_encoder (ours or Hugging Face), embed_file
search      index_texts, search_texts: texts in, texts out
"""

from __future__ import annotations

from .encoders import TextEncoder, embed_file, load_encoder, save_npy
from .hf_encoder import HFEncoder, export_embedding, finetune_hf, is_hf_encoder, minilm_dir
from .loss import check_dims, default_dims, info_nce, mrl_contrastive_loss, resolve_dims, shrink, spec_dims
from .model import (
    EMBEDDING_JSON,
    PROJECTION,
    Embedder,
    embed_ids,
    embed_texts,
    load_embedder,
    mean_pool,
    save_embedding,
    tokenize,
)
from .pairs import corpus_pairs, read_pairs, read_texts, split_pairs
from .retrieval import (
    VectorIndex,
    build_index,
    exact_search,
    funnel_search,
    load_index,
    overlap_at_k,
    pair_recall,
    unit_rows,
)
from .search import embed_queries, index_texts, search_texts
from .training import EmbedTrainConfig, evaluate_pairs, train_embedding

__all__ = [
    "TextEncoder",
    "embed_file",
    "load_encoder",
    "save_npy",
    "HFEncoder",
    "export_embedding",
    "finetune_hf",
    "is_hf_encoder",
    "minilm_dir",
    "check_dims",
    "default_dims",
    "info_nce",
    "mrl_contrastive_loss",
    "resolve_dims",
    "shrink",
    "spec_dims",
    "EMBEDDING_JSON",
    "PROJECTION",
    "Embedder",
    "embed_ids",
    "embed_texts",
    "load_embedder",
    "mean_pool",
    "save_embedding",
    "tokenize",
    "corpus_pairs",
    "read_pairs",
    "read_texts",
    "split_pairs",
    "VectorIndex",
    "build_index",
    "exact_search",
    "funnel_search",
    "load_index",
    "overlap_at_k",
    "pair_recall",
    "unit_rows",
    "embed_queries",
    "index_texts",
    "search_texts",
    "EmbedTrainConfig",
    "evaluate_pairs",
    "train_embedding",
]
