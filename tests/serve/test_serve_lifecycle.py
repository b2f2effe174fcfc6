"""The server's lifecycle against real servers: a non-streaming request whose client leaves stops generating, and
`matryoshka serve` drains on SIGTERM (accepted requests finish; past --drain-timeout they get a 503 JSON, streams an
error event and [DONE]).

Token steps are slowed down (a sleep after each) so that "during generation" is a wide, deterministic window."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_serve import LoopbackServer

from _tiny_ckpt import make_checkpoint
from matryoshka_lm.serve.app import create_app

pytestmark = pytest.mark.slow  # an end-to-end pipeline (still run by `make test`)

NAME = "tiny"
# greedy, and <|endoftext|> ignored, so every row runs to max_tokens unless cancelled
BODY = {"model": f"{NAME}:S", "prompt": "The", "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("lifecycle") / NAME, corpus_file)


def slow_steps(engine, delay: float, steps: list[int]) -> None:
    """Make engine.token_steps sleep `delay` after each step, and count the steps in `steps`."""
    inner_steps = engine.token_steps

    def token_steps(*args, **kwargs):
        inner = inner_steps(*args, **kwargs)
        try:
            for tok in inner:
                steps.append(1)
                time.sleep(delay)
                yield tok
        finally:
            inner.close()

    engine.token_steps = token_steps


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------- a client that leaves


def test_non_streaming_request_is_cancelled_when_the_client_leaves(ckpt):
    app = create_app(ckpt)
    srv = app.state.server
    steps: list[int] = []
    slow_steps(srv.batcher.engine, 0.05, steps)
    max_tokens = srv.cfg.max_seq_len - 4
    with LoopbackServer(app) as s:
        # control: left alone, the request generates all its tokens
        r = httpx.post(s.url + "/v1/completions", json={**BODY, "max_tokens": max_tokens}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens
        assert len(steps) == max_tokens
        steps.clear()
        # the client gives up after 0.3 s (about 6 steps) and closes its connection
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={**BODY, "max_tokens": max_tokens}, timeout=0.3)
        left = time.monotonic()
        wait_for(lambda: srv.batcher.in_flight == 0, 10, "the batch to end")
        ended = time.monotonic() - left
        metrics = httpx.get(s.url + "/metrics").text
    # before: the rows ran to max_tokens (1.4 s) for nobody
    assert len(steps) < max_tokens // 2, steps
    assert ended < 0.5
    assert 'matryoshka_disconnects_total{size="S"} 1.0' in metrics
    assert 'matryoshka_requests_total{endpoint="/v1/completions",size="S",status="499"} 1.0' in metrics


# ---------------------------------------------------------------- drain on SIGTERM (a real `matryoshka serve`)

# `matryoshka serve` with slowed token steps: argv[1] is the delay, the rest the CLI's arguments
LAUNCH = """
import sys, time
from matryoshka_lm.infer.engine import Engine

delay, inner_steps = float(sys.argv[1]), Engine.token_steps

def token_steps(self, *args, **kwargs):
    inner = inner_steps(self, *args, **kwargs)
    try:
        for tok in inner:
            time.sleep(delay)
            yield tok
    finally:
        inner.close()

Engine.token_steps = token_steps
from matryoshka_lm.cli.main import main
raise SystemExit(main(sys.argv[2:]))
"""


class ServeProcess:
    def __init__(self, ckpt: Path, delay: float, *args: str):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", LAUNCH, str(delay), "serve", str(ckpt), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--device", "cpu", "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.out = ""

    def __enter__(self) -> ServeProcess:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self, timeout: float = 30) -> int:
        self.out = self.proc.communicate(timeout=timeout)[0].decode()
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def complete(url: str, max_tokens: int) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={**BODY, "max_tokens": max_tokens}, timeout=60)


def stream(url: str, max_tokens: int) -> tuple[int, list[str]]:
    body = {**BODY, "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        return r.status_code, [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def start_load(pool: ThreadPoolExecutor, s: ServeProcess, n: int, max_tokens: int, batches: int) -> list:
    """n non-streaming requests and one stream; returns once `batches` batches are generating."""
    futures = [pool.submit(complete, s.url, max_tokens) for _ in range(n)]
    futures.append(pool.submit(stream, s.url, max_tokens))
    wait_for(lambda: s.health()["batches_in_flight"] >= batches, 30, "the batches to start")
    return futures


def test_sigterm_drains_accepted_requests(ckpt):
    n, max_tokens = 5, 20
    # 6 rows, 2 per batch: 6 s of round robin, longer than uvicorn's own 5 s grace before this drain existed
    with ServeProcess(ckpt, 0.1, "--max-batch", "2") as s, ThreadPoolExecutor(n + 1) as pool:
        futures = start_load(pool, s, n, max_tokens, batches=3)
        s.proc.send_signal(signal.SIGTERM)
        # no new connections once draining
        wait_for(lambda: _refused(s.url), 5, "the listener to close")
        results = [f.result() for f in futures]
        code = s.stop()
    for r in results[:n]:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == max_tokens
        assert r.json()["choices"][0]["finish_reason"] == "length"
    status, events = results[n]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert code == -signal.SIGTERM and "Finished server process" in s.out and "Traceback" not in s.out, s.out


def test_drain_timeout_answers_the_rest_with_503(ckpt):
    n, max_tokens = 3, 25
    with ServeProcess(ckpt, 0.1, "--drain-timeout", "0.5") as s, ThreadPoolExecutor(n + 1) as pool:
        futures = start_load(pool, s, n, max_tokens, batches=1)  # 2.5 s at least: far past the 0.5 s allowed
        s.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        results = [f.result() for f in futures]
        took = time.monotonic() - t0
        code = s.stop()
    assert took < 2.0
    for r in results[:n]:
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "shutting_down" and r.json()["error"]["type"] == "server_error"
    status, events = results[n]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert code == -signal.SIGTERM and "Finished server process" in s.out and "Traceback" not in s.out, s.out


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=1)
    except httpx.ConnectError:
        return True
    return False
