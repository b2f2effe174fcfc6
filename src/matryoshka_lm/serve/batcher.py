"""Dynamic batching for the server: one worker thread owns the model; requests of one size share a batch.

Requests wait in a FIFO queue. Each turn of the worker loop
  1. admits waiting requests into new batches: same spec and same sampling settings (greedy, or the same
     temperature / top_p without a seed; a seeded request runs alone so its seed alone decides its output),
     up to `max_batch` rows and `max_batches` batches in flight;
  2. runs queued one-off jobs (embeddings);
  3. advances every batch in flight by ONE token (engine.Engine.rounds of one Request), round robin.
So a new request starts at the next token step of the others, not after their batch ends, and a long
generation at one size never holds up another size for more than a step. Rows that finish (stop, max_tokens,
disconnect) drop out; a batch ends when all its rows have. What this is not: continuous batching, which would
add new rows to a running batch's KV cache (the engine's batches are fixed at prefill).

Results go back to the asyncio side with `loop.call_soon_threadsafe` into an unbounded per-request queue: the
worker never waits for a client, so a slow reader only delays itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from matryoshka_lm.core.spec import SubmodelSpec
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.sampling import Sampling
from matryoshka_lm.infer.stops import Decode, StopRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """What a request's queue receives: a text piece of choice `index`, its end, or an error."""

    index: int
    text: str = ""
    tokens: int = 0  # tokens generated for this choice so far
    finish_reason: str | None = None  # set on the last event of a choice: "stop" | "length"
    error: str | None = None  # the request failed (the message is for logs, not clients)
    ids: tuple[int, ...] = ()  # on the last event of a choice: every token generated (for logprobs)
    shutdown: bool = False  # the error is the server shutting down (a 503), not a model failure (a 500)


class BatcherClosed(RuntimeError):
    """Work sent to (or left in) a batcher that has stopped: the server is shutting down."""


class Ticket:
    """The asyncio side of one request: an event queue filled from the worker thread, and a cancel flag."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False

    def put(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def cancel(self) -> None:
        """Called when the client went away: its rows stop at the next step."""
        self.cancelled = True


@dataclass
class GenRequest:
    """One row of generation: prompt token ids, the size, and when to stop."""

    ticket: Ticket
    index: int  # the choice index within its HTTP request
    prompt: list[int]
    spec: SubmodelSpec
    max_tokens: int
    sampling: Sampling
    stop_tokens: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    draft: SubmodelSpec | None = None  # speculative decoding: this smaller spec drafts (the row runs alone)
    prefilled: Any = None  # infer.request.Prefilled: the router's prefill to decode on from (the row runs alone)
    arrived: float = field(default_factory=time.perf_counter)

    def key(self) -> tuple:
        """Rows with equal keys may share a batch."""
        s = self.sampling
        if self.draft is not None or self.prefilled is not None:  # speculative / prefilled decoding is batch 1
            return (id(self),)
        if s.greedy:
            sampling_key: Any = "greedy"
        elif s.seed is not None:
            sampling_key = id(self)  # alone
        else:  # one Sampling serves the whole batch: every setting but the seed must match
            sampling_key = replace(s, seed=None)
        return (self.spec.width, self.spec.layers, self.spec.bits, sampling_key)  # a cell's bits: other weights


class RowStream:
    """Push-mode stop handling for one row: the engine's own StopRow (infer.stops), plus the row's token budget
    and the events the batcher sends. The engine pulls its tokens while the batcher pushes them; the rules and
    the code are the same."""

    def __init__(self, req: GenRequest, budget: int, decode: Decode):
        self.req, self.budget = req, budget
        self.stops = StopRow(req.stop_tokens, req.stop_strings, decode)
        self.steps = 0  # tokens the model generated for this row
        self.ids: list[int] = []
        self.done = False

    def push(self, tok: int) -> Event | None:
        self.steps += 1
        self.ids.append(tok)
        self.stops.add(tok)
        if self.stops.done:
            self.done = True
            return Event(self.req.index, self.stops.take(), self.steps, self.stops.reason, ids=tuple(self.ids))
        if self.steps >= self.budget:
            return self.finish()
        piece = self.stops.take()
        return Event(self.req.index, piece, self.steps) if piece else None

    def finish(self) -> Event:
        """End the row by length: what was held back is final."""
        self.done = True
        return Event(self.req.index, self.stops.flush(), self.steps, "length", ids=tuple(self.ids))


@dataclass
class _Batch:
    spec: SubmodelSpec
    rows: list[RowStream]
    steps: Iterator[torch.Tensor]
    started: float = field(default_factory=time.perf_counter)


class Batcher:
    """The worker thread that runs all model work of a server.

    Args:
        engine: generation at any size of the loaded model.
        decode: token ids -> text (the tokenizer's decode).
        max_batch: rows per batch.
        max_batches: batches in flight at once (each advances one token per turn).
        window_s: when the worker was idle, wait this long for companions before the first prefill.
        on_batch: called with (spec, rows) when a batch starts (metrics).
        on_round: called with (spec, drafted, accepted) after each speculative round (metrics).
    """

    def __init__(
        self,
        engine: Engine,
        decode: Decode,
        max_batch: int = 16,
        max_batches: int = 8,
        window_s: float = 0.002,
        on_batch: Callable[[SubmodelSpec, int], None] | None = None,
        on_round: Callable[[SubmodelSpec, int, int], None] | None = None,
    ):
        self.engine, self.decode = engine, decode
        self.max_batch, self.max_batches, self.window_s = max_batch, max_batches, window_s
        self.on_batch, self.on_round = on_batch, on_round
        self.ctx = engine.cfg.max_seq_len
        self._cv = threading.Condition()
        self._pending: deque[GenRequest] = deque()
        self._jobs: deque[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self._active: list[_Batch] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self.largest_batch = 0  # for tests and /health

    # ---- the asyncio side

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="matryoshka-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Tell the worker to stop after its current step, without waiting for it (safe on the event loop);
        requests still waiting or in flight then get a shutdown error event."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker and wait for it; requests still waiting or in flight get a shutdown error event."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, rows: Sequence[GenRequest]) -> None:
        with self._cv:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._pending.extend(rows)
            self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run fn() on the worker thread (between token steps); await the returned future for its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._jobs.append((fn, fut, loop))
            self._cv.notify()
        return fut

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    # ---- the worker thread

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._pending or self._jobs or self._active):
                    self._cv.wait()
                if self._closed:
                    break
                idle = not self._active
            if idle and self.window_s > 0 and self._pending:
                time.sleep(self.window_s)  # let requests sent together arrive together
            with self._cv:
                jobs = list(self._jobs)
                self._jobs.clear()
                new = self._admit()
            for fn, fut, loop in jobs:
                self._run_job(fn, fut, loop)
            self._active.extend(new)
            for batch in list(self._active):
                self._step(batch)
        self._fail_all("the server is shutting down")

    def _admit(self) -> list[_Batch]:
        """Group waiting rows (FIFO) into new batches; rows that do not fit stay queued."""
        forming: list[tuple[tuple, list[GenRequest]]] = []
        left: deque[GenRequest] = deque()
        room = self.max_batches - len(self._active)
        for req in self._pending:
            if req.ticket.cancelled:
                continue
            key = req.key()
            group = next((g for k, g in forming if k == key and self._fits(g, req)), None)
            if group is not None:
                group.append(req)
            elif len(forming) < room:
                forming.append((key, [req]))
            else:
                left.append(req)
        self._pending = left
        return [self._start(g) for _, g in forming]

    def _budget(self, req: GenRequest) -> int:
        return min(req.max_tokens, self.ctx - len(req.prompt))

    def _fits(self, group: list[GenRequest], req: GenRequest) -> bool:
        """A row may join if the batch stays small enough and no row loses tokens to a longer prompt: the batch
        decodes into ctx - (its longest prompt) slots."""
        if len(group) >= self.max_batch:
            return False
        rows = group + [req]
        room = self.ctx - max(len(r.prompt) for r in rows)
        return all(self._budget(r) <= room for r in rows)

    def _start(self, group: list[GenRequest]) -> _Batch:
        spec = group[0].spec
        n = max(self._budget(r) for r in group)
        self.largest_batch = max(self.largest_batch, len(group))
        if self.on_batch is not None:
            self.on_batch(spec, len(group))
        rows = [RowStream(r, self._budget(r), self.decode) for r in group]
        return _Batch(spec, rows, self._turns(group, n))

    def _turns(self, group: list[GenRequest], n: int) -> Iterator[torch.Tensor]:
        """The engine's rounds for the batch (Engine.rounds: one Request, plain or speculative), one token per row
        per turn: a speculative round runs when its tokens are needed and its 1..γ+1 tokens leave one per turn, so
        other batches keep their turns. The rows' stops are the batcher's own (RowStream), not the Request's."""
        from matryoshka_lm.infer.request import Request
        from matryoshka_lm.infer.speculative import Speculation, SpeculativeStats

        head = group[0]
        plan = None if head.draft is None else Speculation(head.draft)
        prompts = tuple(tuple(r.prompt) for r in group)
        req = Request(prompts, head.spec, n, head.sampling, speculation=plan, prefilled=head.prefilled)
        stats = SpeculativeStats()
        rounds = self.engine.rounds(req, stats)
        seen = (0, 0)  # drafted, accepted already reported
        try:
            for new in rounds:
                if self.on_round is not None and stats.drafted > seen[0]:
                    self.on_round(head.spec, stats.drafted - seen[0], stats.accepted - seen[1])
                    seen = (stats.drafted, stats.accepted)
                for toks in zip(*new):  # every row adds as many tokens per round
                    yield torch.tensor(toks)
        finally:
            rounds.close()

    def _step(self, batch: _Batch) -> None:
        try:
            self._advance(batch)
        except Exception as e:  # a failure ends this batch only; its handlers answer 500
            log.exception("batch at %s failed", batch.spec)
            self._end(batch, error=f"{type(e).__name__}: {e}")

    def _advance(self, batch: _Batch) -> None:
        try:
            toks = next(batch.steps).tolist()
        except StopIteration:  # the context is full; row budgets make every row finish before this
            self._end(batch)
            return
        for row, tok in zip(batch.rows, toks):
            if row.done:
                continue
            if row.req.ticket.cancelled:
                row.done = True
                continue
            ev = row.push(tok)
            if ev is not None:
                row.req.ticket.put(ev)
        if all(r.done for r in batch.rows):
            self._end(batch)

    def _end(self, batch: _Batch, error: str | None = None, shutdown: bool = False) -> None:
        batch.steps.close()
        if batch in self._active:
            self._active.remove(batch)
        for row in batch.rows:
            if not row.done:
                row.done = True
                row.req.ticket.put(
                    row.finish() if error is None else Event(row.req.index, error=error, shutdown=shutdown)
                )

    def _run_job(self, fn: Callable[[], Any], fut: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        try:
            result, exc = fn(), None
        except Exception as e:  # handed to the awaiting handler
            result, exc = None, e

        def settle() -> None:
            if fut.cancelled():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the loop is closed

    def _fail_all(self, message: str) -> None:
        with self._cv:
            pending, self._pending = list(self._pending), deque()
            jobs, self._jobs = list(self._jobs), deque()
        for req in pending:
            req.ticket.put(Event(req.index, error=message, shutdown=True))
        for batch in list(self._active):
            self._end(batch, error=message, shutdown=True)
        for _, fut, loop in jobs:
            self._run_job(_raiser(BatcherClosed(message)), fut, loop)


def _raiser(exc: Exception) -> Callable[[], Any]:
    def fail() -> Any:
        raise exc

    return fail
