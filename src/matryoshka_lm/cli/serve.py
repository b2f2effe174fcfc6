"""`matryoshka serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import os

from .options import int_list, pick_device, port, positive_int


def cmd_serve(a: argparse.Namespace) -> None:
    from matryoshka_lm.serve.app import serve

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    serve(
        a.ckpt,
        host=a.host,
        port=a.port,
        api_key=a.api_key or os.environ.get("MATRYOSHKA_API_KEY"),
        device=pick_device(a.device),
        name=a.name,
        max_batch=a.max_batch,
        compile=a.compile,
        allowed_hosts=a.allowed_host or (),
        cors_origins=a.cors_origin or (),
        drain_timeout=a.drain_timeout,
        bits=int_list(a.bits, "--bits"),
    )


def seconds(text: str) -> float:
    """argparse type for a duration: a finite number >= 0 (0 = at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server: every size of one checkpoint, per request")
    sv.add_argument("ckpt")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=port, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MATRYOSHKA_API_KEY, else none)")
    sv.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="also accept this Host header name (repeatable; default: localhost, 127.0.0.1 and [::1] only, "
        "checked when reached on loopback; once given, checked on every address; '*' accepts any)",
    )
    sv.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let web pages from this origin call the API, e.g. http://localhost:3000 (repeatable; default: none)",
    )
    sv.add_argument("--name", help="model name in ids NAME:SIZE (default: the checkpoint folder's name)")
    sv.add_argument("--max-batch", type=positive_int, default=16, help="rows per generation batch")
    sv.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the decode step (pays off on CUDA)",
    )
    sv.add_argument(
        "--threads", type=positive_int, help="torch CPU threads (default: torch's; 1 suits a small shared CPU)"
    )
    sv.add_argument(
        "--drain-timeout",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, let accepted requests finish for this long, then answer the rest 503 (default 30)",
    )
    sv.add_argument(
        "--bits",
        help="bit widths /v1/models lists per size as NAME:SIZE@intR (default: 8,4,2, or below the stored width of "
        "a quantized checkpoint); any width the weights allow is served either way",
    )
    sv.add_argument("--device", default="auto")
    sv.set_defaults(func=cmd_serve)
