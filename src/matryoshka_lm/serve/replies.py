"""Generation replies: the OpenAI response objects, whole (JSON) or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from matryoshka_lm.core.spec import SubmodelSpec, format_spec

from .batcher import Event, Ticket
from .logprobs import chat_logprobs, kept_ids, legacy_logprobs, score
from .metrics import size_label
from .protocol import CHAT_STOPS, MAX_INPUTS, APIError, GenerationRequest
from .state import Server


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Reply:
    """Builds the OpenAI response objects of one request (completion or chat; whole or as chunks)."""

    def __init__(self, chat: bool, id: str, model: str, n: int):
        self.chat, self.id, self.model = chat, id, model
        self.created = int(time.time())
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.tokens = [0] * n
        self.reasons: list[str | None] = [None] * n
        self.ids: list[tuple[int, ...]] = [()] * n  # every generated token, for logprobs
        self.prefix = [""] * n  # echo: the prompt's text
        self.logprobs: list[dict[str, Any] | None] = [None] * n
        self.started = [False] * n  # chat: the reply's first visible character was sent
        self.first = True

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens)

    def add(self, ev: Event) -> None:
        self.first = False
        self.texts[ev.index].append(ev.text)
        self.tokens[ev.index] = ev.tokens
        self.reasons[ev.index] = ev.finish_reason
        if ev.ids:
            self.ids[ev.index] = ev.ids

    def usage(self, prompt_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt_tokens + self.completion_tokens,
        }

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    def final(self, prompt_tokens: int) -> dict[str, Any]:
        choices = []
        for i, parts in enumerate(self.texts):
            text = self.prefix[i] + "".join(parts)
            if self.chat:  # the template ends "Assistant:", so the model's reply starts with a space
                text = text.lstrip()
            body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": i, **body, "logprobs": self.logprobs[i], "finish_reason": self.reasons[i]})
        return {**self._head(False), "choices": choices, "usage": self.usage(prompt_tokens)}

    def chunk(self, index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text and not self.started[index]:  # as in final(): no leading whitespace
                text = text.lstrip()
                self.started[index] = bool(text)
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        return {**self._head(True), "choices": [{**choice, "logprobs": None, "finish_reason": finish_reason}]}

    def usage_chunk(self, prompt_tokens: int) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": self.usage(prompt_tokens)}


async def generation_reply(
    srv: Server,
    request: Request,
    req: GenerationRequest,
    served: str,
    spec: SubmodelSpec,
    prompts: list[list[int]],
    max_tokens: int | None,
    default_max: int,
    chat: bool,
    draft: SubmodelSpec | None = None,
) -> Response:
    """Queue the request's rows and answer: one JSON object, or a stream of chunks when req.stream. With a draft
    each row decodes speculatively (alone)."""
    n_tokens, sampling, stops = srv.settings(req, max_tokens, default_max)
    stop_tokens = srv.stop_tokens(req)
    if chat:
        stops = stops + CHAT_STOPS
    n = req.n or 1
    if n * len(prompts) > MAX_INPUTS:
        raise APIError(
            400, f"{len(prompts)} prompts x n={n} asks for more than {MAX_INPUTS} choices.", "n", "invalid_value"
        )
    ticket = Ticket(asyncio.get_running_loop())
    rows = srv.rows(ticket, prompts, spec, n, n_tokens, sampling, stops, stop_tokens, draft)
    label = size_label(spec)
    prompt_tokens = sum(len(p) for p in prompts)
    t0 = time.perf_counter()
    reply = Reply(chat, new_id("chatcmpl" if chat else "cmpl"), served, len(rows))
    headers = {"X-Matryoshka-Size": format_spec(spec)}
    if n_tokens == 0:  # echo only (protocol checked): the prompts are scored, nothing is generated
        srv.metrics.tokens.labels(label, "prompt").inc(prompt_tokens)
        reply.reasons = ["length"] * len(rows)
        await add_logprobs(srv, reply, req, spec, prompts, n)
        return JSONResponse(reply.final(prompt_tokens), headers=headers)
    srv.submit(rows)
    srv.metrics.tokens.labels(label, "prompt").inc(prompt_tokens)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = sse_stream(srv, request, ticket, reply, label, t0, prompt_tokens, include_usage)
        return StreamingResponse(body, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
    # nothing is sent until the end, so nothing else notices a client that leaves: race the result against the
    # disconnect and cancel the ticket, or its rows would generate to max_tokens for nobody
    collect = asyncio.ensure_future(_collect(srv, ticket, reply, label, t0))
    gone = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ticket.cancel()  # a no-op when done; stops the rows when the client left or this handler is cancelled
        gone.cancel()
        collect.cancel()
    srv.metrics.tokens.labels(label, "completion").inc(reply.completion_tokens)
    if not collect.done() or collect.cancelled():
        srv.metrics.disconnects.labels(label).inc()
        # nobody reads this answer; 499 (nginx's "client closed request") keeps it apart in /metrics
        raise APIError(499, "The client closed the request.", None, "client_disconnected")
    try:
        collect.result()
    except APIError:
        request.state.failed = True
        raise
    await add_logprobs(srv, reply, req, spec, prompts, n)
    return JSONResponse(reply.final(prompt_tokens), headers=headers)


async def add_logprobs(
    srv: Server,
    reply: Reply,
    req: GenerationRequest,
    spec: SubmodelSpec,
    prompts: list[list[int]],
    n: int,
) -> None:
    """echo (completions) and logprobs: every choice's prompt + kept tokens scored in one job on the worker
    thread (serve/logprobs.py)."""
    echo = bool(getattr(req, "echo", False))
    if reply.chat:
        top = (req.top_logprobs or 0) if req.logprobs else None
    else:
        top = req.logprobs
    if not echo and top is None:
        return

    def decode(ids: list[int]) -> str:  # a special token alone reads as its name, not as ""
        text = srv.tok.decode(ids)
        return text if text or len(ids) != 1 else srv.tok.id_to_token(ids[0]) or ""

    texts = ["".join(parts) for parts in reply.texts]
    seqs = []
    for i in range(len(reply.texts)):
        prompt = prompts[i // n]
        seqs.append((prompt, kept_ids(reply.ids[i], texts[i], srv.tok.decode)))
    scored = await srv.batcher.call(lambda: [score(srv.engine, spec, p + g, top or 0) for p, g in seqs])
    for i, ((prompt, gen), sc) in enumerate(zip(seqs, scored)):
        prompt_text = srv.tok.decode(prompt)
        if echo:
            reply.prefix[i] = prompt_text
        if top is None:
            continue
        ids = prompt + gen
        if reply.chat:
            reply.logprobs[i] = chat_logprobs(sc, ids, len(prompt), top, decode)
        else:
            first, offset0 = (0, 0) if echo else (len(prompt), len(prompt_text))
            reply.logprobs[i] = legacy_logprobs(sc, ids, first, decode, offset0)


async def _collect(srv: Server, ticket: Ticket, reply: Reply, label: str, t0: float) -> None:
    async for ev in events(ticket, len(reply.tokens)):
        if reply.first:
            srv.metrics.ttft.labels(label).observe(time.perf_counter() - t0)
        reply.add(ev)


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected. The body is already read, so the server's next message is
    http.disconnect, sent when the connection closes (uvicorn sends nothing else until the response is done)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected; never spin if a server sends something else


async def events(ticket: Ticket, n_choices: int) -> AsyncIterator[Event]:
    """The events of a request until every choice has finished; an error event raises a 500."""
    left = n_choices
    while left:
        ev = await ticket.queue.get()
        if ev.error is not None and ev.shutdown:
            raise shutting_down()
        if ev.error is not None:
            raise APIError(500, "Generation failed inside the server.", None, "generation_failed", "server_error")
        if ev.finish_reason is not None:
            left -= 1
        yield ev


def shutting_down() -> APIError:
    return APIError(
        503, "The server shut down before this request finished; retry it.", None, "shutting_down", "server_error"
    )


def sse_line(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def sse_stream(
    srv: Server,
    request: Request,
    ticket: Ticket,
    reply: Reply,
    label: str,
    t0: float,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI chunk format, then "data: [DONE]"."""
    finished = False
    try:
        if reply.chat:
            for i in range(len(reply.tokens)):
                yield sse_line(reply.chunk(i, None, None, role=True))
        async for ev in events(ticket, len(reply.tokens)):
            if reply.first:
                srv.metrics.ttft.labels(label).observe(time.perf_counter() - t0)
            reply.add(ev)
            if ev.text or ev.finish_reason:
                yield sse_line(reply.chunk(ev.index, ev.text, ev.finish_reason))
        if include_usage:
            yield sse_line(reply.usage_chunk(prompt_tokens))
        yield "data: [DONE]\n\n"
        finished = True
    except APIError as e:
        request.state.failed = True
        yield sse_line(e.body())
        yield "data: [DONE]\n\n"  # the stream ends as every stream does: clients wait for it
        finished = True
    finally:
        ticket.cancel()
        srv.metrics.tokens.labels(label, "completion").inc(reply.completion_tokens)
        if not finished:
            srv.metrics.disconnects.labels(label).inc()
