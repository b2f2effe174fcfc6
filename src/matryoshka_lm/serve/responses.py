"""The response bodies, as pydantic models for the OpenAPI document (the routes build plain dicts; tests check
the replies against these shapes through the openai client and schemathesis), and the status codes each route
really returns."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # null for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None  # "stop" | "length"


class Completion(BaseModel):
    id: str
    object: str  # "text_completion"
    created: int
    model: str  # NAME:SPEC that served it (auto: the size the router chose)
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: str
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: str  # "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: str  # "embedding"
    index: int
    embedding: list[float] | str  # a base64 string of little-endian float32 with encoding_format "base64"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: str  # "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: str  # "model"
    created: int
    owned_by: str
    size: str  # canonical spec ("auto" for a routed NAME:auto)
    params: int
    bits: int | None  # None: full precision
    weight_bytes: int
    context_length: int
    description: str | None = None  # NAME:auto only
    router: dict[str, Any] | None = None  # NAME:auto only


class ModelList(BaseModel):
    object: str  # "list"
    data: list[ModelCard]


ERRORS = {
    400: "invalid request (the error's param names the field)",
    401: "missing or wrong API key (only when the server has one)",
    404: "unknown model",
    413: "body too large",
    415: "the body is not application/json",
    500: "generation failed inside the server",
    503: "overloaded, or shutting down (retry)",
}


def responses(ok: type[BaseModel] | None, *codes: int, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=`: 200 with `ok` (and server-sent events when `stream`), then the error codes."""
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"model": ok, "description": "OK"}
        if stream:
            out[200]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": ERRORS[code]}
    return out
