"""The inference engine: zero-copy elastic sizes, batched == one at a time, cached == recomputed, sampling, stops."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import tiny_config
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.spec import count_params, parse_spec, uniform_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.engine import Engine, decode_one_token, left_padded, prefill
from matryoshka_lm.infer.sampling import Sampling, logits_to_probs
from matryoshka_lm.infer.stops import held_back

SPECS = ["XL", "L", "M", "S", "S,M,L,XL", "f16h2,f64h4,f8h2@d24"]
PROMPTS = [[5, 17, 3, 88, 41, 2, 9], [60, 1], [33, 12, 70, 70, 4], [8]]


@pytest.fixture(scope="module")
def model() -> MatryoshkaLM:
    """Random weights with a wider spread than the init, so the next-token distributions are far from uniform."""
    torch.manual_seed(0)
    m = MatryoshkaLM(tiny_config()).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return m


def decode_text(ids: list[int]) -> str:
    return "".join(chr(97 + t % 26) for t in ids)


def naive_greedy(model: MatryoshkaLM, prompt: list[int], spec, n: int) -> list[int]:
    """No cache: the whole sequence re-run every step."""
    x = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            x.append(int(model(torch.tensor([x]), spec)[0, -1].argmax()))
    return x[len(prompt) :]


# ---------------------------------------------------------------- zero copy


class WeightsRead(TorchFunctionMode):
    """Records the weight argument of every linear / embedding call."""

    def __init__(self):
        super().__init__()
        self.weights: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear or func is torch.nn.functional.embedding:
            self.weights.append(args[1] if len(args) > 1 else kwargs["weight"])
        return func(*args, **kwargs)


class NewStorageBytes(TorchDispatchMode):
    """Sums the bytes of every storage an op allocates (views and in-place results allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                self.bytes += t.untyped_storage().nbytes()
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("text", SPECS)
def test_every_size_reads_views_of_the_full_weights(model, text):
    spec = parse_spec(model.cfg, text)
    params = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}
    engine = Engine(model)
    with WeightsRead() as mode:
        engine.generate([PROMPTS[0], PROMPTS[1]], spec, max_new_tokens=3)
    # embedding + per layer (q, k, v, o, gate, up, down) + head
    assert len(mode.weights) == 3 * (1 + 7 * spec.depth + 1)
    for w in mode.weights:
        assert w.untyped_storage().data_ptr() in params, "a submodel read a weight that is not the full model's"
    # the slices have the submodel's width: smaller views, not the full tensors
    assert all(spec.width in w.shape for w in mode.weights)


def test_decoding_allocates_no_parameter_copy():
    """One decode step of a width-, head- and FFN-sliced size allocates a tiny fraction of the weights it reads."""
    torch.manual_seed(0)
    model = MatryoshkaLM(tiny_config(d_model=128, ffn_dim=512, vocab_size=500, max_seq_len=32)).eval()
    spec = uniform_spec(model.cfg, "M")
    cache = KVCache.allocate(model.cfg, spec, 1, 16)
    before = {n: (p.data_ptr(), p.shape) for n, p in model.named_parameters()}
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), spec, cache, 0)
        with NewStorageBytes() as mode:
            model(torch.tensor([[4]]), spec, cache, 3)
    weight_bytes = 4 * count_params(model.cfg, spec)["total"]
    assert mode.bytes < 0.1 * weight_bytes, (mode.bytes, weight_bytes)  # activations only
    smallest_slice = 4 * spec.width * min(l.ffn for l in spec.layers)
    assert mode.largest < smallest_slice  # no single allocation as big as even one sliced weight
    assert before == {n: (p.data_ptr(), p.shape) for n, p in model.named_parameters()}


def test_engine_generation_allocates_no_parameter_copy():
    """The whole engine path (view model built on first use, KV cache, prefill, decode) at a sliced size."""
    torch.manual_seed(0)
    model = MatryoshkaLM(tiny_config(d_model=128, ffn_dim=512, vocab_size=500, max_seq_len=32)).eval()
    spec = uniform_spec(model.cfg, "M")
    engine = Engine(model)
    with NewStorageBytes() as mode:
        engine.generate([[1, 2, 3]], spec, max_new_tokens=4)
    # 8 forward passes of small activations in all, and not one allocation the size of a sliced weight
    assert mode.bytes < 0.3 * 4 * count_params(model.cfg, spec)["total"]
    assert mode.largest < 4 * spec.width * min(l.ffn for l in spec.layers)
    sub, _ = engine.runner(spec)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert all(p.untyped_storage().data_ptr() in params for p in sub.parameters())
    assert sub.rope_cos.data_ptr() == model.rope_cos.data_ptr()


def test_slicing_once_equals_slicing_per_call(model):
    for text in ("M", "S,M,L,XL"):
        spec = parse_spec(model.cfg, text)
        once = Engine(model).generate(PROMPTS, spec, 8)
        per_call = Engine(model, slice_once=False).generate(PROMPTS, spec, 8)
        assert [c.tokens for c in once] == [c.tokens for c in per_call]
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        sub, sub_spec = Engine(model).runner(spec)
        torch.testing.assert_close(sub(x, sub_spec), model(x, spec), atol=1e-5, rtol=1e-5)


def test_engine_keeps_no_weights_of_its_own(model):
    nbytes = sum(p.nbytes for p in model.parameters())
    engine = Engine(model)
    for size in ("XL", "L", "M", "S"):
        engine.generate([PROMPTS[0]], uniform_spec(model.cfg, size), max_new_tokens=2)
    assert sum(p.nbytes for p in engine.model.parameters()) == nbytes
    assert engine.model is model


# ---------------------------------------------------------------- correctness of decoding


@pytest.mark.parametrize("text", ["XL", "M", "S", "S,M,L,XL"])
def test_greedy_equals_recomputing_without_cache(model, text):
    spec = parse_spec(model.cfg, text)
    for prompt in PROMPTS[:2]:
        got = Engine(model).generate([prompt], spec, max_new_tokens=12)[0]
        assert got.tokens == naive_greedy(model, prompt, spec, 12)
        assert got.finish_reason == "length"


@pytest.mark.parametrize("text", ["XL", "S", "f16h2,f64h4,f8h2@d24"])
def test_batch_of_different_lengths_equals_one_at_a_time(model, text):
    spec = parse_spec(model.cfg, text)
    engine = Engine(model)
    batch = engine.generate(PROMPTS, spec, max_new_tokens=10)
    for prompt, got in zip(PROMPTS, batch):
        assert got.tokens == engine.generate([prompt], spec, max_new_tokens=10)[0].tokens


def test_batched_logits_match_unpadded_logits(model):
    """Left padding changes nothing: the padded rows' next-token logits, after the prefill and after a decode
    step, equal each prompt's own; the engine's first tokens are the argmax of those logits."""
    spec = uniform_spec(model.cfg, "M")
    idx, pad = left_padded(PROMPTS, torch.device("cpu"))
    P = idx.shape[1]
    with torch.no_grad():
        cache = KVCache.allocate(model.cfg, spec, len(PROMPTS), 16, pad=pad)
        padded = prefill(model, idx, spec, cache)
        nxt = padded.argmax(-1)
        stepped = decode_one_token(model, nxt, spec, cache, torch.tensor([P]))
        for b, p in enumerate(PROMPTS):
            torch.testing.assert_close(padded[b], model(torch.tensor([p]), spec)[0, -1], atol=1e-5, rtol=1e-5)
            alone = model(torch.tensor([p + [int(nxt[b])]]), spec)[0, -1]
            torch.testing.assert_close(stepped[b], alone, atol=1e-5, rtol=1e-5)
    steps = Engine(model).token_steps(PROMPTS, spec, max_new_tokens=2)
    assert next(steps).tolist() == nxt.tolist()
    assert next(steps).tolist() == stepped.argmax(-1).tolist()


def test_context_end_stops_generation(model):
    prompt = list(range(1, model.cfg.max_seq_len - 3))  # room for 4 more
    got = Engine(model).generate([prompt], None, max_new_tokens=50)[0]
    assert len(got.tokens) == 4 and got.finish_reason == "length"


# ---------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(model):
    engine = Engine(model)
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = engine.generate(PROMPTS, None, 15, s)
    b = engine.generate(PROMPTS, None, 15, s)
    c = engine.generate(PROMPTS, None, 15, Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=8))
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    engine = Engine(model)
    greedy = engine.generate(PROMPTS[:2], None, 10)
    for s in (Sampling(temperature=0.7, top_k=1, seed=3), Sampling(temperature=1.3, top_p=1e-6, seed=3)):
        assert [x.tokens for x in engine.generate(PROMPTS[:2], None, 10, s)] == [x.tokens for x in greedy]


def test_logits_to_probs_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    p = logits_to_probs(logits, Sampling(temperature=1.0, top_k=2))
    assert (p > 0).tolist() == [[True, False, False, False, True]]
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)[0]  # 0.636, 0.234, 0.086, 0.032, 0.012 in order 4, 0, 1, 2, 3
    p = logits_to_probs(logits, Sampling(temperature=1.0, top_p=0.8))  # 0.636 < 0.8 <= 0.636 + 0.234
    assert (p > 0).tolist() == [[True, False, False, False, True]]
    torch.testing.assert_close(p[0, 4], full[4] / (full[4] + full[0]))
    assert logits_to_probs(logits, Sampling()).tolist() == [[0, 0, 0, 0, 1]]


# ---------------------------------------------------------------- stops and streaming


def test_stop_token_ends_a_row_and_is_not_returned(model):
    engine = Engine(model)
    full = engine.generate(PROMPTS, None, 12)
    stop = full[0].tokens[4]
    got = engine.generate(PROMPTS, None, 12, stop_tokens=[stop])
    for f, g in zip(full, got):
        expect = f.tokens[: f.tokens.index(stop)] if stop in f.tokens else f.tokens
        assert g.tokens == expect
        assert g.finish_reason == ("stop" if stop in f.tokens else "length")


def test_stop_string_cuts_the_text(model):
    engine = Engine(model)
    full = engine.generate([PROMPTS[0]], None, 16, decode=decode_text)[0]
    stop = full.text[6:8]
    got = engine.generate([PROMPTS[0]], None, 16, stop_strings=[stop, "never"], decode=decode_text)[0]
    assert got.text == full.text[: full.text.index(stop)]
    assert decode_text(got.tokens) == got.text and got.finish_reason == "stop"


def test_stream_joins_to_the_completion(model):
    engine = Engine(model)
    full = engine.generate([PROMPTS[2]], uniform_spec(model.cfg, "S"), 14, decode=decode_text)[0]
    ids = list(engine.stream(PROMPTS[2], uniform_spec(model.cfg, "S"), 14))
    assert ids == full.tokens
    stop = full.text[9:11]
    pieces = list(engine.stream(PROMPTS[2], uniform_spec(model.cfg, "S"), 14, stop_strings=[stop], decode=decode_text))
    assert "".join(pieces) == full.text[: full.text.index(stop)]
    assert all(isinstance(p, str) and p for p in pieces)


def test_held_back_keeps_possible_stop_prefixes():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world"]) == 0
    assert held_back("ab\ufffd", []) == 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=[list(range(64))]), "context holds 64"),
        (dict(prompts=[[1, 500]]), "outside the vocabulary"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(stop_strings=["x"]), "decode function"),
    ],
)
def test_bad_generate_input_raises(model, kwargs, match):
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
    with pytest.raises(MatryoshkaError, match=match):
        Engine(model).generate(args.pop("prompts"), None, **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_bad_sampling_raises(kwargs, match):
    with pytest.raises(MatryoshkaError, match=match):
        Sampling(**kwargs)


def test_bad_spec_raises(model):
    from matryoshka_lm.core.spec import LayerSpec, SubmodelSpec

    with pytest.raises(MatryoshkaError, match="width"):
        Engine(model).generate([[1]], SubmodelSpec(width=999, layers=(LayerSpec(8, 2),)), 2)


# ---------------------------------------------------------------- torch.compile


def widened(model: MatryoshkaLM) -> MatryoshkaLM:
    """The weights spread wider than the init (as in the `model` fixture), so greedy tokens vary."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return model.eval()


def test_compiled_decoding_equals_eager():
    """Engine(compile=True): plain torch.compile of the static-shape step, with no graph break, gives eager's
    greedy tokens for the full size at batch 1 and a smaller size on a left-padded batch; another generation
    of a different length (same cache length) compiles nothing new. Two graphs of a 2-layer model: about 30 s
    of compiling on a loaded 2-core CPU with a cold inductor cache, about 6 s with a warm one."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = widened(MatryoshkaLM(tiny_config(n_layers=2)))
    eager, compiled = Engine(model), Engine(model, compile=True)
    counters.clear()
    for spec, prompts in ((None, [PROMPTS[0]]), (uniform_spec(model.cfg, "M"), PROMPTS)):
        want = [c.tokens for c in eager.generate(prompts, spec, 8)]
        assert [c.tokens for c in compiled.generate(prompts, spec, 8)] == want
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2 and not counters["graph_break"], (graphs, dict(counters["graph_break"]))
    want = eager.generate([PROMPTS[2]], None, 5)[0].tokens
    assert compiled.generate([PROMPTS[2]], None, 5)[0].tokens == want
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_takes_the_options_this_torch_has(model, monkeypatch):
    """torch.compile without isolate_recompiles / recompile_limit (torch 2.11 and older) is not passed them (a
    TypeError there); dynamo's global limit is raised to the engine's instead, never lowered. With them, both."""
    import torch._dynamo

    from matryoshka_lm.infer.engine import RECOMPILE_LIMIT

    calls = []

    def old_compile(fn, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None, disable=False):
        calls.append(dict(dynamic=dynamic, mode=mode))
        return fn

    def new_compile(fn, *, dynamic=None, mode=None, recompile_limit=None, isolate_recompiles=False):
        calls.append(dict(dynamic=dynamic, mode=mode, limit=recompile_limit, isolate=isolate_recompiles))
        return fn

    config = torch._dynamo.config  # config.patch restores it (monkeypatch.setattr would delete the entry)
    monkeypatch.setattr(torch, "compile", old_compile)
    with config.patch(recompile_limit=8):
        assert Engine(model, compile=True)._compile(decode_one_token) is decode_one_token
        assert calls.pop() == dict(dynamic=False, mode=None)
        assert config.recompile_limit == RECOMPILE_LIMIT
    with config.patch(recompile_limit=1000):
        Engine(model, compile=True)._compile(decode_one_token)
        assert config.recompile_limit == 1000
    monkeypatch.setattr(torch, "compile", new_compile)
    with config.patch(recompile_limit=8):
        Engine(model, compile=True)._compile(decode_one_token)
        assert calls[-1] == dict(dynamic=False, mode=None, limit=RECOMPILE_LIMIT, isolate=True)
        assert config.recompile_limit == 8


@pytest.mark.skipif(
    not os.environ.get("MATRYOSHKA_TEST_COMPILE"),
    reason="compiles several more graphs (~10-30 s each on a small CPU); set MATRYOSHKA_TEST_COMPILE=1",
)
def test_compiled_engine_matches_eager_everywhere(model):
    from matryoshka_lm.infer.speculative import speculative_decode

    eager, compiled = Engine(model), Engine(model, compile=True)
    spec = uniform_spec(model.cfg, "S")
    for prompts in ([PROMPTS[0]], PROMPTS):  # unpadded and padded batches
        want = [c.tokens for c in eager.generate(prompts, spec, 12)]
        assert [c.tokens for c in compiled.generate(prompts, spec, 12)] == want
    want = eager.generate([PROMPTS[0]], None, 16)[0].tokens
    for share in (False, True):
        got = speculative_decode(model, PROMPTS[0], None, spec, 16, engine=compiled, share_cache=share)[0]
        assert got.tokens == want
    # the early-exit draft's own compiled steps (exit step, exit state, resume chunk), reusing the target's work
    exit2 = parse_spec(model.cfg, ",".join(["XL"] * 2))
    got = speculative_decode(model, PROMPTS[0], None, exit2, 16, engine=compiled, gamma=3, adaptive=False)[0]
    assert got.tokens == want


# ---------------------------------------------------------------- view models


def test_building_a_view_model_leaves_other_threads_alone(model):
    """While a view model is being built (stopped at its first submodule, from a module-registration hook),
    another thread builds a model from a fixed seed: it must get exactly the weights and RoPE tables it gets
    on its own. (View models used to be built by swapping torch.nn.init.* and model.rope_tables for the whole
    process, which left that model's weights uninitialised and gave it the wrong RoPE tables.)"""
    cfg = tiny_config(n_layers=2, max_seq_len=32)

    def build() -> MatryoshkaLM:
        torch.manual_seed(123)
        return MatryoshkaLM(cfg)

    want, got = build(), {}

    def meanwhile(module, name, submodule):
        if not got:  # once: the first submodule of the view model
            got["thread"] = None
            worker = threading.Thread(target=lambda: got.update(thread=build()))
            worker.start()
            worker.join()

    handle = torch.nn.modules.module.register_module_module_registration_hook(meanwhile)
    try:
        sub, _ = Engine(model).runner(uniform_spec(model.cfg, "M"))
    finally:
        handle.remove()
    other = got["thread"]
    assert other is not None and sub.cfg.d_model < model.cfg.d_model
    for (name, w), (_, o) in zip(want.state_dict().items(), other.state_dict().items()):
        assert torch.equal(w, o), name
    assert torch.equal(want.rope_cos, other.rope_cos) and torch.equal(want.rope_sin, other.rope_sin)


# ---------------------------------------------------------------- the CLI


def test_cli_generate_flags(tmp_path, corpus_file, capsys):
    from _tiny_ckpt import make_checkpoint
    from matryoshka_lm.cli import main

    ckpt = str(make_checkpoint(tmp_path / "ckpt", corpus_file))
    base = ["generate", ckpt, "--prompt", "The", "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--draft", "S", "--stream", "--gamma", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain  # speculative + streamed == plain greedy
    assert "accepted" in out.err
    assert main([*base, "--draft", "XL,XL"]) == 0  # the early-exit form: the target's first 2 layers, reused
    out = capsys.readouterr()
    assert out.out == plain and "accepted" in out.err
    args = ["--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--stop", "e", "--stop", "."]
    assert main([*base, *args, "--size", "M"]) == 0
    assert "e" not in capsys.readouterr().out.removeprefix("The").rstrip("\n")
    for bad, match in (
        (["--draft", "XL", "--size", "S"], "larger than target"),
        (["--top-p", "0"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--top-k", "0"], "top_k"),
    ):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr()
        assert err.out == "" and match in err.err and len(err.err.strip().splitlines()) == 1
