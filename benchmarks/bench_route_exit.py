"""Routing on a model whose sizes really differ (issue #26): the per-query size router, the per-token early exit
(infer/early_exit.py) and the fixed sizes, on the same queries, in domain and out of domain.

Model: --ckpt (default runs/memory: the `memory` preset, 8 layers of width 512, trained sizes XL, the early exits E4
and E2, and the narrower W; trained here on first use, `matryoshka train --preset memory --out runs/memory --steps
700`). The committed section ran on that run resumed to 2000 steps (`cp -r runs/memory runs/memory-2k; matryoshka
train --preset memory --out runs/memory-2k --resume --steps 2000`, ~37 min on 2 cores), `--ckpt runs/memory-2k`.
In domain: the part of the default corpus its `max_corpus_chars` left out (bench_router.unseen_in_domain), halves
for the router's fit and the test. Out of domain: Python's documentation prose (`pydoc_data.topics`), never seen.
Quality: mean NLL per token of a 32-token reference continuation (teacher forced; for the early exit with its real
decoding semantics, early_exit_eval). Compute: FLOPs per query relative to always-full (router overhead included),
and wall time at batch 1 (greedy generation of the same prompts, interleaved). Writes the `router-exit` section of
BENCHMARKS.md and docs/router_exit_in_domain.png, docs/router_exit_out_of_domain.png.
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_router import unseen_in_domain  # noqa: E402
from common import ROOT, machine, write_section  # noqa: E402
from matryoshka_lm.core import checkpoint as ck  # noqa: E402
from matryoshka_lm.data import encode_corpus, split_tokens  # noqa: E402
from matryoshka_lm.infer import router_eval as RE  # noqa: E402
from matryoshka_lm.infer import router_fit as RF  # noqa: E402
from matryoshka_lm.infer import router_labels as RL  # noqa: E402
from matryoshka_lm.infer.early_exit import exit_generate, exit_points  # noqa: E402
from matryoshka_lm.infer.early_exit_eval import exit_policy  # noqa: E402
from matryoshka_lm.infer.engine import Engine  # noqa: E402
from matryoshka_lm.infer.exit_probe import fit_exit_probe  # noqa: E402
from matryoshka_lm.infer.routed import routed_generate  # noqa: E402
from matryoshka_lm.report import md_table  # noqa: E402

GOAL = 0.05  # APGR above the fixed sizes' curve
PNGS = ("docs/router_exit_in_domain.png", "docs/router_exit_out_of_domain.png")


def domain(model, router, probe, tokens, n: int, window: int, cont: int, n_boot: int, name: str, png: str) -> dict:
    t0 = time.perf_counter()
    _, labels = RL.label_tokens(model, tokens, n, window, cont, seed=1, candidates=router.candidates)
    queries = RL.model_queries(model, tokens, n, window, cont, seed=1)
    pols = [exit_policy(model, queries), exit_policy(model, queries, probe=probe)]
    rep = RE.evaluate(model, router, labels, router.tolerance, n_boot=n_boot, per_token=pols)
    rep["seconds"] = time.perf_counter() - t0
    RE.plot_curves(rep, ROOT / png, title=f"{name} ({rep['queries']} queries)")
    print(name, RE.format_report(rep), sep="\n")
    return rep


def wall_clock(model, probe, router, tokens: np.ndarray, taus: list[float], n: int = 12, new: int = 32) -> dict:
    """Greedy tokens/s at batch 1 on `n` prompts: each fixed size through the engine (eager), the learned early
    exit at each τ and the cheap router at its τ (routed_generate), interleaved per prompt, order rotating."""
    engine = Engine(model)
    rng = np.random.default_rng(3)
    prompts = [tokens[s : s + 48].astype(np.int64).tolist() for s in rng.integers(0, len(tokens) - 48, n)]
    runs = {
        f"always {s.name}": (lambda p, s=s: engine.generate([p], s, new)[0].tokens) for s in RL.candidate_specs(model)
    }
    runs |= {f"learned exit, τ={t:.4g}": (lambda p, t=t: exit_generate(model, p, new, t, probe=probe)[0]) for t in taus}
    if "cheap" in router.predictors:
        runs[f"cheap router, τ={router.tolerance:g}"] = lambda p: routed_generate(engine, router, p, new, kind="cheap")
    return interleaved_tps(runs, prompts, new)


def interleaved_tps(runs: dict, prompts: list, new: int) -> dict:
    """Tokens/s of each run over the prompts: one warm-up each, then interleaved per prompt, the order rotating."""
    for fn in runs.values():
        fn(prompts[0])
    secs, names = dict.fromkeys(runs, 0.0), list(runs)
    for i, p in enumerate(prompts):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            runs[k](p)
            secs[k] += time.perf_counter() - t0
    return {k: len(prompts) * new / s for k, s in secs.items()}


def run_info(model: str, router, fit_s: float) -> dict:
    return {"model": model, "candidates": router.candidates, "fit_queries": router.info["fit_queries"],
            "fit_s": fit_s, "default": router.default}  # fmt: skip


def save_report(out: Path, name: str, section_of, res: dict, reports: dict, tps: dict) -> None:
    """The run's numbers to `out` (what --report-only rereads), and its BENCHMARKS.md section."""
    out.write_text(json.dumps({"res": res, "reports": {k: r for k, (r, _) in reports.items()}, "tps": tps}, indent=1))
    text = section_of(res, reports, tps)
    write_section(name, text)
    print(text)


def ci(m: dict, fmt: str = ".3f") -> str:
    return f"{m['value']:{fmt}} [{m['ci'][0]:{fmt}}, {m['ci'][1]:{fmt}}]"


def domain_lines(name: str, rep: dict, png: str) -> list[str]:
    fixed = rep["fixed"]
    lo, hi = fixed[next(iter(fixed))]["nll"], list(fixed.values())[-1]["nll"]  # cheapest first, the full one last
    rows = [[k, ci(m["apgr"]), f"{m['cpt50']['value']:.3f}", f"{m['cpt80']['value']:.3f}"]
            for k, m in rep["metrics"].items()]  # fmt: skip
    diffs = [[k, ci(d, "+.3f"), "met" if d["value"] >= GOAL else "NOT met"]
             for k, d in rep["minus_fixed_sizes"].items()]  # fmt: skip
    pts = {name: [["never" if p["setting"] is None else f"{p['setting']:.3g}", f"{p['compute']:.3f}", f"{p['nll']:.4f}",
                   ", ".join(f"{d}: {v:.0%}" for d, v in p["exits"].items())] for p in points]
           for name, points in rep["per_token"].items()}  # fmt: skip
    sizes = [[k, f"{f['compute']:.3f}", f"{f['nll']:.4f}"] for k, f in fixed.items()]
    return [
        f"### {name} ({rep['queries']} queries, {rep['seconds']:.0f} s)",
        "",
        f"Quality gap between the cheapest candidate and the full one: {lo - hi:.3f} nats/token (goal for a model "
        f"worth routing on: >= 0.15, {'met' if lo - hi >= 0.15 else 'NOT met'}). Split-half reliability of the "
        "per-query gap (first vs second half of the continuation, Spearman-Brown): "
        + ", ".join(f"{k} {v:.2f}" for k, v in rep.get("label_reliability", {}).items())
        + " (the share of a query's gap that is the query's, not the noise of 32 tokens).",
        "",
        md_table(["fixed size", "compute", "NLL"], sizes, "lrr"),
        "",
        md_table(["curve", "APGR [95% CI]", "CPT(50%)", "CPT(80%)"], rows, "llll"),
        "",
        md_table(["policy", "APGR minus the fixed sizes' [paired 95% CI]", f"goal +{GOAL}"], diffs, "lll"),
        "",
        *[
            line
            for name, rows in pts.items()
            for line in (
                f"{name}, per setting (margin at least / predicted gap at most; tokens stopping at each depth):",
                "",
                md_table(["setting", "compute", "NLL", "exits"], rows, "rrrl"),
                "",
            )
        ],  # fmt: skip
        f"![{name}]({png})",
        "",
    ]


def section(res: dict, reports: dict, tps: dict) -> str:
    full = tps["always XL"]
    rep = next(iter(reports.values()))[0]
    where = {k: (f["compute"], f["nll"]) for k, f in rep["fixed"].items()}
    where |= {f"learned exit, τ={p['setting']:.4g}": (p["compute"], p["nll"])
              for p in rep["per_token"]["early exit (learned)"] if p["setting"] is not None}  # fmt: skip
    if "cheap" in rep["at_tau"]:
        where[f"cheap router, τ={rep['tau']:g}"] = (rep["at_tau"]["cheap"]["compute"], rep["at_tau"]["cheap"]["nll"])
    where = {k: where.get(k, (float("nan"),) * 2) for k in tps}
    speed = [[k, f"{v:.1f}", f"{v / full:.2f}x", f"{where[k][0]:.3f}", f"{where[k][1]:.4f}"] for k, v in tps.items()]
    lines = [
        "## Routing on a model whose sizes differ: router vs per-token early exit (`benchmarks/bench_route_exit.py`)",
        "",
        f"Machine: {machine()}. Model: {res['model']}. Candidates {', '.join(res['candidates'])} (cheapest first); "
        f"router fitted on {res['fit_queries']} in-domain queries ({res['fit_s']:.0f} s, default `{res['default']}`). "
        "Queries: a prompt of 8..96 tokens and a 32-token reference continuation; quality = its mean NLL; compute = "
        "FLOPs per query relative to always-full, the router's prefill and predictor and the early exit's heads and "
        "skipped layers' K/V projections included. The early exits stop a token at the trained exits E2 or E4 (state "
        "propagated to the skipped layers as keys and values); every token decides, the prompt's too. Margin: CALM's "
        "softmax margin (an LM head per point asked). Learned: a ridge probe per point predicting the token's NLL gap "
        "to the full model from its normed state (4·C FLOPs per point), fitted on the router's fit split.",
        "",
    ]
    for name, (rep, png) in reports.items():
        lines += domain_lines(name, rep, png)
    lines += [
        "### Wall clock at batch 1",
        "",
        "Greedy generation of 32 tokens after 48-token in-domain prompts, one at a time; fixed sizes through the "
        "engine (eager), the early exit through `exit_generate` (eager: the prompt in one pass, then a token at a "
        "time, one layer per call, skipped layers reduced to their keys and values); runs interleaved per prompt. "
        "FLOPs and NLL: the same setting's point on the in-domain curve above.",
        "",
        md_table(["run", "tokens/s", "vs always XL", "FLOPs (in domain)", "NLL (in domain)"], speed, "lrrrr"),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(ROOT / "runs" / "memory"))
    ap.add_argument("--fit-queries", type=int, default=800)
    ap.add_argument("--test-queries", type=int, default=400)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--wall-at", type=float, nargs="+", default=[0.45, 0.6, 0.8],
                    help="time the learned exit at its in-domain settings nearest these FLOPs fractions")  # fmt: skip
    ap.add_argument("--report-only", action="store_true", help="rewrite the section from runs/route_exit.json")
    a = ap.parse_args()
    out = ROOT / "runs" / "route_exit.json"
    if a.report_only:
        saved = json.loads(out.read_text())
        reports = {k: (r, png) for (k, r), png in zip(saved["reports"].items(), PNGS)}
        return write_section("router-exit", section(saved["res"], reports, saved["tps"]))
    ckpt = Path(a.ckpt)
    if not (ckpt / ck.WEIGHTS).exists():
        cmd = ["train", "--preset", "memory", "--out", str(ckpt), "--steps", "700", "--quiet"]
        subprocess.run([sys.executable, "-m", "matryoshka_lm.cli", *cmd], check=True)
    model, tok = ck.load_model(ckpt), ck.load_tokenizer(ckpt)
    _, tcfg = ck.read_config(ckpt)
    window, cont = min(128, model.cfg.max_seq_len), 32
    t0 = time.perf_counter()
    fit_half, test_half = split_tokens(unseen_in_domain(tok, tcfg.max_corpus_chars, 1_500_000), 0.5)
    _, fit_labels = RL.label_tokens(model, fit_half, a.fit_queries, window, cont, seed=0)
    router = RF.fit_router(model, fit_labels, tolerance=0.1)
    router.info |= {"window": window, "cont": cont}
    fit_windows = RL.model_queries(model, fit_half, a.fit_queries, window, cont, seed=0).windows
    probe = fit_exit_probe(model, fit_windows, exit_points(model.cfg)[:-1])
    fit_s = time.perf_counter() - t0
    ood = encode_corpus(tok, ["\n\n".join(pydoc_data.topics.topics.values())])
    reports = {}
    for (name, tokens), png in zip(
        (("In domain: unseen Shakespeare + KJV", test_half), ("Out of domain: Python documentation prose", ood)), PNGS
    ):
        reports[name] = (
            domain(model, router, probe, tokens, a.test_queries, window, cont, a.bootstrap, name, png),
            png,
        )
    learned = reports["In domain: unseen Shakespeare + KJV"][0]["per_token"]["early exit (learned)"]
    timed = [
        min((p for p in learned if p["setting"] is not None), key=lambda p: abs(p["compute"] - c)) for c in a.wall_at
    ]
    tps = wall_clock(model, probe, router, test_half, [p["setting"] for p in timed])
    res = run_info(f"memory preset, {tcfg.steps} steps of batch {tcfg.batch_size} x {tcfg.seq_len} ({ckpt.name})",
                   router, fit_s)  # fmt: skip
    save_report(out, "router-exit", section, res, reports, tps)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
