"""An OpenAI-compatible HTTP server for one elastic checkpoint: every size from one set of weights, per request.

    matryoshka serve runs/demo --port 8000          # then: OpenAI(base_url="http://127.0.0.1:8000/v1")

Routes
  GET  /v1/models             one model id per size, NAME:XL ... NAME:S, per cell NAME:M@int4 (size x bits:
                               the top bits of int8 codes, core/quant.py), plus NAME:auto (routed, see below)
  GET  /v1/models/{id}
  POST /v1/completions        prompt: string | strings | token ids | arrays of token ids
  POST /v1/chat/completions   messages through the chat template (protocol.chat_prompt)
  POST /v1/embeddings         mean-pooled final hidden states of the size, cut to `dimensions`, L2-normalized
  GET  /health                liveness and queue depth (never needs the API key)
  GET  /                      a page to try the sizes in a browser (serve/page.py; the API key is typed into it)
  GET  /metrics               Prometheus text: requests, errors, tokens, latency, batch size and auto choices per size

The `model` field picks the size: "NAME:M" (or just "M"), any Mix'n'Match spec ("NAME:S,M,L,XL",
"NAME:f128h4,f256h4@d144"), or "NAME:auto". Responses name the size that served them in `model` (e.g. "demo:M"
for auto) and in the X-Matryoshka-Size header.

NAME:auto. With a size router saved beside the checkpoint (CKPT/router.json, `matryoshka route fit CKPT`), each
completion or chat request is served at the smallest size the router predicts it needs (infer/router.py); without
one, auto is the full size, and its /v1/models entry says which ("description", "router": null or the router's
candidates, kind and default τ). Per request, after '@':
  NAME:auto@0.1 or NAME:auto@tau=0.1   tolerance τ >= 0, nats per token of quality given up (0 = always the full
                                       size; default: the router's own τ)
  NAME:auto@budget=0.5                 a target mean compute fraction in (0, 1] (1 = always full): the τ the router
                                       calibrated to meet it on held-out text
A bad setting (negative, NaN, a budget outside (0, 1] or below what the router can reach, unparsable) is a 400 on
`model`; a setting on a server without a router is too. Routing runs one prefill of the router's smallest size
per prompt on the worker thread, before the generation is queued at the chosen size; that prefill is not reused
here (batches are formed per size, after routing; `matryoshka generate --size auto` reuses it). A request with
several prompts is served at the largest size any of them needs, since one response names one size. Embeddings
take auto as the full size. /metrics counts the routed requests per chosen size (matryoshka_auto_choices_total).

Generation: max_tokens (default 16 for completions, the rest of the context for chat; at most
`max_tokens_limit`), temperature (0..2, default 1; 0 = greedy), top_p (0..1; 0 = the most likely token), stop
(up to 4 strings), seed (same seed, same output: a seeded request is never batched with others), n (1..8),
stream with stream_options.include_usage; vLLM's top_k, min_p, stop_token_ids, ignore_eos; logit_bias;
completions' echo and logprobs, chat's logprobs/top_logprobs. Generation also ends at <|endoftext|> and at the end
of the context (finish_reason "length"). Not supported (a 400 names the field): best_of, suffix, penalties, tools.

Speculative decoding: "draft": a smaller size or spec of the same model ("S", or the target's own first layers,
"XL,XL" or an early-exit size such as "E2", which reuse the target's cache and hidden states) drafts and the
requested size verifies. Lossless: greedy output is the size's own, sampled output has its distribution. Each
choice then decodes alone (batch 1, the setting where drafting pays); /metrics counts drafted and accepted tokens
(matryoshka_speculative_tokens_total). A draft that is not smaller than the size, or with NAME:auto, is a 400.

All model work runs on one worker thread (batcher.py): the event loop only parses, tokenizes and forwards.
The modules: protocol (bodies, validation, errors, the chat template), state (the Server: checkpoint, model
field, prompts, settings), replies (whole and streamed answers), metrics (Prometheus), app (routes, this file).

Browser safety (the default has no API key, so any web page the user visits could otherwise reach the server):
POSTs need Content-Type application/json, which a page can only send after a CORS preflight, so a cross-site
"simple" text/plain or form POST never starts generation (415); a request arriving on a loopback address must
name localhost, 127.0.0.1 or [::1] (any port) or an `allowed_hosts` entry in its Host header, which defeats DNS
rebinding (400; on other addresses only when `allowed_hosts` is given); CORS is off unless `cors_origins` names
the pages allowed to call it.

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: 400 bad input (invalid JSON, wrong
types, values out of range, malformed spec, prompt longer than the context, a Host not allowed), 401 missing or
wrong API key, 404 unknown model or route, 405, 413 body over `max_body_bytes`, 415 a POST body not declared
application/json, 503 queue full, 500 only for a model failure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.quant import weight_bytes
from matryoshka_lm.core.spec import SubmodelSpec, count_params, format_spec, parse_spec
from matryoshka_lm.errors import MatryoshkaError

from . import responses as R
from .batcher import BatcherClosed
from .metrics import MetricsMiddleware, size_label
from .page import add_page_routes
from .protocol import (
    CHAT_STOPS,
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_prompt,
    parse_body,
    validation_error,
)
from .replies import generation_reply, shutting_down
from .state import Server, load_checkpoint, load_router

__all__ = ["create_app", "serve", "APIError", "CHAT_STOPS", "chat_prompt"]

log = logging.getLogger(__name__)


def create_app(
    ckpt_or_model: str | Path | MatryoshkaLM,
    tokenizer: Any = None,
    *,
    name: str | None = None,
    api_key: str | None = None,
    device: str = "cpu",
    embedder: Any = None,
    allowed_hosts: Iterable[str] = (),
    cors_origins: Iterable[str] = (),
    **options: Any,
) -> FastAPI:
    """The FastAPI app serving a checkpoint directory (or a loaded model plus its `tokenizers` tokenizer).

    Args:
        ckpt_or_model: a checkpoint directory, or a MatryoshkaLM (then `tokenizer` is required).
        name: the model name in ids NAME:SIZE (default: the checkpoint folder's name, or "matryoshka").
        api_key: if set, /v1/* and /metrics need "Authorization: Bearer <api_key>".
        device: where a checkpoint is loaded.
        embedder: an embed.Embedder over the same model (default: mean pooling, no projection).
        allowed_hosts: Host header names (or name:port) accepted besides localhost, 127.0.0.1 and [::1]; "*"
            accepts any. Checked on requests that arrive on a loopback address, and on every request if given.
        cors_origins: origins (e.g. "http://localhost:3000", or "*") whose pages may call the API; none by default.
        options: Server settings: compile, max_batch, max_batches, batch_window_s, max_body_bytes,
            max_tokens_limit, max_waiting, router (an infer.router.Router for NAME:auto; default: the one saved
            beside the checkpoint directory, if any), bits (the widths /v1/models lists per size), kernels (how
            cells compute: None, "bf16" or "fp32"; see infer.engine.Engine).
    """
    if isinstance(ckpt_or_model, MatryoshkaLM):
        if tokenizer is None:
            raise MatryoshkaError("create_app(model) needs the model's tokenizer")
        model, default_name = ckpt_or_model, "matryoshka"
    else:
        model, tok, loaded_embedder, default_name = load_checkpoint(ckpt_or_model, device)
        if "router" not in options:
            options["router"] = load_router(ckpt_or_model)
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
    # last added runs first: metrics count every answer, then the Host check, then CORS (so even a preflight
    # needs an allowed Host)
    cors_origins = list(cors_origins)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],  # the openai SDK sends its own x-stainless-* headers
            expose_headers=["X-Matryoshka-Size"],
        )
    app.add_middleware(HostCheckMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(MetricsMiddleware, metrics=srv.metrics)
    _add_error_handlers(app)
    _add_routes(app, srv)
    add_page_routes(app)
    return app


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:  # a unix socket path, or no address at all
        return False


class HostCheckMiddleware:
    """Rejects a request whose Host header the server does not answer to (DNS rebinding: a page on evil.example
    re-points its name at 127.0.0.1, and the browser then sends Host: evil.example to this server).

    The check applies to requests that arrive on a loopback address (the local end of the connection, so a server
    bound to 0.0.0.0 is protected when reached through 127.0.0.1 too), and to every request once `allowed_hosts`
    is given."""

    def __init__(self, app: Any, allowed_hosts: Iterable[str] = ()):
        self.app = app
        self.extra = {h.strip().lower() for h in allowed_hosts if h.strip()}
        self.allowed = set(LOOPBACK_NAMES) | self.extra

    def accepts(self, host: str) -> bool:
        host = host.strip().lower()
        if "*" in self.allowed or host in self.allowed:
            return True
        # name:port, with IPv6 literals bracketed: "[::1]:8000".rpartition(":") gives "[::1]"
        name, colon, port = host.rpartition(":")
        return bool(colon) and port.isdigit() and name in self.allowed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (self.extra or _is_loopback(str((scope.get("server") or ("",))[0]))):
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if host is None or not self.accepts(host):
                got = "no Host header" if host is None else f"Host {host!r}"
                message = (
                    f"Request rejected: {got} is not a name this server answers to. Allowed: "
                    f"{', '.join(sorted(self.allowed))} (any port); add one with --allowed-host."
                )
                return await APIError(400, message, None, "invalid_host").response()(scope, receive, send)
        await self.app(scope, receive, send)


async def require_json(request: Request) -> None:
    """POST bodies must be declared application/json: a web page can send text/plain or form bodies cross-site
    without a CORS preflight, but not application/json."""
    received = request.headers.get("content-type")
    if (received or "").partition(";")[0].strip().lower() != "application/json":
        got = "no Content-Type" if received is None else f"Content-Type {received!r}"
        raise APIError(
            415,
            f"Request body must be sent as 'Content-Type: application/json'; got {got}.",
            None,
            "unsupported_media_type",
        )


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
        message = {404: f"No route {path}.", 405: f"Method {request.method} is not allowed on {path}."}.get(
            e.status_code, str(e.detail)
        )
        return APIError(e.status_code, message, None, code).response()

    @app.exception_handler(BatcherClosed)
    async def closed(request: Request, e: BatcherClosed) -> Response:
        return shutting_down().response()

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "Internal server error.", None, "internal_error", "server_error").response()


def _resolve(srv: Server, model: str, request: Request) -> tuple[str, SubmodelSpec]:
    """srv.resolve, noting the size served for the metrics middleware."""
    served, spec = srv.resolve(model)
    request.state.size = size_label(spec)
    return served, spec


async def _generation_size(
    srv: Server,
    request: Request,
    req: CompletionRequest | ChatRequest,
    prompts: list[list[int]],
    max_tokens: int | None,
    default_max: int,
) -> tuple[str, SubmodelSpec, SubmodelSpec | None]:
    """The id and size that serve a generation request, and its speculative draft: NAME:auto with a router is
    routed on the worker thread (after the settings are checked, so bad input costs no model work); anything else
    as srv.resolve."""
    served, spec, tau = srv.resolve_generation(req.model)
    draft = srv.draft_spec(req, spec, routed=tau is not None)
    if tau is not None:
        srv.settings(req, max_tokens, default_max)
        served, spec = await srv.route(prompts, tau)
    request.state.size = size_label(spec)
    return served, spec, draft


GENERATION_ERRORS = (400, 401, 404, 413, 415, 500, 503)


def json_body(app: FastAPI, model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses its body itself (parse_body: size limit, strict JSON,
    OpenAI-shaped errors): `model`'s JSON schema, its nested models added to the app's components (openapi())."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    app.state.schema_defs = {**getattr(app.state, "schema_defs", {}), **schema.pop("$defs", {})}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document plus the request bodies' nested schemas (json_body)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(getattr(app.state, "schema_defs", {}))
        for ops in schema["paths"].values():  # errors are 400s here (validation_error), never FastAPI's 422
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _add_routes(app: FastAPI, srv: Server) -> None:
    app.openapi = lambda: _openapi(app)

    def authorized(request: Request) -> None:
        if srv.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), srv.api_key.encode()):
            raise APIError(
                401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.", None, "invalid_api_key"
            )

    auth = [Depends(authorized)]
    post = [Depends(authorized), Depends(require_json)]  # the key first: a stranger learns nothing else

    @app.get("/health", responses=R.responses(None, 400))
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": srv.name,
            "sizes": srv.sizes,
            "waiting": srv.batcher.waiting,
            "batches_in_flight": srv.batcher.in_flight,
        }

    @app.get(
        "/metrics",
        dependencies=auth,
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text format"}, **R.responses(None, 400, 401)},
    )
    async def metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST

        return PlainTextResponse(srv.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def card(model_id: str) -> dict[str, Any]:
        size = model_id.rpartition(":")[2]
        auto = size == "auto"
        spec = srv.auto if auto else parse_spec(srv.cfg, size)
        bits = spec.bits or srv.model.native_bits
        return {
            "id": model_id,
            "object": "model",
            "created": srv.created,
            "owned_by": "matryoshka-lm",
            "size": "auto" if auto and srv.router is not None else format_spec(spec),
            "params": count_params(srv.cfg, spec)["total"],  # auto: the most it uses
            "bits": bits,  # weight precision: None = fp32, else int8 codes' top `bits` bits
            "weight_bytes": weight_bytes(srv.cfg, spec, bits, srv.model.quant),
            "context_length": srv.cfg.max_seq_len,
            **(srv.auto_card() if auto else {}),
        }

    @app.get("/v1/models", dependencies=auth, responses=R.responses(R.ModelList, 400, 401))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(m) for m in srv.model_ids()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth, responses=R.responses(R.ModelCard, 400, 401, 404))
    async def model_card(model_id: str, request: Request) -> dict[str, Any]:
        served, _ = _resolve(srv, model_id, request)
        auto = model_id.rpartition(":")[2].partition("@")[0] == "auto"
        return card(f"{srv.name}:auto" if auto else served)

    @app.post(
        "/v1/completions",
        dependencies=post,
        openapi_extra=json_body(app, CompletionRequest),
        responses=R.responses(R.Completion, *GENERATION_ERRORS, stream=True),
    )
    async def completions(request: Request) -> Response:
        req = await parse_body(request, CompletionRequest, srv.max_body_bytes)
        _resolve(srv, req.model, request)  # the model field is checked before the prompts
        prompts = srv.prompts(req.prompt)
        served, spec, draft = await _generation_size(srv, request, req, prompts, req.max_tokens, 16)
        return await generation_reply(
            srv, request, req, served, spec, prompts, req.max_tokens, 16, chat=False, draft=draft
        )

    @app.post(
        "/v1/chat/completions",
        dependencies=post,
        openapi_extra=json_body(app, ChatRequest),
        responses=R.responses(R.ChatCompletion, *GENERATION_ERRORS, stream=True),
    )
    async def chat(request: Request) -> Response:
        req = await parse_body(request, ChatRequest, srv.max_body_bytes)
        _resolve(srv, req.model, request)
        prompts = [srv.chat_ids(req.messages)]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        served, spec, draft = await _generation_size(srv, request, req, prompts, max_tokens, srv.max_tokens_limit)
        return await generation_reply(
            srv, request, req, served, spec, prompts, max_tokens, srv.max_tokens_limit, chat=True, draft=draft
        )

    @app.post(
        "/v1/embeddings",
        dependencies=post,
        openapi_extra=json_body(app, EmbeddingRequest),
        responses=R.responses(R.EmbeddingList, 400, 401, 404, 413, 415, 503),
    )
    async def embeddings(request: Request) -> Response:
        req = await parse_body(request, EmbeddingRequest, srv.max_body_bytes)
        served, spec = _resolve(srv, req.model, request)
        return await _embeddings(srv, req, served, spec)


async def _embeddings(srv: Server, req: EmbeddingRequest, served: str, spec: SubmodelSpec) -> Response:
    """Embed the inputs on the worker thread (between token steps): unit vectors cut to `dimensions`."""
    from matryoshka_lm.embed import embed_ids

    ids = srv.prompts(req.input, "input", generate=False)
    full = srv.embedder.out_dim(spec)
    dims = full if req.dimensions is None else req.dimensions
    if dims > full:
        raise APIError(
            400,
            f"Invalid value for 'dimensions': {dims}; size {format_spec(spec)} embeds in {full} dims.",
            "dimensions",
            "invalid_value",
        )
    vecs = await srv.batcher.call(lambda: embed_ids(srv.embedder, ids, spec, dims))
    n_tokens = sum(len(x) for x in ids)
    srv.metrics.tokens.labels(size_label(spec), "prompt").inc(n_tokens)
    b64 = req.encoding_format == "base64"
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else v.tolist(),
        }
        for i, v in enumerate(vecs)
    ]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": served,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        },
        headers={"X-Matryoshka-Size": format_spec(spec)},
    )


# ---------------------------------------------------------------- the CLI's entry


def serve(
    ckpt: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    device: str = "cpu",
    log_level: str = "info",
    drain_timeout: float = 30.0,
    **options: Any,
) -> None:
    """Load `ckpt` and serve it with uvicorn until SIGTERM or SIGINT, then drain: stop accepting connections, let
    the requests in flight and queued finish for up to `drain_timeout` seconds, then answer what is left with a
    503 (streams: an error event and [DONE])."""
    import uvicorn

    app = create_app(ckpt, api_key=api_key, device=device, **options)
    srv: Server = app.state.server

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # uvicorn's shutdown closes the listeners and waits for open connections; the batcher keeps working
            # meanwhile, and at the deadline stops, which fails its leftovers as shutdown errors (503s)
            log.info(
                "draining: %d waiting, %d batches in flight; up to %gs",
                srv.batcher.waiting,
                srv.batcher.in_flight,
                drain_timeout,
            )
            deadline = asyncio.get_running_loop().call_later(drain_timeout, srv.batcher.stop)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    # uvicorn's own limit only backs ours up: when it passes, it cancels handlers and drops their connections
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout + 5)
    DrainingServer(config).run()
