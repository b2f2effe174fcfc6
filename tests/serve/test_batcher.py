"""The server's batcher: who shares a batch, one token step per batch per turn, cancelled rows stop the work,
and push-mode stop handling gives the engine's text (real engine) — without HTTP."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from conftest import tiny_config
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import uniform_spec
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.sampling import GREEDY, Sampling
from matryoshka_lm.serve.batcher import Batcher, GenRequest, Ticket

CFG = tiny_config()


class StubEngine:
    """token_steps yields token 1 forever (slowly) and logs each batch and step."""

    def __init__(self, delay: float = 0.005):
        self.cfg, self.delay = CFG, delay
        self.batches: list[list[list[int]]] = []
        self.steps: list[int] = []  # batch number of each step taken, in order

    def token_steps(self, prompts, spec, max_new_tokens, sampling):
        self.batches.append([list(p) for p in prompts])
        b = len(self.batches) - 1
        for _ in range(max_new_tokens):
            time.sleep(self.delay)
            self.steps.append(b)
            yield torch.ones(len(prompts), dtype=torch.long)

    def rounds(self, req, stats=None):
        """Engine.rounds of a plain Request: one token per row per step, from token_steps."""
        for tok in self.token_steps([list(p) for p in req.prompts], req.spec, req.max_new_tokens, req.sampling):
            yield [[t] for t in tok.tolist()]


def decode(ids: list[int]) -> str:
    return "".join(chr(97 + t % 26) for t in ids)


async def drain(ticket: Ticket, n: int) -> list:
    events, left = [], n
    while left:
        ev = await asyncio.wait_for(ticket.queue.get(), 10)
        events.append(ev)
        left -= ev.finish_reason is not None or ev.error is not None
    return events


def run(coro):
    return asyncio.run(coro)


def test_rows_group_by_spec_and_sampling():
    engine = StubEngine()
    batcher = Batcher(engine, decode, window_s=0.05)
    S, XL = uniform_spec(CFG, "S"), uniform_spec(CFG, "XL")

    async def main():
        t = Ticket(asyncio.get_running_loop())
        rows = [
            GenRequest(t, 0, [1, 2], S, 3, GREEDY),
            GenRequest(t, 1, [3], S, 5, GREEDY),
            GenRequest(t, 2, [4], XL, 3, GREEDY),
            GenRequest(t, 3, [5], S, 3, Sampling(0.8)),
            GenRequest(t, 4, [6], S, 3, Sampling(0.8)),
            GenRequest(t, 5, [7], S, 3, Sampling(0.8, seed=1)),
            GenRequest(t, 6, [8], S, 3, Sampling(0.8, seed=1)),
        ]
        batcher.start()
        batcher.submit(rows)
        return await drain(t, len(rows))

    try:
        events = run(main())
    finally:
        batcher.close()
    # greedy S together, XL alone, unseeded samples together, each seeded row alone
    assert sorted(sorted(b) for b in engine.batches) == sorted([[[1, 2], [3]], [[4]], [[5], [6]], [[7]], [[8]]])
    done = {e.index: e for e in events if e.finish_reason}
    assert done[0].tokens == 3 and done[1].tokens == 5  # each row stops at its own max_tokens


def test_batches_take_turns_one_step_each():
    engine = StubEngine(delay=0.002)
    batcher = Batcher(engine, decode, window_s=0.05)

    async def main():
        t = Ticket(asyncio.get_running_loop())
        rows = [
            GenRequest(t, 0, [1], uniform_spec(CFG, "XL"), 20, GREEDY),
            GenRequest(t, 1, [1], uniform_spec(CFG, "S"), 20, GREEDY),
        ]
        batcher.start()
        batcher.submit(rows)
        await drain(t, 2)

    try:
        run(main())
    finally:
        batcher.close()
    assert engine.steps[:10] in ([0, 1] * 5, [1, 0] * 5)


def test_a_cancelled_row_stops_its_batch():
    engine = StubEngine(delay=0.01)
    batcher = Batcher(engine, decode, window_s=0)

    async def main():
        t = Ticket(asyncio.get_running_loop())
        batcher.start()
        batcher.submit([GenRequest(t, 0, [1], uniform_spec(CFG, "M"), 1000, GREEDY)])
        await asyncio.wait_for(t.queue.get(), 10)
        t.cancel()
        for _ in range(200):
            if not batcher.in_flight:
                return
            await asyncio.sleep(0.01)

    try:
        run(main())
    finally:
        batcher.close()
    assert batcher.in_flight == 0 and len(engine.steps) < 100


def test_rows_that_would_lose_tokens_to_a_longer_prompt_run_apart():
    engine = StubEngine(delay=0)
    batcher = Batcher(engine, decode, window_s=0.05)
    ctx = CFG.max_seq_len

    async def main():
        t = Ticket(asyncio.get_running_loop())
        rows = [
            GenRequest(t, 0, [1] * (ctx - 4), uniform_spec(CFG, "M"), 4, GREEDY),
            GenRequest(t, 1, [2], uniform_spec(CFG, "M"), 30, GREEDY),
        ]
        batcher.start()
        batcher.submit(rows)
        return {e.index: e for e in await drain(t, 2) if e.finish_reason}

    try:
        done = run(main())
    finally:
        batcher.close()
    assert len(engine.batches) == 2 and done[1].tokens == 30 and done[0].tokens == 4


def test_close_fails_waiting_requests():
    batcher = Batcher(StubEngine(), decode)

    async def main():
        t = Ticket(asyncio.get_running_loop())
        batcher.submit([GenRequest(t, 0, [1], uniform_spec(CFG, "M"), 5, GREEDY)])  # never started
        batcher._fail_all("shutting down")
        return await asyncio.wait_for(t.queue.get(), 5)

    assert run(main()).error == "shutting down"


@pytest.mark.parametrize("stops", [(), ("dc",), ("zz", "b")])
def test_pushed_text_equals_engine_generate(stops):
    torch.manual_seed(0)
    model = MatryoshkaLM(CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    engine = Engine(model)
    prompts = [[5, 17, 3, 88, 41, 2, 9], [60, 1], [33, 12, 70, 70, 4]]
    batcher = Batcher(engine, decode, window_s=0.05)
    spec = uniform_spec(CFG, "L")

    async def main():
        t = Ticket(asyncio.get_running_loop())
        batcher.start()
        batcher.submit([GenRequest(t, i, p, spec, 12, GREEDY, frozenset({7}), stops) for i, p in enumerate(prompts)])
        return await drain(t, len(prompts))

    try:
        events = run(main())
    finally:
        batcher.close()
    for i, p in enumerate(prompts):
        want = engine.generate([p], spec, 12, GREEDY, stop_tokens=[7], stop_strings=stops, decode=decode)[0]
        mine = [e for e in events if e.index == i]
        assert "".join(e.text for e in mine) == want.text
        assert mine[-1].finish_reason == want.finish_reason
    assert batcher.largest_batch == 3


def test_a_failing_batch_errors_its_rows_and_the_worker_lives_on():
    engine = StubEngine(delay=0)
    real = engine.token_steps

    def token_steps(prompts, *args):
        if prompts[0] == [666]:
            raise RuntimeError("boom")  # raised at the first step: token_steps is a generator function
            yield
        yield from real(prompts, *args)

    engine.token_steps = token_steps
    batcher = Batcher(engine, decode, window_s=0)

    async def main():
        bad, good = Ticket(asyncio.get_running_loop()), Ticket(asyncio.get_running_loop())
        batcher.start()
        batcher.submit([GenRequest(bad, 0, [666], uniform_spec(CFG, "M"), 5, GREEDY)])
        failed = await asyncio.wait_for(bad.queue.get(), 10)
        batcher.submit([GenRequest(good, 0, [1], uniform_spec(CFG, "M"), 5, GREEDY)])
        return failed, await drain(good, 1)

    try:
        failed, events = run(main())
    finally:
        batcher.close()
    assert failed.error == "RuntimeError: boom"
    assert events[-1].finish_reason == "length" and events[-1].tokens == 5
