"""Log-probabilities in replies: completions' `echo` and `logprobs` (OpenAI's legacy shape, what
lm-evaluation-harness's local-completions backend reads) and chat's `logprobs` / `top_logprobs`.

They are the model's own distribution at the request's size (or cell): the log-softmax of the logits before
temperature, top-k/top-p/min-p and logit_bias. They come from one forward pass over prompt + completion after
generation (the logits a decode step saw, recomputed without the cache: equal to float rounding), so generation
itself is untouched. A token's alternatives are the `top` most likely tokens plus the token itself (as vLLM
returns them), so `logprobs: 0` still reports each token's own logprob.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from matryoshka_lm.core.scoring import log_probs, token_logprobs
from matryoshka_lm.core.spec import SubmodelSpec
from matryoshka_lm.infer.engine import Engine

from .protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

Decode = Callable[[list[int]], str]


@dataclass
class Scored:
    """Per position j >= 1 of a token sequence: log p(ids[j] | ids[:j]) and the most likely alternatives."""

    logprob: list[float]
    top: list[list[tuple[int, float]]]


@torch.no_grad()
def score(engine: Engine, spec: SubmodelSpec, ids: Sequence[int], top: int) -> Scored:
    """One forward of `ids` at `spec` (a cell runs at its bits): the logprob of every token after the first."""
    model, run_spec = engine.runner(engine.check_spec(spec))
    x = torch.tensor([list(ids)], device=engine.device)
    logp = log_probs(model(x, run_spec)[0, :-1])  # position j-1 predicts token j
    target = x[0, 1:]
    chosen = token_logprobs(logp, target)
    best = logp.topk(top, dim=-1) if top else None
    alts = []
    for j in range(len(ids) - 1):
        pairs = [] if best is None else list(zip(best.indices[j].tolist(), best.values[j].tolist()))
        if all(t != int(target[j]) for t, _ in pairs):
            pairs.append((int(target[j]), float(chosen[j])))
        alts.append(pairs)
    return Scored(chosen.tolist(), alts)


def kept_ids(ids: Sequence[int], text: str, decode: Decode) -> list[int]:
    """The generated tokens behind the returned text: all of them, a final stop token (<|endoftext|>) included as
    OpenAI and vLLM report it (lm-eval expects max_tokens tokens after an echoed prompt), but not the tokens of a
    stop string the text was cut before."""
    ids = list(ids)
    while ids and len(decode(ids)) > len(text):
        ids.pop()
    return ids


def legacy_logprobs(scored: Scored, ids: Sequence[int], first: int, decode: Decode, offset0: int) -> CompletionLogprobs:
    """Completions' logprobs for tokens ids[first:] (first 0: the prompt's first token has no logprob, null):
    tokens, token_logprobs, top_logprobs ({token: logprob}) and text_offset (characters, from offset0)."""
    tokens, lps, tops, offsets = [], [], [], []
    for j in range(first, len(ids)):
        tokens.append(decode([ids[j]]))
        offsets.append(offset0 + len(decode(list(ids[first:j]))))
        if j == 0:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(scored.logprob[j - 1])
        tops.append({decode([t]): lp for t, lp in scored.top[j - 1]})
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def chat_logprobs(scored: Scored, ids: Sequence[int], first: int, top: int, decode: Decode) -> ChatLogprobs:
    """Chat's logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def entry(tok: int, lp: float) -> TopLogprob:
        s = decode([tok])
        return TopLogprob(token=s, logprob=lp, bytes=list(s.encode()))

    content = []
    for j in range(first, len(ids)):
        alts = sorted(scored.top[j - 1], key=lambda p: -p[1])[:top]
        tops = [entry(t, lp) for t, lp in alts]
        content.append(TokenLogprob(**entry(ids[j], scored.logprob[j - 1]).model_dump(), top_logprobs=tops))
    return ChatLogprobs(content=content)
