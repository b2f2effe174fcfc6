"""Reading a request body into its protocol model: a size limit (413), strict JSON (400), the model's validation
and the checks across fields (400s naming the field)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from .errors import APIError, invalid, validation_error
from .protocol import UNSUPPORTED, ChatRequest, CompletionRequest, GenerationRequest

B = TypeVar("B", bound=BaseModel)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused (413) past max_bytes whether declared up front or only found while reading."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(
            413, f"Request body of {declared} bytes exceeds the limit of {max_bytes} bytes.", None, "request_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"Request body exceeds the limit of {max_bytes} bytes.", None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(raw: bytes) -> Any:
    """Strict JSON (no NaN or Infinity) or a 400."""
    if not raw.strip():
        raise APIError(400, "The request body is empty; send a JSON object.", None, "invalid_json")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}.", None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, "The request body nests too deeply.", None, "invalid_json") from None


async def parse_body(request: Request, model: type[B], max_bytes: int) -> B:
    """Read at most max_bytes (413 beyond), parse strict JSON (400), validate with `model` (400)."""
    obj = _json(await _read_body(request, max_bytes))
    try:
        body = model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    for name, off in UNSUPPORTED.items():
        value = (body.model_extra or {}).get(name)
        if not any(value == v and type(value) is type(v) for v in off):
            raise APIError(400, f"'{name}' is not supported by this server.", name, "unsupported_parameter")
    if isinstance(body, GenerationRequest) and body.stream_options is not None and not body.stream:
        raise invalid("stream_options", "it is only allowed when 'stream' is true")
    _check_scoring(body)
    return body


def _check_scoring(body: Any) -> None:
    """echo / logprobs / top_logprobs: consistent with each other and with max_tokens and stream."""
    if isinstance(body, CompletionRequest):
        if body.max_tokens == 0 and not body.echo:
            raise invalid("max_tokens", "0 generates nothing; it is only allowed with 'echo': true (score the prompt)")
        scored = [name for name in ("echo", "logprobs") if getattr(body, name) not in (None, False)]
    elif isinstance(body, ChatRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs", "it needs 'logprobs': true")
        scored = ["logprobs"] if body.logprobs else []
    else:
        return
    if scored and body.stream:
        raise invalid(scored[0], "not supported together with 'stream' here; ask without streaming")
