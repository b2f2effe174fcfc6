"""The OpenAI wire protocol as this server speaks it: request and response bodies, limits and the chat template.
Nothing here touches the model."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

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


# ---------------------------------------------------------------- response bodies


def _not_required(schema: dict[str, Any], cls: Any) -> None:
    if "required" in schema:
        schema["required"] = [name for name in schema["required"] if name not in cls.OMIT]


class _Reply(BaseModel):
    """A response body. Its OpenAPI schema (serialization mode) marks every field required, as every reply sends
    them, except the OMIT fields: those are left out of the JSON when None, as OpenAI omits rather than nulls them."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True, json_schema_extra=_not_required)
    OMIT: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):  # no return annotation: the schema stays the fields'
        out = handler(self)
        for name in self.OMIT:
            if out.get(name) is None:
                out.pop(name, None)
        return out


class ErrorDetail(_Reply):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Reply):
    error: ErrorDetail


class Usage(_Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Reply):
    tokens: list[str]
    token_logprobs: list[float | None]  # null for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Reply):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length"; null in a stream's chunks before the last


class Completion(_Reply):
    id: str
    object: str = "text_completion"
    created: int
    model: str  # NAME:SPEC that served it (auto: the size the router chose)
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(Completion):
    """One streamed piece of a completion: the same object, with usage only in the include_usage chunk."""

    OMIT = ("usage",)
    usage: Usage | None = None  # type: ignore[assignment]


class TopLogprob(_Reply):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Reply):
    content: list[TokenLogprob]


class AssistantMessage(_Reply):
    role: str = "assistant"
    content: str


class ChatChoice(_Reply):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(_Reply):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Reply):
    OMIT = ("role", "content")
    role: str | None = None  # only in each choice's first chunk
    content: str | None = None


class ChatChunkChoice(_Reply):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Reply):
    OMIT = ("usage",)
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # the include_usage chunk only


class Embedding(_Reply):
    object: str = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string of little-endian float32 with encoding_format "base64"


class EmbeddingUsage(_Reply):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Reply):
    object: str = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(_Reply):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "matryoshka-lm"
    size: str  # canonical spec ("auto" for a routed NAME:auto)
    params: int  # auto: the most it uses
    bits: int | None  # weight precision: None = fp32, else the top `bits` bits of int8 codes
    weight_bytes: int
    context_length: int
    trained: bool = True  # False: a slice no training has made a model yet (an import's sizes before fine-tuning)
    description: str | None = None  # NAME:auto only
    router: dict[str, Any] | None = None  # NAME:auto only (null there: no router)

    OMIT = ("description", "router")

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):  # router is null on NAME:auto without a router: keyed on description
        out = handler(self)
        if self.description is None:
            out.pop("description", None)
            out.pop("router", None)
        return out


class ModelList(_Reply):
    object: str = "list"
    data: list[ModelCard]


class Health(_Reply):
    status: str  # "ok"
    model: str
    sizes: list[str]
    untrained: list[str] = []  # of those, the slices no training has made a model yet
    waiting: int
    batches_in_flight: int
