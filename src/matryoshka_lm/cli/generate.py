"""`matryoshka generate`: sample text at one size, every size, or speculatively (a small size drafts)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from matryoshka_lm.errors import MatryoshkaError

from .options import pick_device


def cmd_generate(a: argparse.Namespace) -> None:
    from matryoshka_lm.core.checkpoint import load_model, load_tokenizer
    from matryoshka_lm.core.spec import parse_spec, size_names
    from matryoshka_lm.data import EOT
    from matryoshka_lm.infer.engine import Engine
    from matryoshka_lm.infer.sampling import Sampling
    from matryoshka_lm.infer.speculative import check_draft

    device = pick_device(a.device)
    model = load_model(a.ckpt, device)
    tok = load_tokenizer(a.ckpt)
    if not a.prompt:
        raise MatryoshkaError("empty prompt")
    ids = tok.encode(a.prompt).ids
    sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed)  # checks the settings: before any output
    # compiling costs tens of seconds per size on CPU, more than a CLI run gains; on CUDA it pays at once
    engine = Engine(model, compile=device.startswith("cuda") if a.compile is None else a.compile)
    eot = tok.token_to_id(EOT)
    stops = dict(stop_tokens=[] if eot is None else [eot], stop_strings=a.stop or [], decode=tok.decode)
    draft = parse_spec(model.cfg, a.draft) if a.draft else None
    sizes = size_names(model.cfg) if a.size == "all" else [a.size]
    specs = [parse_spec(model.cfg, size) for size in sizes]
    engine.check_prompts([ids], a.max_new_tokens)  # fail before any output
    for spec in specs if draft is not None else []:
        check_draft(model.cfg, spec, draft)
    if draft is not None and not 1 <= a.gamma <= 8:
        raise MatryoshkaError(f"--gamma must be in 1..8, got {a.gamma}")
    for size, spec in zip(sizes, specs):
        print(f"[{size}] {a.prompt}" if len(sizes) > 1 else a.prompt, end="", flush=True)
        _print_pieces(a, model, engine, ids, spec, draft, sampling, stops, size)


def _print_pieces(
    a: argparse.Namespace, model, engine, ids: list[int], spec, draft, sampling, stops: dict, size: str
) -> None:
    """Generate one size's continuation (plain or speculative, streamed or whole) and print it."""
    from matryoshka_lm.infer.speculative import SpeculativeStats, speculative_decode, speculative_stream

    stats = SpeculativeStats()
    pieces: Iterable[str]
    if draft is None:
        pieces = (
            engine.stream(ids, spec, a.max_new_tokens, sampling, **stops)
            if a.stream
            else [engine.generate([ids], spec, a.max_new_tokens, sampling, **stops)[0].text]
        )
    elif a.stream:
        pieces = speculative_stream(
            model, ids, spec, draft, a.max_new_tokens, sampling, engine=engine, stats=stats, gamma=a.gamma, **stops
        )
    else:
        done, stats = speculative_decode(
            model, ids, spec, draft, a.max_new_tokens, sampling, gamma=a.gamma, engine=engine, **stops
        )
        pieces = [done.text]
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    if draft is not None:
        print(
            f"speculative: draft {draft} for {size}: {stats.acceptance:.0%} of {stats.drafted} drafted tokens "
            f"accepted, {stats.tokens_per_round:.2f} tokens per target pass",
            file=sys.stderr,
        )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="sample text at one size (or --size all)")
    g.add_argument("ckpt")
    g.add_argument("--size", default="XL", help="size name, Mix'n'Match spec, or 'all'")
    g.add_argument("--prompt", required=True)
    # --max-new-tokens, --top-k and --gamma stay plain ints: the library names the bad value in one error line
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this much probability")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop at this string (repeatable); <|endoftext|> always stops")
    g.add_argument("--draft", help="speculative decoding: this smaller size or spec drafts, --size verifies")
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
