"""Per-token early exit (infer/early_exit.py): at its strictest it is the full model token for token, at its most
lenient the first exit's size; a batch row does what it would alone; its cost counter is what hooks see run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.spec import uniform_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.early_exit import NEVER, ExitCost, ExitCounter, exit_forward, exit_generate, exit_points
from matryoshka_lm.infer.early_exit_eval import THRESHOLDS, exit_policy, exit_run
from matryoshka_lm.infer.engine import generate
from matryoshka_lm.infer.exit_probe import NEVER_TAU, ExitProbe, fit_exit_probe, probe_data
from matryoshka_lm.infer.router_labels import candidate_specs, label, make_queries

SIZES = {"XL": {"depth": "1"}, "E3": {"depth": "1/2"}, "E1": {"depth": "1/6"}, "W": {"ffn": "1/2"}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=48, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64, vocab_size=97, sizes=SIZES
    )
    m = MatryoshkaLM(cfg).eval()
    with torch.no_grad():  # a sharper head than a fresh model's, so margins spread over (0, 1)
        m.tok_emb.weight.mul_(25.0)
    return m


def margins_seen(model, prompt, n=12):
    """Margins at the first exit along the full model's greedy path: thresholds that split them."""
    from matryoshka_lm.infer.early_exit import margin

    toks = generate(model, [prompt], None, n)[0].tokens
    ids = torch.tensor([prompt + toks])
    h = model.hidden_states(ids, uniform_spec(model.cfg, "E1"))
    return margin(model.logits(h)[0, len(prompt) - 1 :]).tolist()


def split(margins: list[float]) -> float:
    """A threshold between the two middle margins: no token sits on it, so float noise cannot flip a decision."""
    m = sorted(set(margins))
    return (m[len(m) // 2 - 1] + m[len(m) // 2]) / 2


def test_exit_points_are_the_trained_depths_of_full_width():
    cfg = ModelConfig(d_model=48, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, sizes=SIZES)
    assert exit_points(cfg) == [1, 3, 6]  # W is narrower: no exit
    assert exit_points(ModelConfig(d_model=48, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96)) == [4]


def test_the_strictest_setting_is_the_full_models_greedy_output(model):
    prompt = [5, 17, 3, 44, 9]
    want = generate(model, [prompt], None, 20)[0].tokens
    got, counter = exit_generate(model, prompt, 20, NEVER)
    assert got == want
    n = len(prompt) + 19  # every token fed: the prompt and the new ones but the last
    assert counter.exits == {6: n} and int(counter.heads.sum()) == n and int(counter.kv.sum()) == 0


def test_the_most_lenient_setting_is_the_first_exits_size(model):
    prompt = [5, 17, 3, 44, 9]
    want = generate(model, [prompt], uniform_spec(model.cfg, "E1"), 20)[0].tokens
    got, counter = exit_generate(model, prompt, 20, 0.0)
    assert got == want
    n = len(prompt) + 19
    assert counter.exits == {1: n} and int(counter.kv.sum()) == n * 5  # the other 5 layers: keys and values


def test_the_counter_is_what_runs(model, monkeypatch):
    prompt = [7, 1, 30, 2]
    thr = split(margins_seen(model, prompt))
    calls = {"blocks": 0, "wk": 0, "heads": 0}
    hooks = [b.register_forward_hook(lambda *_: calls.__setitem__("blocks", calls["blocks"] + 1)) for b in model.layers]
    hooks += [
        b.attn.wk.register_forward_hook(lambda *_: calls.__setitem__("wk", calls["wk"] + 1)) for b in model.layers
    ]
    logits = model.logits

    def counted(*a, **k):
        calls["heads"] += 1
        return logits(*a, **k)

    monkeypatch.setattr(model, "logits", counted)
    try:
        _, counter = exit_generate(model, prompt, 12, thr, prefill="tokens")
    finally:
        for h in hooks:
            h.remove()
    assert len(counter.exits) > 1  # some tokens stopped early, some did not: the case worth counting
    assert calls["blocks"] == int(counter.layers.sum()) and calls["heads"] == int(counter.heads.sum())
    assert calls["wk"] == int(counter.layers.sum() + counter.kv.sum())  # every layer of every token, run or filled
    assert counter.tokens == len(prompt) + 11
    cost = ExitCost.of(model.cfg, 16)
    assert 0 < counter.relative(cost) < 1 + 2 * cost.head / cost.full


def test_one_pass_over_a_sequence_is_feeding_it_token_by_token(model):
    """What teacher-forced evaluation computes (one exit_forward over the window) is what generation runs."""
    seq = [7, 1, 30, 2, 55, 13, 8, 91, 4, 4, 26, 70, 3, 33, 12, 60]
    thr = split(margins_seen(model, seq[:4]))
    with torch.no_grad():
        whole = exit_forward(model, torch.tensor([seq]), thr)
        cache = KVCache.allocate(model.cfg, model.full, 1, len(seq))
        steps = [exit_forward(model, torch.tensor([[t]]), thr, cache, i) for i, t in enumerate(seq)]
    assert len(set(whole.depth[0].tolist())) > 1
    assert whole.depth[0].tolist() == [int(s.depth) for s in steps]
    torch.testing.assert_close(whole.logits[0], torch.cat([s.logits[0] for s in steps]), rtol=1e-4, atol=1e-4)
    assert torch.equal(whole.ran[0], torch.cat([s.ran[0] for s in steps]))


def test_a_batch_row_does_what_it_would_alone(model):
    """Rows exit at different depths in one batch; each gets the tokens, depths and counts of its own run."""
    prompts = [[7, 1, 30, 2], [5, 17, 3, 44, 9, 60], [88, 12, 4]]
    thr = split(margins_seen(model, prompts[0]))
    alone = [exit_generate(model, p, 10, thr, prefill="tokens") for p in prompts]
    from matryoshka_lm.infer.forward import left_padded

    idx, pad = left_padded(prompts, "cpu")
    P = idx.shape[1]
    cache = KVCache.allocate(model.cfg, model.full, 3, P + 10, pad=pad)
    counter = ExitCounter.zeros(3, model.cfg.n_layers)
    with torch.no_grad():
        res = exit_forward(model, idx, thr, cache, 0)
        real = torch.arange(P)[None] >= pad[:, None]  # the pad slots' own tokens are not counted
        res.ran, res.asked = res.ran & real[..., None], res.asked * real
        counter.add(res)
        counter.kv -= (~real).long().sum(1, keepdim=True)
        got = []
        for t in range(10):
            tok = res.logits[:, -1].argmax(-1, keepdim=True)
            got.append(tok[:, 0].tolist())
            if t < 9:
                res = exit_forward(model, tok, thr, cache, P + t)
                counter.add(res)
    for j, (toks, c) in enumerate(alone):
        assert [g[j] for g in got] == toks
        assert torch.equal(counter.layers[j], c.layers[0]) and torch.equal(counter.kv[j], c.kv[0])
        assert counter.heads[j] == c.heads[0]


def test_the_policy_at_its_ends_scores_as_the_labels_do(model):
    tokens = np.random.default_rng(0).integers(0, 97, 4000)
    queries = make_queries(tokens, 12, window=40, cont=8)
    specs = candidate_specs(model)
    names = [s.name for s in specs]
    labels = label(model, queries, specs)
    pol = exit_policy(model, queries, thresholds=(0.0, NEVER))
    np.testing.assert_allclose(pol.nll[1], labels.nll[:, names.index("XL")], rtol=1e-5)
    np.testing.assert_allclose(pol.nll[0], labels.nll[:, names.index("E1")], rtol=1e-5)
    total = queries.prompt_lens.numpy() + queries.cont
    np.testing.assert_allclose(pol.work[1], total)  # never asking costs what always-full costs
    assert (pol.work[0] < total).all() and pol.exits[0] == {1: 1.0} and pol.exits[1] == {6: 1.0}


def test_bad_exit_points_are_refused(model):
    with pytest.raises(MatryoshkaError, match="exit points"):
        exit_forward(model, torch.tensor([[1]]), 0.5, points=[2, 3])
    with pytest.raises(MatryoshkaError, match="exit points"):
        exit_forward(model, torch.tensor([[1]]), 0.5, points=[3, 1, 6])
    with pytest.raises(MatryoshkaError, match="max_seq_len"):
        exit_generate(model, [1] * 60, 10, 0.5)
    queries = make_queries(np.arange(200) % 97, 2, window=40, cont=8)
    w, q, ex = exit_run(model, queries, NEVER, [6])
    assert ex == {6: int(queries.prompt_lens.sum()) + 16} and np.isfinite(q).all() and (w > 0).all()


def test_route_eval_measures_the_early_exit_beside_the_router(tmp_path, corpus_file, capsys):
    from _tiny_ckpt import make_checkpoint
    from matryoshka_lm.cli import main

    ckpt = make_checkpoint(
        tmp_path / "ck", corpus_file, n_layers=4, sizes={"XL": {"depth": "1"}, "E2": {"depth": "1/2"}}
    )
    common = ["--queries", "24", "--data", str(corpus_file)]
    assert main(["route", "fit", str(ckpt), "--window", "40", "--cont", "8", *common]) == 0
    js = tmp_path / "rep.json"
    assert main(["route", "eval", str(ckpt), "--bootstrap", "5", "--json", str(js), *common]) == 0
    out = capsys.readouterr().out
    assert "early exit (margin): setting, compute, NLL" in out and "APGR early exit (margin) - fixed sizes" in out
    assert "label reliability (split-half gap, Spearman-Brown): E2 " in out
    rep = json.loads(js.read_text())
    pts = rep["per_token"]["early exit (margin)"]
    assert [p["setting"] for p in pts] == list(THRESHOLDS)
    assert pts[-1]["exits"] == {"4": 1.0} and pts[0]["exits"] == {"2": 1.0}
    assert pts[-1]["compute"] == pytest.approx(1.0) and pts[-1]["nll"] == pytest.approx(
        rep["fixed"]["always XL"]["nll"]
    )
    assert set(rep["minus_fixed_sizes"]) == {
        "learned",
        "confidence",
        "cheap",
        "early exit (margin)",
        "early exit (learned)",
    }
    learned = rep["per_token"]["early exit (learned)"]
    assert learned[-1]["setting"] is None and learned[-1]["compute"] == pytest.approx(1.0)
    assert main(["route", "eval", str(ckpt), "--bootstrap", "5", "--json", str(js), "--no-early-exit", *common]) == 0
    assert json.loads(js.read_text())["per_token"] == {}
    capsys.readouterr()
    gen = ["generate", str(ckpt), "--size", "exit", "--prompt", "The lambda", "--temperature", "0", "--max-new-tokens"]
    assert main([*gen, "8", "--tolerance", "0.05"]) == 0
    cap = capsys.readouterr()
    from matryoshka_lm.core.checkpoint import load_model, load_tokenizer

    tok = load_tokenizer(ckpt)
    model, ids = load_model(ckpt), tok.encode("The lambda").ids
    want, _ = exit_generate(
        model, ids, 8, 0.05, probe=ExitProbe.load(ckpt), stop_tokens=[tok.token_to_id("<|endoftext|>")]
    )
    assert cap.out == "The lambda" + tok.decode(want) + "\n" and "exit: τ=0.05; tokens stopped at depth" in cap.err
    (ckpt / "exit_probe.json").unlink()
    assert main([*gen, "8"]) == 2
    assert "needs an exit probe" in capsys.readouterr().err


@pytest.fixture(scope="module")
def probe(model):
    tokens = np.random.default_rng(1).integers(0, 97, 6000)
    return fit_exit_probe(model, make_queries(tokens, 40, window=40, cont=8).windows, [1, 3])


def test_the_probes_targets_are_the_per_token_gaps_the_labels_average(model):
    tokens = np.random.default_rng(2).integers(0, 97, 3000)
    queries = make_queries(tokens, 6, window=40, cont=8)
    x, gaps = probe_data(model, queries.windows, [1])
    specs = candidate_specs(model)
    labels = label(model, queries, specs)
    names = [s.name for s in specs]
    per_window = gaps[0].view(6, 39)
    pos = torch.arange(39)[None]
    p = queries.prompt_lens[:, None]
    scored = (pos >= p - 1) & (pos < p - 1 + 8)
    want = labels.nll[:, names.index("E1")] - labels.nll[:, names.index("XL")]
    np.testing.assert_allclose((per_window * scored).sum(1).numpy() / 8, want, rtol=1e-4, atol=1e-5)
    assert x.shape == (1, 6 * 39, 48)


def test_the_learned_rule_at_its_ends_and_its_counts(model, probe, tmp_path, monkeypatch):
    prompt = [5, 17, 3, 44, 9]
    assert exit_generate(model, prompt, 12, NEVER_TAU, probe=probe)[0] == generate(model, [prompt], None, 12)[0].tokens
    lenient, counter = exit_generate(model, prompt, 12, float("inf"), probe=probe)
    assert lenient == generate(model, [prompt], uniform_spec(model.cfg, "E1"), 12)[0].tokens
    assert int(counter.heads.sum()) == counter.tokens  # one head per token, where it stops
    probe.save(tmp_path)
    again = ExitProbe.load(tmp_path)
    x, _ = probe_data(model, torch.tensor([prompt * 4]), [1, 3])
    taus = sorted(probe.gap(0, x[0]).tolist())
    tau = (taus[len(taus) // 2 - 1] + taus[len(taus) // 2]) / 2
    got, counter = exit_generate(model, prompt, 12, tau, probe=probe)
    got_again, counter_again = exit_generate(model, prompt, 12, tau, probe=again)
    assert (got_again, counter_again.exits) == (got, counter.exits) and len(counter.exits) > 1
    assert int(counter.heads.sum()) == counter.tokens and int(counter.probes.sum()) >= counter.tokens
    assert ExitProbe.load(tmp_path / "none") is None
    (tmp_path / "exit_probe.json").write_text('{"version": 99}')
    with pytest.raises(MatryoshkaError, match="not a version-1 exit probe"):
        ExitProbe.load(tmp_path)


def test_a_batched_prefill_gives_the_tokens_and_counts_of_feeding_the_prompt_alone(model):
    prompt = [7, 1, 30, 2, 55, 13, 8, 91, 4]
    thr = split(margins_seen(model, prompt))
    fast, slow = exit_generate(model, prompt, 10, thr), exit_generate(model, prompt, 10, thr, prefill="tokens")
    assert fast[0] == slow[0] and fast[1].exits == slow[1].exits and len(slow[1].exits) > 1
    assert torch.equal(fast[1].layers, slow[1].layers) and torch.equal(fast[1].heads, slow[1].heads)
    with pytest.raises(MatryoshkaError, match="prefill must be"):
        exit_generate(model, prompt, 2, thr, prefill="eager")


def test_the_cost_parts_add_up_to_the_flops_formula(model):
    from matryoshka_lm.core.spec import flops_per_token, full_spec

    cfg = model.cfg
    cost = ExitCost.of(cfg, 40)
    assert sum(cost.layer) + cost.head == pytest.approx(cost.full) == flops_per_token(cfg, full_spec(cfg), 40)
    kv_width = cfg.n_kv_heads * cfg.head_dim  # keys, and as many values: 2 FLOPs per weight
    assert cost.kv == [2.0 * cfg.d_model * 2 * kv_width] * cfg.n_layers and cost.probe == 4.0 * cfg.d_model
    with torch.no_grad():
        full = exit_forward(model, torch.tensor([[3, 4, 5]]), NEVER)
        first = exit_forward(model, torch.tensor([[3, 4, 5]]), 0.0)
    assert full.flops(cost)[0].tolist() == pytest.approx([cost.full] * 3)
    want = cost.layer[0] + sum(cost.kv[1:]) + cost.head  # the first layer, keys/values of the rest, one head
    assert first.flops(cost)[0].tolist() == pytest.approx([want] * 3)
