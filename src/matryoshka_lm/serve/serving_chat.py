"""POST /v1/chat/completions: messages -> the chat template (protocol.chat_prompt) -> checked ids -> rows on the
batcher -> a ChatCompletion (or its chunks), with chat's logprobs."""

from __future__ import annotations

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from matryoshka_lm.errors import MatryoshkaError

from .batcher import Event
from .errors import APIError
from .inputs import check_ids, encode
from .logprobs import chat_logprobs
from .metrics import note_size
from .protocol import (
    CHAT_ROLES,
    CHAT_STOPS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatRequest,
    chat_prompt,
)
from .serving import Choices, Job, ServingGeneration


class ServingChat(ServingGeneration):
    id_prefix = "chatcmpl"

    async def create(
        self, req: ChatRequest, request: Request, response: Response
    ) -> ChatCompletion | StreamingResponse:
        target = self.models.resolve(req.model)  # the model field is checked before the messages
        note_size(request, target.spec)
        prompts = [self.prompt_ids(req.messages)]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        # no default length: the rest of the context (the batcher caps each row at it)
        # the plain template's next turn is a stop string; a model's own template ends its turn with a token (eot)
        stops = () if self.templated else CHAT_STOPS
        job = await self.prepare(request, req, target, prompts, max_tokens, self.state.max_tokens_limit, stops)
        response.headers.update(job.headers)
        ticket = self.submit(job)
        if req.stream:
            return self.stream(request, req, job, ticket)
        return await self.reply(req, job, await self.collect(request, job, ticket))

    def prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The messages through the chat template, as checked token ids."""
        turns = []
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise APIError(
                    400,
                    f"Invalid value for 'messages[{i}].role': {m.role!r}; use one of {', '.join(CHAT_ROLES)}.",
                    f"messages[{i}].role",
                    "invalid_value",
                )
            turns.append((m.role, _message_text(m, i)))
        if self.templated:  # the model's own template (core.chat), rendered as transformers renders it
            try:
                roles = {"developer": "system"}  # OpenAI's newer name; model templates know "system"
                text = self.state.chat.render([{"role": roles.get(r, r), "content": c} for r, c in turns])
            except MatryoshkaError as e:
                raise APIError(400, f"{e}.", "messages", "invalid_value") from None
        else:
            text = chat_prompt(turns)
        return check_ids(self.state, encode(self.state, text, "messages"), "messages")

    @property
    def templated(self) -> bool:
        return self.state.chat is not None and self.state.chat.template is not None

    async def reply(self, req: ChatRequest, job: Job, out: Choices) -> ChatCompletion:
        logprobs: list[ChatLogprobs | None] = [None] * len(out)
        if req.logprobs:
            top = req.top_logprobs or 0
            for i, (prompt, gen, sc) in enumerate(await self.score(job, out, top)):
                logprobs[i] = chat_logprobs(sc, prompt + gen, len(prompt), top, self.decode_one)
        choices = [
            ChatChoice(
                index=i,
                # the template ends "Assistant:", so the model's reply starts with a space
                message=AssistantMessage(content=out.text(i).lstrip()),
                logprobs=logprobs[i],
                finish_reason=out.reasons[i],
            )
            for i in range(len(out))
        ]
        return ChatCompletion(
            id=job.id, created=job.created, model=job.target.id, choices=choices, usage=out.usage(job.prompt_tokens)
        )

    def _chunk(self, job: Job, choices: list[ChatChunkChoice], out: Choices | None = None) -> ChatCompletionChunk:
        usage = None if out is None else out.usage(job.prompt_tokens)
        return ChatCompletionChunk(id=job.id, created=job.created, model=job.target.id, choices=choices, usage=usage)

    def first_chunks(self, job: Job, out: Choices) -> list[ChatCompletionChunk]:
        """Each choice opens with the assistant's role and empty content, as OpenAI streams."""
        return [
            self._chunk(job, [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            for i in range(len(out))
        ]

    def chunk(self, job: Job, out: Choices, ev: Event) -> ChatCompletionChunk:
        text = ev.text
        if text and not out.started[ev.index]:  # as in reply(): no leading whitespace
            text = text.lstrip()
            out.started[ev.index] = bool(text)
        delta = ChatDelta(content=text or None)
        return self._chunk(job, [ChatChunkChoice(index=ev.index, delta=delta, finish_reason=ev.finish_reason)])

    def usage_chunk(self, job: Job, out: Choices) -> ChatCompletionChunk:
        return self._chunk(job, [], out)


def _message_text(m: ChatMessage, i: int) -> str:
    """A message's content: the string, or its text parts joined (other part types are a 400)."""
    if not isinstance(m.content, list):
        return m.content or ""
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise APIError(
                400, "Only text content parts are supported.", f"messages[{i}].content[{j}]", "invalid_value"
            )
    return "".join(p.text for p in m.content)
