"""The server's state: the loaded checkpoint, its engine, embedder, batcher and metrics, and the checks that
turn a request's model field, prompts and settings into generation rows."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, format_spec, parse_spec, size_names, uniform_spec
from matryoshka_lm.data import EOT
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.router import ROUTER_JSON, Router
from matryoshka_lm.infer.sampling import Sampling
from matryoshka_lm.infer.speculative import check_draft

from .batcher import Batcher, GenRequest, Ticket
from .metrics import Metrics, size_label
from .protocol import CHAT_ROLES, MAX_INPUTS, MAX_STOPS, APIError, ChatMessage, GenerationRequest, chat_prompt


def load_router(ckpt: str | Path) -> Router | None:
    """The size router saved beside a checkpoint (CKPT/router.json), or None: NAME:auto is then the full size."""
    return Router.load(ckpt) if (Path(ckpt) / ROUTER_JSON).is_file() else None


def load_checkpoint(ckpt: str | Path, device: str) -> tuple[MatryoshkaLM, Any, Any, str]:
    """(model, tokenizer, embedder or None, default name) of an LM or an embedding checkpoint directory."""
    from matryoshka_lm.core import checkpoint as ck
    from matryoshka_lm.embed import EMBEDDING_JSON, load_embedder

    ckpt = Path(ckpt)
    if (ckpt / EMBEDDING_JSON).is_file():  # an embedding checkpoint: its projection serves /v1/embeddings
        embedder, tok, _ = load_embedder(ckpt, device)
        return embedder.lm, tok, embedder, ckpt.name
    return ck.load_model(ckpt, device), ck.load_tokenizer(ckpt), None, ckpt.resolve().name


class Server:
    """The loaded checkpoint and everything the routes share."""

    def __init__(
        self,
        model: MatryoshkaLM,
        tokenizer: Any,
        name: str,
        embedder: Any = None,
        api_key: str | None = None,
        compile: bool = False,
        max_batch: int = 16,
        max_batches: int = 8,
        batch_window_s: float = 0.002,
        max_body_bytes: int = 1 << 20,
        max_tokens_limit: int | None = None,
        max_waiting: int = 4096,
        router: Router | None = None,
        bits: list[int] | None = None,
        kernels: str | None = None,
    ):
        from matryoshka_lm.embed import Embedder

        self.model, self.tok, self.name, self.api_key = model.eval(), tokenizer, name, api_key
        self.cfg = model.cfg
        self.engine = Engine(model, compile=compile, kernels=kernels)
        self.embedder = (embedder if embedder is not None else Embedder(model)).eval()
        self.max_body_bytes, self.max_waiting = max_body_bytes, max_waiting
        self.max_tokens_limit = max_tokens_limit or self.cfg.max_seq_len - 1
        eot = tokenizer.token_to_id(EOT)
        self.eot = [] if eot is None else [eot]
        self.sizes = size_names(self.cfg)
        self.auto = self._full_size()
        self.router = router
        self.bits = self._served_bits(bits)
        # the router's candidates, checked against this model now rather than at the first auto request
        self.router_specs = [] if router is None else [self.engine.check_spec(s) for s in router.specs(self.cfg)]
        self.batcher = Batcher(
            self.engine,
            tokenizer.decode,
            max_batch,
            max_batches,
            batch_window_s,
            on_batch=lambda spec, n: self.metrics.batch_rows.labels(size_label(spec)).observe(n),
            on_round=self._count_round,
        )
        self.metrics = Metrics(self.batcher)
        self.created = int(time.time())

    def _count_round(self, spec: SubmodelSpec, drafted: int, accepted: int) -> None:
        self.metrics.speculative.labels(size_label(spec), "drafted").inc(drafted)
        self.metrics.speculative.labels(size_label(spec), "accepted").inc(accepted)

    def draft_spec(self, req: GenerationRequest, target: SubmodelSpec, routed: bool) -> SubmodelSpec | None:
        """The request's speculative draft, checked against the size that serves it; None without one."""
        if req.draft is None:
            return None
        if routed:
            raise APIError(
                400, "'draft' does not combine with NAME:auto: name the size to verify.", "draft", "invalid_value"
            )
        try:
            draft = self.engine.check_spec(parse_spec(self.cfg, req.draft))
            check_draft(self.cfg, target, draft)
        except MatryoshkaError as e:
            raise APIError(400, f"Invalid value for 'draft': {e}", "draft", "invalid_value") from None
        return draft

    def _full_size(self) -> SubmodelSpec:
        """auto = the full model, by its size name when one size is the full model."""
        full = self.model.full
        for name in self.sizes:
            spec = uniform_spec(self.cfg, name)
            if (spec.width, spec.layers) == (full.width, full.layers):
                return spec
        return full

    # ---- the model field

    def model_ids(self) -> list[str]:
        """Every size, every listed cell (size@intR) and auto; any other spec or cell is served too."""
        cells = [f"{self.name}:{s}@int{b}" for b in self.bits for s in self.sizes]
        return [f"{self.name}:{s}" for s in self.sizes] + cells + [f"{self.name}:auto"]

    def _served_bits(self, bits: list[int] | None) -> list[int]:
        """The bit widths /v1/models lists: those given, else for a quantized checkpoint its stored width's
        narrower MatQuant widths (int4, int2), for a full-precision one int8/int4/int2 (round-to-nearest)."""
        if bits is not None:
            for b in bits:
                self.model.check_bits(b)
            return bits
        stored = self.model.code_bits if self.model.codes is not None else None
        return [b for b in (8, 4, 2) if stored is None or b < stored]

    def _not_found(self, model: str) -> APIError:
        return APIError(
            404,
            f"The model '{model}' does not exist; this server has {', '.join(self.model_ids())} "
            f"or {self.name}:SPEC for any Mix'n'Match spec.",
            "model",
            "model_not_found",
        )

    def resolve(self, model: str) -> tuple[str, SubmodelSpec]:
        """NAME:SIZE | NAME:SPEC | NAME:auto[@KNOB] | SIZE | SPEC -> (the id that serves it, its spec); auto is the
        full size here (embeddings; generation routes it: resolve_generation)."""
        served, spec, _ = self.resolve_generation(model)
        return served, spec

    def resolve_generation(self, model: str) -> tuple[str, SubmodelSpec, float | None]:
        """As resolve, plus the τ to route the request's prompts at: None unless the model field is NAME:auto[@KNOB]
        and a router is loaded (the spec is then the full size until routing picks one)."""
        prefix, colon, size = model.rpartition(":")  # spec strings never contain ':'
        if colon and prefix != self.name:
            raise self._not_found(model)
        tau = None
        base, at, knob = size.partition("@")
        if base == "auto":
            spec, tau = self.auto, self._auto_tau(model, knob if at else None)
        else:
            try:
                spec = parse_spec(self.cfg, size)
                self.model.check_bits(spec.bits)
            except MatryoshkaError as e:
                if colon:
                    raise APIError(
                        400, f"Invalid size spec in model '{model}': {e}", "model", "invalid_model"
                    ) from None
                raise self._not_found(model) from None
        return f"{self.name}:{format_spec(spec)}", spec, tau

    def _auto_tau(self, model: str, knob: str | None) -> float | None:
        """The τ of NAME:auto (the router's default), NAME:auto@T, NAME:auto@tau=T or NAME:auto@budget=F; None
        without a router. A bad setting is a 400 naming the model field."""

        def bad(why: str) -> APIError:
            return APIError(400, f"Invalid routing setting in model '{model}': {why}.", "model", "invalid_model")

        if self.router is None:
            if knob is not None:
                raise bad(f"no router is saved beside this checkpoint, so {self.name}:auto is the full size")
            return None
        if knob is None:
            return self.router.tolerance
        field, eq, value = knob.rpartition("=")
        field = field if eq else "tau"
        if field not in ("tau", "budget"):
            raise bad(f"unknown setting '{field}'; use {self.name}:auto@T, @tau=T or @budget=F")
        try:
            x = float(value)
        except ValueError:
            raise bad(f"{field} must be a number, got '{value}'") from None
        if field == "tau":
            if not x >= 0:  # also NaN
                raise bad(f"tau must be a number >= 0 (nats per token), got '{value}'")
            return x
        if not 0 < x <= 1:
            raise bad(f"budget must be a mean compute fraction in (0, 1] (1 = always the full size), got '{value}'")
        try:
            return self.router.tau_for_budget(x)
        except MatryoshkaError as e:
            raise bad(str(e)) from None

    async def route(self, prompts: list[list[int]], tau: float) -> tuple[str, SubmodelSpec]:
        """The size that serves NAME:auto at τ: the largest any of the prompts needs (one response names one size),
        each routed by one small-size prefill on the worker thread. The router's prefill is not reused: batches
        are formed per size, after routing. Counted in the auto-choice metric."""
        from matryoshka_lm.infer.router import route

        assert self.router is not None

        def choose() -> int:
            x = [torch.tensor(p, device=self.engine.device) for p in prompts]
            return max(route(self.model, ids, self.router, tolerance=tau).index for ids in x)

        spec = self.router_specs[await self.batcher.call(choose)]
        self.metrics.auto_choices.labels(size_label(spec)).inc()
        return f"{self.name}:{format_spec(spec)}", spec

    def auto_card(self) -> dict[str, Any]:
        """What /v1/models says about NAME:auto: routed (by which router) or always the full size."""
        full = format_spec(self.auto)
        if self.router is None:
            return {"description": f"the full size ({full}): no router is saved beside this checkpoint", "router": None}
        r = self.router
        return {
            "description": f"the smallest of {', '.join(r.candidates)} each prompt needs, as the router predicts",
            "router": {"candidates": r.candidates, "kind": r.default, "tolerance": r.tolerance},
        }

    # ---- prompts

    def check_ids(self, ids: list[int], param: str, generate: bool = True) -> list[int]:
        """Token ids of one prompt (generate: an empty one starts a new document; one slot is left to generate)
        or of one embedding input."""
        if not ids and generate:
            ids = list(self.eot)
        if not ids:
            raise APIError(400, f"'{param}' is empty.", param, "invalid_value")
        ctx = self.cfg.max_seq_len
        if len(ids) > ctx - generate:
            room = f" (at most {ctx - 1} leave room to generate)" if generate else ""
            raise APIError(
                400,
                f"This model's context is {ctx} tokens; '{param}' has {len(ids)} tokens{room}.",
                param,
                "context_length_exceeded",
            )
        bad = next((t for t in ids if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise APIError(
                400,
                f"'{param}' has token id {bad}, outside the vocabulary 0..{self.cfg.vocab_size - 1}.",
                param,
                "invalid_value",
            )
        return ids

    def encode(self, text: str, param: str) -> list[int]:
        try:
            return self.tok.encode(text).ids
        except (TypeError, ValueError):  # a lone UTF-16 surrogate ("\ud800") passes json.loads, not the tokenizer
            raise APIError(400, f"'{param}' is not valid Unicode text.", param, "invalid_value") from None

    def prompts(self, prompt: str | list, param: str = "prompt", generate: bool = True) -> list[list[int]]:
        """A prompt or input field (string, strings, ids, arrays of ids) -> checked token ids, one list each."""
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, f"'{param}' is an empty array.", param, "invalid_value")
        if len(items) > MAX_INPUTS:
            raise APIError(
                400, f"'{param}' has {len(items)} entries; the limit is {MAX_INPUTS}.", param, "invalid_value"
            )
        names = [param if len(items) == 1 else f"{param}[{i}]" for i in range(len(items))]
        return [
            self.check_ids(self.encode(p, name) if isinstance(p, str) else list(p), name, generate)
            for p, name in zip(items, names)
        ]

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
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
        return self.check_ids(self.encode(chat_prompt(turns), "messages"), "messages")

    # ---- generation settings

    def settings(
        self, req: GenerationRequest, max_tokens: int | None, default_max: int
    ) -> tuple[int, Sampling, tuple[str, ...]]:
        """(tokens to generate, sampling, stop strings) of a request, checked against this server's limits."""
        n = default_max if max_tokens is None else max_tokens
        if n > self.max_tokens_limit:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise APIError(
                400,
                f"Invalid value for '{param}': {n} is above this server's limit of {self.max_tokens_limit}.",
                param,
                "invalid_value",
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOPS:
            raise APIError(
                400, f"Invalid value for 'stop': at most {MAX_STOPS} strings, got {len(stop)}.", "stop", "invalid_value"
            )
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0:
            temperature = 0.0  # only the most likely token is left
        seed = None if req.seed is None else req.seed % 2**64
        top_k = req.top_k if req.top_k and req.top_k > 0 else None  # 0 and -1 mean off
        sampling = Sampling(temperature, top_k, top_p or 1.0, seed, req.min_p or 0.0, self._logit_bias(req))
        return n, sampling, tuple(s for s in stop if s)

    def _token_id(self, key: str | int, param: str) -> int:
        if isinstance(key, str) and not (key.isascii() and key.isdigit()):
            raise APIError(400, f"Invalid value for '{param}': {key!r} is not a token id.", param, "invalid_value")
        tok = int(key)
        if not 0 <= tok < self.cfg.vocab_size:
            raise APIError(
                400,
                f"Invalid value for '{param}': token id {tok} is outside the vocabulary 0..{self.cfg.vocab_size - 1}.",
                param,
                "invalid_value",
            )
        return tok

    def _logit_bias(self, req: GenerationRequest) -> tuple[tuple[int, float], ...]:
        """logit_bias as sorted (token id, bias) pairs: equal settings give equal batching keys."""
        bias: dict[int, float] = {}
        for key, value in (req.logit_bias or {}).items():
            tok = self._token_id(key, "logit_bias")
            if tok in bias:
                raise APIError(
                    400, f"Invalid value for 'logit_bias': token id {tok} appears twice.", "logit_bias", "invalid_value"
                )
            bias[tok] = float(value)
        return tuple(sorted((t, b) for t, b in bias.items() if b != 0))

    def stop_tokens(self, req: GenerationRequest) -> frozenset[int]:
        """The token ids that end a row: <|endoftext|> unless ignore_eos, plus stop_token_ids."""
        extra = [self._token_id(t, "stop_token_ids") for t in req.stop_token_ids or []]
        return frozenset(([] if req.ignore_eos else self.eot) + extra)

    def rows(
        self,
        ticket: Ticket,
        prompts: list[list[int]],
        spec: SubmodelSpec,
        n: int,
        max_tokens: int,
        sampling: Sampling,
        stops: tuple[str, ...],
        stop_tokens: frozenset[int] | None = None,
        draft: SubmodelSpec | None = None,
    ) -> list[GenRequest]:
        """One generation row per prompt and choice; seeded choices after the first get seed + k. stop_tokens:
        <|endoftext|> unless given (see stop_tokens)."""
        stop_tokens = frozenset(self.eot) if stop_tokens is None else stop_tokens
        rows = []
        for p, ids in enumerate(prompts):
            for k in range(n):
                s = sampling if sampling.seed is None or k == 0 else replace(sampling, seed=(sampling.seed + k) % 2**64)
                rows.append(GenRequest(ticket, p * n + k, ids, spec, max_tokens, s, stop_tokens, stops, draft))
        return rows

    def submit(self, rows: list[GenRequest]) -> None:
        if self.batcher.waiting + len(rows) > self.max_waiting:
            raise APIError(503, "The server is overloaded; retry shortly.", None, "overloaded", "server_error")
        self.batcher.submit(rows)


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
