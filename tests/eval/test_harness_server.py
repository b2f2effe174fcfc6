"""lm-evaluation-harness's own `local-completions` backend against a real uvicorn server (echo + logprobs in the
legacy completions shape): on the shipped perplexity task it measures what the in-process evaluation measures,
at two sizes."""

from __future__ import annotations

import json
import shutil

import pytest

from _loopback import LoopbackServer
from _tiny_ckpt import make_checkpoint
from matryoshka_lm.core.checkpoint import TOKENIZER, load_model, load_tokenizer
from matryoshka_lm.data import EOT
from matryoshka_lm.serve.app import create_app

pytestmark = pytest.mark.slow  # an end-to-end pipeline (still run by `make test`)

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API backends (the lm-eval[api] extra)
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file):
    return make_checkpoint(tmp_path_factory.mktemp("harness-server") / "tiny", corpus_file)


@pytest.fixture(scope="module")
def server(ckpt):
    with LoopbackServer(create_app(ckpt, name="tiny")) as s:
        yield s


@pytest.fixture(scope="module")
def hf_tokenizer(ckpt, tmp_path_factory):
    """Our tokenizer.json as a folder transformers' AutoTokenizer loads (lm-eval counts context tokens with it)."""
    d = tmp_path_factory.mktemp("tok")
    shutil.copy(ckpt / TOKENIZER, d / TOKENIZER)
    (d / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "model_max_length": 10**6})
    )
    return d


def perplexity(lm, limit: int = 4) -> dict:
    from lm_eval import simple_evaluate

    from matryoshka_lm.eval.harness import task_manager

    res = simple_evaluate(
        model=lm,
        tasks=["matryoshka_ppl"],
        limit=limit,
        task_manager=task_manager(["matryoshka_ppl"]),
        bootstrap_iters=0,
        log_samples=False,
    )
    return res["results"]["matryoshka_ppl"]


@pytest.mark.parametrize("size", ["XL", "S@int4"])
def test_local_completions_against_the_server_equals_in_process(server, ckpt, hf_tokenizer, size):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from matryoshka_lm.eval.harness import MatryoshkaHarnessLM

    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    ctx = model.cfg.max_seq_len
    remote = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions",
        model=f"tiny:{size}",
        tokenizer=str(hf_tokenizer),
        tokenizer_backend="huggingface",
        max_length=ctx,  # lm-eval's API backend keeps a slot to generate and scores windows of max_length - 2
        custom_prefix_token_id=tok.token_to_id(EOT),
        max_retries=1,
        num_concurrent=1,
    )
    local = MatryoshkaHarnessLM(model, tok, size, max_length=ctx - 2)  # the same windows
    got, want = perplexity(remote), perplexity(local)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert got[metric] == pytest.approx(want[metric], rel=1e-4), (metric, got, want)
    assert want["word_perplexity,none"] > 1
