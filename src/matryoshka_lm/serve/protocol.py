"""The OpenAI wire protocol as this server speaks it: request bodies, their validation, errors, limits and the
chat template. Nothing here touches the model."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOPS = 4
MAX_CHOICES = 8
MAX_INPUTS = 256  # prompts per completion request, texts per embedding request
MAX_STOP_TOKEN_IDS = 64
MAX_SPEC_CHARS = 512  # a size spec in the draft field
MAX_LOGPROBS = 20  # most likely alternatives per token (completions' `logprobs`, chat's `top_logprobs`)

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

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        # ASCII JSON: a message quoting the client's input stays encodable even with a lone surrogate in it
        return Response(
            json.dumps(self.body()), status_code=self.status, headers=headers, media_type="application/json"
        )


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


# fields we do not implement, with the values that mean "off" (anything else, true for 1 included, gets a 400
# naming the field). The penalties and min_tokens need each row's generated tokens at sampling time.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "min_tokens": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


class StreamOptions(_Body):
    include_usage: bool = False


class GenerationRequest(_Body):
    """The fields completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    user: str | None = None
    # vLLM's extra_body fields (top-level JSON keys on the wire)
    top_k: int | None = Field(None, ge=-1)  # 0 and -1 mean off, as in vLLM
    min_p: float | None = Field(None, ge=0, le=1)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool | None = None
    # token id (a decimal string: JSON keys are strings) -> bias added to its logit, as OpenAI
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # speculative decoding: a smaller size or spec of the same model drafts, the requested size verifies; lossless
    # (the output is the requested size's own). The target's first layers ("XL,XL", or an early-exit size such as
    # E2) reuse the target's KV cache and hidden states. Each choice then decodes alone (batch 1).
    draft: str | None = Field(None, max_length=MAX_SPEC_CHARS)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    echo: bool | None = False  # the reply's text (and logprobs) start with the prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # per token: its logprob and this many alternatives


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None


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


async def parse_body(request: Request, model: type[_Body], max_bytes: int) -> Any:
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
        raise APIError(
            400,
            "Invalid value for 'stream_options': it is only allowed when 'stream' is true.",
            "stream_options",
            "invalid_value",
        )
    _check_scoring(body)
    return body


def _check_scoring(body: Any) -> None:
    """echo / logprobs / top_logprobs: consistent with each other and with max_tokens and stream."""

    def bad(param: str, why: str) -> APIError:
        return APIError(400, f"Invalid value for '{param}': {why}.", param, "invalid_value")

    if isinstance(body, CompletionRequest):
        if body.max_tokens == 0 and not body.echo:
            raise bad("max_tokens", "0 generates nothing; it is only allowed with 'echo': true (score the prompt)")
        scored = [name for name in ("echo", "logprobs") if getattr(body, name) not in (None, False)]
    elif isinstance(body, ChatRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise bad("top_logprobs", "it needs 'logprobs': true")
        scored = ["logprobs"] if body.logprobs else []
    else:
        return
    if scored and body.stream:
        raise bad(scored[0], "not supported together with 'stream' here; ask without streaming")
