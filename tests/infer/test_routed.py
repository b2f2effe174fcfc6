"""Generation at the size the router picks (infer/routed.py, `matryoshka generate --size auto`): the same tokens
as the engine at that size, the router's prefill reused when the smallest size is chosen, and the knobs τ / budget."""

from __future__ import annotations

import pytest

from _tiny_ckpt import make_checkpoint
from _tiny_router import length_router
from matryoshka_lm.cli.main import main
from matryoshka_lm.core.checkpoint import load_model, load_tokenizer
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import parse_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.routed import routed_generate, routed_steps, routed_stream
from matryoshka_lm.infer.sampling import GREEDY, Sampling

SHORT = [7, 30, 101, 5]  # 4 tokens: S at τ 0.1
LONG = [(11 * i + 3) % 250 for i in range(20)]  # 20 tokens: XL at τ 0.1, M at τ 0.5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file):
    path = make_checkpoint(tmp_path_factory.mktemp("routed") / "tiny", corpus_file)
    length_router(load_model(path).cfg).save(path)
    return path


@pytest.fixture(scope="module")
def engine(ckpt) -> Engine:
    return Engine(load_model(ckpt))


@pytest.fixture(scope="module")
def router(engine):
    return length_router(engine.cfg)


def tokens(engine: Engine, prompt: list[int], size: str, n: int, sampling: Sampling = GREEDY) -> list[int]:
    return engine.generate([prompt], parse_spec(engine.cfg, size), n, sampling)[0].tokens


@pytest.mark.parametrize(
    ("prompt", "tau", "size"), [(SHORT, 0.1, "S"), (LONG, 0.1, "XL"), (LONG, 0.5, "M"), (SHORT, 0.0, "XL")]
)
def test_routed_greedy_equals_the_engine_at_the_chosen_size(engine, router, prompt, tau, size):
    decision, done = routed_generate(engine, router, prompt, 24, tolerance=tau)
    assert decision.spec == parse_spec(engine.cfg, size)
    assert decision.reuses_prefill == (size == "S")
    assert done.tokens == tokens(engine, prompt, size, 24)
    assert len(done.tokens) == 24


def test_reused_prefill_also_matches_seeded_sampling_and_streaming(engine, router):
    sampling = Sampling(1.0, None, 0.9, seed=7)
    decision, done = routed_generate(engine, router, SHORT, 16, sampling, tolerance=0.1)
    assert decision.reuses_prefill
    assert done.tokens == tokens(engine, SHORT, "S", 16, sampling)
    decision, pieces = routed_stream(engine, router, SHORT, 16, tolerance=0.1)
    assert decision.reuses_prefill and list(pieces) == tokens(engine, SHORT, "S", 16)


def test_no_second_prefill_when_the_smallest_size_is_chosen(engine, router, monkeypatch):
    """Every forward over more than one token is a prefill: the router's own when S serves, plus the engine's at
    the chosen size otherwise."""
    prefills = []
    real = MatryoshkaLM.hidden_states

    def counting(self, idx, *args, **kw):
        if idx.shape[1] > 1:
            prefills.append(idx.shape[1])
        return real(self, idx, *args, **kw)

    monkeypatch.setattr(MatryoshkaLM, "hidden_states", counting)
    decision, done = routed_generate(engine, router, SHORT, 8, tolerance=0.1)
    assert decision.reuses_prefill and len(done.tokens) == 8
    assert prefills == [len(SHORT)]
    prefills.clear()
    decision, done = routed_generate(engine, router, LONG, 8, tolerance=0.1)
    assert not decision.reuses_prefill and len(done.tokens) == 8
    assert prefills == [len(LONG), len(LONG)]


def test_tau_zero_is_full_and_huge_tau_is_smallest(engine, router):
    for prompt in (SHORT, LONG):
        assert routed_steps(engine, router, prompt, 4, tolerance=0.0)[0].spec == parse_spec(engine.cfg, "XL")
        assert routed_steps(engine, router, prompt, 4, tolerance=1e9)[0].spec == parse_spec(engine.cfg, "S")


def test_budget_maps_to_the_calibrated_tau(engine, router):
    for budget, size in ((1.0, "XL"), (0.7, "M"), (0.3, "S")):
        decision, _ = routed_steps(engine, router, LONG, 4, budget=budget)
        assert decision.spec == parse_spec(engine.cfg, size), budget


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tolerance": -0.1}, "tolerance"),
        ({"tolerance": float("nan")}, "tolerance"),
        ({"budget": 0.0}, "budget"),
        ({"budget": 0.1}, "below the smallest mean compute"),
        ({"tolerance": 0.1, "budget": 0.5}, "not both"),
    ],
)
def test_bad_knobs_are_refused_before_the_model_runs(engine, router, kw, match, monkeypatch):
    monkeypatch.setattr(MatryoshkaLM, "hidden_states", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(MatryoshkaError, match=match):
        routed_steps(engine, router, SHORT, 4, **kw)


def test_routed_prompts_are_checked_like_the_engines(engine, router):
    with pytest.raises(MatryoshkaError, match="empty"):
        routed_steps(engine, router, [], 4)
    with pytest.raises(MatryoshkaError, match="context holds"):
        routed_steps(engine, router, list(range(engine.cfg.max_seq_len)), 4)


# ---------------------------------------------------------------- the CLI


def cli_auto(ckpt, *extra: str) -> list[str]:
    return ["generate", str(ckpt), "--size", "auto", "--temperature", "0", "--max-new-tokens", "6", *extra]


@pytest.mark.parametrize(("tau", "size"), [("0.1", "S"), ("0", "XL")])
def test_cli_auto_says_which_size_served(ckpt, engine, capsys, tau, size):
    tok = load_tokenizer(ckpt)
    prompt = "The"
    ids = tok.encode(prompt).ids
    assert len(ids) < 6  # the router sends it to S at τ > 0
    assert main(cli_auto(ckpt, "--prompt", prompt, "--tolerance", tau, "--device", "cpu")) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"auto: served by {size} ("), err
    eot = tok.token_to_id("<|endoftext|>")
    want = engine.generate([ids], parse_spec(engine.cfg, size), 6, stop_tokens=[eot], decode=tok.decode)[0].text
    assert out == prompt + want + "\n"


def test_cli_auto_budget_and_stream(ckpt, capsys):
    assert main(cli_auto(ckpt, "--prompt", "The", "--budget", "0.3", "--stream", "--device", "cpu")) == 0
    out, err = capsys.readouterr()
    assert err.startswith("auto: budget 0.3 -> served by S"), err
    assert out.startswith("The")


def test_cli_auto_without_a_router_says_how_to_fit_one(tmp_path, corpus_file, capsys):
    bare = make_checkpoint(tmp_path / "bare", corpus_file)
    assert main(cli_auto(bare, "--prompt", "The", "--device", "cpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert str(bare / "router.json") in err[0] and f"matryoshka route fit {bare}" in err[0]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--tolerance", "-1"], "tolerance must be a number >= 0"),
        (["--tolerance", "0.1", "--budget", "0.5"], "not both"),
        (["--draft", "S"], "--draft does not combine"),
    ],
)
def test_cli_auto_bad_options(ckpt, capsys, extra, match):
    assert main(cli_auto(ckpt, "--prompt", "The", *extra, "--device", "cpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_cli_knobs_need_auto(ckpt, capsys):
    assert main(["generate", str(ckpt), "--size", "S", "--prompt", "a", "--tolerance", "0.1", "--device", "cpu"]) == 2
    assert "--size auto only" in capsys.readouterr().err
