"""Matryoshka embeddings (MRL, Kusupati et al. 2022): one vector whose first m dims are themselves an embedding.

An embedding is the mean of a submodel's final-normed hidden states over the real tokens (right padding is
invisible to a causal model), optionally followed by a linear projection. Training sums an in-batch-negatives
contrastive loss (InfoNCE) over nested dims {d/16, d/8, d/4, d/2, d}: the MRL recipe, the same objective as
sentence-transformers' `MatryoshkaLoss(MultipleNegativesRankingLoss)` (scale 20 = temperature 0.05). Listing
several sizes trains 2D Matryoshka embeddings (sizes x dims); a depth is just a spec with fewer layers.

Every embedding is L2-normalized *after* truncation: `shrink(t, m)` = slice, then normalize. Servers disagree
on the order (see docs/embeddings.md), so vectors from here are always unit-norm at the dims asked for.

    >>> q, p = torch.randn(8, 64), torch.randn(8, 64)
    >>> loss = mrl_contrastive_loss(q, p, dims=[4, 8, 16, 32, 64])

Shapes: B batch, T tokens, C hidden width of the spec, D embedding dims (C, or the projection's width).
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import nested
from matryoshka_lm.data import EOT
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, format_spec, parse_spec, validate_spec

log = logging.getLogger(__name__)

EMBEDDING_JSON = "embedding.json"
PROJECTION = "projection.safetensors"
MRL_FRACTIONS = (16, 8, 4, 2, 1)  # the MRL nesting: d/16, d/8, d/4, d/2, d


# ---------------------------------------------------------------- dims, shrink, loss


def default_dims(d: int) -> list[int]:
    """The MRL nesting {d/16, d/8, d/4, d/2, d} (rounded down, at least 1, without repeats)."""
    return sorted({max(1, d // f) for f in MRL_FRACTIONS})


def check_dims(dims: list[int] | tuple[int, ...], max_dim: int, trained: list[int] | None = None) -> list[int]:
    """Validate embedding dims: integers in 1..max_dim and, when `trained` is given, among the trained dims."""
    dims = [int(m) for m in dims]
    if not dims:
        raise MatryoshkaError("no embedding dims given")
    for m in dims:
        if not 0 < m <= max_dim:
            raise MatryoshkaError(f"embedding dim {m} is outside 1..{max_dim} (the embedding has {max_dim} dims)")
        if trained is not None and m not in trained:
            ok = [t for t in trained if t <= max_dim]
            raise MatryoshkaError(f"embedding dim {m} was not trained; this model's Matryoshka dims are {ok}")
    return sorted(set(dims))


def shrink(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` features, L2-normalized (truncate, then normalize)."""
    if not 0 < dim <= t.shape[-1]:
        raise MatryoshkaError(f"embedding dim {dim} is outside 1..{t.shape[-1]}")
    return F.normalize(t[..., :dim], p=2, dim=-1)


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float, symmetric: bool = False) -> torch.Tensor:
    """In-batch-negatives contrastive loss for unit vectors q, p (B, D): row i's positive is p[i]."""
    logits = q @ p.T / temperature  # (B, B) cosine similarities / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:  # also passages -> queries; the two directions averaged
        loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
    return loss


def mrl_contrastive_loss(q: torch.Tensor, p: torch.Tensor, dims: list[int], weights: list[float] | None = None,
                         temperature: float = 0.05, symmetric: bool = False) -> torch.Tensor:
    """Matryoshka loss: sum over m in `dims` of weight_m * InfoNCE(shrink(q, m), shrink(p, m)).

    q, p: (B, D) unnormalized embeddings of the queries and their positives. Weights default to 1 (the MRL
    paper and sentence-transformers' MatryoshkaLoss both sum with unit weights).
    """
    dims = list(dims)
    if not dims:
        raise MatryoshkaError("no embedding dims given")
    weights = [1.0] * len(dims) if weights is None else list(weights)
    if len(weights) != len(dims):
        raise MatryoshkaError(f"{len(weights)} dim weights for {len(dims)} dims")
    total = q.new_zeros(())
    for m, w in zip(dims, weights):  # shrink() rejects dims outside 1..D
        total = total + w * info_nce(shrink(q, m), shrink(p, m), temperature, symmetric)
    return total


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: h (B, T, C), mask (B, T) of 0/1 -> (B, C)."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


# ---------------------------------------------------------------- the embedding model


class Embedder(nn.Module):
    """Our LM, mean pooling and an optional projection. A spec picks the submodel; the embedding of a spec has
    spec.width dims, or `proj_dim` with a projection (whose input columns are sliced to the spec's width)."""

    def __init__(self, lm: MatryoshkaLM, proj_dim: int = 0):
        super().__init__()
        self.lm = lm
        self.proj = nn.Linear(lm.cfg.d_model, proj_dim, bias=False) if proj_dim else None
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=lm.cfg.d_model ** -0.5)

    def out_dim(self, spec: SubmodelSpec | None = None) -> int:
        return self.proj.out_features if self.proj is not None else (spec or self.lm.full).width

    def forward(self, idx: torch.Tensor, mask: torch.Tensor, spec: SubmodelSpec | None = None) -> torch.Tensor:
        h = self.lm.hidden_states(idx, spec)  # (B, T, C)
        e = mean_pool(h.float(), mask)  # (B, C)
        if self.proj is not None:
            e = nested.linear(e, self.proj.weight, self.proj.out_features)  # (B, D)
        return e


def tokenize(tok, texts: list[str], max_tokens: int, device: str | torch.device = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and mask (B, T); each text truncated to `max_tokens`."""
    encs = tok.encode_batch(list(texts))
    ids = [e.ids[:max_tokens] for e in encs]
    for i, row in enumerate(ids):
        if not row:
            raise MatryoshkaError(f"text {i} ({texts[i][:40]!r}) has no tokens")
    T = max(len(r) for r in ids)
    pad = tok.token_to_id(EOT) or 0
    idx = torch.full((len(ids), T), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), T)
    for i, row in enumerate(ids):
        idx[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return idx.to(device), mask.to(device)


@torch.inference_mode()
def embed_texts(model: Embedder, tok, texts: list[str], spec: SubmodelSpec | None = None, dims: int | None = None,
                batch_size: int = 64, max_tokens: int | None = None) -> np.ndarray:
    """L2-normalized embeddings (N, dims) float32 of `texts` from submodel `spec` (default: full model, all dims).

    Texts are batched by length (less padding) and returned in input order.
    """
    if not texts:
        raise MatryoshkaError("no texts to embed")
    spec = spec or model.lm.full
    D = model.out_dim(spec)
    dims = D if dims is None else check_dims([dims], D)[0]
    max_tokens = min(max_tokens or model.lm.cfg.max_seq_len, model.lm.cfg.max_seq_len)
    device = next(model.parameters()).device
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), dims), dtype=np.float32)
    model.eval()
    for i in range(0, len(texts), batch_size):
        rows = order[i:i + batch_size]
        idx, mask = tokenize(tok, [texts[j] for j in rows], max_tokens, device)
        out[rows] = shrink(model(idx, mask, spec), dims).cpu().numpy()
    return out


# ---------------------------------------------------------------- pairs


def read_texts(path: str | Path) -> list[str]:
    """Texts to embed: one per non-blank line, or a JSONL file (.jsonl) of {"text": ...} objects."""
    p = Path(path)
    if not p.is_file():
        raise MatryoshkaError(f"input file {p} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MatryoshkaError(f"{p} is not UTF-8 text") from None
    if p.suffix == ".jsonl":
        texts = [_json_field(line, ("text",), p, i)[0] for i, line in enumerate(lines, 1) if line.strip()]
    else:
        texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise MatryoshkaError(f"{p} is empty (no non-blank lines)")
    return texts


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Training pairs from JSONL: one {"query": ..., "positive": ...} object per line ("anchor" also works)."""
    p = Path(path)
    if not p.is_file():
        raise MatryoshkaError(f"pairs file {p} does not exist")
    pairs = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            q, pos = _json_field(line, (("query", "anchor"), "positive"), p, i)
            pairs.append((q, pos))
    if not pairs:
        raise MatryoshkaError(f"pairs file {p} is empty")
    return pairs


def _json_field(line: str, keys: tuple, path: Path, lineno: int) -> list[str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise MatryoshkaError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise MatryoshkaError(f"{path}:{lineno}: expected a JSON object")
    values = []
    for key in keys:
        names = key if isinstance(key, tuple) else (key,)
        value = next((obj[k] for k in names if k in obj), None)
        if not isinstance(value, str) or not value.strip():
            raise MatryoshkaError(f"{path}:{lineno}: needs a non-empty string field {' or '.join(map(repr, names))}")
        values.append(value.strip())
    return values


def corpus_pairs(docs: list[str], passage_chars: int = 240, min_chars: int = 24,
                 overlap: float = 0.0) -> list[tuple[str, str]]:
    """Self-supervised pairs: consecutive lines grouped into passages of ~`passage_chars`, each cut into two
    halves (at the line boundary nearest the middle, else at a space): (first half, second half).

    overlap > 0 widens both halves towards each other so that they share that fraction of the passage's words
    (an easier task, learnable from scratch by a small model)."""
    pairs = []
    for doc in docs:
        buf: list[str] = []
        for line in doc.splitlines():
            line = " ".join(line.split())
            if line:
                buf.append(line)
            if sum(len(b) for b in buf) >= passage_chars:
                pair = _halves(buf)
                if pair and overlap > 0:
                    pair = _overlap(pair, overlap)
                if pair and min(len(pair[0]), len(pair[1])) >= min_chars:
                    pairs.append(pair)
                buf = []
    return pairs


def _halves(lines: list[str]) -> tuple[str, str] | None:
    text = " ".join(lines)
    half = len(text) / 2
    if len(lines) > 1:
        cuts = np.cumsum([len(b) + 1 for b in lines[:-1]])
        k = int(np.argmin(np.abs(cuts - half))) + 1
        return " ".join(lines[:k]), " ".join(lines[k:])
    cut = text.rfind(" ", 0, int(half) + 1)
    return (text[:cut], text[cut + 1:]) if cut > 0 else None


def _overlap(pair: tuple[str, str], overlap: float) -> tuple[str, str]:
    a, b = pair[0].split(), pair[1].split()
    words, e = a + b, round(overlap * (len(a) + len(b)) / 2)
    return " ".join(words[: len(a) + e]), " ".join(words[max(0, len(a) - e):])


def split_pairs(pairs: list[tuple[str, str]], n_eval: int, seed: int) -> tuple[list, list]:
    """Shuffle (seeded) and hold out `n_eval` pairs for evaluation."""
    if len(pairs) < 2:
        raise MatryoshkaError(f"need at least 2 pairs to train with in-batch negatives, got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(n_eval, len(pairs) // 5)
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


# ---------------------------------------------------------------- training


@dataclass
class EmbedTrainConfig:
    steps: int = 200
    batch_size: int = 32          # pairs per step: each query has batch_size - 1 in-batch negatives
    lr: float = 5e-4
    min_lr_ratio: float = 0.1     # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 0.05     # = sentence-transformers' scale 20
    symmetric: bool = True        # also passages -> queries
    dims: list[int] | None = None  # nested dims trained; None -> {D/16, D/8, D/4, D/2, D}
    dim_weights: list[float] | None = None  # one per dim; None -> all 1
    mrl: bool = True              # False: the baseline, the loss at the full dims only
    sizes: list[str] | None = None  # specs trained jointly (2D Matryoshka); None -> the full model only
    depths: list[int] | None = None  # extra specs: the full model cut to these many layers
    cross_size: bool = True       # also contrast each smaller spec's queries with the full model's passages
    proj_dim: int = 0             # 0 -> no projection: D = the spec's width
    max_tokens: int = 64
    pairs: str | None = None      # JSONL of {"query", "positive"}; None -> self-supervised corpus pairs
    data: str | None = None       # corpus for self-supervised pairs; None -> the embedded default corpus
    max_corpus_chars: int = 2_000_000
    passage_chars: int = 240
    pair_overlap: float = 0.0     # corpus pairs: fraction of the passage's words both halves share
    n_eval: int = 500             # held-out pairs for recall@k
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_tokens", "passage_chars"):
            if getattr(self, name) <= 0:
                raise MatryoshkaError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise MatryoshkaError("batch_size must be at least 2 (in-batch negatives)")
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
        spec = SubmodelSpec(width=lm.cfg.d_model, layers=lm.full.layers[: int(d)])
        validate_spec(lm.cfg, spec)
        specs.append(spec)
    unique: list[SubmodelSpec] = []
    for s in specs:
        if all((s.width, s.layers) != (u.width, u.layers) for u in unique):
            unique.append(s)
    return unique


def spec_dims(dims: list[int], out_dim: int) -> list[int]:
    """The nested dims a spec of `out_dim` dims trains: those that fit, plus its own full dims."""
    return sorted({m for m in dims if m <= out_dim} | {out_dim})


def joint_loss(model: Embedder, specs: list[SubmodelSpec], dims: list[int], weights: dict[int, float],
               q: tuple[torch.Tensor, torch.Tensor], p: tuple[torch.Tensor, torch.Tensor],
               cfg: EmbedTrainConfig) -> torch.Tensor:
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


def lr_at(step: int, cfg: EmbedTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_pairs(cfg: EmbedTrainConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    if cfg.pairs:
        pairs = read_pairs(cfg.pairs)
    else:
        from matryoshka_lm.data import limit_chars, read_corpus

        docs = limit_chars(read_corpus(cfg.data), cfg.max_corpus_chars)
        pairs = corpus_pairs(docs, cfg.passage_chars, overlap=cfg.pair_overlap)
        if not pairs:
            raise MatryoshkaError("the corpus yields no passage pairs (too short?)")
    return split_pairs(pairs, cfg.n_eval, cfg.seed)


def train_embedding(init: str | Path, out: str | Path, cfg: EmbedTrainConfig, device: str = "cpu",
                    callback: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
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
    if cfg.dim_weights is not None and len(cfg.dim_weights) != len(cfg.dims or dims):
        raise MatryoshkaError(f"{len(cfg.dim_weights)} dim weights for the dims {cfg.dims or dims}")
    weights = dict(zip(cfg.dims or dims, cfg.dim_weights or [1.0] * len(dims)))
    train_pairs, eval_pairs = load_pairs(cfg)
    if len(train_pairs) < cfg.batch_size:
        raise MatryoshkaError(f"{len(train_pairs)} training pairs, fewer than one batch of {cfg.batch_size}")
    log.info("training on %d pairs, %d held out; specs %s; dims %s", len(train_pairs), len(eval_pairs),
             [format_spec(s) for s in specs], dims)
    before = evaluate_pairs(model, tok, eval_pairs, specs, dims, cfg.max_tokens) if eval_pairs else {}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    model.train()
    for step in range(cfg.steps):
        batch = rng.sample(train_pairs, cfg.batch_size)
        q = tokenize(tok, [b[0] for b in batch], cfg.max_tokens, device)
        p = tokenize(tok, [b[1] for b in batch], cfg.max_tokens, device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = joint_loss(model, specs, dims, weights, q, p, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if callback:
            callback(step + 1, {"loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
    after = evaluate_pairs(model, tok, eval_pairs, specs, dims, cfg.max_tokens) if eval_pairs else {}
    trained = sorted({m for s in specs for m in (spec_dims(dims, model.out_dim(s)) if cfg.mrl else [model.out_dim(s)])})
    meta = {"is_matryoshka": cfg.mrl, "matryoshka_dimensions": trained, "pooling": "mean",
            "normalize": "after_truncation",
            "projection": cfg.proj_dim or None, "sizes": [format_spec(s) for s in specs], "base": str(init),
            "train": asdict(cfg), "eval_pairs": len(eval_pairs), "recall_before": before, "recall_after": after}
    save_embedding(out, model, tok.to_str(), meta)
    return meta


@torch.inference_mode()
def evaluate_pairs(model: Embedder, tok, pairs: list[tuple[str, str]], specs: list[SubmodelSpec], dims: list[int],
                   max_tokens: int, ks: tuple[int, ...] = (1, 10)) -> dict[str, dict[str, dict[str, float]]]:
    """recall@k of each held-out query's positive among all held-out positives: {spec: {dim: {"r@k": ...}}}."""
    from .retrieval import pair_recall

    out: dict[str, dict[str, dict[str, float]]] = {}
    for s in specs:
        q = embed_texts(model, tok, [a for a, _ in pairs], s, max_tokens=max_tokens)
        p = embed_texts(model, tok, [b for _, b in pairs], s, max_tokens=max_tokens)
        out[format_spec(s)] = {str(m): pair_recall(q[:, :m], p[:, :m], ks) for m in spec_dims(dims, q.shape[1])}
    model.train()
    return out


# ---------------------------------------------------------------- save / load


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
            raise MatryoshkaError(f"{ckpt} is not an embedding checkpoint (no {EMBEDDING_JSON}); "
                                  "make one with `matryoshka train-embed`")
        raise MatryoshkaError(f"checkpoint {ckpt} does not exist")
    from matryoshka_lm.config import load_json

    meta = load_json(ckpt / EMBEDDING_JSON)
    lm = ck.load_model(ckpt, device)
    model = Embedder(lm, meta.get("projection") or 0)
    if model.proj is not None:
        state = ck.load_tensors(ckpt / PROJECTION)
        ck.load_state(model.proj, state, ckpt / PROJECTION)
    return model.to(device).eval(), ck.load_tokenizer(ckpt), meta


def resolve_dims(out_dim: int, trained: list[int], dims: int | None, what: str = "this size") -> int:
    """The dims to emit: validated against the trained set; default the largest trained dim that fits."""
    if dims is None:
        fits = [m for m in trained if m <= out_dim]
        if not fits:
            raise MatryoshkaError(f"no trained dims fit {what} ({out_dim} dims); trained: {trained}")
        return max(fits)
    return check_dims([dims], out_dim, trained)[0]


class TextEncoder:
    """What `embed`, `index build` and `search` need from an embedding checkpoint: texts in, unit vectors out.

    Our checkpoints (embedding.json) and Hugging Face encoder folders (embed_hf.HFEncoder) both provide it.
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

    def encode(self, texts: list[str], size: str | None = None, dims: int | None = None,
               batch_size: int = 64) -> np.ndarray:
        m = self.resolve_dims(size, dims)
        return embed_texts(self.model, self.tok, texts, self.spec(size), m, batch_size,
                           self.meta.get("train", {}).get("max_tokens"))


def load_encoder(ckpt: str | Path, device: str = "cpu") -> Any:
    """A TextEncoder for an embedding checkpoint, or an HFEncoder for a Hugging Face encoder folder."""
    from .hf_encoder import HFEncoder, is_hf_encoder

    if is_hf_encoder(ckpt):
        return HFEncoder(ckpt, device=device)
    return TextEncoder(*load_embedder(ckpt, device))


def embed_file(ckpt: str | Path, path: str | Path, out: str | Path | None = None, size: str | None = None,
               dims: int | None = None, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Embed every non-blank line of `path` (or each {"text"} of a .jsonl) with size `size` of the embedding
    checkpoint `ckpt`; returns (N, dims) unit vectors and writes them to `out` (.npy) if given."""
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
