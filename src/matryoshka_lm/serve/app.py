"""An OpenAI-compatible HTTP server for one elastic checkpoint: every size from one set of weights, per request
(README.md, "Serving: one process, every size", documents the API: the model field, NAME:auto, the fields).

    matryoshka serve runs/demo --port 8000          # then: OpenAI(base_url="http://127.0.0.1:8000/v1")

Routes: GET /v1/models, /v1/models/{id}; POST /v1/completions, /v1/chat/completions, /v1/embeddings; GET /health
(never needs the API key), / (a page to try the sizes), /metrics (Prometheus).

A request runs one way: body.parse_body reads it into its protocol model, serving_models resolves the model field
into a Target once, the endpoint's module (serving_completion, serving_chat, serving_embedding) checks its inputs
and settings, submits to the batcher (the scheduler: all model work runs on its thread) and returns a protocol
response model, or a stream of them. This file keeps the routes and the middleware.

Browser safety (the default has no API key, so any web page the user visits could otherwise reach the server):
POSTs need Content-Type application/json, which a page can only send after a CORS preflight (415 otherwise); a
request arriving on a loopback address must name localhost, 127.0.0.1 or [::1] (any port) or an `allowed_hosts`
entry in its Host header, which defeats DNS rebinding (400); CORS is off unless `cors_origins` names pages.

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: 400 bad input, 401 missing or wrong API
key, 404 unknown model or route, 405, 413 body over `max_body_bytes`, 415 not application/json, 503 queue full or
shutting down, 500 only for a model failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from matryoshka_lm.core.chat import read_chat
from matryoshka_lm.core.checkpoint import trained_sizes
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.errors import MatryoshkaError

from .batcher import BatcherClosed
from .body import B, parse_body
from .errors import APIError, shutting_down, validation_error
from .metrics import MetricsMiddleware, note_size
from .openapi import GENERATION_ERRORS, json_body, openapi, responses
from .page import add_page_routes
from .protocol import (
    CHAT_STOPS,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    Health,
    ModelCard,
    ModelList,
    chat_prompt,
)
from .serving_chat import ServingChat
from .serving_completion import ServingCompletion
from .serving_embedding import ServingEmbedding
from .serving_models import Models
from .state import State, load_checkpoint, load_router

__all__ = ["create_app", "serve", "APIError", "CHAT_STOPS", "chat_prompt"]

log = logging.getLogger(__name__)
SAVED: Any = object()  # create_app's router default: the one saved beside the checkpoint


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
    router: Any = SAVED,
    bits: list[int] | None = None,
    chat: Any = SAVED,
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
        router: an infer.router.Router for NAME:auto, or None; default: the one saved beside the checkpoint
            directory, if any.
        bits: the widths /v1/models lists per size.
        chat: a core.chat.ChatFormat (the model's own template and end-of-turn ids), or None for the plain template;
            default: the checkpoint's chat.json, if any.
        options: State settings: compile, max_batch, max_batches, batch_window_s, max_body_bytes,
            max_tokens_limit, max_waiting.
    """
    if isinstance(ckpt_or_model, MatryoshkaLM):
        if tokenizer is None:
            raise MatryoshkaError("create_app(model) needs the model's tokenizer")
        model, default_name = ckpt_or_model, "matryoshka"
        router = None if router is SAVED else router
        chat = None if chat is SAVED else chat
        trained = None
    else:
        model, tok, loaded_embedder, default_name = load_checkpoint(ckpt_or_model, device)
        router = load_router(ckpt_or_model) if router is SAVED else router
        chat = read_chat(ckpt_or_model) if chat is SAVED else chat
        trained = trained_sizes(ckpt_or_model, model.cfg)
        tokenizer = tok if tokenizer is None else tokenizer
        embedder = loaded_embedder if embedder is None else embedder
    name = name or default_name
    if ":" in name:
        raise MatryoshkaError(f"model name {name!r} may not contain ':'")
    state = State(model, tokenizer, name, embedder, api_key, chat=chat, trained=trained, **options)
    return _build_app(state, Models(state, router, bits), allowed_hosts, cors_origins)


def _build_app(state: State, served: Models, allowed_hosts: Iterable[str], cors_origins: Iterable[str]) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        yield
        state.batcher.close()

    app = FastAPI(title="matryoshka-lm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server, app.state.models = state, served
    app.state.completion, app.state.chat = ServingCompletion(state, served), ServingChat(state, served)
    app.state.embedding = ServingEmbedding(state, served)
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
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    _add_error_handlers(app)
    app.include_router(router)
    app.openapi = lambda: openapi(app)
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


# ---------------------------------------------------------------- routes (the handlers live on app.state)

router = APIRouter()


def authorized(request: Request) -> None:
    key = request.app.state.server.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.", None, "invalid_api_key"
        )


AUTH = [Depends(authorized)]
POST = [Depends(authorized), Depends(require_json)]  # the key first: a stranger learns nothing else


@router.get("/health", responses=responses(400, ok=False))
async def health(request: Request) -> Health:
    state: State = request.app.state.server
    b = state.batcher
    return Health(
        status="ok",
        model=state.name,
        sizes=state.sizes,
        untrained=state.untrained,
        waiting=b.waiting,
        batches_in_flight=b.in_flight,
    )


@router.get(
    "/metrics",
    dependencies=AUTH,
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text format"}, **responses(400, 401, ok=False)},
)
async def metrics(request: Request) -> PlainTextResponse:
    from prometheus_client import CONTENT_TYPE_LATEST

    return PlainTextResponse(request.app.state.server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=AUTH, responses=responses(400, 401))
async def models(request: Request) -> ModelList:
    return request.app.state.models.listing()


@router.get("/v1/models/{model_id:path}", dependencies=AUTH, responses=responses(400, 401, 404))
async def model_card(model_id: str, request: Request) -> ModelCard:
    served: Models = request.app.state.models
    target = served.resolve(model_id)
    note_size(request, target.spec)
    return served.card(target)


async def _body(request: Request, model: type[B]) -> B:
    return await parse_body(request, model, request.app.state.server.max_body_bytes)


@router.post(
    "/v1/completions",
    dependencies=POST,
    response_model=Completion,
    openapi_extra=json_body(CompletionRequest),
    responses=responses(*GENERATION_ERRORS, stream=True),
)
async def completions(request: Request, response: Response) -> Any:  # a Completion, or a stream of chunks
    return await request.app.state.completion.create(await _body(request, CompletionRequest), request, response)


@router.post(
    "/v1/chat/completions",
    dependencies=POST,
    response_model=ChatCompletion,
    openapi_extra=json_body(ChatRequest),
    responses=responses(*GENERATION_ERRORS, stream=True),
)
async def chat(request: Request, response: Response) -> Any:  # a ChatCompletion, or a stream of chunks
    return await request.app.state.chat.create(await _body(request, ChatRequest), request, response)


@router.post(
    "/v1/embeddings",
    dependencies=POST,
    openapi_extra=json_body(EmbeddingRequest),
    responses=responses(400, 401, 404, 413, 415, 503),
)
async def embeddings(request: Request, response: Response) -> EmbeddingList:
    return await request.app.state.embedding.create(await _body(request, EmbeddingRequest), request, response)


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
    state: State = app.state.server

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # uvicorn's shutdown closes the listeners and waits for open connections; the batcher keeps working
            # meanwhile, and at the deadline stops, which fails its leftovers as shutdown errors (503s)
            log.info(
                "draining: %d waiting, %d batches in flight; up to %gs",
                state.batcher.waiting,
                state.batcher.in_flight,
                drain_timeout,
            )
            deadline = asyncio.get_running_loop().call_later(drain_timeout, state.batcher.stop)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    # uvicorn's own limit only backs ours up: when it passes, it cancels handlers and drops their connections
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout + 5)
    DrainingServer(config).run()
