"""Soak test of `matryoshka serve`: N concurrent loopback clients for a bounded time, a mix of sizes and streaming.

The server runs as users start it (the CLI, in its own process, bound to 127.0.0.1); the clients are asyncio tasks
sending completions, chat and embeddings, half of the generations streamed. Reports requests/s, tokens/s and
p50/p99 latency per size, and the three numbers that must be 0: 5xx answers, other errors, and lost requests (no
complete answer: connection dropped, timeout, or a stream without its [DONE]). Writes the `server` section of
BENCHMARKS.md.

    python benchmarks/bench_soak_server.py [--seconds 60] [--clients 32] [--ckpt runs/demo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine, write_section  # noqa: E402
from matryoshka_lm.report import md_table  # noqa: E402

PROMPTS = [
    "ROMEO: ",
    "JULIET: O Romeo,",
    "And God said,",
    "To be, or not",
    "The king",
    "KING HENRY:\n",
    "In the beginning",
    "First Citizen:\nBefore we proceed",
]
THREADS = 1  # torch threads of the server: its event loop and the clients need the other core
SIZES = ["XL", "L", "M", "S", "S,M,L,XL"]  # four named sizes and one Mix'n'Match spec


@dataclass
class Stats:
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass
class Totals:
    sizes: dict[str, Stats] = field(default_factory=lambda: defaultdict(Stats))
    sent: int = 0
    ok: int = 0
    status_5xx: int = 0
    errors: int = 0
    lost: int = 0
    examples: list[str] = field(default_factory=list)

    def fail(self, kind: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 5:
            self.examples.append(what[:200])


def checkpoint(path: str | None) -> Path:
    """runs/demo if trained, else a quick `tiny` preset run in a temporary folder."""
    if path:
        return Path(path)
    demo = ROOT / "runs" / "demo"
    if (demo / "model.safetensors").is_file():
        return demo
    from matryoshka_lm.config import preset
    from matryoshka_lm.train.loop import train

    cfg, tcfg = preset("tiny")
    out = Path(tempfile.mkdtemp(prefix="soak-")) / "tiny"
    print(f"no runs/demo: training the tiny preset into {out}", file=sys.stderr)
    train(cfg, tcfg, out)
    return out


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(ckpt: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "matryoshka_lm.cli",
        "serve",
        str(ckpt),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--threads",
        str(THREADS),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit("the server did not start:\n" + proc.stdout.read().decode())
        time.sleep(0.2)


def make_request(rng: random.Random, name: str) -> tuple[str, dict, str]:
    size = rng.choice(SIZES)
    kind = rng.choices(["completion", "chat", "embedding"], [6, 3, 1])[0]
    if kind == "embedding":
        texts = rng.sample(PROMPTS, rng.randint(1, 4))
        return (
            "/v1/embeddings",
            {"model": f"{name}:{size}", "input": texts, "dimensions": 32, "encoding_format": "float"},
            size,
        )
    body = {
        "model": f"{name}:{size}",
        "max_tokens": rng.randint(8, 48),
        "stream": rng.random() < 0.5,
        "temperature": rng.choice([0.0, 0.8]),
        "seed": rng.randint(0, 3) if rng.random() < 0.2 else None,
    }
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
        return "/v1/chat/completions", body, size
    body["prompt"] = rng.choice(PROMPTS)
    return "/v1/completions", body, size


async def one(http: httpx.AsyncClient, path: str, body: dict, size: str, t: Totals) -> None:
    t.sent += 1
    t0 = time.perf_counter()
    try:
        if body.get("stream"):
            first, done, tokens = None, False, 0
            async with http.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return _bad(t, r.status_code, r.text)
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return t.fail("errors", f"stream error: {chunk['error']}")
                    if first is None:
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            if not done:
                return t.fail("lost", f"{path}: stream ended without [DONE]")
            s = t.sizes[size]
            s.ttft.append(first)
        else:
            r = await http.post(path, json=body)
            if r.status_code != 200:
                return _bad(t, r.status_code, r.text)
            tokens = r.json()["usage"].get("completion_tokens", 0)
            s = t.sizes[size]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return t.fail("lost", f"{path}: {type(e).__name__}: {e}")
    s.latency.append(time.perf_counter() - t0)
    s.tokens += tokens
    t.ok += 1


def _bad(t: Totals, status: int, text: str) -> None:
    t.fail("status_5xx" if status >= 500 else "errors", f"{status}: {text}")


async def soak(url: str, name: str, clients: int, seconds: float, seed: int = 0) -> tuple[Totals, float]:
    t = Totals()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        deadline = time.perf_counter() + seconds

        async def client(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < deadline:
                await one(http, *make_request(rng, name), t)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return t, time.perf_counter() - t0


def batch_rows(metrics: str) -> float:
    """Mean rows per generation batch, from the server's Prometheus histogram."""
    total = {"sum": 0.0, "count": 0.0}
    for line in metrics.splitlines():
        for k in total:
            if line.startswith(f"matryoshka_batch_rows_{k}{{"):
                total[k] += float(line.rsplit(" ", 1)[1])
    return total["sum"] / max(total["count"], 1)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def report(t: Totals, wall: float, clients: int, seconds: float, ckpt: Path, rows_per_batch: float) -> str:
    head = [
        "size",
        "requests",
        "req/s",
        "tokens/s",
        "p50 latency (s)",
        "p99 latency (s)",
        "p50 first token, streams (s)",
    ]
    cells = []
    for size in SIZES:
        s = t.sizes.get(size)
        if not s:
            continue
        ttft = f"{statistics.median(s.ttft):.3f}" if s.ttft else "-"
        cells.append([size, len(s.latency), f"{len(s.latency) / wall:.2f}", f"{s.tokens / wall:.1f}",
                      f"{pct(s.latency, 0.5):.3f}", f"{pct(s.latency, 0.99):.3f}", ttft])  # fmt: skip
    tokens = sum(s.tokens for s in t.sizes.values())
    lat = [x for s in t.sizes.values() for x in s.latency]
    cells.append(["**all**", t.ok, f"{t.ok / wall:.2f}", f"{tokens / wall:.1f}", f"{pct(lat, 0.5):.3f}",
                  f"{pct(lat, 0.99):.3f}", ""])  # fmt: skip
    rows = [md_table(head, cells)]
    verdict = "all three 0" if not (t.status_5xx or t.errors or t.lost) else "NOT all 0: " + "; ".join(t.examples)
    return (
        f"## Server soak (`benchmarks/bench_soak_server.py`)\n\n"
        f"Machine: {machine()}.\n\n"
        f"`matryoshka serve {ckpt.name} --threads {THREADS}` (CPU, dynamic batching) under {clients} concurrent "
        f"loopback clients for {seconds:.0f} s: completions and chat (half streamed; greedy or T=0.8, some "
        f"seeded; max_tokens 8..48) and embeddings (1 in 10), each request at a random size of "
        f"{', '.join(SIZES)}. Latency is request to last byte; tokens are completion tokens.\n\n"
        + "\n".join(rows)
        + "\n\n"
        f"Requests sent {t.sent}, answered 200 {t.ok}; **5xx: {t.status_5xx}, errors: {t.errors}, lost: {t.lost}** "
        f"({verdict}). Generation batches held {rows_per_batch:.2f} rows on average.\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--ckpt", help="checkpoint to serve (default runs/demo, else a quick tiny-preset run)")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    a = p.parse_args()
    ckpt = checkpoint(a.ckpt)
    port = free_port()
    proc = start_server(ckpt, port)
    url = f"http://127.0.0.1:{port}"
    try:
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"].split(":")[0]
        t, wall = asyncio.run(soak(url, name, a.clients, a.seconds))
        alive = httpx.get(url + "/health", timeout=10).status_code == 200
        rows_per_batch = batch_rows(httpx.get(url + "/metrics").text)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0].decode()
    if not alive or "Traceback" in log:
        t.fail("errors", "server unhealthy after the soak:\n" + log[-2000:])
    body = report(t, wall, a.clients, a.seconds, ckpt, rows_per_batch)
    print(body)
    if not a.no_write:
        write_section("server", body)
    if t.status_5xx or t.errors or t.lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
