"""Generation at the size the router picks (`--size auto`), reusing the router's prefill when it picks the smallest.

The router (router.py) decides from one prefill of its smallest candidate over the prompt. Here that prefill goes
into a KV cache the engine allocated for that size's decoding, so when the smallest size is chosen the engine
decodes straight on from it (a Request with `prefilled`, through Engine.run): routing costs nothing beyond the prefill
that size needed anyway. The router ran the full model with the small spec; the engine decodes with the size's view
model (same weights, same cache shapes), and tests/infer/test_routed.py checks the tokens equal a plain generation at
that size.
Any other choice drops that cache and runs the engine at the chosen size, its own prefill included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack

import torch

from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.request import Prefilled, Request, Stops
from matryoshka_lm.infer.router import Decision, Router, route
from matryoshka_lm.infer.sampling import GREEDY, Sampling
from matryoshka_lm.infer.stops import Completion, Decode


def routed_request(
    engine: Engine,
    router: Router,
    prompt: Sequence[int],
    max_new_tokens: int = 64,
    sampling: Sampling = GREEDY,
    tolerance: float | None = None,
    budget: float | None = None,
    kind: str | None = None,
    stops: Stops | None = None,
) -> tuple[Decision, Request]:
    """Route one prompt now; the Request that generates at the chosen size (Engine.run / stream_request). Routed to
    the smallest size, the Request decodes on from the router's prefill and holds its KV cache until it ends."""
    tau = router.resolve_tau(tolerance, budget, kind)  # bad knobs fail before any model work
    [ids] = engine.check_prompts([prompt], max_new_tokens)
    decision, prefilled = route_with_prefill(engine, router, ids, max_new_tokens, tau, kind)
    req = Request((tuple(ids),), decision.spec, max_new_tokens, sampling, stops or Stops(), prefilled=prefilled)
    return decision, req


def route_with_prefill(
    engine: Engine, router: Router, ids: list[int], max_new_tokens: int, tau: float, kind: str | None = None
) -> tuple[Decision, Prefilled | None]:
    """Route checked prompt ids by a prefill of the router's smallest candidate into a cache sized for decoding;
    when that size is chosen, the prefill to decode on from (it holds the cache until released), else None."""
    _, small_spec = engine.runner(engine.check_spec(router.specs(engine.cfg)[0]))
    P = len(ids)
    stack = ExitStack()
    try:
        slots = engine.cache_slots(P + engine.new_tokens(P, max_new_tokens))
        cache = stack.enter_context(engine.kv_cache(small_spec, 1, slots))
        x = torch.tensor(ids, device=engine.device)
        decision = route(engine.model, x, router, tolerance=tau, kind=kind, cache=cache)
    except BaseException:
        stack.close()
        raise
    if not decision.reuses_prefill:
        stack.close()  # a compiled engine may hand that cache out again
        return decision, None
    return decision, Prefilled(cache, decision.small_logits[:, -1], P, stack.close)


def routed_steps(
    engine: Engine,
    router: Router,
    prompt: Sequence[int],
    max_new_tokens: int = 64,
    sampling: Sampling = GREEDY,
    tolerance: float | None = None,
    budget: float | None = None,
    kind: str | None = None,
) -> tuple[Decision, Iterator[torch.Tensor]]:
    """routed_request's decision and its token steps (1,), as Engine.token_steps yields them."""
    decision, req = routed_request(engine, router, prompt, max_new_tokens, sampling, tolerance, budget, kind)
    return decision, (torch.tensor(new[0]) for new in engine.rounds(req))


def routed_generate(
    engine: Engine,
    router: Router,
    prompt: Sequence[int],
    max_new_tokens: int = 64,
    sampling: Sampling = GREEDY,
    tolerance: float | None = None,
    budget: float | None = None,
    kind: str | None = None,
    stop_tokens: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Decode | None = None,
) -> tuple[Decision, Completion]:
    """Engine.generate for one prompt at the size the router picks: (where it went, its completion)."""
    stops = Stops(tuple(stop_tokens), tuple(stop_strings), decode)  # checked before the model runs
    decision, req = routed_request(engine, router, prompt, max_new_tokens, sampling, tolerance, budget, kind, stops)
    return decision, engine.run(req)[0]


def routed_stream(
    engine: Engine,
    router: Router,
    prompt: Sequence[int],
    max_new_tokens: int = 64,
    sampling: Sampling = GREEDY,
    tolerance: float | None = None,
    budget: float | None = None,
    kind: str | None = None,
    stop_tokens: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Decode | None = None,
) -> tuple[Decision, Iterator[int | str]]:
    """Engine.stream at the size the router picks: (where it went, token ids or text pieces)."""
    stops = Stops(tuple(stop_tokens), tuple(stop_strings), decode)
    decision, req = routed_request(engine, router, prompt, max_new_tokens, sampling, tolerance, budget, kind, stops)
    return decision, engine.stream_request(req)


def describe(router: Router, decision: Decision) -> str:
    """One line on where a prompt went and why, e.g. "served by S (predicted gap 0.031 < tau 0.1)"."""
    name = router.candidates[decision.index]
    gaps = decision.gaps.clamp_min(0).tolist()
    if decision.index < len(router.candidates) - 1:
        return f"served by {name} (predicted gap {gaps[decision.index]:.3g} < tau {decision.tau:g})"
    smaller = ", ".join(f"{c} {g:.3g}" for c, g in zip(router.candidates[:-1], gaps))
    return f"served by {name} (predicted gaps {smaller}: none below tau {decision.tau:g})"
