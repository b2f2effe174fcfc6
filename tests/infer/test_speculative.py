"""Speculative decoding inside one nested model is lossless: greedy output == the target's, sampled output ~ p."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from _chain_model import chain_trained_model
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.spec import parse_spec, uniform_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.sampling import Sampling, logits_to_probs
from matryoshka_lm.infer.speculative import (
    SpeculativeStats,
    accept_reject,
    best_gamma,
    can_share_cache,
    shared_cache,
    speculative_decode,
    speculative_stream,
)

PROMPTS = [[5, 17, 3, 88, 41, 2, 9], [60, 1], [33, 12, 70, 70, 4, 4, 4, 19, 80]]
DRAFTS = ["S", "M", "L", "S,M,L,XL", "f8h2,f16h2,f32h4@d24"]


@pytest.fixture(scope="module")
def model() -> MatryoshkaLM:
    """All sizes briefly trained on a noisy chain (tests/_chain_model.py)."""
    return chain_trained_model()


def target_greedy(model, prompt, target, n):
    return Engine(model).generate([prompt], target, n)[0].tokens


@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("share", [False, True])
def test_greedy_speculative_equals_target_greedy(model, draft, share):
    spec = parse_spec(model.cfg, draft)
    accepted = 0
    for prompt in PROMPTS:
        want = target_greedy(model, prompt, None, 24)
        for gamma, adaptive in ((1, False), (3, False), (4, True)):
            got, stats = speculative_decode(
                model, prompt, None, spec, 24, gamma=gamma, adaptive=adaptive, share_cache=share
            )
            assert got.tokens == want, (draft, share, gamma)
            accepted += stats.accepted
    assert accepted > 0


def test_greedy_speculative_to_a_smaller_target(model):
    target, draft = uniform_spec(model.cfg, "L"), uniform_spec(model.cfg, "S")
    for prompt in PROMPTS:
        got, _ = speculative_decode(model, prompt, target, draft, 20, gamma=3)
        assert got.tokens == target_greedy(model, prompt, target, 20)


def test_both_paths_run_and_stats_add_up(model):
    got, stats = speculative_decode(model, PROMPTS[0], None, uniform_spec(model.cfg, "S"), 40, gamma=4, adaptive=False)
    assert len(got.tokens) == 40
    assert 0 < stats.accepted < stats.drafted == 4 * stats.rounds
    assert 1 + stats.accepted + stats.rounds >= 40  # first token from the prefill, then n + 1 per round
    _, s2 = speculative_decode(model, PROMPTS[0], None, None, 20, gamma=4, adaptive=False)
    assert s2.acceptance == 1.0  # a draft equal to the target is always right


def test_sampled_speculative_is_reproducible(model):
    s = Sampling(temperature=1.0, top_k=30, seed=11)
    draft = uniform_spec(model.cfg, "S")
    a, _ = speculative_decode(model, PROMPTS[1], None, draft, 20, s)
    b, _ = speculative_decode(model, PROMPTS[1], None, draft, 20, s)
    assert a.tokens == b.tokens and len(a.tokens) == 20


def test_stop_and_stream(model):
    draft = uniform_spec(model.cfg, "M")
    want = target_greedy(model, PROMPTS[2], None, 20)
    got, _ = speculative_decode(model, PROMPTS[2], None, draft, 20, stop_tokens=[want[7]])
    assert got.tokens == want[: want.index(want[7])] and got.finish_reason == "stop"
    assert list(speculative_stream(model, PROMPTS[2], None, draft, 20)) == want


# ---------------------------------------------------------------- the rejection sampler


def test_accept_reject_reproduces_the_target_distribution():
    """Stub distributions: draft q far from target p. Over many draws, the first emitted token ~ p[0] and,
    when the first draft survives, the second ~ p[1]: exactly the target's, whatever q is."""
    V, gamma, N = 6, 2, 12_000
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(gamma + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(gamma, V, generator=g) * 1.5, -1)
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(N):
        drafted = torch.multinomial(q, 1, generator=g).squeeze(-1)
        n, nxt = accept_reject(p, q, drafted, False, g)
        emitted = drafted[:n].tolist() + [int(nxt)]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    torch.testing.assert_close(first / N, p[0], atol=0.02, rtol=0)
    torch.testing.assert_close(second / second.sum(), p[1], atol=0.03, rtol=0)
    assert second.sum() < N  # some rejections happened


def test_accept_reject_greedy():
    p = F.one_hot(torch.tensor([3, 1, 4]), 6).float()
    q = F.one_hot(torch.tensor([3, 2]), 6).float()
    n, nxt = accept_reject(p, q, torch.tensor([3, 2]), True, None)
    assert (n, int(nxt)) == (1, 1)  # first draft right, second wrong: the target's token replaces it
    n, nxt = accept_reject(p, F.one_hot(torch.tensor([3, 1]), 6).float(), torch.tensor([3, 1]), True, None)
    assert (n, int(nxt)) == (2, 4)  # all right: the bonus token


def test_best_gamma_follows_acceptance_and_cost():
    assert best_gamma(0.95, t_draft=0.1, t_verify=1.0, max_gamma=8) >= 6
    assert best_gamma(0.2, t_draft=0.5, t_verify=1.0, max_gamma=8) == 1
    assert best_gamma(0.8, 0.1, 1.0, 8) > best_gamma(0.8, 0.6, 1.0, 8)


# ---------------------------------------------------------------- shared cache and bad input


def test_shared_cache_is_a_view_of_the_target_cache(model):
    target, draft = model.full, uniform_spec(model.cfg, "S")
    assert can_share_cache(model.cfg, target, draft)
    cache = KVCache.allocate(model.cfg, target, 1, 16)
    view = shared_cache(model.cfg, cache, draft)
    assert len(view.k) == draft.depth
    for full, k in zip(cache.k, view.k):
        assert k.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
        assert k.shape[1] == draft.layers[0].heads // model.cfg.group_size


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target="S", draft="XL"), "larger than target"),
        (dict(target="M", draft="L"), "larger than target"),
        (dict(gamma=0), "gamma"),
        (dict(gamma=9), "gamma"),
        (dict(prompt=[]), "empty"),
        (dict(prompt=list(range(64))), "context"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_speculative_input_raises(model, kwargs, match):
    args = dict(prompt=[1, 2, 3], target="XL", draft="S", max_new_tokens=5) | kwargs
    target, draft = (parse_spec(model.cfg, args.pop(k)) for k in ("target", "draft"))
    with pytest.raises(MatryoshkaError, match=match):
        speculative_decode(model, args.pop("prompt"), target, draft, **args)


# ---------------------------------------------------------------- sampled output ~ the target's distribution


def exact_joint(model, prompt, sampling, n, target=None):
    """The target's own sampling distribution of its first n tokens: {token tuple: probability}."""
    joint = {(): 1.0}
    with torch.no_grad():
        for _ in range(n):
            nxt = {}
            for prefix, p in joint.items():
                probs = logits_to_probs(model(torch.tensor([prompt + list(prefix)]), target)[0, -1], sampling)
                for t in probs.nonzero().flatten().tolist():
                    nxt[prefix + (t,)] = p * float(probs[t])
            joint = nxt
    return joint


@pytest.mark.parametrize(
    "draft_text,share,target_text",
    [("S", False, None), ("S", True, None), ("XL,XL", False, None), ("XL@int2", False, "XL@int8")],
)
def test_sampled_speculative_is_distributed_as_the_target(model, draft_text, share, target_text):
    """The first three sampled tokens (the first from the target's prefill, then one draft-and-verify round of
    gamma 2: accepted drafts, a resampled rejection or the bonus token) over many seeds follow the target's
    exact joint distribution (top-k 3: 27 outcomes); chi-square, cells with expected counts under 5 merged.
    (Resampling a rejection from p instead of the residual max(0, p - q) scores p ~ 1e-15 here.)"""
    from scipy.stats import chisquare

    prompt, n, N = PROMPTS[1], 3, 300
    draft, engine = parse_spec(model.cfg, draft_text), Engine(model)  # XL,XL: the early exit, reused
    target = None if target_text is None else parse_spec(model.cfg, target_text)  # XL@int2: a bits draft
    exact = exact_joint(model, prompt, Sampling(temperature=1.5, top_k=3), n, target)
    counts: Counter[tuple[int, ...]] = Counter()
    total = SpeculativeStats()
    for seed in range(N):
        s = Sampling(temperature=1.5, top_k=3, seed=seed)
        got, stats = speculative_decode(
            model, prompt, target, draft, n, s, gamma=2, adaptive=False, share_cache=share, engine=engine
        )
        counts[tuple(got.tokens)] += 1
        total.accepted, total.drafted = total.accepted + stats.accepted, total.drafted + stats.drafted
    assert set(counts) <= set(exact)  # never a token outside the target's top-k
    assert min(total.accepted, total.drafted - total.accepted) >= 20  # the accept and the reject paths ran often
    big = [c for c in sorted(exact, key=exact.get, reverse=True) if exact[c] * N >= 5]
    observed = [counts[c] for c in big] + [N - sum(counts[c] for c in big)]
    expected = [exact[c] * N for c in big] + [N - sum(exact[c] * N for c in big)]
    assert len(big) >= 8
    assert chisquare(observed, expected).pvalue > 1e-3, (observed, [round(e) for e in expected])


@pytest.mark.parametrize("draft", ["XL@int4", "S@int2"])
def test_a_quantized_cell_drafts_losslessly(model, draft):
    """The draft may be a cell of the size x bits grid (the same size at int4, or a small size at int2): the
    output is still exactly the target's greedy output."""
    spec = parse_spec(model.cfg, draft)
    accepted = 0
    for prompt in PROMPTS:
        got, stats = speculative_decode(model, prompt, None, spec, 16, gamma=3)
        assert got.tokens == target_greedy(model, prompt, None, 16)
        accepted += stats.accepted
    assert accepted > 0


@pytest.mark.parametrize("draft", ["XL@int4", "XL@int3", "XL@int2"])
def test_a_bits_draft_reads_the_targets_cache_and_is_lossless(model, draft, monkeypatch):
    """XL@int8 drafted by XL at fewer bits (the top planes of the same weights): the draft always shares the
    target's KV cache (one cache is allocated), and the output is the target's greedy output."""
    from matryoshka_lm.infer import speculative

    target, d = parse_spec(model.cfg, "XL@int8"), parse_spec(model.cfg, draft)
    engine, caches = Engine(model), []
    real = engine.kv_cache
    monkeypatch.setattr(engine, "kv_cache", lambda *a, **k: caches.append(a) or real(*a, **k))
    assert speculative.is_bits_draft(target, d)
    for prompt in PROMPTS:
        caches.clear()
        got, stats = speculative_decode(model, prompt, target, d, 16, gamma=3, engine=engine)
        assert got.tokens == target_greedy(model, prompt, target, 16)
        assert len(caches) == 1 and stats.drafted > 0


# ---------------------------------------------------------------- early exit with exact reuse (self-speculation)


@pytest.mark.parametrize(
    "target,draft", [("XL", "XL,XL"), ("XL", "XL"), ("XL", "XL,XL,XL"), ("L", "L,L"), ("XL@int4", "XL,XL@int4")]
)
def test_early_exit_draft_with_reuse_is_the_targets_greedy_output(model, target, draft):
    """The draft is the target's first k layers; reused or not, the output is the target's own greedy output."""
    from matryoshka_lm.infer.speculative import early_exit_depth

    cfg = model.cfg
    t, d = parse_spec(cfg, target), parse_spec(cfg, draft.replace("XL", "XL", 1))
    if draft == "XL":  # the first layer alone: a one-layer prefix
        d = type(t)(width=t.width, layers=t.layers[:1])
    assert early_exit_depth(t, d) == d.depth
    accepted = 0
    for prompt in PROMPTS:
        want = target_greedy(model, prompt, t, 20)
        reused, stats = speculative_decode(model, prompt, t, d, 20, gamma=3)
        plain, _ = speculative_decode(model, prompt, t, d, 20, gamma=3, reuse=False)
        assert reused.tokens == want == plain.tokens, (target, draft)
        accepted += stats.accepted
    assert accepted > 0


def test_the_verifier_does_not_recompute_the_reused_layers(model):
    """Per round, layers 1..k run once per drafted token (the draft) plus once for the last draft (the verifier);
    layers k+1..L once (the verifier, on all γ+1 tokens together)."""
    cfg, k = model.cfg, 2
    target, draft = parse_spec(cfg, "XL"), parse_spec(cfg, "XL,XL")
    calls = [0] * cfg.n_layers
    hooks = [
        b.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(model.layers)
    ]
    try:
        _, stats = speculative_decode(model, PROMPTS[0], target, draft, 20, gamma=3, adaptive=False)
    finally:
        for h in hooks:
            h.remove()
    assert stats.rounds > 0
    for i, c in enumerate(calls):
        want = 1 + (stats.drafted + stats.rounds if i < k else stats.rounds)  # 1: the prefill
        assert c == want, (i, calls, stats.rounds, stats.drafted)


def test_the_memory_presets_early_exits_are_reusable_drafts():
    from matryoshka_lm.config import preset
    from matryoshka_lm.core.spec import count_params
    from matryoshka_lm.infer.speculative import early_exit_depth

    cfg, _ = preset("memory")
    xl = uniform_spec(cfg, "XL")
    assert 4 * count_params(cfg, xl)["total"] >= 100e6  # past the CPU's caches: batch-1 decode is memory-bound
    assert early_exit_depth(xl, uniform_spec(cfg, "E2")) == 2 and early_exit_depth(xl, uniform_spec(cfg, "E4")) == 4
    assert early_exit_depth(xl, uniform_spec(cfg, "W")) is None  # narrower layers: an ordinary draft
