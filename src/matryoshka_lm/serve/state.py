"""What every endpoint shares: the loaded checkpoint, its engine and embedder, the batcher (the scheduler: all
model work runs on its thread), the metrics and the server's limits. Request handling lives in serving_*.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, size_names
from matryoshka_lm.data import EOT
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.router import ROUTER_JSON, Router

from .batcher import Batcher, GenRequest
from .errors import overloaded
from .metrics import Metrics, size_label


def load_router(ckpt: str | Path) -> Router | None:
    """The size router saved beside a checkpoint (CKPT/router.json), or None: NAME:auto is then the full size."""
    return Router.load(ckpt) if (Path(ckpt) / ROUTER_JSON).is_file() else None


def load_checkpoint(ckpt: str | Path, device: str) -> tuple[MatryoshkaLM, Any, Any, str]:
    """(model, tokenizer, embedder or None, default name) of an LM or an embedding checkpoint directory."""
    from matryoshka_lm.core import checkpoint as ck
    from matryoshka_lm.embed import EMBEDDING_JSON, load_embedder

    ckpt = Path(ckpt)
    if (ckpt / EMBEDDING_JSON).is_file():  # an embedding checkpoint: its projection serves /v1/embeddings
        embedder, tok, _ = load_embedder(ckpt, device)
        return embedder.lm, tok, embedder, ckpt.name
    return ck.load_model(ckpt, device), ck.load_tokenizer(ckpt), None, ckpt.resolve().name


class State:
    """The loaded checkpoint and the worker that runs it (app.state.server)."""

    def __init__(
        self,
        model: MatryoshkaLM,
        tokenizer: Any,
        name: str,
        embedder: Any = None,
        api_key: str | None = None,
        compile: bool = False,
        max_batch: int = 16,
        max_batches: int = 8,
        batch_window_s: float = 0.002,
        max_body_bytes: int = 1 << 20,
        max_tokens_limit: int | None = None,
        max_waiting: int = 4096,
        chat: Any = None,
        trained: list[str] | None = None,
    ):
        from matryoshka_lm.embed import Embedder

        self.model, self.tok, self.name, self.api_key = model.eval(), tokenizer, name, api_key
        self.cfg = model.cfg
        self.engine = Engine(model, compile=compile)
        self.embedder = (embedder if embedder is not None else Embedder(model)).eval()
        self.max_body_bytes, self.max_waiting = max_body_bytes, max_waiting
        self.max_tokens_limit = max_tokens_limit or self.cfg.max_seq_len - 1
        eot = tokenizer.token_to_id(EOT)
        # where a reply ends: <|endoftext|>, and the model's own end-of-turn ids (core.chat; e.g. <|im_end|>)
        self.chat = chat
        self.eot = list(dict.fromkeys(([] if eot is None else [eot]) + list(chat.stop_ids if chat else ())))
        self.sizes = size_names(self.cfg)
        # sizes that are models; the rest (an import's slices before a fine-tune) are served but marked untrained
        self.untrained = [s for s in self.sizes if trained is not None and s not in trained]
        self.batcher = Batcher(
            self.engine,
            tokenizer.decode,
            max_batch,
            max_batches,
            batch_window_s,
            on_batch=lambda spec, n: self.metrics.batch_rows.labels(size_label(spec)).observe(n),
            on_round=self._count_round,
        )
        self.metrics = Metrics(self.batcher)
        self.created = int(time.time())

    def _count_round(self, spec: SubmodelSpec, drafted: int, accepted: int) -> None:
        self.metrics.speculative.labels(size_label(spec), "drafted").inc(drafted)
        self.metrics.speculative.labels(size_label(spec), "accepted").inc(accepted)

    def submit(self, rows: list[GenRequest]) -> None:
        """Queue generation rows on the batcher; a 503 past max_waiting rows."""
        if self.batcher.waiting + len(rows) > self.max_waiting:
            raise overloaded()
        self.batcher.submit(rows)
