"""`matryoshka harness`: our lm-eval model scores what the model computes, and the shipped offline tasks run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from _tiny_ckpt import make_checkpoint  # noqa: E402
from matryoshka_lm.cli.main import main  # noqa: E402
from matryoshka_lm.core import checkpoint as ck  # noqa: E402
from matryoshka_lm.core.spec import parse_spec  # noqa: E402
from matryoshka_lm.data import EOT  # noqa: E402
from matryoshka_lm.eval.harness import MatryoshkaHarnessLM, format_tables, run_harness  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file):
    return make_checkpoint(tmp_path_factory.mktemp("harness") / "ckpt", corpus_file)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return ck.load_model(ckpt), ck.load_tokenizer(ckpt)


def request(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_logprob(model, spec, tokens: list[int], n_scored: int) -> float:
    """Sum of log p of the last n_scored tokens of `tokens`, each given all before it (one forward pass of all but
    the last token)."""
    idx = torch.tensor([tokens[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(model(idx, spec).float(), dim=-1)[0]
    T = len(tokens)
    return sum(float(logp[t - 1, tokens[t]]) for t in range(T - n_scored, T))


@pytest.mark.parametrize("size", ["XL", "S"])
def test_loglikelihood_is_the_log_softmax_sum(loaded, size):
    model, tok = loaded
    spec = parse_spec(model.cfg, size)
    lm = MatryoshkaHarnessLM(model, tok, spec, batch_size=2)  # 2: a batch mixes lengths (right padding)
    pairs = [
        ("The object of", " the function is"),
        ("Return a new", " list"),
        ("", "Hello world"),  # empty context: conditioned on <|endoftext|>
        ("A much longer context that tells us about modules and classes.", " It ends here."),
    ]
    got = lm.loglikelihood([request("loglikelihood", p) for p in pairs])
    eot = tok.token_to_id(EOT)
    for (ctx, cont), (score, greedy) in zip(pairs, got):
        whole = tok.encode(ctx + cont).ids
        n = len(whole) - len(tok.encode(ctx).ids) if ctx else len(whole)
        tokens = whole if ctx else [eot] + whole
        assert score == pytest.approx(direct_logprob(model, spec, tokens, n), abs=1e-4)
        assert isinstance(greedy, bool)


def test_loglikelihood_rolling_sums_the_windows(loaded):
    model, tok = loaded
    spec = parse_spec(model.cfg, "M")
    lm = MatryoshkaHarnessLM(model, tok, spec)
    text = "Classes provide a means of bundling data and functionality together. " * 6
    ids = tok.encode(text).ids
    L = model.cfg.max_seq_len
    assert len(ids) > 2 * L  # several windows
    # disjoint windows of L tokens: the first conditioned on EOT, each later one on the L tokens before it
    expected = direct_logprob(model, spec, [tok.token_to_id(EOT)] + ids[:L], L)
    for start in range(L, len(ids), L):
        end = min(start + L, len(ids))
        expected += direct_logprob(model, spec, ids[end - 1 - L : end], end - start)
    (got,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", (text,))])
    assert got == pytest.approx(expected, rel=1e-5)


def test_generate_until_stops_at_the_stop_string(loaded):
    model, tok = loaded
    lm = MatryoshkaHarnessLM(model, tok, "S")
    (free,) = lm.generate_until([request("generate_until", ("The function", {"max_gen_toks": 12}))])
    assert free
    stop = free[len(free) // 2 :][:2]
    (cut,) = lm.generate_until([request("generate_until", ("The function", {"until": [stop], "max_gen_toks": 12}))])
    assert cut == free[: free.find(stop)]


def test_run_harness_on_the_shipped_tasks(ckpt, tmp_path):
    res = run_harness(ckpt, ["XL", "S"], ["matryoshka_ppl", "matryoshka_cloze"], limit=3, out_json=tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text())["sizes"].keys() == {"XL", "S"}
    xl, s = (res["sizes"][n]["results"] for n in ("XL", "S"))
    for r in (xl, s):
        assert {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"} <= r["matryoshka_ppl"].keys()
        assert 0 <= r["matryoshka_cloze"]["acc,none"] <= 1 and "acc_norm,none" in r["matryoshka_cloze"]
    assert xl["matryoshka_ppl"]["word_perplexity,none"] != s["matryoshka_ppl"]["word_perplexity,none"]
    tables = format_tables(res)
    assert tables.count("matryoshka_ppl") == 1 and "bits_per_byte" in tables and "acc_norm" in tables


def test_cli_prints_one_table_per_task(ckpt, capsys):
    argv = ["harness", str(ckpt), "--sizes", "XL;S,M,M,L", "--tasks", "matryoshka_cloze", "--limit", "2"]
    assert main(argv + ["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("matryoshka_cloze") and "matryoshka_ppl" not in out
    rows = [line.split()[0] for line in out.splitlines()[3:]]
    assert rows == ["XL", "S,M,M,L"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "matryoshka_nope"], "unknown task matryoshka_nope; available here: matryoshka_cloze"),
        (["--sizes", "XXL"], "unknown size 'XXL'"),
    ],
)
def test_bad_task_or_size_is_a_one_line_error(ckpt, capsys, args, message):
    assert main(["harness", str(ckpt), "--limit", "1", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_lm_eval_is_a_one_line_error(ckpt):
    """Without lm-eval installed (simulated: its import fails), the command says how to install it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['lm_eval'] = None; from matryoshka_lm.cli.main import main; "
        f"sys.exit(main(['harness', {str(ckpt)!r}, '--device', 'cpu']))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == 'error: lm-evaluation-harness is not installed: pip install "lm-eval>=0.4"'
