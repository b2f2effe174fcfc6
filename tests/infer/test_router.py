"""The size router (issue 11): the choice rule and its knobs, recovery of a known needed size, FLOPs, files, metrics,
and the `matryoshka route` commands on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _tiny_ckpt import make_checkpoint
from matryoshka_lm.cli.main import main
from matryoshka_lm.core.spec import flops_per_token, full_spec, uniform_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer import router_fit as RF
from matryoshka_lm.infer import router_labels as RL
from matryoshka_lm.infer.router import Predictor, Router, choose, route, router_flops


def synthetic_labels(n: int = 600, seed: int = 0) -> RL.Labels:
    """Four candidates whose gap to the full size grows linearly with feature 3 (a pooled hidden unit), steeper the
    smaller the candidate, so that the size a query needs at any τ is a known function of that feature."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3 + 8))
    nll = 3.0 + true_gaps(x) + 0.01 * rng.normal(size=(n, 4))
    return RL.Labels(nll, x, rng.integers(8, 40, n), 16)


def true_gaps(x: np.ndarray) -> np.ndarray:
    return (x[:, 3:4] + 3.0) * np.array([[0.12, 0.08, 0.04, 0.0]])


def synthetic_router(labels: RL.Labels, names=("S", "M", "L", "XL")) -> Router:
    return Router(list(names), [0.25, 0.4, 0.6, 1.0], [f"f{i}" for i in range(11)], RF.fit_predictors(labels))


def test_tau_zero_routes_to_full_and_huge_tau_to_smallest():
    gaps = torch.tensor([[-0.3, -0.1, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, 4.0, 3.0, 0.0]])
    assert choose(gaps, 0.0).tolist() == [3, 3, 3]
    assert choose(gaps, 1e9).tolist() == [0, 0, 0]
    assert choose(gaps, 3.5).tolist() == [0, 0, 2]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.1", None])
def test_bad_tolerance_is_refused(bad):
    with pytest.raises(MatryoshkaError, match="tolerance"):
        choose(torch.zeros(1, 2), bad)


def test_router_recovers_a_known_needed_size():
    labels = synthetic_labels()
    router = synthetic_router(labels.subset(np.arange(400)))
    test = labels.subset(np.arange(400, 600))
    need = choose(torch.as_tensor(true_gaps(test.features)), 0.25).numpy()
    assert len(set(need.tolist())) >= 3  # the test set needs several different sizes
    picked = choose(router.predictor("learned").gaps(torch.as_tensor(test.features)), 0.25).numpy()
    assert (picked == need).mean() > 0.95
    # the training-free router sees only the prompt NLL (pure noise here), so it cannot tell the sizes apart
    conf = choose(router.predictor("confidence").gaps(torch.as_tensor(test.features)), 0.25).numpy()
    assert (conf == need).mean() < 0.6


def test_budget_calibration_meets_the_budget_and_bad_budgets_are_refused():
    labels = synthetic_labels()
    router = synthetic_router(labels)
    n = labels.nll.shape[0]
    costs = RF.Costs(labels.prompt_lens[:, None] * np.array(router.costs)[None], np.zeros((n, 4)), labels.prompt_lens)
    RF.calibrate(router, labels, costs)
    for budget in (0.3, 0.5, 0.8):
        tau = router.tau_for_budget(budget, "learned")
        compute, _ = RF.predicted_policy(
            "x", router.predictor("learned").gaps(torch.as_tensor(labels.features)).numpy(), np.array([tau])
        ).points(labels, costs)
        assert compute[0] <= budget + 1e-9
    assert router.tau_for_budget(2.0, "learned") == 0.0  # everything at full fits
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(MatryoshkaError, match="budget"):
            router.tau_for_budget(bad)
    with pytest.raises(MatryoshkaError, match="below the smallest mean compute"):
        router.tau_for_budget(0.01)
    with pytest.raises(MatryoshkaError, match="not both"):
        router.resolve_tau(0.1, 0.5)


def test_apgr_oracle_is_one_random_is_half_and_cpt():
    ends = (0.25, 1.0, 4.0, 3.0)  # c_small, c_full, nll_small, nll_full
    c = np.linspace(0.25, 1.0, 11)
    random = RF.apgr_cpt(c, 4.0 - (c - 0.25) / 0.75, ends)
    assert random["apgr"] == pytest.approx(0.5, abs=1e-3)
    assert random["cpt50"] == pytest.approx(0.625, abs=1e-3)
    assert random["cpt80"] == pytest.approx(0.85, abs=1e-3)
    oracle = RF.apgr_cpt(np.array([0.25]), np.array([2.9]), ends)  # full quality (or better) at the smallest cost
    assert oracle["apgr"] == pytest.approx(1.0)
    assert oracle["cpt80"] == pytest.approx(0.25)
    worse = RF.apgr_cpt(np.array([0.5, 1.0]), np.array([4.2, 4.1]), ends)  # never better than always-smallest
    assert worse["apgr"] == pytest.approx(0.0) and np.isnan(worse["cpt50"])


def test_sampled_random_routing_scores_about_half():
    labels = synthetic_labels(2000)
    n = labels.nll.shape[0]
    costs = RF.Costs(
        labels.prompt_lens[:, None] * np.array([0.25, 0.4, 0.6, 1.0])[None],
        np.zeros((n, 4)),
        labels.prompt_lens.astype(float),
    )
    m = RF.metrics_with_ci(RF.random_policy(n, 4, np.linspace(0, 1, 21)), labels, costs, n_boot=30)
    assert m["apgr"]["value"] == pytest.approx(0.5, abs=0.05)
    lo, hi = m["apgr"]["ci"]
    assert lo <= m["apgr"]["value"] <= hi and hi - lo < 0.2
    oracle = RF.metrics_with_ci(RF.oracle_policy(labels, RF.tau_grid(labels.gaps)), labels, costs, n_boot=30)
    assert oracle["apgr"]["value"] > m["apgr"]["value"] + 0.1


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, corpus_file):
    return make_checkpoint(tmp_path_factory.mktemp("router") / "ckpt", corpus_file)


def test_router_flops_stay_under_five_percent_of_a_full_prefill(tiny_ckpt):
    from matryoshka_lm.config import preset
    from matryoshka_lm.core.checkpoint import read_config

    for cfg in (read_config(tiny_ckpt)[0], preset("demo")[0], preset("small")[0]):
        small = uniform_spec(cfg, "S")
        n_feat = 3 + small.width
        for p in (8, 32, cfg.max_seq_len):
            f = router_flops(cfg, small, p, n_feat, 3)
            assert f["full_prefill"] == flops_per_token(cfg, full_spec(cfg), p) * p
            assert f["predictor"] < 0.05 * f["full_prefill"], (cfg.d_model, p, f)


def fitted_tiny_router(ckpt, corpus_file, folder):
    """The tiny checkpoint, its 80 labelled queries (48-token windows, 12 scored), the router fitted on them and
    the same router saved to `folder` and loaded back."""
    from matryoshka_lm.core.checkpoint import load_model, load_tokenizer
    from matryoshka_lm.data import encode_corpus, read_corpus

    model = load_model(ckpt)
    tokens = encode_corpus(load_tokenizer(ckpt), read_corpus(corpus_file))
    specs, labels = RL.label_tokens(model, tokens, 80, 48, 12)
    router = RF.fit_router(model, labels)
    router.save(folder)
    return model, RL.make_queries(tokens, 80, 48, 12), specs, labels, router, Router.load(folder)


def test_route_save_load_identical_choices_and_prefill_reuse(tiny_ckpt, corpus_file, tmp_path):
    model, queries, specs, labels, router, loaded = fitted_tiny_router(tiny_ckpt, corpus_file, tmp_path)
    assert json.loads((tmp_path / "router.json").read_text())["default"] in ("learned", "confidence", "cheap")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))  # forward() = a prefill outside route's own
    for kind in ("learned", "confidence"):
        for tau in (0.0, 0.02, 1e9):
            for i in range(0, 80, 8):
                ids = queries.windows[i, : int(queries.prompt_lens[i])]
                a, b = (
                    route(model, ids, router, tolerance=tau, kind=kind),
                    route(model, ids, loaded, tolerance=tau, kind=kind),
                )
                assert a.index == b.index and torch.equal(a.gaps, b.gaps)
                # the features are those of the labelling pass: one prefill of the smallest size over the prompt
                assert torch.allclose(a.features, torch.as_tensor(labels.features[i]), atol=1e-4)
                assert a.small_logits.shape == (1, ids.numel(), model.cfg.vocab_size)
                assert a.reuses_prefill == (a.index == 0) and str(a.small_spec) == str(specs[0])
                if tau == 0.0:
                    assert a.index == len(specs) - 1
                if tau == 1e9:
                    assert a.index == 0 and a.reuses_prefill
    assert calls == []


def test_predictor_refuses_wrong_feature_count():
    p = Predictor(torch.zeros(3, 5), torch.zeros(3), torch.zeros(5), torch.ones(5))
    with pytest.raises(MatryoshkaError, match="expects 5 features"):
        p.gaps(torch.zeros(1, 6))


def test_load_refuses_a_missing_router(tmp_path):
    with pytest.raises(MatryoshkaError, match="no router"):
        Router.load(tmp_path)


def test_cli_fit_and_eval(tiny_ckpt, corpus_file, tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        main(
            [
                "route",
                "fit",
                str(tiny_ckpt),
                "--data",
                str(corpus_file),
                "-o",
                str(out),
                "--queries",
                "60",
                "--window",
                "48",
                "--cont",
                "12",
            ]
        )
        == 0
    )
    assert (out / "router.json").is_file() and (out / "router.safetensors").is_file()
    meta = json.loads((out / "router.json").read_text())
    assert meta["candidates"] == ["S", "M", "L", "XL"] and set(meta["calibration"]) == {
        "learned",
        "confidence",
        "cheap",
    }
    png, js = tmp_path / "curve.png", tmp_path / "rep.json"
    args = [
        "route",
        "eval",
        str(tiny_ckpt),
        "--data",
        str(corpus_file),
        "--router",
        str(out),
        "--queries",
        "40",
        "--bootstrap",
        "5",
        "--plot",
        str(png),
        "--json",
        str(js),
    ]
    assert main(args + ["--tolerance", "0.05"]) == 0
    text = capsys.readouterr().out
    assert "APGR" in text and "always XL" in text and "oracle" in text
    assert png.stat().st_size > 1000
    rep = json.loads(js.read_text())
    assert (
        set(rep["curves"]) == {"learned", "confidence", "cheap", "oracle", "random", "fixed sizes"}
        and rep["queries"] == 40
    )
    assert set(rep["learned_minus_confidence"]) == {"value", "ci"} and len(rep["fixed"]) == 4
    assert main(args + ["--tolerance", "0.05", "--budget", "0.5"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(args + ["--budget", "0"]) == 2
    assert "budget" in capsys.readouterr().err


def test_generation_labeller_full_size_gap_is_zero_and_scores_the_greedy_continuation(tiny_ckpt, corpus_file):
    from matryoshka_lm.core.checkpoint import load_model, load_tokenizer
    from matryoshka_lm.data import encode_corpus, read_corpus
    from matryoshka_lm.infer.engine import Engine

    model = load_model(tiny_ckpt)
    tokens = encode_corpus(load_tokenizer(tiny_ckpt), read_corpus(corpus_file))
    specs, labels = RL.label_tokens(model, tokens, 12, 32, 8, quality="generation", new_tokens=6)
    _, scoring = RL.label_tokens(model, tokens, 12, 32, 8)
    assert labels.nll.shape == (12, len(specs)) and labels.cont == 6 and np.isfinite(labels.nll).all()
    assert (labels.gaps[:, -1] == 0).all()
    # same prompts, same features as the scoring labeller (the smallest size's prefill of the prompt)
    assert np.array_equal(labels.prompt_lens, scoring.prompt_lens)
    assert np.allclose(labels.features, scoring.features, atol=1e-4)
    # independently: the full model's NLL of the smallest size's greedy continuation of query 0
    q = RL.make_queries(tokens, 12, 32, 8)
    prompt = q.windows[0, : int(q.prompt_lens[0])]
    gen = torch.tensor(Engine(model).generate([prompt.tolist()], specs[0], 6)[0].tokens)
    ids = torch.cat([prompt, gen])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None, :-1])[0, len(prompt) - 1 :].float(), -1)
    assert labels.nll[0, 0] == pytest.approx(-logp.gather(-1, gen[:, None]).mean().item(), abs=1e-5)
    with pytest.raises(MatryoshkaError, match="quality"):
        RL.label_tokens(model, tokens, 12, 32, 8, quality="bleu")


def test_router_candidates_may_be_cells_costed_in_bytes(tiny_ckpt, corpus_file):
    """Candidates of the size x bits grid: ordered by bytes of weights, labelled at their own bit width, and
    routed to; a huge τ picks the cheapest cell, τ 0 the most expensive."""
    from matryoshka_lm.core import quant
    from matryoshka_lm.core.checkpoint import load_model, load_tokenizer
    from matryoshka_lm.core.spec import parse_spec
    from matryoshka_lm.data import encode_corpus, read_corpus

    model = load_model(tiny_ckpt)
    tokens = encode_corpus(load_tokenizer(tiny_ckpt), read_corpus(corpus_file))
    cells = ["XL", "M@int4", "S@int2", "L@int8"]
    specs, labels = RL.label_tokens(model, tokens, 40, 48, 12, candidates=cells)
    assert [str(s) for s in specs] == ["S@int2", "M@int4", "L@int8", "XL"]
    # each column is that cell's own loss: S@int2 labels differ from S's
    _, s_labels = RL.label_tokens(model, tokens, 40, 48, 12, candidates=["S", "XL"])
    assert not np.allclose(labels.nll[:, 0], s_labels.nll[:, 0])
    router = RF.fit_router(model, labels, candidates=cells)
    full = quant.weight_bytes(model.cfg, full_spec(model.cfg), None, model.precision.quant)
    want = [quant.weight_bytes(model.cfg, s, s.bits, model.precision.quant) / full for s in specs]
    assert router.costs == pytest.approx(want) and router.costs == sorted(router.costs)
    assert [s for s in router.specs(model.cfg)] == [parse_spec(model.cfg, c) for c in router.candidates]
    ids = torch.as_tensor(tokens[:20].astype(np.int64))
    assert route(model, ids, router, tolerance=1e9).index == 0
    assert route(model, ids, router, tolerance=0.0).index == 3
    with pytest.raises(MatryoshkaError, match="distinct"):
        RL.candidate_specs(model, ["M@int4", "M@int4"])


def test_label_halves_average_to_the_label_and_reliability_tells_signal_from_noise(tiny_ckpt, corpus_file):
    from matryoshka_lm.core.checkpoint import load_model, load_tokenizer
    from matryoshka_lm.data import encode_corpus, read_corpus

    model = load_model(tiny_ckpt)
    tokens = encode_corpus(load_tokenizer(tiny_ckpt), read_corpus(corpus_file))
    _, labels = RL.label_tokens(model, tokens, 20, 48, 12)
    np.testing.assert_allclose(labels.halves.mean(2), labels.nll, rtol=1e-5, atol=1e-6)
    assert labels.subset(np.arange(5)).halves.shape == (5, labels.nll.shape[1], 2)
    rng = np.random.default_rng(0)
    n = 400
    signal = rng.normal(0, 1, (n, 1, 1)) * np.array([1.0, 0.0])[None, :, None]  # a per-query gap; full: none
    clean = RL.Labels(np.zeros((n, 2)), np.zeros((n, 1)), np.full(n, 8), 8, signal + rng.normal(0, 0.05, (n, 2, 2)))
    noisy = RL.Labels(np.zeros((n, 2)), np.zeros((n, 1)), np.full(n, 8), 8, rng.normal(0, 1, (n, 2, 2)))
    assert clean.reliability()[0] > 0.99 and abs(noisy.reliability()[0]) < 0.25
    assert RL.Labels(np.zeros((n, 2)), np.zeros((n, 1)), np.full(n, 8), 8).reliability() is None


def test_the_cheap_router_costs_under_two_percent_of_a_full_prefill():
    from matryoshka_lm.config import preset
    from matryoshka_lm.infer.router import cheap_feature_names, cheap_router_flops

    for name in ("tiny", "demo", "memory", "small"):
        cfg = preset(name)[0]
        small = full_spec(cfg)  # the widest embeddings any smallest candidate could pool
        n_feat = len(cheap_feature_names(small.width))
        for p in (1, 8, 32, cfg.max_seq_len):
            f = cheap_router_flops(cfg, small, p, n_feat, len(cfg.sizes) - 1)
            assert f["full_prefill"] == flops_per_token(cfg, full_spec(cfg), p) * p
            assert f["predictor"] <= 0.02 * f["full_prefill"], (name, p, f)


def test_the_cheap_router_runs_no_layer_and_routes_as_its_labels_say(tiny_ckpt, corpus_file, tmp_path):
    model, queries, specs, labels, router, loaded = fitted_tiny_router(tiny_ckpt, corpus_file, tmp_path)
    assert loaded.cheap_features == router.cheap_features and len(router.cheap_features) == labels.cheap.shape[1]
    ran = []
    for m in (*model.layers, model.norm):
        m.register_forward_hook(lambda *a: ran.append(1))
    predicted = RF.predicted_gaps(router, labels, "cheap")
    for tau in (0.0, 0.02, 1e9):
        want = choose(torch.as_tensor(predicted), tau).numpy()
        for i in range(0, 80, 8):
            ids = queries.windows[i, : int(queries.prompt_lens[i])]
            d = route(model, ids, loaded, tolerance=tau, kind="cheap")
            assert torch.allclose(d.features, torch.as_tensor(labels.cheap[i]), atol=1e-5)
            assert d.index == want[i] and d.small_logits is None and not d.reuses_prefill
            assert d.index == (len(specs) - 1 if tau == 0.0 else 0 if tau == 1e9 else d.index)
    assert ran == []  # no block, no final norm (so no LM head): the embeddings alone
    # what the curves charge it: its features and predictor, never the small size's prefill
    costs = RF.query_costs(model, specs, labels)
    assert (costs.cheap_overhead < 0.02 * costs.full[:, None]).all()
    assert (costs.cheap_overhead < costs.overhead[:, 1:2]).all()
