"""MRL training of an embedding from one of our LM checkpoints.

Training sums an in-batch-negatives contrastive loss (InfoNCE) over nested dims {d/16, d/8, d/4, d/2, d}: the
MRL recipe, the same objective as sentence-transformers' `MatryoshkaLoss(MultipleNegativesRankingLoss)` (scale
20 = temperature 0.05). Listing several sizes trains 2D Matryoshka embeddings (sizes x dims); a depth is just a
spec with fewer layers. The optimizer, schedule and step are matryoshka_lm.train's, shared with LM training.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import nested
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, format_spec, parse_spec, validate_spec
from matryoshka_lm.data import limit_chars, read_corpus
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.train.optim import adamw
from matryoshka_lm.train.steps import MetricsLog, fit, whole_batch

from .loss import check_dims, default_dims, mrl_contrastive_loss, spec_dims
from .model import Embedder, embed_texts, save_embedding, tokenize
from .pairs import corpus_pairs, read_pairs, split_pairs
from .retrieval import pair_recall

log = logging.getLogger(__name__)


@dataclass
class EmbedTrainConfig:
    steps: int = 200
    batch_size: int = 32  # pairs per step: each query has batch_size - 1 in-batch negatives
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 0.05  # = sentence-transformers' scale 20
    symmetric: bool = True  # also passages -> queries
    dims: list[int] | None = None  # nested dims trained; None -> {D/16, D/8, D/4, D/2, D}
    dim_weights: list[float] | None = None  # one per dim; None -> all 1
    mrl: bool = True  # False: the baseline, the loss at the full dims only
    sizes: list[str] | None = None  # specs trained jointly (2D Matryoshka); None -> the full model only
    depths: list[int] | None = None  # extra specs: the full model cut to these many layers
    cross_size: bool = True  # also contrast each smaller spec's queries with the full model's passages
    proj_dim: int = 0  # 0 -> no projection: D = the spec's width
    max_tokens: int = 64
    pairs: str | None = None  # JSONL of {"query", "positive"}; None -> self-supervised corpus pairs
    data: str | None = None  # corpus for self-supervised pairs; None -> the embedded default corpus
    max_corpus_chars: int = 2_000_000
    passage_chars: int = 240
    pair_overlap: float = 0.0  # corpus pairs: fraction of the passage's words both halves share
    n_eval: int = 500  # held-out pairs for recall@k
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_tokens", "passage_chars"):
            if getattr(self, name) <= 0:
                raise MatryoshkaError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "proj_dim", "max_corpus_chars", "n_eval"):
            if getattr(self, name) < 0:
                raise MatryoshkaError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise MatryoshkaError("batch_size must be at least 2 (in-batch negatives)")
        if self.lr <= 0:
            raise MatryoshkaError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.pair_overlap < 1:
            raise MatryoshkaError(f"pair_overlap must be in [0, 1), got {self.pair_overlap}")
        if self.temperature <= 0:
            raise MatryoshkaError(f"temperature must be positive, got {self.temperature}")
        if self.dim_weights is not None and self.dims is not None and len(self.dim_weights) != len(self.dims):
            raise MatryoshkaError(f"{len(self.dim_weights)} dim weights for {len(self.dims)} dims")


def training_specs(lm: MatryoshkaLM, sizes: list[str] | None, depths: list[int] | None) -> list[SubmodelSpec]:
    """The full model first, then each listed size and each depth cut (full width, first `depth` layers)."""
    specs = [parse_spec(lm.cfg, format_spec(lm.full))]  # the full model, named (e.g. "XL") when a size is it
    for s in sizes or []:
        specs.append(parse_spec(lm.cfg, s))
    for d in depths or []:
        if not 1 <= int(d) <= lm.cfg.n_layers:
            raise MatryoshkaError(f"depth {d} is outside 1..{lm.cfg.n_layers}")
        spec = nested.first_layers(lm.full, int(d))
        validate_spec(lm.cfg, spec)
        specs.append(spec)
    unique: list[SubmodelSpec] = []
    for s in specs:
        if all((s.width, s.layers) != (u.width, u.layers) for u in unique):
            unique.append(s)
    return unique


def joint_loss(
    model: Embedder,
    specs: list[SubmodelSpec],
    dims: list[int],
    weights: dict[int, float],
    q: tuple[torch.Tensor, torch.Tensor],
    p: tuple[torch.Tensor, torch.Tensor],
    cfg: EmbedTrainConfig,
) -> torch.Tensor:
    """Sum over specs s of MRL(q_s, p_s), plus MRL(q_s, p_full) for the smaller specs (cross-size retrieval)."""
    total: torch.Tensor | float = 0.0
    p_full = None
    for s in specs:  # specs[0] is the full model
        eq, ep = model(*q, s), model(*p, s)
        ds = spec_dims(dims, model.out_dim(s)) if cfg.mrl else [model.out_dim(s)]
        w = [weights.get(m, 1.0) for m in ds]
        total = total + mrl_contrastive_loss(eq, ep, ds, w, cfg.temperature, cfg.symmetric)
        if p_full is None:
            p_full = ep
        elif cfg.cross_size:
            ds = [m for m in ds if m <= p_full.shape[-1]]
            w = [weights.get(m, 1.0) for m in ds]
            total = total + mrl_contrastive_loss(eq, p_full, ds, w, cfg.temperature, cfg.symmetric)
    return total


def load_pairs(cfg: EmbedTrainConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, held-out pairs): cfg.pairs, or passage halves of the corpus."""
    if cfg.pairs:
        pairs = read_pairs(cfg.pairs)
    else:
        docs = limit_chars(read_corpus(cfg.data), cfg.max_corpus_chars)
        pairs = corpus_pairs(docs, cfg.passage_chars, overlap=cfg.pair_overlap)
        if not pairs:
            raise MatryoshkaError("the corpus yields no passage pairs (too short?)")
    return split_pairs(pairs, cfg.n_eval, cfg.seed)


def dim_weights(cfg: EmbedTrainConfig, dims: list[int]) -> dict[int, float]:
    if cfg.dim_weights is not None and len(cfg.dim_weights) != len(cfg.dims or dims):
        raise MatryoshkaError(f"{len(cfg.dim_weights)} dim weights for the dims {cfg.dims or dims}")
    return dict(zip(cfg.dims or dims, cfg.dim_weights or [1.0] * len(dims)))


def embedding_meta(
    cfg: EmbedTrainConfig,
    model: Embedder,
    specs: list[SubmodelSpec],
    dims: list[int],
    init: str | Path,
    n_eval: int,
    before: dict,
    after: dict,
) -> dict[str, Any]:
    """embedding.json: the dims trained (sentence-transformers' Matryoshka fields), specs, base, recall@k."""
    trained = sorted({m for s in specs for m in (spec_dims(dims, model.out_dim(s)) if cfg.mrl else [model.out_dim(s)])})
    meta = {
        "is_matryoshka": cfg.mrl,
        "matryoshka_dimensions": trained,
        "pooling": "mean",
        "normalize": "after_truncation",
        "projection": cfg.proj_dim or None,
        "sizes": [format_spec(s) for s in specs],
        "base": str(init),
        "train": asdict(cfg),
        "eval_pairs": n_eval,
        "recall_before": before,
        "recall_after": after,
    }
    return meta


def train_embedding(
    init: str | Path,
    out: str | Path,
    cfg: EmbedTrainConfig,
    device: str = "cpu",
    callback: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """MRL-train an embedding from the LM checkpoint `init`; write an embedding checkpoint to `out`.

    `out` holds config.json / model.safetensors / tokenizer.json (an ordinary checkpoint: the LM weights after
    training), projection.safetensors (with a projection) and embedding.json (dims, pooling, specs, recall@k of
    the held-out pairs before and after). Returns the embedding.json content.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MatryoshkaError(f"output directory {out} is not empty; pick a new one")
    torch.manual_seed(cfg.seed)
    lm = ck.load_model(init, device)
    tok = ck.load_tokenizer(init)
    model = Embedder(lm, cfg.proj_dim).to(device)
    specs = training_specs(lm, cfg.sizes, cfg.depths)
    D = model.out_dim()
    dims = check_dims(cfg.dims, D) if cfg.dims else default_dims(D)
    weights = dim_weights(cfg, dims)
    train_pairs, eval_pairs = load_pairs(cfg)
    if len(train_pairs) < cfg.batch_size:
        raise MatryoshkaError(f"{len(train_pairs)} training pairs, fewer than one batch of {cfg.batch_size}")
    log.info(
        "training on %d pairs, %d held out; specs %s; dims %s",
        len(train_pairs),
        len(eval_pairs),
        [format_spec(s) for s in specs],
        dims,
    )
    before = evaluate_pairs(model, tok, eval_pairs, specs, dims, cfg.max_tokens) if eval_pairs else {}
    opt = adamw(model, cfg.lr, cfg.weight_decay, decay_matrices_only=False)
    rng, metrics = random.Random(cfg.seed), MetricsLog(callback=callback)
    model.train()

    def micro_steps(step: int) -> list:
        batch = rng.sample(train_pairs, cfg.batch_size)
        q = tokenize(tok, [b[0] for b in batch], cfg.max_tokens, device)
        p = tokenize(tok, [b[1] for b in batch], cfg.max_tokens, device)
        return whole_batch(partial(joint_loss, model, specs, dims, weights, q, p, cfg))

    fit(opt, list(model.parameters()), cfg, micro_steps, after_step=lambda done, m: metrics(done, m))
    after = evaluate_pairs(model, tok, eval_pairs, specs, dims, cfg.max_tokens) if eval_pairs else {}
    meta = embedding_meta(cfg, model, specs, dims, init, len(eval_pairs), before, after)
    save_embedding(out, model, tok.to_str(), meta)
    return meta


@torch.inference_mode()
def evaluate_pairs(
    model: Embedder,
    tok: Any,
    pairs: list[tuple[str, str]],
    specs: list[SubmodelSpec],
    dims: list[int],
    max_tokens: int,
    ks: tuple[int, ...] = (1, 10),
) -> dict[str, dict[str, dict[str, float]]]:
    """recall@k of each held-out query's positive among all held-out positives: {spec: {dim: {"r@k": ...}}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for s in specs:
        q = embed_texts(model, tok, [a for a, _ in pairs], s, max_tokens=max_tokens)
        p = embed_texts(model, tok, [b for _, b in pairs], s, max_tokens=max_tokens)
        out[format_spec(s)] = {
            str(m): pair_recall(nested.embedding_prefix(q, m), nested.embedding_prefix(p, m), ks)
            for m in spec_dims(dims, q.shape[1])
        }
    model.train()
    return out
