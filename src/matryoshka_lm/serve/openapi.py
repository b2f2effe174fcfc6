"""The OpenAPI document (/openapi.json): the request bodies the routes parse themselves and the status codes each
route really returns, so schemathesis can hold the server to it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .protocol import ErrorResponse

ERRORS = {
    400: "invalid request (the error's param names the field)",
    401: "missing or wrong API key (only when the server has one)",
    404: "unknown model",
    413: "body too large",
    415: "the body is not application/json",
    500: "generation failed inside the server",
    503: "overloaded, or shutting down (retry)",
}
GENERATION_ERRORS = (400, 401, 404, 413, 415, 500, 503)


def responses(*codes: int, ok: bool = True, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=`: 200 (described "OK"; its body is the route's response model, or server-sent events
    when `stream`), then the error codes the route really returns."""
    out: dict[int | str, dict[str, Any]] = {200: {"description": "OK"}} if ok else {}
    if stream:
        out[200]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": ERRORS[code]}
    return out


SCHEMA_DEFS: dict[str, Any] = {}  # the request bodies' nested models (filled as app.py's routes are declared)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses its body itself (body.parse_body: size limit, strict JSON,
    OpenAI-shaped errors): `model`'s JSON schema, its nested models kept for every app's components (openapi)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    SCHEMA_DEFS.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document plus the request bodies' nested schemas (json_body)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(SCHEMA_DEFS)
        for ops in schema["paths"].values():  # errors are 400s here (validation_error), never FastAPI's 422
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
