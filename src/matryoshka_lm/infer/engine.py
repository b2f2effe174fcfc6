"""Elastic inference: batched, KV-cached generation at any size, on the full model's own weights.

A size (or Mix'n'Match spec) reads prefix views of the full model's weights, so one loaded model serves every
size with no copy (tests/infer/test_engine.py checks the storage pointers). `model(x, spec)` would take those views at
every call; the engine takes them once per size instead (`view_model`: a module of the size's shape whose
parameters ARE the views, from nested.slice_views), which saves the slicing ops of every step.

The decoding loop follows gpt-fast: `prefill` the prompt into a KV cache preallocated at a fixed length, then
`decode_one_token` per step; `Engine` adds batching, sampling, stop conditions and streaming around it. Its decode
loop (`decode_steps`) also continues a prefill run elsewhere: the size router's, when it picks the size whose prefill
it already ran (routed.py).

Compiled decoding (`compile=True`) has static shapes: a step gets its cache slot as a tensor, writes it in place
(index_copy_) and attends to all the cache's slots through a mask derived from that position, so no shape and no
Python int changes from step to step, and plain torch.compile compiles each size's step once for every step
("reduce-overhead", i.e. CUDA graphs, on CUDA; its caches are reused so that their addresses stay fixed). Cache
lengths are rounded up to a power of two there (`Engine.cache_slots`), so graphs see few distinct shapes. Eager
decoding passes the slot as an int and attends to the slots written so far only, which is cheaper without a
compiler (core/model.py has both; the compiled test checks they agree token for token).

Batches of prompts of different lengths are LEFT-padded: every row's prompt ends in the same cache slot, so each
decode step writes one slot for the whole batch. The cache records each row's padding; row b's tokens sit at
RoPE positions `slot - pad[b]` and its queries never attend to its pad slots (core/model.py builds the masks).

Shapes: B batch, P padded prompt length, L cache slots, V vocab.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from matryoshka_lm.core import precision
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec, validate_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.sampling import GREEDY, Sampling, sample
from matryoshka_lm.infer.stops import Completion, Decode, StopRow, stream_rows

from .forward import (  # noqa: F401 (the decoder's passes, re-exported)
    decode_one_token,
    exit_state,
    exit_step,
    forward_chunk,
    left_padded,
    prefill,
    resume_chunk,
    share_planes,
    view_model,
)
from .request import Request, request

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the engine

RECOMPILE_LIMIT = 64  # graphs per size and step kind: batch sizes x cache lengths x padded or not
Step = Callable[[MatryoshkaLM, torch.Tensor, SubmodelSpec | None, KVCache, int | torch.Tensor], torch.Tensor]


def _recompile_options() -> dict[str, Any]:
    """torch.compile's per-region recompile settings where it takes them: isolate_recompiles and recompile_limit
    are newer than torch 2.11 (a TypeError there). Older releases keep one cache per function, shared by every
    size and engine: there dynamo's global limit is raised to at least RECOMPILE_LIMIT instead (never lowered)."""
    params = inspect.signature(torch.compile).parameters
    if "isolate_recompiles" in params and "recompile_limit" in params:
        return {"isolate_recompiles": True, "recompile_limit": RECOMPILE_LIMIT}
    from torch._dynamo import config

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    return {}


class Engine:
    """Generation at any size of one loaded model. `compile=True` compiles the per-token forward (and the
    speculative verify chunk) with torch.compile, one compiled region per size, on first use; "reduce-overhead"
    (CUDA graphs) on CUDA. See BENCHMARKS.md for when it pays off on CPU."""

    def __init__(self, model: MatryoshkaLM, compile: bool = False, slice_once: bool = True):
        """Cells with a bit width compute from the model's one copy of bit-planes (core/planes.py), exactly
        (fp32 activations), whatever size and width they are."""
        self.model = model.eval()
        self.cfg = model.cfg
        p = model.norm.weight  # a quantized model's linear weights live on the meta device (precision.py)
        self.device, self.dtype = p.device, p.dtype
        self.compiled = compile
        self.slice_once = slice_once  # False: slice at every call, model(x, spec) (for comparison)
        self._views: dict[SubmodelSpec, MatryoshkaLM] = {}
        self._graphs: dict[tuple[Step, SubmodelSpec], Step] = {}
        self._free_caches: dict[tuple, list[KVCache]] = {}
        self._lock = threading.Lock()

    # ---- validation

    def check_spec(self, spec: SubmodelSpec | None) -> SubmodelSpec:
        spec = spec or self.model.full
        validate_spec(self.cfg, spec)
        precision.check_bits(self.model, spec.bits)
        return spec

    def runner(self, spec: SubmodelSpec) -> tuple[MatryoshkaLM, SubmodelSpec]:
        """The module that runs `spec` and the spec to pass it: the model itself for its full size, else the
        size's view model (built on first use, one per shape: views share the model's weights and bit-planes, so
        every bit width of a size runs on the same view; they stay valid while the model's tensors are updated
        in place, so build a new Engine after replacing them). The spec returned names the bit width the module
        computes at, so compiled graphs are per cell."""
        bits = self.model.cell_bits(spec.bits)
        full = self.model.full.at_bits(bits)
        if (spec.width, spec.layers) == (full.width, full.layers):
            return self.model, full
        if not self.slice_once:
            return self.model, spec.at_bits(bits)
        sub = self._views.get(spec.shape)
        if sub is None:
            sub = self._views[spec.shape] = view_model(self.model, spec.shape)
        if bits is not None and sub.precision.planes_key != self.model.precision.planes_key:
            share_planes(self.model, sub)  # viewed before this fp32 model's first cell built its planes
        return sub, sub.full.at_bits(bits)

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
                raise MatryoshkaError(
                    f"prompt {i} has {len(p)} tokens; the context holds {self.cfg.max_seq_len} "
                    f"(at most {self.cfg.max_seq_len - 1} prompt tokens leave room to generate)"
                )
            bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise MatryoshkaError(
                    f"prompt {i}: token id {bad[0]} is outside the vocabulary 0..{self.cfg.vocab_size - 1}"
                )
            out.append(p)
        return out

    # ---- the steps a decoder runs (compiled when the engine is)

    def cache_slots(self, needed: int) -> int:
        """Cache length for `needed` slots: exactly that eagerly (attention reads every slot); compiled, the
        next power of two (at least 16, at most the context), so that graphs see few distinct shapes and
        caches can be reused."""
        if not self.compiled:
            return needed
        return min(self.cfg.max_seq_len, max(16, 1 << (needed - 1).bit_length()))

    def decode_step(
        self, model: MatryoshkaLM, tok: torch.Tensor, spec: SubmodelSpec, cache: KVCache, slot: int
    ) -> torch.Tensor:
        """Tokens (B,) into cache slot `slot`; next-token logits (B, V). (model, spec) from `runner`."""
        return self._run(decode_one_token, model, tok, spec, cache, slot)

    def forward_chunk(
        self, model: MatryoshkaLM, idx: torch.Tensor, spec: SubmodelSpec, cache: KVCache, start: int
    ) -> torch.Tensor:
        """Tokens (B, T) into slots start..start+T after a cached prefix; logits (B, T, V)."""
        return self._run(forward_chunk, model, idx, spec, cache, start)

    def exit_step(
        self, model: MatryoshkaLM, tok: torch.Tensor, draft: SubmodelSpec, cache: KVCache, slot: int, logits: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Early-exit draft step into the target's cache: (state, logits), or the state alone (speculative.py).
        The state is the caller's to keep: the verify pass reads γ of them after later steps ran."""
        out = self._run(exit_step if logits else exit_state, model, tok, draft, cache, slot)
        if not self._graphed:
            return out
        # a CUDA graph's outputs are overwritten by its next replay: copy the state that outlives it
        return (out[0].clone(), out[1]) if logits else out.clone()

    def resume_chunk(
        self, model: MatryoshkaLM, h: torch.Tensor, spec: SubmodelSpec, cache: KVCache, start: int, k: int
    ) -> torch.Tensor:
        """Layers k+1..L of the target on early-exit states (1, T, C) at slots start..; logits (1, T, V)."""
        return self._run(resume_chunk, model, h, spec, cache, start, k)

    @property
    def _graphed(self) -> bool:
        """Compiled steps replay CUDA graphs ("reduce-overhead"): their outputs live only until the next step."""
        return self.compiled and self.device.type == "cuda"

    def _run(
        self, fn: Callable, model: MatryoshkaLM, x: torch.Tensor, spec: SubmodelSpec, cache: KVCache, start: int, *extra
    ) -> Any:
        """`fn` eagerly, or its compiled graph for `spec`. Under CUDA graphs the result is valid until the next
        compiled step only (each call starts a new graph step): read it before then, or clone what is kept."""
        if not self.compiled:  # an int: attention reads only the slots written so far
            return fn(model, x, spec, cache, start, *extra)
        f = self._graphs.get((fn, spec))
        if f is None:
            f = self._graphs.setdefault((fn, spec), self._compile(fn))
        if self._graphed:
            torch.compiler.cudagraph_mark_step_begin()
        # a tensor: attention reads every slot through a mask, so one graph serves every position
        return f(model, x, spec, cache, torch.tensor([start], device=self.device), *extra)

    def _compile(self, fn: Step) -> Step:
        """`fn` compiled for one size, in a region of its own where torch.compile has them (one size's graphs
        never count against another's recompile limit; _recompile_options). Static shapes (dynamic=False): a batch
        size or cache length not seen before compiles a graph of its own. Otherwise dynamo, which tracks what
        changed between calls per function across all sizes, would make the next size's head and FFN counts
        symbolic: slower graphs, or a graph break."""
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        return torch.compile(fn, mode=mode, dynamic=False, **_recompile_options())

    @contextmanager
    def kv_cache(
        self, spec: SubmodelSpec, batch: int, n_slots: int, pad: torch.Tensor | None = None
    ) -> Iterator[KVCache]:
        """A KV cache for one generation. A compiled engine hands out caches of the same shape again once their
        generation ends: CUDA graphs replay on fixed addresses (stale slots are masked out, never read)."""
        if not self.compiled:
            yield KVCache.allocate(self.cfg, spec, batch, n_slots, self.device, self.dtype, pad)
            return
        with self._lock:
            free = self._free_caches.setdefault((spec, batch, n_slots, pad is None), [])
            cache = (
                free.pop()
                if free
                else KVCache.allocate(
                    self.cfg, spec, batch, n_slots, self.device, self.dtype, None if pad is None else pad.clone()
                )
            )
        if pad is not None:
            cache.pad.copy_(pad)
        try:
            yield cache
        finally:
            with self._lock:
                free.append(cache)

    # ---- decoding

    @torch.no_grad()
    def token_steps(
        self,
        prompts: Sequence[Sequence[int]],
        spec: SubmodelSpec | None = None,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (B,), for up to max_new_tokens steps (fewer if the context fills).
        The caller decides when to stop; every row keeps decoding until then."""
        model, spec = self.runner(self.check_spec(spec))
        prompts = self.check_prompts(prompts, max_new_tokens)
        idx, pad = left_padded(prompts, self.device)
        B, P = idx.shape
        n_new = self.new_tokens(P, max_new_tokens)
        with self.kv_cache(spec, B, self.cache_slots(P + n_new), pad) as cache:
            logits = prefill(model, idx, spec, cache)
            yield from self.decode_steps(model, spec, cache, logits, P, n_new, sampling)

    def new_tokens(self, prompt_len: int, max_new_tokens: int) -> int:
        """Tokens a prompt of `prompt_len` (padded) may still get: max_new_tokens, or fewer if the context fills."""
        return min(max_new_tokens, self.cfg.max_seq_len - prompt_len)

    def decode_steps(
        self,
        model: MatryoshkaLM,
        spec: SubmodelSpec,
        cache: KVCache,
        logits: torch.Tensor,
        start: int,
        n_new: int,
        sampling: Sampling = GREEDY,
    ) -> Iterator[torch.Tensor]:
        """The decode loop after a prefill, wherever that ran (token_steps, or the router's: infer/routed.py):
        `cache` holds slots 0..start, `logits` (B, V) are the last prompt slot's. Yields n_new tokens (B,).
        (model, spec) from `runner`."""
        gen = sampling.generator(self.device)
        for i in range(n_new):
            tok = sample(logits, sampling, gen)
            yield tok
            if i + 1 < n_new:
                logits = self.decode_step(model, tok, spec, cache, start + i)

    # ---- the one generation path: a Request in, completions or a stream out

    def rounds(self, req: Request, stats: Any = None) -> Iterator[list[list[int]]]:
        """What each step (plain) or round (speculative) adds to every row: a list of new token ids per row."""
        if req.speculation is not None:
            yield from ([toks] for toks in req.speculation.rounds(self, req, stats))
            return
        if req.prefilled is not None:
            yield from self._prefilled_rounds(req)
            return
        yield from (
            [[t] for t in tok.tolist()]
            for tok in self.token_steps(req.prompts, req.spec, req.max_new_tokens, req.sampling)
        )

    def _prefilled_rounds(self, req: Request) -> Iterator[list[list[int]]]:
        """Decode on from the request's prefill (its cache and last logits), then release the cache."""
        pre = req.prefilled
        try:
            model, spec = self.runner(self.check_spec(req.spec))
            n_new = self.new_tokens(pre.start, req.max_new_tokens)
            for tok in self.decode_steps(model, spec, pre.cache, pre.logits, pre.start, n_new, req.sampling):
                yield [[t] for t in tok.tolist()]
        finally:
            if pre.release is not None:
                pre.release()

    def run(self, req: Request, stats: Any = None) -> list[Completion]:
        """Every row's completion (`stats`: a speculative run's acceptance statistics, filled in)."""
        return complete(self.rounds(req, stats), req.stops.rows(len(req.prompts)))

    def stream_request(self, req: Request, stats: Any = None) -> Iterator[int | str]:
        """One prompt's new token ids, or, with a decode function, pieces of text (which join to the completion's
        text: a piece that might begin a stop string waits until the next token decides)."""
        if len(req.prompts) != 1:
            raise MatryoshkaError(f"a stream takes one prompt, got {len(req.prompts)}")
        yield from stream_rows((new[0] for new in self.rounds(req, stats)), req.stops.rows(1)[0])

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        spec: SubmodelSpec | None = None,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        stop_tokens: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        decode: Decode | None = None,
    ) -> list[Completion]:
        """Continue every prompt (token ids; lengths may differ) with the submodel `spec` (None = the full model):
        `run` of the Request these arguments make (infer/request.py says what each means)."""
        return self.run(request(prompts, spec, max_new_tokens, sampling, stop_tokens, stop_strings, decode))

    def stream(
        self,
        prompt: Sequence[int],
        spec: SubmodelSpec | None = None,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        stop_tokens: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        decode: Decode | None = None,
    ) -> Iterator[int | str]:
        """`stream_request` of the Request these arguments make."""
        yield from self.stream_request(
            request([prompt], spec, max_new_tokens, sampling, stop_tokens, stop_strings, decode)
        )


def complete(steps: Iterator[list[list[int]]], rows: list[StopRow]) -> list[Completion]:
    """Feed what each step adds to every row to the row's stop state until every row is done (or the steps end)."""
    for new in steps:
        for row, toks in zip(rows, new):
            for t in toks:
                if row.done:
                    break
                row.add(t)
        if all(r.done for r in rows):
            break
    return [r.completion() for r in rows]


def generate(
    model: MatryoshkaLM,
    prompts: Sequence[Sequence[int]],
    spec: SubmodelSpec | None = None,
    max_new_tokens: int = 64,
    sampling: Sampling = GREEDY,
    **kw,
) -> list[Completion]:
    """Engine(model).generate(...) for one-off calls."""
    return Engine(model).generate(prompts, spec, max_new_tokens, sampling, **kw)
