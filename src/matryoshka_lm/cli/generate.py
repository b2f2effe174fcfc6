"""`matryoshka generate`: sample text at one size, every size, the size the router picks (`--size auto`), or
speculatively (a small size drafts)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from matryoshka_lm.errors import MatryoshkaError

from .options import pick_device

EXIT_TOLERANCE = 0.05  # --size exit's default τ: nats of predicted per-token gap to the full model a token may give up


def cmd_generate(a: argparse.Namespace) -> None:
    from matryoshka_lm.core.chat import read_chat
    from matryoshka_lm.core.checkpoint import load_model, load_tokenizer
    from matryoshka_lm.core.spec import parse_spec
    from matryoshka_lm.data import EOT
    from matryoshka_lm.infer.engine import Engine
    from matryoshka_lm.infer.sampling import Sampling
    from matryoshka_lm.infer.speculative import check_draft

    router = _load_router(a) if a.size == "auto" else None  # before the model: a missing router fails fast
    device = pick_device(a.device)
    model = load_model(a.ckpt, device)
    tok = load_tokenizer(a.ckpt)
    if not a.prompt:
        raise MatryoshkaError("empty prompt")
    ids = tok.encode(a.prompt).ids
    sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed)  # checks the settings: before any output
    # compiling costs tens of seconds per size on CPU, more than a CLI run gains; on CUDA it pays at once
    compile = device.startswith("cuda") if a.compile is None else a.compile
    engine = Engine(model, compile=compile)
    eot = tok.token_to_id(EOT)
    chat = read_chat(a.ckpt)  # an imported instruct model also ends a turn at its own token (e.g. <|im_end|>)
    stop_ids = list(dict.fromkeys(([] if eot is None else [eot]) + list(chat.stop_ids if chat else ())))
    stops = dict(stop_tokens=stop_ids, stop_strings=a.stop or [], decode=tok.decode)
    if router is not None:
        return _generate_auto(a, engine, router, ids, sampling, stops)
    if a.size == "exit":
        return _generate_exit(a, model, tok, ids, sampling, stop_ids)
    if a.tolerance is not None or a.budget is not None:
        raise MatryoshkaError("--tolerance and --budget apply to --size auto only (and --tolerance to --size exit)")
    draft = parse_spec(model.cfg, a.draft) if a.draft else None
    sizes = _all_sizes(a.ckpt, model.cfg) if a.size == "all" else [a.size]
    specs = [parse_spec(model.cfg, size) for size in sizes]
    engine.check_prompts([ids], a.max_new_tokens)  # fail before any output
    for spec in specs if draft is not None else []:
        check_draft(model.cfg, spec, draft)
    if draft is not None and not 1 <= a.gamma <= 8:
        raise MatryoshkaError(f"--gamma must be in 1..8, got {a.gamma}")
    for size, spec in zip(sizes, specs):
        print(f"[{size}] {a.prompt}" if len(sizes) > 1 else a.prompt, end="", flush=True)
        _print_pieces(a, model, engine, ids, spec, draft, sampling, stops, size)


def _load_router(a: argparse.Namespace):
    """The router saved beside the checkpoint, for --size auto."""
    from matryoshka_lm.infer.router import ROUTER_JSON, Router

    if a.draft:
        raise MatryoshkaError("--draft does not combine with --size auto")
    if a.tolerance is not None and a.budget is not None:
        raise MatryoshkaError("give --tolerance or --budget, not both")
    if not (Path(a.ckpt) / ROUTER_JSON).is_file():
        raise MatryoshkaError(
            f"--size auto needs a router: {Path(a.ckpt) / ROUTER_JSON} does not exist; "
            f"run `matryoshka route fit {a.ckpt}` first"
        )
    return Router.load(a.ckpt)


def _generate_auto(a: argparse.Namespace, engine, router, ids: list[int], sampling, stops: dict) -> None:
    """--size auto: the router picks the size; its prefill is reused when it picks the smallest."""
    from matryoshka_lm.infer.routed import describe, routed_generate, routed_stream

    args = (engine, router, ids, a.max_new_tokens, sampling, a.tolerance, a.budget)
    if a.stream:
        decision, pieces = routed_stream(*args, **stops)
    else:
        decision, done = routed_generate(*args, **stops)
        pieces = [done.text]
    budget = f"budget {a.budget:g} -> " if a.budget is not None else ""
    print(f"auto: {budget}{describe(router, decision)}", file=sys.stderr, flush=True)
    print(a.prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def _generate_exit(a: argparse.Namespace, model, tok, ids: list[int], sampling, stop_ids: list[int]) -> None:
    """--size exit: every token stops at the first trained exit whose predicted gap to the full model is at most
    --tolerance (the exit probe `route fit` saved beside the checkpoint)."""
    from matryoshka_lm.infer.early_exit import ExitCost, exit_generate
    from matryoshka_lm.infer.exit_probe import PROBE_JSON, ExitProbe

    if a.draft or a.budget is not None or a.stream:
        raise MatryoshkaError("--size exit takes --tolerance only (no --draft, --budget or --stream)")
    probe = ExitProbe.load(a.ckpt)
    if probe is None:
        raise MatryoshkaError(
            f"--size exit needs an exit probe: {Path(a.ckpt) / PROBE_JSON} does not exist; run `matryoshka route fit "
            f"{a.ckpt}` (it fits one when the model has trained exits: sizes of full width and fewer layers)"
        )
    probe.check(model)
    tau = EXIT_TOLERANCE if a.tolerance is None else a.tolerance
    if len(ids) + a.max_new_tokens > model.cfg.max_seq_len:
        raise MatryoshkaError(f"{len(ids)} prompt + {a.max_new_tokens} new tokens exceed {model.cfg.max_seq_len}")
    out, counter = exit_generate(
        model, ids, a.max_new_tokens, tau, probe=probe, sampling=sampling, stop_tokens=stop_ids
    )
    text = tok.decode(out)
    for stop in a.stop or []:
        text = text.split(stop)[0]
    share = ", ".join(f"depth {d}: {n / counter.tokens:.0%}" for d, n in sorted(counter.exits.items()))
    flops = counter.relative(ExitCost.of(model.cfg, len(ids) + len(out)))
    print(f"exit: τ={tau:g}; tokens stopped at {share}; {flops:.2f}x the full model's FLOPs", file=sys.stderr)
    print(a.prompt + text, flush=True)


def _all_sizes(ckpt: str, cfg) -> list[str]:
    """--size all: the sizes that are models (core.checkpoint.trained_sizes); the untrained slices are named."""
    from matryoshka_lm.core.checkpoint import trained_sizes
    from matryoshka_lm.core.spec import size_names

    trained = set(trained_sizes(ckpt, cfg))
    sizes = [s for s in size_names(cfg) if s in trained]
    if len(sizes) < len(cfg.sizes):
        skipped = ", ".join(s for s in size_names(cfg) if s not in trained)
        print(f"--size all: skipping {skipped}, not trained yet (ask for one by name to try it)", file=sys.stderr)
    return sizes


def _print_pieces(
    a: argparse.Namespace, model, engine, ids: list[int], spec, draft, sampling, stops: dict, size: str
) -> None:
    """Generate one size's continuation (plain or speculative, streamed or whole) and print it."""
    from matryoshka_lm.infer.engine import complete
    from matryoshka_lm.infer.request import request
    from matryoshka_lm.infer.speculative import Speculation, SpeculativeStats
    from matryoshka_lm.infer.stops import stream_rows

    # one Request, plain or speculative, streamed or whole: the engine's one generation path
    plan = None if draft is None else Speculation(draft, gamma=a.gamma)
    req = request([ids], spec, a.max_new_tokens, sampling, speculation=plan, **stops)
    stats, clock = SpeculativeStats(), _Clock()
    rounds = clock.rounds(engine.rounds(req, stats))
    row = req.stops.rows(1)[0]
    pieces: Iterable[str] = (
        stream_rows((new[0] for new in rounds), row) if a.stream else [complete(rounds, [row])[0].text]
    )
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    print(clock.line(size, len(ids)), file=sys.stderr)
    if draft is not None:
        print(
            f"speculative: draft {draft} for {size}: {stats.acceptance:.0%} of {stats.drafted} drafted tokens "
            f"accepted, {stats.tokens_per_round:.2f} tokens per target pass",
            file=sys.stderr,
        )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="sample text at one size (or --size all)")
    g.add_argument("ckpt")
    g.add_argument(
        "--size",
        default="XL",
        help="size name, Mix'n'Match spec, 'all', 'auto' (the router beside CKPT picks) or 'exit' (each token "
        "stops at a trained exit: the exit probe beside CKPT, --tolerance its predicted gap, default 0.05)",
    )
    g.add_argument("--prompt", required=True)
    # --max-new-tokens, --top-k and --gamma stay plain ints: the library names the bad value in one error line
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this much probability")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop at this string (repeatable); <|endoftext|> always stops")
    g.add_argument("--tolerance", type=float, help="--size auto: τ, nats/token of quality given up (default: router's)")
    g.add_argument("--budget", type=float, help="--size auto: target mean compute fraction instead of τ (1 = full)")
    g.add_argument(
        "--draft",
        help="speculative decoding: this smaller size or spec drafts, --size verifies; the target's own first layers "
        "(e.g. XL,XL for XL) are an early exit whose cache and states the verifier reuses",
    )
    g.add_argument("--gamma", type=int, default=4, help="draft tokens per verification (start value; adapts)")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the decode step (default: on for CUDA, off for CPU)",
    )
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)


class _Clock:
    """Prefill and decode speed of one generation, from the engine's rounds: the first round ends with the prefill
    (and its first token), every later one is decoding."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end = self.start
        self.tokens = 0

    def rounds(self, rounds):
        for new in rounds:
            self.end = time.perf_counter()
            self.first = self.end if self.first is None else self.first
            self.tokens += len(new[0])
            yield new

    def line(self, size: str, prompt_len: int) -> str:
        if self.first is None:
            return f"{size}: no tokens"
        prefill, decode, n = self.first - self.start, self.end - self.first, self.tokens - 1
        rate = f"{n / decode:.1f} tokens/s" if n and decode > 0 else "-"
        return (
            f"{size}: prefill {prompt_len} tokens in {prefill * 1000:.0f} ms ({prompt_len / max(prefill, 1e-9):.0f} "
            f"tokens/s), decode {n} tokens in {decode:.2f} s ({rate})"
        )
