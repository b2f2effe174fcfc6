"""Browser-safe defaults of the server, against a real uvicorn: what a hostile web page can make a browser send
(cross-site text/plain or form POSTs, DNS-rebound Host names, CORS reads) must start no model work and read
nothing; the openai client, which sends application/json to 127.0.0.1, works as before."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import httpx
import pytest
import uvicorn
from test_serve import KEY, NAME, LoopbackServer, wait_healthy

from _tiny_ckpt import make_checkpoint
from matryoshka_lm.serve.app import create_app

openai = pytest.importorskip("openai")

BODY = {"model": f"{NAME}:S", "prompt": "Hi", "max_tokens": 2}
PAGE = "http://app.example:3000"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file):
    return make_checkpoint(tmp_path_factory.mktemp("security") / NAME, corpus_file)


@pytest.fixture(scope="module")
def server(ckpt):
    with LoopbackServer(create_app(ckpt)) as s:
        yield s


def port_of(server) -> int:
    return int(server.url.rpartition(":")[2])


def model_work(server) -> list[str]:
    """The /metrics lines that only model work writes: tokens processed, generation batches."""
    text = httpx.get(server.url + "/metrics").text
    return [x for x in text.splitlines() if x.startswith(("matryoshka_tokens_total", "matryoshka_batch_rows_count"))]


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    return err


# ---------------------------------------------------------------- Content-Type


@pytest.mark.parametrize(
    "content_type",
    ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])
def test_a_non_json_post_is_415_and_starts_nothing(server, path, content_type):
    before = model_work(server)
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = b'{"model": "tiny:S", "prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "input": "Hi"}'
    r = httpx.post(server.url + path, content=body, headers=headers, timeout=30)
    err = assert_error(r, 415, "unsupported_media_type")
    assert "application/json" in err["message"]
    assert (content_type or "no Content-Type") in err["message"]  # names what was received
    assert model_work(server) == before


def test_json_with_a_charset_is_served(server):
    r = httpx.post(
        server.url + "/v1/completions",
        content=httpx.Request("POST", "/", json=BODY).content,
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------- Host


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example", "127.0.0.2", ""])
def test_a_foreign_host_is_rejected_on_loopback(server, host):
    before = model_work(server)
    headers = {"Host": host.format(port=port_of(server))}
    for r in (
        httpx.get(server.url + "/v1/models", headers=headers),
        httpx.get(server.url + "/health", headers=headers),
        httpx.post(server.url + "/v1/completions", json=BODY, headers=headers, timeout=30),
    ):
        err = assert_error(r, 400, "invalid_host")
        assert "--allowed-host" in err["message"]
    assert model_work(server) == before


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:{port}", "127.0.0.1", "127.0.0.1:{port}", "[::1]:{port}"])
def test_loopback_names_are_accepted(server, host):
    r = httpx.post(server.url + "/v1/completions", json=BODY, headers={"Host": host.format(port=port_of(server))})
    assert r.status_code == 200, r.text


def test_allowed_hosts_admit_a_name(ckpt):
    with LoopbackServer(create_app(ckpt, allowed_hosts=["Model.Internal"])) as s:
        port = port_of(s)
        for host in ("model.internal", f"model.internal:{port}", f"localhost:{port}"):
            assert httpx.get(s.url + "/v1/models", headers={"Host": host}).status_code == 200, host
        assert_error(httpx.get(s.url + "/v1/models", headers={"Host": "evil.example"}), 400, "invalid_host")
        assert_error(httpx.get(s.url + "/v1/models", headers={"Host": "model.internal:x"}), 400, "invalid_host")


def _public_address() -> str | None:
    """This machine's address on its default route, if it has one that is not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: picks the route, sends nothing
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


class AddressServer(LoopbackServer):
    """LoopbackServer on another address."""

    def __init__(self, app, addr: str):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((addr, 0))
        self.url = f"http://{addr}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)


def test_no_host_check_off_loopback_unless_hosts_are_given(ckpt):
    addr = _public_address()
    if addr is None:
        pytest.skip("no non-loopback address to bind")
    with AddressServer(create_app(ckpt), addr) as s:
        assert httpx.get(s.url + "/v1/models", headers={"Host": "model.example"}).status_code == 200
    with AddressServer(create_app(ckpt, allowed_hosts=["model.example"]), addr) as s:
        assert httpx.get(s.url + "/v1/models", headers={"Host": "model.example"}).status_code == 200
        assert_error(httpx.get(s.url + "/v1/models", headers={"Host": "evil.example"}), 400, "invalid_host")


# ---------------------------------------------------------------- CORS


def preflight(server, origin: str) -> httpx.Response:
    return httpx.options(
        server.url + "/v1/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization,x-stainless-lang",
        },
    )


def test_no_cors_by_default(server):
    r = preflight(server, PAGE)
    assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers
    r = httpx.post(server.url + "/v1/completions", json=BODY, headers={"Origin": PAGE}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_for_allowed_origins_only(ckpt):
    with LoopbackServer(create_app(ckpt, cors_origins=[PAGE])) as s:
        r = preflight(s, PAGE)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "x-stainless-lang" in r.headers["access-control-allow-headers"].lower()
        r = httpx.post(s.url + "/v1/completions", json=BODY, headers={"Origin": PAGE}, timeout=30)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE
        assert "x-matryoshka-size" in r.headers["access-control-expose-headers"].lower()
        other = "http://evil.example"
        assert "access-control-allow-origin" not in preflight(s, other).headers
        r = httpx.post(s.url + "/v1/completions", json=BODY, headers={"Origin": other}, timeout=30)
        assert "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------- API key, and the openai client


def test_api_key_then_content_type(ckpt):
    with LoopbackServer(create_app(ckpt, api_key=KEY)) as s:
        url = s.url + "/v1/completions"
        for auth in ({}, {"Authorization": "Bearer " + KEY[:-1]}, {"Authorization": "Bearer " + KEY + "x"}):
            assert_error(httpx.post(url, json=BODY, headers=auth, timeout=30), 401, "invalid_api_key")
            # a stranger's text/plain POST learns nothing beyond the missing key
            r = httpx.post(url, content=b"{}", headers={**auth, "Content-Type": "text/plain"}, timeout=30)
            assert_error(r, 401, "invalid_api_key")
        good = {"Authorization": "Bearer " + KEY}
        assert httpx.post(url, json=BODY, headers=good, timeout=30).status_code == 200
        r = httpx.post(url, content=b"{}", headers={**good, "Content-Type": "text/plain"}, timeout=30)
        assert_error(r, 415, "unsupported_media_type")
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert client.completions.create(model=f"{NAME}:S", prompt="x", max_tokens=2).usage.completion_tokens >= 1
        chat = client.chat.completions.create(
            model=f"{NAME}:S", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert chat.choices[0].message.role == "assistant"
        assert len(client.embeddings.create(model=f"{NAME}:S", input="x").data[0].embedding) > 0


def test_cli_allowed_host_and_cors_origin(ckpt):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    args = ["--allowed-host", "model.internal", "--allowed-host", "other.internal", "--cors-origin", PAGE]
    proc = subprocess.Popen(
        [sys.executable, "-m", "matryoshka_lm.cli", "serve", str(ckpt), "--port", str(port), "--device", "cpu", *args],
        env={k: v for k, v in os.environ.items() if k != "MATRYOSHKA_API_KEY"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url)
        for host in ("model.internal", f"other.internal:{port}"):
            assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"Host": "evil.example"}).status_code == 400
        r = httpx.get(url + "/v1/models", headers={"Origin": PAGE})
        assert r.headers["access-control-allow-origin"] == PAGE
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
