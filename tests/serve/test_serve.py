"""The OpenAI-compatible server as users meet it: a real uvicorn on a loopback port, the real `openai` client.

Greedy answers must equal what the engine produces for that size directly, alone or batched with others; bad
input must get an OpenAI-style 4xx, never a 5xx.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _loopback import LoopbackServer
from _tiny_ckpt import make_checkpoint
from _tiny_router import length_router, predicted_gaps
from matryoshka_lm.core.checkpoint import load_model, load_tokenizer
from matryoshka_lm.core.spec import parse_spec
from matryoshka_lm.embed import Embedder, embed_texts
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.sampling import GREEDY, Sampling
from matryoshka_lm.serve.app import create_app
from matryoshka_lm.serve.protocol import CHAT_STOPS, chat_prompt

openai = pytest.importorskip("openai")

NAME = "tiny"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / NAME, corpus_file)


@pytest.fixture(scope="module")
def server(ckpt):
    # a batching window long enough that requests sent together reliably share a batch
    app = create_app(ckpt, batch_window_s=0.05, max_body_bytes=64 * 1024)
    with LoopbackServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(ckpt):
    """The same checkpoint, loaded separately, for direct engine references."""
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    return Engine(model), tok


def engine_text(local, prompt: str, size: str, max_tokens: int, stops=()) -> str:
    engine, tok = local
    eot = tok.token_to_id("<|endoftext|>")
    spec = parse_spec(engine.cfg, size)
    done = engine.generate(
        [tok.encode(prompt).ids], spec, max_tokens, GREEDY, stop_tokens=[eot], stop_strings=stops, decode=tok.decode
    )
    return done[0].text


# ---------------------------------------------------------------- the openai client


def test_models_lists_every_size_its_cells_and_auto(client):
    models = client.models.list().data
    sizes = ["XL", "L", "M", "S"]
    cells = [f"{s}@int{b}" for b in (8, 4, 2) for s in sizes]
    assert [m.id for m in models] == [f"{NAME}:{s}" for s in sizes + cells] + [f"{NAME}:auto"]
    card = {m.id: m for m in models}
    assert card[f"{NAME}:M"].bits is None and card[f"{NAME}:M@int4"].bits == 4
    assert card[f"{NAME}:M@int2"].weight_bytes < card[f"{NAME}:M@int4"].weight_bytes < card[f"{NAME}:M"].weight_bytes
    assert client.models.retrieve(f"{NAME}:S,M,L,XL").id.startswith(f"{NAME}:")
    assert client.models.retrieve(f"{NAME}:S,M,L,XL@int4").bits == 4


def test_a_bad_bit_width_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError, match="int1"):
        client.completions.create(model=f"{NAME}:M@int1", prompt="The", max_tokens=2)


@pytest.mark.parametrize("size", ["M", "S,M,L,XL", "M@int4", "S,M,L,XL@int2"])
def test_completion_equals_engine(client, local, size):
    r = client.completions.create(model=f"{NAME}:{size}", prompt="The class statement", max_tokens=12, temperature=0)
    assert r.choices[0].text == engine_text(local, "The class statement", size, 12)
    served = parse_spec(local[0].cfg, r.model.split(":", 1)[1])
    assert served == parse_spec(local[0].cfg, size)
    assert r.usage.prompt_tokens == len(local[1].encode("The class statement").ids)
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_auto_is_the_full_size_and_says_so(client, local):
    r = client.completions.create(model=f"{NAME}:auto", prompt="Lists", max_tokens=6, temperature=0)
    assert r.model == f"{NAME}:XL"
    assert r.choices[0].text == engine_text(local, "Lists", "XL", 6)


def test_chat_uses_the_documented_template(client, local):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    r = client.chat.completions.create(model=f"{NAME}:L", messages=messages, max_tokens=10, temperature=0)
    prompt = chat_prompt([(m["role"], m["content"]) for m in messages])
    assert prompt == "System: Be brief.\nUser: What is a list?\nAssistant:"
    assert r.choices[0].message.role == "assistant"
    raw = engine_text(local, prompt, "L", 10, CHAT_STOPS)
    # the reply is the model's continuation without the space the template's "Assistant:" leaves before it
    assert r.choices[0].message.content == raw.lstrip() and not r.choices[0].message.content[:1].isspace()
    assert r.usage.prompt_tokens == len(local[1].encode(prompt).ids)


def test_streaming_joins_to_the_whole_answer(client):
    kw = dict(model=f"{NAME}:S", prompt="A function", max_tokens=15, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 15

    messages = [{"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(model=f"{NAME}:M", messages=messages, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(model=f"{NAME}:M", messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_and_seeds(client, local):
    base = engine_text(local, "The class statement", "XL", 20)
    stop = base[4:6]  # a string the greedy answer is known to contain
    r = client.completions.create(
        model=f"{NAME}:XL", prompt="The class statement", max_tokens=20, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == engine_text(local, "The class statement", "XL", 20, [stop])
    assert stop not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    kw = dict(model=f"{NAME}:M", prompt="Sampling", max_tokens=12, temperature=1.0, top_p=0.9)
    a, b = (client.completions.create(**kw, seed=7).choices[0].text for _ in range(2))
    assert a == b


def test_n_choices_and_prompt_arrays(client, local):
    r = client.completions.create(model=f"{NAME}:M", prompt=["One", "Two words"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == engine_text(local, "One", "M", 5)
    assert r.choices[2].text == engine_text(local, "Two words", "M", 5)
    ids = local[1].encode("One").ids
    r2 = client.completions.create(model=f"{NAME}:M", prompt=ids, max_tokens=5, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_embeddings_are_truncated_unit_vectors(client, local):
    engine, tok = local
    texts = ["a short text", "another, somewhat longer text about classes"]
    for fmt in ("base64", "float"):  # the client asks for base64 unless told
        kw = {} if fmt == "base64" else {"encoding_format": "float"}
        r = client.embeddings.create(model=f"{NAME}:M", input=texts, dimensions=8, **kw)
        vecs = np.array([d.embedding for d in r.data])
        assert vecs.shape == (2, 8)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
        ref = embed_texts(Embedder(engine.model), tok, texts, parse_spec(engine.cfg, "M"), 8)
        np.testing.assert_allclose(vecs, ref, atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(tok.encode(t).ids) for t in texts)
    full = client.embeddings.create(model=f"{NAME}:S", input="x", encoding_format="float").data[0].embedding
    assert len(full) == parse_spec(engine.cfg, "S").width


# ---------------------------------------------------------------- speculative decoding


@pytest.mark.parametrize("size,draft", [("XL", "S"), ("XL", "XL,XL"), ("L", "L,L@int8")])
def test_a_draft_decodes_speculatively_and_losslessly(server, client, local, size, draft):
    """The draft field: the answer is the size's own greedy output, and the drafted tokens were really verified
    (the speculative counters moved). "XL,XL" is the early-exit draft that reuses the target's cache."""
    registry = server.app.state.server.metrics.registry
    label = {"size": size, "kind": "drafted"}
    before = registry.get_sample_value("matryoshka_speculative_tokens_total", label) or 0
    prompt = "The class statement"
    r = client.completions.create(
        model=f"{NAME}:{size}", prompt=prompt, max_tokens=20, temperature=0, extra_body={"draft": draft}
    )
    assert r.choices[0].text == engine_text(local, prompt, size, 20)
    assert r.usage.completion_tokens == 20
    assert (registry.get_sample_value("matryoshka_speculative_tokens_total", label) or 0) > before
    chunks = client.completions.create(
        model=f"{NAME}:{size}", prompt=prompt, max_tokens=20, temperature=0, stream=True, extra_body={"draft": draft}
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_speculative_and_batched_requests_in_flight_at_once(client, local):
    jobs = [("XL", "One", "XL,XL"), ("XL", "Two words here", None), ("M", "A function", "S"), ("M", "Four", None)]

    def ask(job):
        size, prompt, draft = job
        extra = {"draft": draft} if draft else {}
        return client.chat.completions.create(
            model=f"{NAME}:{size}",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=16,
            temperature=0,
            extra_body=extra,
        )

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(ask, jobs))
    for (size, prompt, _), r in zip(jobs, results):
        raw = engine_text(local, chat_prompt([("user", prompt)]), size, 16, CHAT_STOPS)
        assert r.choices[0].message.content == raw.lstrip(), (size, prompt)


def test_a_seeded_speculative_sample_is_reproducible(client):
    kw = dict(model=f"{NAME}:XL", prompt="Lists", max_tokens=12, temperature=0.9, seed=7, n=2)
    a = client.completions.create(**kw, extra_body={"draft": "XL,XL"})
    b = client.completions.create(**kw, extra_body={"draft": "XL,XL"})
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert all(c.finish_reason in ("stop", "length") for c in a.choices)


# ---------------------------------------------------------------- concurrency


def test_two_sizes_in_flight_at_once_equal_the_engine(client, local):
    jobs = [("XL", "The class statement", 24), ("S", "A function definition", 24)]

    def ask(job):
        size, prompt, n = job
        return client.completions.create(model=f"{NAME}:{size}", prompt=prompt, max_tokens=n, temperature=0)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(ask, jobs))
    for (size, prompt, n), r in zip(jobs, results):
        assert r.choices[0].text == engine_text(local, prompt, size, n)
        assert r.model == f"{NAME}:{size}"


def test_one_size_at_two_bit_widths_in_flight_at_once_never_share_weights(client, local):
    """Rows of L and L@int2 arrive together; a batch holds one cell, so each answer is its own cell's."""
    jobs = [(size, p) for p in ("One", "Two words here", "Three: a longer prompt") for size in ("L", "L@int2")]

    def ask(job):
        size, prompt = job
        return client.completions.create(model=f"{NAME}:{size}", prompt=prompt, max_tokens=12, temperature=0)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(ask, jobs))
    texts = {}
    for (size, prompt), r in zip(jobs, results):
        assert r.choices[0].text == engine_text(local, prompt, size, 12), (size, prompt)
        texts[size, prompt] = r.choices[0].text
    assert any(texts["L", p] != texts["L@int2", p] for _, p in jobs)  # the cells differ, so the test can fail


def shared_batches(server, size: str) -> float:
    """Generation batches of `size` started so far with two or more rows (from the batch-size histogram)."""
    registry = server.app.state.server.metrics.registry
    count = registry.get_sample_value("matryoshka_batch_rows_count", {"size": size}) or 0
    alone = registry.get_sample_value("matryoshka_batch_rows_bucket", {"size": size, "le": "1.0"}) or 0
    return count - alone


def test_same_size_requests_share_a_batch(server, client, local):
    prompts = ["One", "Two words here", "Three: a longer prompt of several tokens", "Four"]
    before = shared_batches(server, "L")
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(
            pool.map(
                lambda p: client.completions.create(model=f"{NAME}:L", prompt=p, max_tokens=10, temperature=0), prompts
            )
        )
    assert shared_batches(server, "L") > before  # these requests, not earlier ones, were batched together
    for p, r in zip(prompts, results):
        assert r.choices[0].text == engine_text(local, p, "L", 10)


def test_a_disconnected_stream_does_not_stall_others(server, client):
    body = {"model": f"{NAME}:XL", "prompt": "Long", "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # read one event, then hang up
        t0 = time.perf_counter()
        other = client.completions.create(model=f"{NAME}:S", prompt="Other", max_tokens=5, temperature=0)
        assert other.choices[0].finish_reason == "length" and time.perf_counter() - t0 < 20
        deadline = time.monotonic() + 10
        while "matryoshka_disconnects_total" not in http.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline, "the dropped stream was never noticed"
            time.sleep(0.05)
    batcher = server.app.state.server.batcher
    deadline = time.monotonic() + 10
    while batcher.in_flight or batcher.waiting:  # the dropped row's batch ends instead of running on
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_slow_stream_reader_stalls_nobody_and_loses_nothing(server, client, local):
    body = {"model": f"{NAME}:M", "prompt": "Slow reader", "max_tokens": 30, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            t0 = time.perf_counter()  # this stream is not read while another request runs start to end
            other = client.completions.create(model=f"{NAME}:S", prompt="Other", max_tokens=10, temperature=0)
            assert other.choices[0].text == engine_text(local, "Other", "S", 10) and time.perf_counter() - t0 < 20
            time.sleep(0.3)
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == engine_text(local, "Slow reader", "M", 30)


# ---------------------------------------------------------------- bad input


def _completion(**kw):
    body = {"model": f"{NAME}:M", "prompt": "Hi", "max_tokens": 4}
    body.update(kw)
    return {k: v for k, v in body.items() if v is not ...}


BAD = [  # (id, path, raw body or JSON object, status, param)
    ("invalid-json", "/v1/completions", b'{"model": "tiny:M", "prompt": ', 400, None),
    ("nan", "/v1/completions", b'{"model": "tiny:M", "prompt": "a", "temperature": NaN}', 400, None),
    ("empty-body", "/v1/completions", b"", 400, None),
    ("not-an-object", "/v1/completions", [1, 2], 400, None),
    ("unknown-model", "/v1/completions", _completion(model="gpt-4o"), 404, "model"),
    ("other-name", "/v1/completions", _completion(model="llama:M"), 404, "model"),
    ("malformed-spec", "/v1/completions", _completion(model="tiny:M,Q"), 400, "model"),
    ("spec-too-deep", "/v1/completions", _completion(model="tiny:S,S,S,S,S,S"), 400, "model"),
    ("missing-model", "/v1/completions", _completion(model=...), 400, "model"),
    ("missing-prompt", "/v1/completions", _completion(prompt=...), 400, "prompt"),
    ("max-tokens-0", "/v1/completions", _completion(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", "/v1/completions", _completion(max_tokens=-3), 400, "max_tokens"),
    ("max-tokens-over-limit", "/v1/completions", _completion(max_tokens=10_000), 400, "max_tokens"),
    ("prompt-too-long", "/v1/completions", _completion(prompt="word " * 200), 400, "prompt"),
    ("token-out-of-vocab", "/v1/completions", _completion(prompt=[1, 2, 99999]), 400, "prompt"),
    ("draft-larger-than-size", "/v1/completions", _completion(model="tiny:S", draft="XL"), 400, "draft"),
    ("draft-malformed", "/v1/completions", _completion(draft="M,Q"), 400, "draft"),
    ("draft-not-a-string", "/v1/completions", _completion(draft=3), 400, "draft"),
    ("temperature-high", "/v1/completions", _completion(temperature=2.5), 400, "temperature"),
    ("temperature-negative", "/v1/completions", _completion(temperature=-0.1), 400, "temperature"),
    ("top-p-high", "/v1/completions", _completion(top_p=1.5), 400, "top_p"),
    ("top-p-negative", "/v1/completions", _completion(top_p=-1), 400, "top_p"),
    ("max-tokens-string", "/v1/completions", _completion(max_tokens="10"), 400, "max_tokens"),
    ("max-tokens-float", "/v1/completions", _completion(max_tokens=1.5), 400, "max_tokens"),
    ("temperature-string", "/v1/completions", _completion(temperature="hot"), 400, "temperature"),
    ("prompt-number", "/v1/completions", _completion(prompt=5), 400, "prompt"),
    ("prompt-empty-array", "/v1/completions", _completion(prompt=[]), 400, "prompt"),
    ("stream-string", "/v1/completions", _completion(stream="yes"), 400, "stream"),
    ("model-number", "/v1/completions", _completion(model=3), 400, "model"),
    ("stop-number", "/v1/completions", _completion(stop=7), 400, "stop"),
    ("too-many-stops", "/v1/completions", _completion(stop=list("abcde")), 400, "stop"),
    ("seed-string", "/v1/completions", _completion(seed="x"), 400, "seed"),
    ("n-zero", "/v1/completions", _completion(n=0), 400, "n"),
    ("logprobs-too-many", "/v1/completions", _completion(logprobs=21), 400, "logprobs"),
    ("logprobs-bool", "/v1/completions", _completion(logprobs=True), 400, "logprobs"),
    ("max-tokens-0-no-echo", "/v1/completions", _completion(max_tokens=0), 400, "max_tokens"),
    ("logprobs-stream", "/v1/completions", _completion(logprobs=1, stream=True), 400, "logprobs"),
    (
        "deep-nesting",
        "/v1/completions",
        b'{"model": "tiny:M", "prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        400,
        None,
    ),
    ("lone-surrogate", "/v1/completions", b'{"model": "tiny:M", "prompt": "a\\ud800b"}', 400, "prompt"),
    ("model-lone-surrogate", "/v1/completions", b'{"model": "x\\udc00", "prompt": "a"}', 404, "model"),
    ("too-many-choices", "/v1/completions", _completion(prompt=["a"] * 100, n=8), 400, "n"),
    ("huge-seed", "/v1/completions", _completion(seed=10**30), 400, "seed"),
    (
        "infinite-temperature",
        "/v1/completions",
        b'{"model": "tiny:M", "prompt": "a", "temperature": 1e400}',
        400,
        "temperature",
    ),
    ("oversize-body", "/v1/completions", _completion(prompt="x" * 100_000), 413, None),
    ("chat-missing-messages", "/v1/chat/completions", {"model": "tiny:M"}, 400, "messages"),
    ("chat-empty-messages", "/v1/chat/completions", {"model": "tiny:M", "messages": []}, 400, "messages"),
    (
        "chat-bad-role",
        "/v1/chat/completions",
        {"model": "tiny:M", "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "chat-content-number",
        "/v1/chat/completions",
        {"model": "tiny:M", "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    ("chat-message-string", "/v1/chat/completions", {"model": "tiny:M", "messages": ["hi"]}, 400, "messages[0]"),
    (
        "chat-max-completion-tokens-0",
        "/v1/chat/completions",
        {"model": "tiny:M", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    (
        "chat-image",
        "/v1/chat/completions",
        {
            "model": "tiny:M",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        },
        400,
        "messages[0].content[0]",
    ),
    ("embed-missing-input", "/v1/embeddings", {"model": "tiny:M"}, 400, "input"),
    (
        "embed-dims-too-large",
        "/v1/embeddings",
        {"model": "tiny:M", "input": "x", "dimensions": 10_000},
        400,
        "dimensions",
    ),
    ("embed-dims-zero", "/v1/embeddings", {"model": "tiny:M", "input": "x", "dimensions": 0}, 400, "dimensions"),
    (
        "embed-bad-format",
        "/v1/embeddings",
        {"model": "tiny:M", "input": "x", "encoding_format": "int8"},
        400,
        "encoding_format",
    ),
    ("embed-unknown-model", "/v1/embeddings", {"model": "bert", "input": "x"}, 404, "model"),
    ("embed-too-long", "/v1/embeddings", {"model": "tiny:M", "input": "word " * 200}, 400, "input"),
]


@pytest.mark.parametrize("path,body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_style_4xx(server, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_oversize_chunked_body_is_413(server):
    def chunks():
        for _ in range(100):
            yield b"x" * 1024

    headers = {"Content-Type": "application/json"}  # without it the answer is 415, before the body is read
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=headers, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_routes_and_methods(server):
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_client_raises_for_unknown_model(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=f"{NAME}:M", messages=[{"role": "user", "content": "x"}], temperature=9)


def test_the_model_field_is_resolved_once_per_request(server, monkeypatch):
    """One place (serving_models.Models.resolve) turns the model field into a size, once per request."""
    models = server.app.state.models
    seen = []

    def resolve(model):
        seen.append(model)
        return type(models).resolve(models, model)

    monkeypatch.setattr(models, "resolve", resolve)
    for path, body in (
        ("/v1/completions", {"prompt": "The", "max_tokens": 2, "echo": True, "logprobs": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        ("/v1/embeddings", {"input": ["a", "b"]}),
    ):
        seen.clear()
        r = httpx.post(server.url + path, json={"model": f"{NAME}:M", **body}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == f"{NAME}:M", r.text
        assert seen == [f"{NAME}:M"], (path, seen)


# ---------------------------------------------------------------- health, metrics


def test_health_and_metrics(server, client):
    client.completions.create(model=f"{NAME}:S", prompt="x", max_tokens=2, temperature=0)
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["sizes"] == ["XL", "L", "M", "S"]
    text = httpx.get(server.url + "/metrics").text
    for series in (
        'matryoshka_requests_total{endpoint="/v1/completions",size="S",status="200"}',
        'matryoshka_tokens_total{kind="completion",size="S"}',
        'matryoshka_request_latency_seconds_bucket{endpoint="/v1/completions",le="0.5",size="S"}',
        'matryoshka_time_to_first_token_seconds_count{size="S"}',
        "matryoshka_errors_total{",
        "matryoshka_batch_rows_bucket{",
        "matryoshka_queue_waiting ",
    ):
        assert series in text, series
    assert 'status="5' not in text  # nothing above ever produced a 5xx


# ---------------------------------------------------------------- API key


def test_api_key(ckpt):
    app = create_app(ckpt, api_key=KEY)
    with LoopbackServer(app) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(s.url + "/v1/completions", json={"model": "bad"})
        assert r.status_code == 401  # authentication comes before validation
        assert httpx.get(s.url + "/metrics").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=f"{NAME}:S", prompt="x", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()


# ---------------------------------------------------------------- the command line


def test_cli_serve_binds_loopback_and_stops(ckpt):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "MATRYOSHKA_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "matryoshka_lm.cli", "serve", str(ckpt), "--port", str(port), "--device", "cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert r.json()["data"][0]["id"] == f"{NAME}:XL"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it (exit status -15)
    assert "Finished server process" in out and "Traceback" not in out, out
    assert f"Uvicorn running on http://127.0.0.1:{port}" in out


# ---------------------------------------------------------------- fuzz: never a 5xx

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
_fields = [
    "prompt",
    "messages",
    "input",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stop",
    "seed",
    "dimensions",
    "encoding_format",
    "max_completion_tokens",
    "stream_options",
    "logprobs",
]
_small = st.one_of(
    _json, st.integers(0, 8), st.sampled_from(["x", "ab", ["a"], [1, 2], [{"role": "user", "content": "x"}]])
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]),
    model=st.sampled_from(["tiny:M", "tiny:S,M,L,XL", "tiny:auto", "S", "tiny:", "", "tiny:f8h2@d8"]),
    body=st.dictionaries(st.sampled_from(_fields), _small, max_size=6),
)
def test_fuzzed_bodies_never_get_a_5xx(server, path, model, body):
    r = httpx.post(server.url + path, json={"model": model, **body}, timeout=60)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------- NAME:auto with a size router

SHORT_IDS = [7, 30, 101, 5]  # 4 tokens: the hand-made router sends them to S at any τ > 0
LONG_IDS = [(11 * i + 3) % 250 for i in range(20)]  # 20 tokens: XL at τ 0.1 (its default), M at τ 0.5, S at 1e9


@pytest.fixture(scope="module")
def routed_ckpt(ckpt, tmp_path_factory) -> Path:
    """The same checkpoint with the length router of tests/_tiny_router.py saved beside it."""
    path = tmp_path_factory.mktemp("routed") / NAME
    shutil.copytree(ckpt, path)
    length_router(load_model(path).cfg).save(path)
    return path


@pytest.fixture(scope="module")
def routed_server(routed_ckpt):
    with LoopbackServer(create_app(routed_ckpt, batch_window_s=0.01)) as s:
        yield s


@pytest.fixture(scope="module")
def routed_client(routed_server):
    return openai.OpenAI(base_url=routed_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ids_text(local, ids: list[int], size: str, max_tokens: int) -> str:
    engine, tok = local
    eot = tok.token_to_id("<|endoftext|>")
    spec = parse_spec(engine.cfg, size)
    return engine.generate([ids], spec, max_tokens, GREEDY, stop_tokens=[eot], decode=tok.decode)[0].text


def auto_choices(server) -> dict[str, float]:
    """matryoshka_auto_choices_total per size label, from /metrics."""
    text = httpx.get(server.url + "/metrics").text
    found = re.findall(r'^matryoshka_auto_choices_total\{size="(\w+)"\} (\S+)$', text, re.M)
    return {size: float(v) for size, v in found}


def auto_compute(server) -> dict[str, float]:
    """matryoshka_auto_compute_total by kind (served, full), from /metrics."""
    text = httpx.get(server.url + "/metrics").text
    return {k: float(v) for k, v in re.findall(r'^matryoshka_auto_compute_total\{kind="(\w+)"\} (\S+)$', text, re.M)}


@pytest.mark.parametrize(
    ("model", "prompt", "size"),
    [
        ("auto", SHORT_IDS, "S"),
        ("auto", LONG_IDS, "XL"),
        ("auto@0.5", LONG_IDS, "M"),
        ("auto@tau=1e9", LONG_IDS, "S"),
        ("auto@budget=0.7", LONG_IDS, "M"),
        ("auto@0", SHORT_IDS, "XL"),
    ],
)
def test_auto_serves_each_prompt_at_the_size_the_router_picks(routed_server, routed_client, local, model, prompt, size):
    before, work = auto_choices(routed_server), auto_compute(routed_server)
    raw = routed_client.completions.with_raw_response.create(
        model=f"{NAME}:{model}", prompt=prompt, max_tokens=8, temperature=0
    )
    r = raw.parse()
    assert r.model == f"{NAME}:{size}" and raw.headers["X-Matryoshka-Size"] == size
    assert r.choices[0].text == ids_text(local, prompt, size, 8)
    after = auto_choices(routed_server)
    assert after[size] == before.get(size, 0) + 1
    assert sum(after.values()) == sum(before.values()) + 1
    # the compute saved: tokens at the chosen size's cost (S 0.25, M 0.5, XL 1) plus the small prefill unless reused
    tokens = len(prompt) + r.usage.completion_tokens
    cost = {"S": 0.25, "M": 0.5, "XL": 1.0}[size]
    overhead = 0.0 if size == "S" else 0.25 * len(prompt)
    now = auto_compute(routed_server)
    assert now["full"] - work.get("full", 0) == pytest.approx(tokens)
    assert now["served"] - work.get("served", 0) == pytest.approx(tokens * cost + overhead)


def test_auto_decodes_on_from_the_routers_prefill(routed_server, routed_client, local, monkeypatch):
    """Routed to the size the router prefilled with (S), the row decodes on from that prefill: no second prefill
    (Engine.token_steps, which prefills, is not called) and the same text as a plain generation at S."""
    engine = routed_server.app.state.server.engine
    calls = []
    real = engine.token_steps

    def counted(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("spec"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "token_steps", counted)
    for model, prompt, size, prefills in (("auto", SHORT_IDS, "S", 0), ("auto", LONG_IDS, "XL", 1)):
        r = routed_client.completions.create(model=f"{NAME}:{model}", prompt=prompt, max_tokens=8, temperature=0)
        assert r.model == f"{NAME}:{size}" and r.choices[0].text == ids_text(local, prompt, size, 8)
        assert len(calls) == prefills, (size, calls)
        calls.clear()


def test_auto_chat_and_several_prompts(routed_server, routed_client, local):
    messages = [{"role": "user", "content": "Hi"}]
    n = len(local[1].encode(chat_prompt([("user", "Hi")])).ids)
    gap_s, gap_m = predicted_gaps(n)
    want = "S" if gap_s < 0.1 else "M" if gap_m < 0.1 else "XL"
    r = routed_client.chat.completions.create(model=f"{NAME}:auto", messages=messages, max_tokens=4, temperature=0)
    assert r.model == f"{NAME}:{want}"
    # several prompts: one response names one size, the largest any prompt needs
    r = routed_client.completions.create(
        model=f"{NAME}:auto@0.5", prompt=[SHORT_IDS, LONG_IDS], max_tokens=5, temperature=0
    )
    assert r.model == f"{NAME}:M"
    assert [c.text for c in r.choices] == [ids_text(local, p, "M", 5) for p in (SHORT_IDS, LONG_IDS)]


def test_models_say_whether_auto_is_routed(server, routed_server, routed_client):
    routed = next(m for m in routed_client.models.list() if m.id == f"{NAME}:auto")
    assert routed.owned_by == "matryoshka-lm"  # still an OpenAI model object
    card = httpx.get(routed_server.url + f"/v1/models/{NAME}:auto@0.2").json()
    assert card["id"] == f"{NAME}:auto" and card["size"] == "auto"
    assert card["router"] == {"candidates": ["S", "M", "XL"], "kind": "learned", "tolerance": 0.1}
    plain = httpx.get(server.url + f"/v1/models/{NAME}:auto").json()
    assert plain["router"] is None and plain["size"] == "XL" and "no router" in plain["description"]


@pytest.mark.parametrize(
    ("knob", "words"),
    [
        ("-0.1", "tau must be a number >= 0"),
        ("nan", "tau must be a number >= 0"),
        ("tau=", "tau must be a number"),
        ("0.1x", "tau must be a number"),
        ("budget=0", "budget must be a mean compute fraction in (0, 1]"),
        ("budget=1.5", "budget must be a mean compute fraction in (0, 1]"),
        ("budget=nan", "budget must be a mean compute fraction in (0, 1]"),
        ("budget=0.1", "below the smallest mean compute"),
        ("speed=2", "unknown setting 'speed'"),
    ],
)
def test_bad_routing_settings_are_a_400_on_model(routed_client, knob, words):
    with pytest.raises(openai.BadRequestError) as e:
        routed_client.completions.create(model=f"{NAME}:auto@{knob}", prompt="Hi", max_tokens=2)
    err = e.value.body
    assert err["param"] == "model" and err["code"] == "invalid_model" and words in err["message"], err


def test_routing_settings_without_a_router_are_a_400(client):
    with pytest.raises(openai.BadRequestError, match="no router is saved"):
        client.completions.create(model=f"{NAME}:auto@0.1", prompt="Hi", max_tokens=2)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]),
    model=st.sampled_from(["tiny:auto", "tiny:auto@0.2", "tiny:auto@budget=0.7", "auto@x", "tiny:auto@", "auto"]),
    body=st.dictionaries(st.sampled_from(_fields), _small, max_size=6),
)
def test_fuzzed_auto_bodies_never_get_a_5xx(routed_server, path, model, body):
    r = httpx.post(routed_server.url + path, json={"model": model, **body}, timeout=60)
    assert r.status_code < 500, r.text


# ---------------------------------------------------------------- the sampling surface


def _post(server, **kw) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json=_completion(**kw), timeout=60)


@pytest.mark.parametrize("temperature", [1e-38, 1e-10, 1.0, 2.0])
def test_extreme_sampling_values_are_answered(server, ckpt, temperature):
    vocab = load_model(ckpt, "cpu").cfg.vocab_size
    for top_p in (1e-300, 1e-10, 0.5, 1.0):
        for top_k in (1, vocab):
            for min_p in (0.0, 1.0):
                r = _post(server, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=1)
                assert r.status_code == 200, (top_p, top_k, min_p, r.text)


def _greedy_ids(local, ids: list[int], n: int) -> list[int]:
    engine, _ = local
    return engine.generate([ids], parse_spec(engine.cfg, "M"), n, GREEDY)[0].tokens


def test_logit_bias_bans_and_forces_tokens(server, local):
    engine, tok = local
    ids = tok.encode("The class statement").ids
    first = _greedy_ids(local, ids, 1)[0]
    plain = _post(server, prompt=ids, max_tokens=1, temperature=0).json()["choices"][0]["text"]
    assert plain == tok.decode([first])
    ban = Sampling(0.0, logit_bias=((first, -100.0),))
    second = engine.generate([ids], parse_spec(engine.cfg, "M"), 1, ban)[0].tokens[0]
    assert second != first
    banned = _post(server, prompt=ids, max_tokens=1, temperature=0, logit_bias={str(first): -100})
    assert banned.status_code == 200 and banned.json()["choices"][0]["text"] == tok.decode([second])
    forced = tok.encode(" the").ids[0]
    r = _post(server, prompt=ids, max_tokens=3, temperature=1.0, seed=3, logit_bias={str(forced): 100})
    assert r.json()["choices"][0]["text"] == tok.decode([forced] * 3)


def test_stop_token_ids_and_ignore_eos(server, local):
    _, tok = local
    ids = tok.encode("The class statement").ids
    first = _greedy_ids(local, ids, 1)[0]
    r = _post(server, prompt=ids, max_tokens=8, temperature=0).json()["choices"][0]
    assert r["finish_reason"] == "length"
    r = _post(server, prompt=ids, max_tokens=8, temperature=0, stop_token_ids=[first]).json()["choices"][0]
    assert (r["text"], r["finish_reason"]) == ("", "stop")
    eot = {str(tok.token_to_id("<|endoftext|>")): 100}
    r = _post(server, prompt=ids, max_tokens=3, temperature=0, logit_bias=eot).json()["choices"][0]
    assert (r["text"], r["finish_reason"]) == ("", "stop")
    r = _post(server, prompt=ids, max_tokens=3, temperature=0, logit_bias=eot, ignore_eos=True).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    "field,value",
    [
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("repetition_penalty", 1.2),
        ("repetition_penalty", True),
        ("min_tokens", 3),
        ("presence_penalty", False),
    ],
)
def test_unsupported_sampling_fields_are_a_400_naming_them(server, field, value):
    r = _post(server, **{field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert "not supported" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "field,value", [("presence_penalty", 0), ("frequency_penalty", 0.0), ("repetition_penalty", 1), ("min_tokens", 0)]
)
def test_unsupported_fields_at_their_off_value_are_fine(server, field, value):
    assert _post(server, **{field: value}).status_code == 200


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream_options": {"include_usage": True}, "stream": False}, "stream_options"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 1, "05": 2}}, "logit_bias"),
        ({"stop_token_ids": [99999]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_bad_sampling_values_are_a_400_naming_the_field(server, kw, param):
    r = _post(server, **kw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].split(".")[0] == param


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 60.0) -> None:
    """Poll /health until a server process answers; fail with its output if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, f"no answer from {url} within {timeout} s"
        time.sleep(0.1)


# ---------------------------------------------------------------- echo and logprobs (prompt scoring, lm-eval)


def direct_logprobs(local, ids: list[int], size: str):
    """log p(ids[j] | ids[:j]) for j >= 1 from one forward of the locally loaded model."""
    import torch

    engine, _ = local
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids]), parse_spec(engine.cfg, size))[0, :-1]
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(), logp


@pytest.mark.parametrize("size", ["M", "L@int4"])
def test_echo_with_max_tokens_zero_scores_the_prompt(client, local, size):
    _, tok = local
    ids = tok.encode("The class statement defines a new class object").ids
    r = client.completions.create(model=f"{NAME}:{size}", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == tok.decode(ids) and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want, logp = direct_logprobs(local, ids, size)
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-4)
    for j, top in enumerate(lp.top_logprobs[1:]):  # the most likely token, and the token itself when it is not
        assert max(top.values()) == pytest.approx(float(logp[j].max()), abs=1e-4)
        assert lp.token_logprobs[j + 1] in top.values()
    assert lp.text_offset == [len(tok.decode(ids[:j])) for j in range(len(ids))]


def test_logprobs_of_generated_tokens_are_the_models(client, local):
    _, tok = local
    r = client.completions.create(model=f"{NAME}:S", prompt="A function", max_tokens=8, temperature=0, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text and len(lp.tokens) == r.usage.completion_tokens == 8
    prompt = tok.encode("A function").ids
    gen = tok.encode(c.text).ids
    want, _ = direct_logprobs(local, prompt + gen, "S")
    np.testing.assert_allclose(lp.token_logprobs, want[len(prompt) - 1 :], atol=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen == max(top.values())  # greedy: each token is the most likely
    assert lp.text_offset[0] == len("A function")


def test_logprobs_zero_still_reports_each_tokens_logprob(client):
    r = client.completions.create(model=f"{NAME}:M", prompt="The", max_tokens=3, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.token_logprobs) == 3 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 1 for top in lp.top_logprobs)


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(
        model=f"{NAME}:M",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content).lstrip() == r.choices[0].message.content
    for t in content:
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert t.logprob == t.top_logprobs[0].logprob and t.bytes == list(t.token.encode())
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model=f"{NAME}:M", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, top_logprobs=2
        )
