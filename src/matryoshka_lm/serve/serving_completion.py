"""POST /v1/completions: prompt(s) -> checked ids -> rows on the batcher -> a Completion (or its chunks), with
echo and the legacy logprobs."""

from __future__ import annotations

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from .batcher import Event
from .inputs import prompt_ids
from .logprobs import legacy_logprobs
from .metrics import note_size
from .protocol import Completion, CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest
from .serving import Choices, Job, ServingGeneration

DEFAULT_MAX_TOKENS = 16  # as OpenAI's


class ServingCompletion(ServingGeneration):
    id_prefix = "cmpl"

    async def create(
        self, req: CompletionRequest, request: Request, response: Response
    ) -> Completion | StreamingResponse:
        target = self.models.resolve(req.model)  # the model field is checked before the prompts
        note_size(request, target.spec)
        prompts = prompt_ids(self.state, req.prompt)
        job = await self.prepare(request, req, target, prompts, req.max_tokens, DEFAULT_MAX_TOKENS)
        response.headers.update(job.headers)
        if job.params.max_tokens == 0:  # echo only (body.py checked): the prompts are scored, nothing generated
            self.count_prompt(job)
            out = Choices(job.n_choices)
            out.reasons = ["length"] * len(out)
            return await self.reply(req, job, out)
        ticket = self.submit(job)
        if req.stream:
            return self.stream(request, req, job, ticket)
        return await self.reply(req, job, await self.collect(request, job, ticket))

    async def reply(self, req: CompletionRequest, job: Job, out: Choices) -> Completion:
        """The whole answer; echo starts each text with its prompt, logprobs scores its tokens."""
        prefix = [""] * len(out)
        logprobs: list[CompletionLogprobs | None] = [None] * len(out)
        if req.echo or req.logprobs is not None:
            for i, (prompt, gen, sc) in enumerate(await self.score(job, out, req.logprobs or 0)):
                prompt_text = self.state.tok.decode(prompt)
                if req.echo:
                    prefix[i] = prompt_text
                if req.logprobs is not None:
                    first, offset0 = (0, 0) if req.echo else (len(prompt), len(prompt_text))
                    logprobs[i] = legacy_logprobs(sc, prompt + gen, first, self.decode_one, offset0)
        choices = [
            CompletionChoice(index=i, text=prefix[i] + out.text(i), logprobs=logprobs[i], finish_reason=out.reasons[i])
            for i in range(len(out))
        ]
        return Completion(
            id=job.id, created=job.created, model=job.target.id, choices=choices, usage=out.usage(job.prompt_tokens)
        )

    def chunk(self, job: Job, out: Choices, ev: Event) -> CompletionChunk:
        choice = CompletionChoice(index=ev.index, text=ev.text or "", finish_reason=ev.finish_reason)
        return CompletionChunk(id=job.id, created=job.created, model=job.target.id, choices=[choice])

    def usage_chunk(self, job: Job, out: Choices) -> CompletionChunk:
        return CompletionChunk(
            id=job.id, created=job.created, model=job.target.id, choices=[], usage=out.usage(job.prompt_tokens)
        )
