"""`matryoshka route fit|eval`: fit the size router beside a checkpoint, and measure it on any text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matryoshka_lm.errors import MatryoshkaError

from .options import pick_device, positive_int, progress, spec_list


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _tokens(ckpt: str, data: str | None):
    """The checkpoint's own held-out split when no data is given, else all of `data`."""
    from matryoshka_lm.core import checkpoint as ck
    from matryoshka_lm.data import encode_corpus, read_corpus
    from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split

    if data is None:
        return checkpoint_val_split(Path(ckpt))[2]
    return encode_corpus(ck.load_tokenizer(Path(ckpt)), read_corpus(data))


def cmd_fit(a: argparse.Namespace) -> None:
    import torch

    from matryoshka_lm.core.checkpoint import load_model
    from matryoshka_lm.infer.early_exit import exit_points
    from matryoshka_lm.infer.exit_probe import fit_exit_probe
    from matryoshka_lm.infer.router_fit import fit_on_tokens
    from matryoshka_lm.infer.router_labels import model_queries

    torch.manual_seed(a.seed)
    model = load_model(Path(a.ckpt), pick_device(a.device))
    tokens = _tokens(a.ckpt, a.data)
    candidates = spec_list(a.candidates)
    with progress("matryoshka_lm.infer.router_labels"):
        router = fit_on_tokens(model, tokens, a.queries, a.window, a.cont, a.tolerance, a.seed, candidates=candidates)
    out = Path(a.output or a.ckpt)
    router.save(out)
    apgr = ", ".join(f"{k} {v:.3f}" for k, v in router.info["calibration_apgr"].items())
    print(f"router for {', '.join(router.candidates)} -> {out}/router.json")
    print(f"calibration APGR: {apgr}; default: {router.default}, tolerance {router.tolerance:g}")
    points = exit_points(model.cfg)[:-1]
    if points and not candidates:  # the model has trained exits: fit the per-token rule on the same text
        queries = model_queries(model, tokens, a.queries, a.window, a.cont, a.seed)
        fit_exit_probe(model, queries.windows, points).save(out)
        print(f"per-token exit probe at depths {points} -> {out}/exit_probe.json")


def cmd_eval(a: argparse.Namespace) -> None:
    from matryoshka_lm.core.checkpoint import load_model
    from matryoshka_lm.infer.early_exit import exit_points
    from matryoshka_lm.infer.early_exit_eval import exit_policy
    from matryoshka_lm.infer.exit_probe import ExitProbe
    from matryoshka_lm.infer.router import Router
    from matryoshka_lm.infer.router_eval import evaluate, format_report, plot_curves
    from matryoshka_lm.infer.router_labels import label_tokens, model_queries

    if a.tolerance is not None and a.budget is not None:
        raise MatryoshkaError("give --tolerance or --budget, not both")
    router = Router.load(Path(a.router or a.ckpt))
    model = load_model(Path(a.ckpt), pick_device(a.device))
    tau = router.resolve_tau(a.tolerance, a.budget)
    window, cont = router.info.get("window", 128), router.info.get("cont", 32)
    tokens = _tokens(a.ckpt, a.data)
    with progress("matryoshka_lm.infer.router_labels"):
        _, labels = label_tokens(model, tokens, a.queries, window, cont, a.seed, candidates=router.candidates)
    per_token = []
    if a.early_exit and len(exit_points(model.cfg)) > 1 and not any("@" in c for c in router.candidates):
        queries = model_queries(model, tokens, a.queries, window, cont, a.seed)
        probe = ExitProbe.load(a.router or a.ckpt)
        with progress("matryoshka_lm.infer.early_exit_eval"):
            per_token.append(exit_policy(model, queries))
            if probe is not None:
                per_token.append(exit_policy(model, queries, probe=probe))
    rep = evaluate(model, router, labels, tau, n_boot=a.bootstrap, per_token=per_token)
    print(format_report(rep))
    if a.plot:
        plot_curves(rep, a.plot, title=f"{Path(a.data).name}: {rep['queries']} queries")
        print(f"plot -> {a.plot}")
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=2) + "\n")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("route", help="the size router: fit it beside a checkpoint, evaluate it on a text file")
    rs = r.add_subparsers(dest="route_command", required=True)
    f = rs.add_parser("fit", help="label held-out queries with every size (the oracle), fit, calibrate, save")
    f.add_argument("ckpt")
    f.add_argument("--data", help="text to cut queries from (default: the checkpoint's validation split)")
    f.add_argument("-o", "--output", help="directory for router.json/.safetensors (default: CKPT)")
    f.add_argument("--queries", type=positive_int, default=1000, help="labelled queries (default 1000)")
    f.add_argument("--window", type=positive_int, default=128, help="prompt + continuation tokens per query")
    f.add_argument("--cont", type=positive_int, default=32, help="continuation tokens scored per query")
    f.add_argument("--tolerance", type=_nonnegative_float, default=0.1, help="default τ saved (nats/token)")
    f.add_argument(
        "--candidates",
        help="specs or cells to route between, e.g. S@int2,M@int4,XL (';'-separated if they contain commas; "
        "default: the trained sizes); with bit widths the cost is bytes of weights, else FLOPs",
    )
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="cpu")
    f.set_defaults(func=cmd_fit)
    e = rs.add_parser("eval", help="curves, APGR and CPT of the router against baselines and the oracle")
    e.add_argument("ckpt")
    e.add_argument("--data", required=True, help="any text file (or folder of them)")
    e.add_argument("--router", help="router directory (default: CKPT)")
    e.add_argument("--tolerance", type=_nonnegative_float, help="τ in nats/token (default: the router's)")
    e.add_argument("--budget", type=float, help="target mean compute fraction instead of τ (1 = always full)")
    e.add_argument("--queries", type=positive_int, default=1000)
    e.add_argument("--bootstrap", type=positive_int, default=200, help="bootstrap resamples for the CIs")
    e.add_argument("--plot", help="write the compute-vs-quality PNG here")
    e.add_argument("--json", help="write the full report as JSON here")
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--device", default="cpu")
    e.add_argument(
        "--no-early-exit",
        dest="early_exit",
        action="store_false",
        help="skip the per-token early-exit policy (measured by default when the model has trained exits: sizes of "
        "full width and fewer layers)",
    )
    e.set_defaults(func=cmd_eval)
