"""Property-based API testing with schemathesis against a real uvicorn server: every request body the OpenAPI
document declares (and many it forbids) gets an answer that is not a server error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from _loopback import LoopbackServer
from _tiny_ckpt import make_checkpoint
from matryoshka_lm.serve.app import create_app

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server(tmp_path_factory, corpus_file):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("schema") / "tiny", corpus_file)
    # small limits keep every generated request cheap: 8 tokens at most, small bodies
    with LoopbackServer(create_app(ckpt, max_tokens_limit=8, max_body_bytes=16 * 1024)) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_the_openapi_document_declares_every_request_body(server):
    import httpx

    doc = httpx.get(server.url + "/openapi.json").json()
    for path, model in (
        ("/v1/completions", "prompt"),
        ("/v1/chat/completions", "messages"),
        ("/v1/embeddings", "input"),
    ):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert model in body["properties"] and "model" in body["properties"]
    assert "StreamOptions" in doc["components"]["schemas"] and "ChatMessage" in doc["components"]["schemas"]


def test_every_route_documents_the_response_model_it_returns(server):
    """The routes return protocol models, so the document's 200 bodies are those models, every field a reply
    always sends required and the ones it omits (a chunk's usage, a card's auto-only fields) optional."""
    import httpx

    doc = httpx.get(server.url + "/openapi.json").json()
    for path, method, model in (
        ("/health", "get", "Health"),
        ("/v1/models", "get", "ModelList"),
        ("/v1/models/{model_id}", "get", "ModelCard"),
        ("/v1/completions", "post", "Completion"),
        ("/v1/chat/completions", "post", "ChatCompletion"),
        ("/v1/embeddings", "post", "EmbeddingList"),
    ):
        ok = doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{model}"}, (path, ok)
    schemas = doc["components"]["schemas"]
    assert set(schemas["Completion"]["required"]) == set(schemas["Completion"]["properties"])
    card = schemas["ModelCard"]
    assert "bits" in card["required"] and not {"description", "router"} & set(card["required"])


def test_no_request_the_schema_allows_gets_a_5xx(api_schema):
    """Every operation, with bodies drawn from its schema (hypothesis, through schemathesis): never a 5xx, only
    documented status codes and content types, and every body matches its documented schema.
    (schemathesis' pytest plugin does not run under this pytest; its strategies do.)"""
    ran, calls = [], []
    for result in api_schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            calls.append(case.call_and_validate(checks=CHECKS, timeout=60).status_code)

        check()
        ran.append(op.path)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings"} <= set(ran)
    assert len(calls) >= 3 * 10 and any(c == 200 for c in calls), calls  # real requests, some accepted
