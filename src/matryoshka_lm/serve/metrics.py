"""Prometheus metrics of one app, and the ASGI middleware that counts and times every HTTP answer."""

from __future__ import annotations

import time
from typing import Any

from matryoshka_lm.core.spec import SubmodelSpec

from .batcher import Batcher

ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"}


def size_label(spec: SubmodelSpec) -> str:
    """The metrics label of a size: its name, or "mixnmatch" for every other spec, with its bit width for a cell
    ("M@int4", "mixnmatch@int2"): bounded label values."""
    return (spec.name or "mixnmatch") + ("" if spec.bits is None else f"@int{spec.bits}")


class Metrics:
    """Prometheus series of one app (its own registry, so several apps in one process never collide)."""

    # over 60 lines: one statement per series, so every series the app exports reads in one place
    def __init__(self, batcher: Batcher):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: they double /metrics and no dashboard reads them
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "matryoshka_requests",
            "HTTP requests answered, by endpoint, size and status",
            ["endpoint", "size", "status"],
            registry=r,
        )
        self.errors = Counter(
            "matryoshka_errors",
            "Failed requests: a 4xx/5xx answer or a stream ended by an error",
            ["endpoint", "size", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "matryoshka_tokens",
            "Tokens processed, by size and kind (prompt | completion)",
            ["size", "kind"],
            registry=r,
        )
        self.auto_choices = Counter(
            "matryoshka_auto_choices",
            "NAME:auto generation requests the router sent to each size",
            ["size"],
            registry=r,
        )
        self.auto_compute = Counter(
            "matryoshka_auto_compute",
            "NAME:auto work in full-size token-passes (FLOPs, or bytes for cells, as the router prices them): served "
            "= what the routed sizes and the router did, full = what always-full would have; 1 - served/full is saved",
            ["kind"],
            registry=r,
        )
        self.speculative = Counter(
            "matryoshka_speculative_tokens",
            "Speculative decoding: draft tokens proposed and accepted, by the size that verified",
            ["size", "kind"],
            registry=r,
        )
        self.disconnects = Counter(
            "matryoshka_disconnects", "Requests whose client went away before the end", ["size"], registry=r
        )
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.latency = Histogram(
            "matryoshka_request_latency_seconds",
            "Request start to last byte",
            ["endpoint", "size"],
            buckets=lat,
            registry=r,
        )
        self.ttft = Histogram(
            "matryoshka_time_to_first_token_seconds",
            "Request start to first generated token",
            ["size"],
            buckets=lat,
            registry=r,
        )
        self.batch_rows = Histogram(
            "matryoshka_batch_rows",
            "Rows per generation batch, by size",
            ["size"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        Gauge("matryoshka_queue_waiting", "Rows waiting for a batch", registry=r).set_function(lambda: batcher.waiting)
        Gauge("matryoshka_batches_in_flight", "Generation batches in flight", registry=r).set_function(
            lambda: batcher.in_flight
        )

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def endpoint_label(path: str) -> str:
    """A bounded label for a request path: a known route, the model-card route, or "other"."""
    if path in ENDPOINTS:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


class MetricsMiddleware:
    """Counts every HTTP answer and times it to its last byte (streams included); handlers put the size served
    into request.state.size, and request.state.failed when a stream ended in an error."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint, size, code = endpoint_label(scope["path"]), state.get("size", "none"), str(status[0])
            self.metrics.requests.labels(endpoint, size, code).inc()
            if status[0] >= 400 or state.get("failed"):
                self.metrics.errors.labels(endpoint, size, code).inc()
            self.metrics.latency.labels(endpoint, size).observe(time.perf_counter() - t0)


def note_size(request: Any, spec: SubmodelSpec) -> None:
    """Tell MetricsMiddleware the size that serves this request (request.state.size)."""
    request.state.size = size_label(spec)
