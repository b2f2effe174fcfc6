"""POST /v1/embeddings: inputs -> checked ids -> one job on the worker thread (between token steps) -> unit
vectors cut to `dimensions`, as an EmbeddingList."""

from __future__ import annotations

import base64

from fastapi import Request, Response

from matryoshka_lm.core.spec import format_spec

from .errors import invalid
from .inputs import prompt_ids
from .metrics import note_size, size_label
from .protocol import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from .serving_models import Models
from .state import State


class ServingEmbedding:
    def __init__(self, state: State, models: Models):
        self.state, self.models = state, models

    async def create(self, req: EmbeddingRequest, request: Request, response: Response) -> EmbeddingList:
        from matryoshka_lm.embed import embed_ids

        target = self.models.resolve(req.model)  # NAME:auto embeds at the full size
        spec, embedder = target.spec, self.state.embedder
        note_size(request, spec)
        ids = prompt_ids(self.state, req.input, "input", generate=False)
        full = embedder.out_dim(spec)
        dims = full if req.dimensions is None else req.dimensions
        if dims > full:
            raise invalid("dimensions", f"{dims}; size {format_spec(spec)} embeds in {full} dims")
        vecs = await self.state.batcher.call(lambda: embed_ids(embedder, ids, spec, dims))
        n_tokens = sum(len(x) for x in ids)
        self.state.metrics.tokens.labels(size_label(spec), "prompt").inc(n_tokens)
        b64 = req.encoding_format == "base64"
        data = [
            Embedding(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else v.tolist())
            for i, v in enumerate(vecs)
        ]
        response.headers["X-Matryoshka-Size"] = format_spec(spec)
        return EmbeddingList(
            data=data, model=target.id, usage=EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens)
        )
