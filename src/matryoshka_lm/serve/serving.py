"""The generation pipeline completions and chat share: preprocess (draft, settings, routing) -> submit rows to the
batcher -> collect the events whole or stream them as server-sent events. Each endpoint (serving_completion.py,
serving_chat.py) turns the events into its own response bodies."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from matryoshka_lm.core.spec import SubmodelSpec, format_spec

from .batcher import Event, GenRequest, Ticket
from .errors import APIError, client_disconnected, generation_failed, shutting_down
from .logprobs import Scored, kept_ids, score
from .metrics import note_size, size_label
from .params import GenParams, gen_params
from .protocol import GenerationRequest, Usage
from .serving_models import Models, Target
from .state import State


@dataclass
class Job:
    """One generation request after preprocessing: what to run, and what the reply needs."""

    target: Target
    prompts: list[list[int]]
    params: GenParams
    draft: SubmodelSpec | None
    id: str
    prefilled: Any = None  # the router's prefill to decode on from (infer.request.Prefilled), NAME:auto only
    created: int = field(default_factory=lambda: int(time.time()))
    t0: float = field(default_factory=time.perf_counter)

    @property
    def label(self) -> str:
        return size_label(self.target.spec)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def n_choices(self) -> int:
        return len(self.prompts) * self.params.n

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Matryoshka-Size": format_spec(self.target.spec)}


class Choices:
    """What the events of one request said so far, per choice (prompt-major: choice p * n + k)."""

    def __init__(self, count: int):
        self.texts: list[list[str]] = [[] for _ in range(count)]
        self.tokens = [0] * count
        self.reasons: list[str | None] = [None] * count
        self.ids: list[tuple[int, ...]] = [()] * count  # every generated token, for logprobs
        self.started = [False] * count  # streamed chat: the choice's first visible character was sent
        self.first = True

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, ev: Event) -> None:
        self.first = False
        self.texts[ev.index].append(ev.text)
        self.tokens[ev.index] = ev.tokens
        self.reasons[ev.index] = ev.finish_reason
        if ev.ids:
            self.ids[ev.index] = ev.ids

    def text(self, i: int) -> str:
        return "".join(self.texts[i])

    def usage(self, prompt_tokens: int) -> Usage:
        done = sum(self.tokens)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse_line(obj: BaseModel | dict) -> str:
    body = obj.model_dump() if isinstance(obj, BaseModel) else obj
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


class ServingGeneration:
    """The shared steps; subclasses name their id prefix and build their chunks (first_chunks, chunk, usage)."""

    id_prefix = "cmpl"

    def __init__(self, state: State, models: Models):
        self.state, self.models = state, models

    # ---- preprocess

    async def prepare(
        self,
        request: Request,
        req: GenerationRequest,
        target: Target,
        prompts: list[list[int]],
        max_tokens: int | None,
        default_max: int,
        extra_stops: tuple[str, ...] = (),
    ) -> Job:
        """Check the draft and the settings (bad input costs no model work), then route NAME:auto."""
        draft = self.models.draft(req.draft, target)
        params = gen_params(self.state, req, max_tokens, default_max, len(prompts), extra_stops)
        alone = len(prompts) == 1 and params.n == 1 and draft is None
        routed = await self.models.route(target, prompts, params.max_tokens, alone)
        note_size(request, routed.target.spec)
        return Job(routed.target, prompts, params, draft, new_id(self.id_prefix), prefilled=routed.prefilled)

    # ---- submit

    def submit(self, job: Job) -> Ticket:
        """One row per prompt and choice on the batcher; seeded choices after the first get seed + k."""
        ticket = Ticket(asyncio.get_running_loop())
        p, spec, rows = job.params, job.target.spec, []
        for i, ids in enumerate(job.prompts):
            for k in range(p.n):
                s = p.sampling
                if s.seed is not None and k:
                    s = replace(s, seed=(s.seed + k) % 2**64)
                row = GenRequest(ticket, i * p.n + k, ids, spec, p.max_tokens, s, p.stop_tokens, p.stops, job.draft)
                row.prefilled = job.prefilled  # set only for one prompt and one choice
                rows.append(row)
        self.state.submit(rows)
        self.count_prompt(job)
        return ticket

    def count_prompt(self, job: Job) -> None:
        self.state.metrics.tokens.labels(job.label, "prompt").inc(job.prompt_tokens)

    def count_completion(self, job: Job, out: Choices) -> None:
        """Completion tokens by size; for a routed NAME:auto also its work beside always-full's (the compute saved)."""
        done = sum(out.tokens)
        self.state.metrics.tokens.labels(job.label, "completion").inc(done)
        t = job.target
        if t.cost is not None:
            tokens = job.prompt_tokens * job.params.n + done
            self.state.metrics.auto_compute.labels("served").inc(tokens * t.cost + t.overhead)
            self.state.metrics.auto_compute.labels("full").inc(tokens)

    # ---- collect whole

    async def collect(self, request: Request, job: Job, ticket: Ticket) -> Choices:
        """Every choice's events. Nothing is sent until the end, so nothing else notices a client that leaves:
        race the result against the disconnect and cancel the ticket, or its rows would generate to max_tokens
        for nobody (499)."""
        out = Choices(job.n_choices)
        collect = asyncio.ensure_future(self._collect(job, ticket, out))
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ticket.cancel()  # a no-op when done; stops the rows when the client left or this handler is cancelled
            gone.cancel()
            collect.cancel()
        metrics = self.state.metrics
        self.count_completion(job, out)
        if not collect.done() or collect.cancelled():
            metrics.disconnects.labels(job.label).inc()
            raise client_disconnected()
        try:
            collect.result()
        except APIError:
            request.state.failed = True
            raise
        return out

    async def _collect(self, job: Job, ticket: Ticket, out: Choices) -> None:
        async for ev in events(ticket, len(out)):
            self._add(job, out, ev)

    def _add(self, job: Job, out: Choices, ev: Event) -> None:
        if out.first:
            self.state.metrics.ttft.labels(job.label).observe(time.perf_counter() - job.t0)
        out.add(ev)

    # ---- stream

    def first_chunks(self, job: Job, out: Choices) -> list[BaseModel]:
        return []

    def chunk(self, job: Job, out: Choices, ev: Event) -> BaseModel:
        raise NotImplementedError

    def usage_chunk(self, job: Job, out: Choices) -> BaseModel:
        raise NotImplementedError

    def stream(self, request: Request, req: GenerationRequest, job: Job, ticket: Ticket) -> StreamingResponse:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = self._sse(request, job, ticket, include_usage)
        headers = {**job.headers, "Cache-Control": "no-cache"}
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

    async def _sse(self, request: Request, job: Job, ticket: Ticket, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events in the OpenAI chunk format, then "data: [DONE]"; an error is an event too."""
        out, finished = Choices(job.n_choices), False
        try:
            for c in self.first_chunks(job, out):
                yield sse_line(c)
            async for ev in events(ticket, len(out)):
                self._add(job, out, ev)
                if ev.text or ev.finish_reason:
                    yield sse_line(self.chunk(job, out, ev))
            if include_usage:
                yield sse_line(self.usage_chunk(job, out))
            yield "data: [DONE]\n\n"
            finished = True
        except APIError as e:
            request.state.failed = True
            yield sse_line(e.body())
            yield "data: [DONE]\n\n"  # the stream ends as every stream does: clients wait for it
            finished = True
        finally:
            ticket.cancel()
            self.count_completion(job, out)
            if not finished:
                self.state.metrics.disconnects.labels(job.label).inc()

    # ---- logprobs

    async def score(self, job: Job, out: Choices, top: int) -> list[tuple[list[int], list[int], Scored]]:
        """(prompt, kept generated tokens, scores) per choice: one job on the worker thread (serve/logprobs.py)."""
        tok, engine, spec = self.state.tok, self.state.engine, job.target.spec
        seqs = [
            (job.prompts[i // job.params.n], kept_ids(out.ids[i], out.text(i), tok.decode)) for i in range(len(out))
        ]
        scored = await self.state.batcher.call(lambda: [score(engine, spec, p + g, top) for p, g in seqs])
        return [(p, g, s) for (p, g), s in zip(seqs, scored)]

    def decode_one(self, ids: list[int]) -> str:
        """Token text for logprobs: a special token alone reads as its name, not as ""."""
        text = self.state.tok.decode(ids)
        return text if text or len(ids) != 1 else self.state.tok.id_to_token(ids[0]) or ""


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected. The body is already read, so the server's next message is
    http.disconnect, sent when the connection closes (uvicorn sends nothing else until the response is done)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected; never spin if a server sends something else


async def events(ticket: Ticket, n_choices: int) -> AsyncIterator[Event]:
    """The events of a request until every choice has finished; an error event raises a 500 (503 at shutdown)."""
    left = n_choices
    while left:
        ev = await ticket.queue.get()
        if ev.error is not None:
            raise shutting_down() if ev.shutdown else generation_failed()
        if ev.finish_reason is not None:
            left -= 1
        yield ev
