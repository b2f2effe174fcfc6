"""One loaded model, every cell of its size x bits grid side by side: bits/byte on held-out text (the lm-eval task
`matryoshka_ppl`), bytes of weights read per token, batch-1 decode speed and a greedy reply, plus a speculative
line where a cell drafts for another. What `matryoshka demo` prints; every cell runs on the same resident copy."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from matryoshka_lm.core import quant
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import SubmodelSpec
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.speculative import speculative_decode
from matryoshka_lm.report import md_table

from .harness import evaluate_cell, task_manager

HELD_OUT = "matryoshka_ppl"  # 50 passages of the default corpus no preset trains on (eval/harness_tasks)


def bits_per_byte(model: MatryoshkaLM, tok, spec: SubmodelSpec, engine: Engine, limit: int | None) -> float:
    """bits/byte of `spec` on the first `limit` held-out passages (lm-eval's loglikelihood_rolling)."""
    quiet = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [q.level for q in quiet]
    for q in quiet:  # its per-task notes (default aggregations...) would bury the table
        q.setLevel(logging.ERROR)
    try:
        res = evaluate_cell(model, tok, spec, [HELD_OUT], task_manager([HELD_OUT]), engine, limit, bootstrap_iters=0)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return float(res["results"][HELD_OUT]["bits_per_byte,none"])


def decode_rate(engine: Engine, spec: SubmodelSpec, prompt: list[int], n: int) -> float:
    """Batch-1 greedy tokens/s over `n` tokens after the prefill's (no stop: every cell decodes as many)."""
    steps = engine.token_steps([prompt], spec, n + 1)
    next(steps)
    t0 = time.perf_counter()
    for _ in steps:
        pass
    return n / (time.perf_counter() - t0)


def greedy_reply(engine: Engine, spec: SubmodelSpec, prompt: list[int], n: int, stops: Sequence[int]) -> list[int]:
    ids = []
    for step in engine.token_steps([prompt], spec, n):
        if int(step[0]) in stops:
            break
        ids.append(int(step[0]))
    return ids


def cell_rows(
    model: MatryoshkaLM,
    tok,
    cells: Sequence[SubmodelSpec],
    prompt: list[int],
    n_new: int,
    limit: int | None,
    stops: Sequence[int] = (),
    progress: Callable[[str], None] = lambda _: None,
    rate_tokens: int = 32,
) -> list[dict[str, Any]]:
    """One row per cell: bits/byte, MB of weights per token, tok/s (over `rate_tokens`) and the greedy reply."""
    engine, qcfg, rows = Engine(model), model.precision.quant, []
    decode_rate(engine, cells[0], prompt, 2)  # warm-up: the kernels' first call builds them
    for spec in cells:
        progress(f"cell {spec}")
        bits = model.cell_bits(spec.bits)
        ids = greedy_reply(engine, spec, prompt, n_new, stops)
        rows.append(
            {
                "cell": str(spec),
                "bits": bits,
                "bpb": bits_per_byte(model, tok, spec, engine, limit),
                "mb_per_token": quant.weight_bytes(model.cfg, spec, bits, qcfg) / 1e6,
                "tok_s": decode_rate(engine, spec, prompt, rate_tokens),
                "text": tok.decode(ids),
            }
        )
    return rows


def speculative_row(
    model: MatryoshkaLM, tok, target: SubmodelSpec, draft: SubmodelSpec, prompt: list[int], n_new: int
) -> dict[str, Any]:
    """The target decoded with `draft` (lossless) against the target alone: tokens/s of each over `n_new` tokens,
    prefill included on both sides, the acceptance, and whether the text is the target's own."""
    engine = Engine(model)
    t0 = time.perf_counter()
    alone = engine.generate([prompt], target, n_new)[0].tokens
    t1 = time.perf_counter()
    got, stats = speculative_decode(model, prompt, target, draft, n_new, engine=engine)
    t2 = time.perf_counter()
    return {
        "target": str(target),
        "draft": str(draft),
        "tok_s": len(got.tokens) / (t2 - t1),
        "alone_tok_s": len(alone) / (t1 - t0),
        "acceptance": stats.acceptance,
        "same": got.tokens == alone,
        "text": tok.decode(got.tokens),
    }


def grid_table(rows: list[dict[str, Any]], ref: float | None = None) -> str:
    """Markdown: cell, bits/byte (and its change from `ref`), MB read per token, tok/s."""
    cells = []
    for r in rows:
        delta = "" if ref is None else f" ({r['bpb'] - ref:+.3f})"
        cells.append([r["cell"], f"{r['bpb']:.3f}{delta}", f"{r['mb_per_token']:.0f}", f"{r['tok_s']:.1f}"])
    return md_table(["cell", "bits/byte (held out)", "MB read/token", "tok/s"], cells, "lrrr")
