"""Elastic inference: batched, KV-cached generation at any size, on the full model's own weights.

A size (or Mix'n'Match spec) reads prefix views of the full model's weights, so one loaded model serves every
size with no copy (tests/test_engine.py checks the storage pointers). `model(x, spec)` would take those views at
every call; the engine takes them once per size instead (`view_model`: a module of the size's shape whose
parameters ARE the views, from nested.slice_views), which saves the slicing ops of every step.

The decoding loop follows gpt-fast: `prefill` the prompt into a preallocated KV cache, then `decode_one_token`
per step; `Engine` adds batching, sampling, stop conditions and streaming around it.

Batches of prompts of different lengths are LEFT-padded: every row's prompt ends in the same cache slot, so each
decode step writes one slot for the whole batch. Row b's tokens sit at RoPE positions `slot - pad[b]` and its
queries may not attend to its pad slots (a boolean mask); rows of equal length take the unmasked fast path.

Shapes: B batch, P padded prompt length, L cache slots, V vocab.
"""
from __future__ import annotations

import logging
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from matryoshka_lm.core import nested
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.nested import submodel_config
from matryoshka_lm.core.spec import SubmodelSpec, validate_spec
from matryoshka_lm.infer.sampling import GREEDY, Sampling, sample
from matryoshka_lm.infer.stops import Completion, Decode, StopRow, stream_rows

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the forward passes a decoder needs


def prefill(model: MatryoshkaLM, idx: torch.Tensor, spec: SubmodelSpec, cache: KVCache,
            pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run prompts (B, P) through `spec`, filling cache slots 0..P; logits (B, V) of the last slot only."""
    h = model.hidden_states(idx, spec, cache, 0, pos, mask)[:, -1:]
    return nested.linear(h, model.head_weight(), model.cfg.vocab_size)[:, -1]


def decode_one_token(model: MatryoshkaLM, tok: torch.Tensor, spec: SubmodelSpec, cache: KVCache, start: int,
                     pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One step for the whole batch: tokens (B,) into cache slot `start`; next-token logits (B, V)."""
    return model(tok.view(-1, 1), spec, cache, start, pos, mask)[:, -1]


def forward_chunk(model: MatryoshkaLM, idx: torch.Tensor, spec: SubmodelSpec, cache: KVCache,
                  start: int) -> torch.Tensor:
    """Tokens (B, T) into slots start..start+T after a cached prefix; logits (B, T, V) (speculative verify)."""
    return model(idx, spec, cache, start)


@contextmanager
def _bare_construction(rope: tuple[torch.Tensor, torch.Tensor]) -> Iterator[None]:
    """Build modules without computing anything: no weight initialisation (transformers' `no_init_weights`
    trick) and the given RoPE tables. On the meta device this allocates nothing; computing on meta tensors
    would also import sympy & co. (~70 MB resident), for values that are replaced at once."""
    from matryoshka_lm.core import model as model_module

    names = ("normal_", "ones_", "zeros_", "uniform_", "kaiming_uniform_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    saved_rope = model_module.rope_tables
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *args, **kwargs: t)
        model_module.rope_tables = lambda *args: rope
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)
        model_module.rope_tables = saved_rope


@torch.no_grad()
def view_model(model: MatryoshkaLM, spec: SubmodelSpec) -> MatryoshkaLM:
    """A standalone-shaped model of `spec` whose parameters are views of `model`'s: no weight is copied (built
    bare on the meta device, then the views are assigned), and each slice is taken once instead of at every call.
    It shares the model's RoPE tables too."""
    with _bare_construction((model.rope_cos, model.rope_sin)):
        sub = MatryoshkaLM(submodel_config(model.cfg, spec))
    views = nested.slice_views(dict(model.named_parameters()), model.cfg, spec)
    sub.load_state_dict({k: v.detach() for k, v in views.items()}, assign=True)
    return sub.requires_grad_(False).eval()


# ---------------------------------------------------------------- padding


@dataclass
class Padding:
    """Left padding of a batch: per-row RoPE positions and key masks for every cache slot."""
    pad: torch.Tensor    # (B,) pad slots before each prompt
    pos: torch.Tensor    # (B, L) RoPE position of each slot (0 in the padding)
    valid: torch.Tensor  # (B, L) slot holds a real token of that row

    @classmethod
    def build(cls, lengths: list[int], n_slots: int, device: torch.device) -> Padding:
        P = max(lengths)
        pad = torch.tensor([P - n for n in lengths], device=device)
        slots = torch.arange(n_slots, device=device)
        return cls(pad, (slots[None] - pad[:, None]).clamp(min=0), slots[None] >= pad[:, None])

    def prefill_mask(self, P: int) -> torch.Tensor:
        """(B, 1, P, P): causal, no pad keys; a pad query sees itself only (never a row of -inf, hence no NaN)."""
        eye = torch.eye(P, dtype=torch.bool, device=self.pad.device)
        causal = torch.ones(P, P, dtype=torch.bool, device=self.pad.device).tril()
        return ((causal[None] & self.valid[:, None, :P]) | eye[None]).unsqueeze(1)

    def step(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (B, 1) and mask (B, 1, 1, start + 1) for a decode step writing slot `start`."""
        return self.pos[:, start:start + 1], self.valid[:, None, None, :start + 1]


# ---------------------------------------------------------------- the engine


def compile_per_spec(fn: Callable) -> Callable:
    """torch.compile `fn(model, x, spec, cache, start, ...)` with one private copy of its code per spec.

    Dynamo keeps its "this int changed, make it dynamic" state per code object. With one copy per spec only the
    cache position and lengths ever change between calls, so only they become symbolic; a spec's head and FFN
    counts stay Python ints (shared by all specs, they would turn symbolic too and break the graph at SDPA).
    """
    compiled: dict[SubmodelSpec, Callable] = {}

    def call(model, x, spec, cache, *args):
        f = compiled.get(spec)
        if f is None:
            code = fn.__code__.replace(co_name=f"{fn.__name__}_spec{len(compiled)}")
            f = compiled[spec] = torch.compile(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__))
        for t in cache.k + cache.v:  # any cache length: no recompile when max_new_tokens changes
            torch._dynamo.maybe_mark_dynamic(t, 2)
        return f(model, x, spec, cache, *args)

    return call


class Engine:
    """Generation at any size of one loaded model. `compile=True` wraps the per-token forward in torch.compile
    (graphs per spec, compiled on first use; see BENCHMARKS.md for when it pays off on CPU)."""

    def __init__(self, model: MatryoshkaLM, compile: bool = False, slice_once: bool = True):
        self.model = model.eval()
        self.cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.compiled = compile
        self.slice_once = slice_once  # False: slice at every call, model(x, spec) (for comparison)
        self._views: dict[SubmodelSpec, MatryoshkaLM] = {}
        self._decode = decode_one_token
        self._chunk = forward_chunk
        if compile:
            import torch._dynamo

            # each spec x (batch 1 | batch > 1) x (padded | not) is a graph of its own
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._decode = compile_per_spec(decode_one_token)
            self._chunk = compile_per_spec(forward_chunk)

    # ---- validation

    def check_spec(self, spec: SubmodelSpec | None) -> SubmodelSpec:
        spec = spec or self.model.full
        validate_spec(self.cfg, spec)
        return spec

    def runner(self, spec: SubmodelSpec) -> tuple[MatryoshkaLM, SubmodelSpec]:
        """The module that runs `spec` and the spec to pass it: the model itself for the full size, else the
        size's view model (built on first use; views stay valid while the model's tensors are updated in place,
        so build a new Engine after replacing them)."""
        full = self.model.full
        if not self.slice_once or (spec.width, spec.layers) == (full.width, full.layers):
            return self.model, spec
        sub = self._views.get(spec)
        if sub is None:
            sub = self._views[spec] = view_model(self.model, spec)
        return sub, sub.full

    def check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if max_new_tokens <= 0:
            raise MatryoshkaError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if not prompts:
            raise MatryoshkaError("no prompts given")
        out = []
        for i, p in enumerate(prompts):
            p = [int(t) for t in p]
            if not p:
                raise MatryoshkaError(f"prompt {i} is empty")
            if len(p) >= self.cfg.max_seq_len:
                raise MatryoshkaError(f"prompt {i} has {len(p)} tokens; the context holds {self.cfg.max_seq_len} "
                                      f"(at most {self.cfg.max_seq_len - 1} prompt tokens leave room to generate)")
            bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise MatryoshkaError(
                    f"prompt {i}: token id {bad[0]} is outside the vocabulary 0..{self.cfg.vocab_size - 1}")
            out.append(p)
        return out

    # ---- decoding

    @torch.no_grad()
    def token_steps(self, prompts: Sequence[Sequence[int]], spec: SubmodelSpec | None = None,
                    max_new_tokens: int = 64, sampling: Sampling = GREEDY) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (B,), for up to max_new_tokens steps (fewer if the context fills).
        The caller decides when to stop; every row keeps decoding until then."""
        model, spec = self.runner(self.check_spec(spec))
        prompts = self.check_prompts(prompts, max_new_tokens)
        lengths = [len(p) for p in prompts]
        B, P = len(prompts), max(lengths)
        n_new = min(max_new_tokens, self.cfg.max_seq_len - P)
        idx = torch.zeros(B, P, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            idx[b, P - len(p):] = torch.tensor(p)
        cache = KVCache.allocate(self.cfg, spec, B, P + n_new, self.device, self.dtype)
        padding = Padding.build(lengths, P + n_new, self.device) if len(set(lengths)) > 1 else None
        gen = sampling.generator(self.device)
        if padding is None:
            logits = prefill(model, idx, spec, cache)
        else:
            logits = prefill(model, idx, spec, cache, padding.pos[:, :P], padding.prefill_mask(P))
        for i in range(n_new):
            tok = sample(logits, sampling, gen)
            yield tok
            if i + 1 < n_new:
                pos, mask = padding.step(P + i) if padding is not None else (None, None)
                logits = self._decode(model, tok, spec, cache, P + i, pos, mask)

    def generate(self, prompts: Sequence[Sequence[int]], spec: SubmodelSpec | None = None, max_new_tokens: int = 64,
                 sampling: Sampling = GREEDY, stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 decode: Decode | None = None) -> list[Completion]:
        """Continue every prompt (token ids) with the submodel `spec`.

        Args:
            prompts: one list of token ids per row; lengths may differ (left-padded internally).
            spec: the size; None = the full model.
            max_new_tokens: per row; fewer when the context (max_seq_len) fills first.
            sampling: temperature / top_k / top_p / seed.
            stop_tokens: a row stops at any of these (not included in its tokens).
            stop_strings: a row stops when its text contains one (cut before it); needs `decode`.
            decode: token ids -> text, e.g. a tokenizer's decode.
        """
        rows = self._rows(len(prompts), stop_tokens, stop_strings, decode)
        for tok in self.token_steps(prompts, spec, max_new_tokens, sampling):
            for row, t in zip(rows, tok.tolist()):
                row.add(t)
            if all(r.done for r in rows):
                break
        return [r.completion() for r in rows]

    def stream(self, prompt: Sequence[int], spec: SubmodelSpec | None = None, max_new_tokens: int = 64,
               sampling: Sampling = GREEDY, stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (),
               decode: Decode | None = None) -> Iterator[int | str]:
        """Yield new token ids one at a time, or, given `decode`, pieces of text (which join to the completion's
        text: a piece that might begin a stop string waits until the next token decides)."""
        steps = (t.tolist() for t in self.token_steps([prompt], spec, max_new_tokens, sampling))
        yield from stream_rows(steps, self._rows(1, stop_tokens, stop_strings, decode)[0])

    def _rows(self, n: int, stop_tokens: Sequence[int], stop_strings: Sequence[str],
              decode: Decode | None) -> list[StopRow]:
        stop_strings = tuple(s for s in stop_strings if s)
        if stop_strings and decode is None:
            raise MatryoshkaError("stop strings need a decode function (token ids -> text)")
        return [StopRow(frozenset(int(t) for t in stop_tokens), stop_strings, decode) for _ in range(n)]


def generate(model: MatryoshkaLM, prompts: Sequence[Sequence[int]], spec: SubmodelSpec | None = None,
             max_new_tokens: int = 64, sampling: Sampling = GREEDY, **kw) -> list[Completion]:
    """Engine(model).generate(...) for one-off calls."""
    return Engine(model).generate(prompts, spec, max_new_tokens, sampling, **kw)
