"""Generation at the size the router picks (`--size auto`), reusing the router's prefill when it picks the smallest.

The router (router.py) decides from one prefill of its smallest candidate over the prompt. Here that prefill goes
into a KV cache the engine allocated for that size's decoding, so when the smallest size is chosen the engine
decodes straight on from it (Engine.decode_steps): routing costs nothing beyond the prefill that size needed
anyway. The router ran the full model with the small spec; the engine decodes with the size's view model (same
weights, same cache shapes), and tests/infer/test_routed.py checks the tokens equal a plain generation at that size.
Any other choice drops that cache and runs the engine at the chosen size, its own prefill included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack

import torch

from matryoshka_lm.infer.engine import Engine, complete
from matryoshka_lm.infer.router import Decision, Router, route
from matryoshka_lm.infer.sampling import GREEDY, Sampling
from matryoshka_lm.infer.stops import Completion, Decode, stream_rows


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
    """Route one prompt, then its token steps (1,) at the chosen size, as Engine.token_steps yields them.

    The decision is made at once (this is not a generator); the steps run when iterated. Routed to the smallest
    size, the steps hold that size's KV cache until they end or are closed.
    """
    tau = router.resolve_tau(tolerance, budget, kind)  # bad knobs fail before any model work
    [ids] = engine.check_prompts([prompt], max_new_tokens)
    small_model, small_spec = engine.runner(engine.check_spec(router.specs(engine.cfg)[0]))
    P = len(ids)
    n_new = engine.new_tokens(P, max_new_tokens)
    stack = ExitStack()
    try:
        cache = stack.enter_context(engine.kv_cache(small_spec, 1, engine.cache_slots(P + n_new)))
        x = torch.tensor(ids, device=engine.device)
        decision = route(engine.model, x, router, tolerance=tau, kind=kind, cache=cache)
    except BaseException:
        stack.close()
        raise
    if not decision.reuses_prefill:
        stack.close()  # a compiled engine may hand that cache out again
        return decision, engine.token_steps([ids], decision.spec, max_new_tokens, sampling)
    logits = decision.small_logits[:, -1]
    steps = engine.decode_steps(small_model, small_spec, cache, logits, P, n_new, sampling)
    return decision, _closing(steps, stack)


def _closing(steps: Iterator[torch.Tensor], stack: ExitStack) -> Iterator[torch.Tensor]:
    """`steps`, then release what `stack` holds (also when the consumer stops early and closes this)."""
    with stack:
        yield from steps


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
    rows = engine.stop_rows(1, stop_tokens, stop_strings, decode)  # checked before the model runs
    decision, steps = routed_steps(engine, router, prompt, max_new_tokens, sampling, tolerance, budget, kind)
    return decision, complete(([[t] for t in tok.tolist()] for tok in steps), rows)[0]


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
    row = engine.stop_rows(1, stop_tokens, stop_strings, decode)[0]
    decision, steps = routed_steps(engine, router, prompt, max_new_tokens, sampling, tolerance, budget, kind)
    return decision, stream_rows((t.tolist() for t in steps), row)


def describe(router: Router, decision: Decision) -> str:
    """One line on where a prompt went and why, e.g. "served by S (predicted gap 0.031 < tau 0.1)"."""
    name = router.candidates[decision.index]
    gaps = decision.gaps.clamp_min(0).tolist()
    if decision.index < len(router.candidates) - 1:
        return f"served by {name} (predicted gap {gaps[decision.index]:.3g} < tau {decision.tau:g})"
    smaller = ", ".join(f"{c} {g:.3g}" for c, g in zip(router.candidates[:-1], gaps))
    return f"served by {name} (predicted gaps {smaller}: none below tau {decision.tau:g})"
