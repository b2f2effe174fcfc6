"""An OpenAI-compatible HTTP server for one elastic checkpoint: every size from one set of weights, per request.

    matryoshka serve runs/demo --port 8000          # then: OpenAI(base_url="http://127.0.0.1:8000/v1")

Routes
  GET  /v1/models             one model id per size, NAME:XL ... NAME:S, plus NAME:auto
  GET  /v1/models/{id}
  POST /v1/completions        prompt: string | strings | token ids | arrays of token ids
  POST /v1/chat/completions   messages through CHAT_TEMPLATE (below)
  POST /v1/embeddings         mean-pooled final hidden states of the size, cut to `dimensions`, L2-normalized
  GET  /health                liveness and queue depth (never needs the API key)
  GET  /metrics               Prometheus text: requests, errors, tokens, latency and batch size per size

The `model` field picks the size: "NAME:M" (or just "M"), any Mix'n'Match spec ("NAME:S,M,L,XL",
"NAME:f128h4,f256h4@d144"), or "NAME:auto" (the full size until a router exists). Responses name the size that
served them in `model` (e.g. "demo:XL" for auto) and in the X-Matryoshka-Size header.

Generation: max_tokens (default 16 for completions, the rest of the context for chat; at most
`max_tokens_limit`), temperature (0..2, default 1; 0 = greedy), top_p (0..1; 0 = the most likely token), stop
(up to 4 strings), seed (same seed, same output: a seeded request is never batched with others), n (1..8),
stream with stream_options.include_usage. Generation also ends at <|endoftext|> and at the end of the context
(finish_reason "length"). Not supported (a 400 names the field): logprobs, echo, best_of, suffix, logit_bias,
penalties, tools.

All model work runs on one worker thread (batcher.py): the event loop only parses, tokenizes and forwards.

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: 400 bad input (invalid JSON, wrong
types, values out of range, malformed spec, prompt longer than the context), 401 missing or wrong API key,
404 unknown model or route, 405, 413 body over `max_body_bytes`, 503 queue full, 500 only for a model failure.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher, Event, GenRequest, Ticket
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.sampling import Sampling
from matryoshka_lm.data import EOT
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, count_params, format_spec, parse_spec, size_names, uniform_spec

log = logging.getLogger(__name__)

MAX_STOPS = 4
MAX_CHOICES = 8
MAX_INPUTS = 256  # prompts per completion request, texts per embedding request

# The chat template: one line per message, "Role: content", then "Assistant:" for the model to continue.
# Roles: system (and developer) -> System, user -> User, assistant -> Assistant. The reply ends where the model
# starts the next turn (CHAT_STOPS), at <|endoftext|>, at max_tokens or at the end of the context.
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = ("\nUser:", "\nSystem:")


def chat_prompt(messages: list[tuple[str, str]]) -> str:
    """[(role, content)] -> the prompt text, e.g. "System: Be brief.\\nUser: Hi\\nAssistant:"."""
    return "".join(f"{CHAT_ROLES[role]}: {content}\n" for role, content in messages) + "Assistant:"


# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as OpenAI does: status and {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        # ASCII JSON: a message quoting the client's input stays encodable even with a lone surrogate in it
        return Response(json.dumps(self.body()), status_code=self.status, headers=headers,
                        media_type="application/json")


# union-typed fields get one message instead of pydantic's one-per-branch
TYPE_HINTS = {
    "prompt": "a string, an array of strings, an array of token ids or an array of arrays of token ids",
    "input": "a string, an array of strings, an array of token ids or an array of arrays of token ids",
    "stop": f"a string or an array of up to {MAX_STOPS} strings",
    "content": "a string or an array of text parts",
}


def _param(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (pydantic's union branch tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "function-after", "constrained-str"):
            break  # a union branch tag: the rest is about one alternative
        else:
            out += f".{part}" if out else part
    return out


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic error as a 400 naming the parameter."""
    e = errors[0]
    loc = tuple(x for x in e["loc"] if x != "body")
    param = _param(loc) or None
    if not loc and e["type"] in ("model_type", "dict_type", "model_attributes_type"):
        return APIError(400, "The request body must be a JSON object.", None, "invalid_type")
    if e["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    field = param.rsplit(".", 1)[-1].split("[")[0] if param else ""
    hint = TYPE_HINTS.get(field)
    if hint and (len(errors) > 1 or e["type"].endswith("_type")):
        return APIError(400, f"Invalid type for '{param}': expected {hint}.", param, "invalid_type")
    if e["type"].endswith("_type") or e["type"] in ("literal_error", "enum"):
        return APIError(400, f"Invalid type for '{param}': {e['msg']}.", param, "invalid_type")
    return APIError(400, f"Invalid value for '{param}': {e['msg']}.", param, "invalid_value")


# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # strict: "1" is not an int and true is not 1; unknown fields pass (clients send many), see UNSUPPORTED
    model_config = ConfigDict(strict=True, extra="allow")


# fields we do not implement, with the values that mean "off" (anything else gets a 400 naming the field)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    user: str | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def parse_body(request: Request, model: type[_Body], max_bytes: int) -> Any:
    """Read at most max_bytes (413 beyond), parse strict JSON (400), validate with `model` (400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"Request body of {declared} bytes exceeds the limit of {max_bytes} bytes.",
                       None, "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"Request body exceeds the limit of {max_bytes} bytes.", None, "request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "The request body is empty; send a JSON object.", None, "invalid_json")
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}.", None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, "The request body nests too deeply.", None, "invalid_json") from None
    try:
        body = model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    for name, off in UNSUPPORTED.items():
        if not any((body.model_extra or {}).get(name) == v for v in off):
            raise APIError(400, f"'{name}' is not supported by this server.", name, "unsupported_parameter")
    return body


# ---------------------------------------------------------------- metrics


class Metrics:
    """Prometheus series of one app (its own registry, so several apps in one process never collide)."""

    def __init__(self, batcher: Batcher):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: they double /metrics and no dashboard reads them
        r = self.registry = CollectorRegistry()
        self.requests = Counter("matryoshka_requests", "HTTP requests answered, by endpoint, size and status",
                                ["endpoint", "size", "status"], registry=r)
        self.errors = Counter("matryoshka_errors", "Failed requests: a 4xx/5xx answer or a stream ended by an error",
                              ["endpoint", "size", "status"], registry=r)
        self.tokens = Counter("matryoshka_tokens", "Tokens processed, by size and kind (prompt | completion)",
                              ["size", "kind"], registry=r)
        self.disconnects = Counter("matryoshka_disconnects", "Streams whose client went away before the end",
                                   ["size"], registry=r)
        lat = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.latency = Histogram("matryoshka_request_latency_seconds", "Request start to last byte",
                                 ["endpoint", "size"], buckets=lat, registry=r)
        self.ttft = Histogram("matryoshka_time_to_first_token_seconds", "Request start to first generated token",
                              ["size"], buckets=lat, registry=r)
        self.batch_rows = Histogram("matryoshka_batch_rows", "Rows per generation batch, by size", ["size"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        Gauge("matryoshka_queue_waiting", "Rows waiting for a batch", registry=r).set_function(lambda: batcher.waiting)
        Gauge("matryoshka_batches_in_flight", "Generation batches in flight", registry=r).set_function(
            lambda: batcher.in_flight)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"}


class MetricsMiddleware:
    """Counts every HTTP answer and times it to its last byte (streams included); handlers put the size served
    into request.state.size."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            size = state.get("size", "none")
            code = str(status[0])
            self.metrics.requests.labels(endpoint, size, code).inc()
            if status[0] >= 400 or state.get("failed"):
                self.metrics.errors.labels(endpoint, size, code).inc()
            self.metrics.latency.labels(endpoint, size).observe(time.perf_counter() - t0)


# ---------------------------------------------------------------- the server state


def size_label(spec: SubmodelSpec) -> str:
    """The metrics label of a size: its name, or "mixnmatch" for every other spec (bounded label values)."""
    return spec.name or "mixnmatch"


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Server:
    """The loaded checkpoint and everything the routes share."""

    def __init__(self, model: MatryoshkaLM, tokenizer: Any, name: str, embedder: Any = None,
                 api_key: str | None = None, compile: bool = False, max_batch: int = 16, max_batches: int = 8,
                 batch_window_s: float = 0.002, max_body_bytes: int = 1 << 20, max_tokens_limit: int | None = None,
                 max_waiting: int = 4096):
        from matryoshka_lm.embed.model import Embedder

        self.model, self.tok, self.name, self.api_key = model.eval(), tokenizer, name, api_key
        self.cfg = model.cfg
        self.engine = Engine(model, compile=compile)
        self.embedder = (embedder if embedder is not None else Embedder(model)).eval()
        self.max_body_bytes, self.max_waiting = max_body_bytes, max_waiting
        self.max_tokens_limit = max_tokens_limit or self.cfg.max_seq_len - 1
        eot = tokenizer.token_to_id(EOT)
        self.eot = [] if eot is None else [eot]
        self.sizes = size_names(self.cfg)
        self.auto = self._full_size()
        self.batcher = Batcher(self.engine, tokenizer.decode, max_batch, max_batches, batch_window_s,
                               on_batch=lambda spec, n: self.metrics.batch_rows.labels(size_label(spec)).observe(n))
        self.metrics = Metrics(self.batcher)
        self.created = int(time.time())

    def _full_size(self) -> SubmodelSpec:
        """auto = the full model, by its size name when one size is the full model."""
        full = self.model.full
        for name in self.sizes:
            spec = uniform_spec(self.cfg, name)
            if (spec.width, spec.layers) == (full.width, full.layers):
                return spec
        return full

    # ---- the model field

    def model_ids(self) -> list[str]:
        return [f"{self.name}:{s}" for s in self.sizes] + [f"{self.name}:auto"]

    def resolve(self, model: str, request: Request) -> tuple[str, SubmodelSpec]:
        """NAME:SIZE | NAME:SPEC | NAME:auto | SIZE | SPEC -> (the id that serves it, its spec)."""
        prefix, colon, size = model.rpartition(":")  # spec strings never contain ':'
        if colon and prefix != self.name:
            raise APIError(404, f"The model '{model}' does not exist; this server has {', '.join(self.model_ids())} "
                                f"or {self.name}:SPEC for any Mix'n'Match spec.", "model", "model_not_found")
        if size == "auto":
            spec = self.auto
        else:
            try:
                spec = parse_spec(self.cfg, size)
            except MatryoshkaError as e:
                if colon:
                    raise APIError(400, f"Invalid size spec in model '{model}': {e}", "model",
                                   "invalid_model") from None
                raise APIError(404, f"The model '{model}' does not exist; this server has "
                                    f"{', '.join(self.model_ids())} or {self.name}:SPEC for any Mix'n'Match spec.",
                               "model", "model_not_found") from None
        request.state.size = size_label(spec)
        return f"{self.name}:{format_spec(spec)}", spec

    # ---- prompts

    def check_ids(self, ids: list[int], param: str, generate: bool = True) -> list[int]:
        """Token ids of one prompt (generate: an empty one starts a new document; one slot is left to generate)
        or of one embedding input."""
        if not ids and generate:
            ids = list(self.eot)
        if not ids:
            raise APIError(400, f"'{param}' is empty.", param, "invalid_value")
        ctx = self.cfg.max_seq_len
        if len(ids) > ctx - generate:
            room = f" (at most {ctx - 1} leave room to generate)" if generate else ""
            raise APIError(400, f"This model's context is {ctx} tokens; '{param}' has {len(ids)} tokens{room}.",
                           param, "context_length_exceeded")
        bad = next((t for t in ids if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"'{param}' has token id {bad}, outside the vocabulary 0..{self.cfg.vocab_size - 1}.",
                           param, "invalid_value")
        return ids

    def encode(self, text: str, param: str) -> list[int]:
        try:
            return self.tok.encode(text).ids
        except (TypeError, ValueError):  # a lone UTF-16 surrogate ("\ud800") passes json.loads, not the tokenizer
            raise APIError(400, f"'{param}' is not valid Unicode text.", param, "invalid_value") from None

    def prompts(self, prompt: str | list, param: str = "prompt", generate: bool = True) -> list[list[int]]:
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, f"'{param}' is an empty array.", param, "invalid_value")
        if len(items) > MAX_INPUTS:
            raise APIError(400, f"'{param}' has {len(items)} entries; the limit is {MAX_INPUTS}.", param,
                           "invalid_value")
        names = [param if len(items) == 1 else f"{param}[{i}]" for i in range(len(items))]
        return [self.check_ids(self.encode(p, name) if isinstance(p, str) else list(p), name, generate)
                for p, name in zip(items, names)]

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        turns = []
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise APIError(400, f"Invalid value for 'messages[{i}].role': {m.role!r}; use one of "
                                    f"{', '.join(CHAT_ROLES)}.", f"messages[{i}].role", "invalid_value")
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type != "text" or part.text is None:
                        raise APIError(400, "Only text content parts are supported.", f"messages[{i}].content[{j}]",
                                       "invalid_value")
                content = "".join(p.text for p in m.content)
            else:
                content = m.content or ""
            turns.append((m.role, content))
        return self.check_ids(self.encode(chat_prompt(turns), "messages"), "messages")

    # ---- generation settings

    def settings(self, req: _Generation, max_tokens: int | None, default_max: int
                 ) -> tuple[int, Sampling, tuple[str, ...]]:
        n = default_max if max_tokens is None else max_tokens
        if n > self.max_tokens_limit:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise APIError(400, f"Invalid value for '{param}': {n} is above this server's limit of "
                                f"{self.max_tokens_limit}.", param, "invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOPS:
            raise APIError(400, f"Invalid value for 'stop': at most {MAX_STOPS} strings, got {len(stop)}.",
                           "stop", "invalid_value")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0:
            temperature = 0.0  # only the most likely token is left
        seed = None if req.seed is None else req.seed % 2 ** 64
        sampling = Sampling(temperature, None, top_p or 1.0, seed)
        return n, sampling, tuple(s for s in stop if s)

    def rows(self, ticket: Ticket, prompts: list[list[int]], spec: SubmodelSpec, n: int, max_tokens: int,
             sampling: Sampling, stops: tuple[str, ...]) -> list[GenRequest]:
        rows = []
        for p, ids in enumerate(prompts):
            for k in range(n):
                s = sampling if sampling.seed is None or k == 0 else Sampling(
                    sampling.temperature, None, sampling.top_p, (sampling.seed + k) % 2 ** 64)
                rows.append(GenRequest(ticket, p * n + k, ids, spec, max_tokens, s, frozenset(self.eot), stops))
        return rows

    def submit(self, rows: list[GenRequest]) -> None:
        if self.batcher.waiting + len(rows) > self.max_waiting:
            raise APIError(503, "The server is overloaded; retry shortly.", None, "overloaded", "server_error")
        self.batcher.submit(rows)


# ---------------------------------------------------------------- the app


def _load(ckpt: str | Path, device: str) -> tuple[MatryoshkaLM, Any, Any, str]:
    from matryoshka_lm.core import checkpoint as ck
    from matryoshka_lm.embed.model import EMBEDDING_JSON, load_embedder

    ckpt = Path(ckpt)
    if (ckpt / EMBEDDING_JSON).is_file():  # an embedding checkpoint: its projection serves /v1/embeddings
        embedder, tok, _ = load_embedder(ckpt, device)
        return embedder.lm, tok, embedder, ckpt.name
    return ck.load_model(ckpt, device), ck.load_tokenizer(ckpt), None, ckpt.resolve().name


def create_app(ckpt_or_model: str | Path | MatryoshkaLM, tokenizer: Any = None, *, name: str | None = None,
               api_key: str | None = None, device: str = "cpu", embedder: Any = None, **options: Any) -> FastAPI:
    """The FastAPI app serving a checkpoint directory (or a loaded model plus its `tokenizers` tokenizer).

    Args:
        ckpt_or_model: a checkpoint directory, or a MatryoshkaLM (then `tokenizer` is required).
        name: the model name in ids NAME:SIZE (default: the checkpoint folder's name, or "matryoshka").
        api_key: if set, /v1/* and /metrics need "Authorization: Bearer <api_key>".
        device: where a checkpoint is loaded.
        embedder: an embed.Embedder over the same model (default: mean pooling, no projection).
        options: Server settings: compile, max_batch, max_batches, batch_window_s, max_body_bytes,
            max_tokens_limit, max_waiting.
    """
    if isinstance(ckpt_or_model, MatryoshkaLM):
        if tokenizer is None:
            raise MatryoshkaError("create_app(model) needs the model's tokenizer")
        model, default_name = ckpt_or_model, "matryoshka"
    else:
        model, tok, loaded_embedder, default_name = _load(ckpt_or_model, device)
        tokenizer = tok if tokenizer is None else tokenizer
        embedder = loaded_embedder if embedder is None else embedder
    name = name or default_name
    if ":" in name:
        raise MatryoshkaError(f"model name {name!r} may not contain ':'")
    srv = Server(model, tokenizer, name, embedder, api_key, **options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        srv.batcher.start()
        yield
        srv.batcher.close()

    app = FastAPI(title="matryoshka-lm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv
    app.add_middleware(MetricsMiddleware, metrics=srv.metrics)
    _add_error_handlers(app)
    _add_routes(app, srv)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        return validation_error(list(e.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        path = request.url.path
        message = {404: f"No route {path}.", 405: f"Method {request.method} is not allowed on {path}."
                   }.get(e.status_code, str(e.detail))
        return APIError(e.status_code, message, None, code).response()

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "Internal server error.", None, "internal_error", "server_error").response()


def _add_routes(app: FastAPI, srv: Server) -> None:
    def authorized(request: Request) -> None:
        if srv.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), srv.api_key.encode()):
            raise APIError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.", None,
                           "invalid_api_key")

    auth = [Depends(authorized)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": srv.name, "sizes": srv.sizes, "waiting": srv.batcher.waiting,
                "batches_in_flight": srv.batcher.in_flight}

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST

        return PlainTextResponse(srv.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def card(model_id: str) -> dict[str, Any]:
        size = model_id.rpartition(":")[2]
        spec = srv.auto if size == "auto" else parse_spec(srv.cfg, size)
        return {"id": model_id, "object": "model", "created": srv.created, "owned_by": "matryoshka-lm",
                "size": format_spec(spec), "params": count_params(srv.cfg, spec)["total"],
                "context_length": srv.cfg.max_seq_len}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(m) for m in srv.model_ids()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model_card(model_id: str, request: Request) -> dict[str, Any]:
        served, _ = srv.resolve(model_id, request)
        return card(model_id if model_id.endswith(":auto") else served)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        req = await parse_body(request, CompletionRequest, srv.max_body_bytes)
        served, spec = srv.resolve(req.model, request)
        prompts = srv.prompts(req.prompt)
        return await _generate(srv, request, req, served, spec, prompts, req.max_tokens, 16, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request):
        req = await parse_body(request, ChatRequest, srv.max_body_bytes)
        served, spec = srv.resolve(req.model, request)
        prompts = [srv.chat_ids(req.messages)]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await _generate(srv, request, req, served, spec, prompts, max_tokens, srv.max_tokens_limit, chat=True)

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(request: Request):
        req = await parse_body(request, EmbeddingRequest, srv.max_body_bytes)
        served, spec = srv.resolve(req.model, request)
        ids = srv.prompts(req.input, "input", generate=False)
        full = srv.embedder.out_dim(spec)
        dims = full if req.dimensions is None else req.dimensions
        if dims > full:
            raise APIError(400, f"Invalid value for 'dimensions': {dims}; size {format_spec(spec)} embeds in "
                                f"{full} dims.", "dimensions", "invalid_value")
        vecs = await srv.batcher.call(lambda: embed_ids(srv.embedder, ids, spec, dims))
        n_tokens = sum(len(x) for x in ids)
        srv.metrics.tokens.labels(size_label(spec), "prompt").inc(n_tokens)
        b64 = req.encoding_format == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else v.tolist()}
                for i, v in enumerate(vecs)]
        return JSONResponse({"object": "list", "data": data, "model": served,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}},
                            headers={"X-Matryoshka-Size": format_spec(spec)})


@torch.inference_mode()
def embed_ids(embedder: Any, ids: list[list[int]], spec: SubmodelSpec, dims: int, batch_size: int = 64) -> np.ndarray:
    """embed.embed_texts for token ids (the server tokenizes first, to check lengths and count usage):
    right-padded batches sorted by length, mean-pooled, cut to `dims` and L2-normalized (embed.shrink)."""
    from matryoshka_lm.embed.model import shrink

    device = next(embedder.parameters()).device
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.empty((len(ids), dims), dtype=np.float32)
    for i in range(0, len(ids), batch_size):
        rows = order[i:i + batch_size]
        T = max(len(ids[j]) for j in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T)
        for b, j in enumerate(rows):
            idx[b, :len(ids[j])] = torch.tensor(ids[j])
            mask[b, :len(ids[j])] = 1
        out[rows] = shrink(embedder(idx.to(device), mask.to(device), spec), dims).float().cpu().numpy()
    return out


# ---------------------------------------------------------------- generation responses


async def _generate(srv: Server, request: Request, req: _Generation, served: str, spec: SubmodelSpec,
                    prompts: list[list[int]], max_tokens: int | None, default_max: int, chat: bool):
    n_tokens, sampling, stops = srv.settings(req, max_tokens, default_max)
    if chat:
        stops = stops + CHAT_STOPS
    n = req.n or 1
    if n * len(prompts) > MAX_INPUTS:
        raise APIError(400, f"{len(prompts)} prompts x n={n} asks for more than {MAX_INPUTS} choices.", "n",
                       "invalid_value")
    ticket = Ticket(asyncio.get_running_loop())
    rows = srv.rows(ticket, prompts, spec, n, n_tokens, sampling, stops)
    srv.submit(rows)
    label = size_label(spec)
    prompt_tokens = sum(len(p) for p in prompts)
    srv.metrics.tokens.labels(label, "prompt").inc(prompt_tokens)
    t0 = time.perf_counter()
    reply = _Reply(chat, _new_id("chatcmpl" if chat else "cmpl"), served, len(rows))
    headers = {"X-Matryoshka-Size": format_spec(spec)}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _sse(srv, request, ticket, reply, label, t0, prompt_tokens, include_usage)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    try:
        async for ev in _events(ticket, len(rows)):
            if reply.first:
                srv.metrics.ttft.labels(label).observe(time.perf_counter() - t0)
            reply.add(ev)
    except APIError:
        request.state.failed = True
        raise
    finally:
        ticket.cancel()  # a no-op when done; stops the rows when this handler is cancelled
    srv.metrics.tokens.labels(label, "completion").inc(reply.completion_tokens)
    return JSONResponse(reply.final(prompt_tokens), headers=headers)


async def _events(ticket: Ticket, n_choices: int) -> AsyncIterator[Event]:
    """The events of a request until every choice has finished; an error event raises a 500."""
    left = n_choices
    while left:
        ev = await ticket.queue.get()
        if ev.error is not None:
            raise APIError(500, "Generation failed inside the server.", None, "generation_failed", "server_error")
        if ev.finish_reason is not None:
            left -= 1
        yield ev


class _Reply:
    """Builds the OpenAI response objects of one request (completion or chat; whole or as chunks)."""

    def __init__(self, chat: bool, id: str, model: str, n: int):
        self.chat, self.id, self.model = chat, id, model
        self.created = int(time.time())
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.tokens = [0] * n
        self.reasons: list[str | None] = [None] * n
        self.first = True

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens)

    def add(self, ev: Event) -> None:
        self.first = False
        self.texts[ev.index].append(ev.text)
        self.tokens[ev.index] = ev.tokens
        self.reasons[ev.index] = ev.finish_reason

    def usage(self, prompt_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt_tokens + self.completion_tokens}

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def final(self, prompt_tokens: int) -> dict[str, Any]:
        choices = []
        for i, parts in enumerate(self.texts):
            text = "".join(parts)
            body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": i, **body, "logprobs": None, "finish_reason": self.reasons[i]})
        return {**self._head(False), "choices": choices, "usage": self.usage(prompt_tokens)}

    def chunk(self, index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        return {**self._head(True), "choices": [{**choice, "logprobs": None, "finish_reason": finish_reason}]}

    def usage_chunk(self, prompt_tokens: int) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": self.usage(prompt_tokens)}


def _sse_line(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(srv: Server, request: Request, ticket: Ticket, reply: _Reply, label: str, t0: float,
               prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI chunk format, then "data: [DONE]"."""
    finished = False
    try:
        if reply.chat:
            for i in range(len(reply.tokens)):
                yield _sse_line(reply.chunk(i, None, None, role=True))
        async for ev in _events(ticket, len(reply.tokens)):
            if reply.first:
                srv.metrics.ttft.labels(label).observe(time.perf_counter() - t0)
            reply.add(ev)
            if ev.text or ev.finish_reason:
                yield _sse_line(reply.chunk(ev.index, ev.text, ev.finish_reason))
        if include_usage:
            yield _sse_line(reply.usage_chunk(prompt_tokens))
        yield "data: [DONE]\n\n"
        finished = True
    except APIError as e:
        request.state.failed = True
        yield _sse_line(e.body())
        finished = True
    finally:
        ticket.cancel()
        srv.metrics.tokens.labels(label, "completion").inc(reply.completion_tokens)
        if not finished:
            srv.metrics.disconnects.labels(label).inc()


# ---------------------------------------------------------------- the CLI's entry


def serve(ckpt: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "cpu", log_level: str = "info", **options: Any) -> None:
    """Load `ckpt` and serve it with uvicorn until interrupted."""
    import uvicorn

    app = create_app(ckpt, api_key=api_key, device=device, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
