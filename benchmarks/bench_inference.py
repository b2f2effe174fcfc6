"""Inference: decode/prefill speed per size, elastic slicing vs extracted models, ours vs transformers, speculative
decoding vs the full model alone, torch.compile, and the memory of serving all sizes from one set of weights.

Two models: `demo` (the demo preset, 2.0 M params, trained here for a few minutes so that drafts can be accepted;
cached in runs/bench-inference) and `wide` (26 M params, random weights: speed only, big enough for the matmuls
to matter on a CPU). Ratios are measured side by side, interleaved, medians of repeats. Times are the CPU time
of this (single-threaded) process: on a shared machine, wall-clock time also counts the time other jobs hold the
core, which inflated and scattered the figures several-fold while this was written.
Writes the `inference` section of BENCHMARKS.md; `--quick` runs a smoke version without writing it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine, self_timed, write_section
from matryoshka_lm.config import ModelConfig, preset
from matryoshka_lm.core.checkpoint import load_model, load_tokenizer
from matryoshka_lm.core.model import KVCache, MatryoshkaLM
from matryoshka_lm.core.nested import slice_state_dict, submodel_config
from matryoshka_lm.core.spec import count_params, uniform_spec
from matryoshka_lm.infer.engine import Engine, prefill
from matryoshka_lm.infer.speculative import SpeculativeStats, speculative_decode
from matryoshka_lm.report import md_table

THREADS = 1  # see the notes in the section: the 2-core machine is shared, and 2 threads make small ops erratic
MODEL_DIR = ROOT / "runs" / "bench-inference"
TRAIN_STEPS = 200
SIZES = ["XL", "L", "M", "S"]
EXTRACTED_HEAD = ["model", "size", "extracted copy", "engine (views, sliced once)", "sliced at every call"]
WIDE = dict(vocab_size=2048, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, max_seq_len=256)
PROMPTS = [
    "ROMEO: ",
    "And God said, Let there be",
    "KING HENRY:\nNow, lords,",
    "To be, or not to be",
    "In the beginning",
    "JULIET: O Romeo, Romeo!",
    "And it came to pass, when",
    "First Citizen:\nBefore we",
]


# ---------------------------------------------------------------- models


def demo_model() -> tuple[MatryoshkaLM, object, str]:
    if not (MODEL_DIR / "model.safetensors").is_file():
        from matryoshka_lm.train.loop import train

        cfg, tcfg = preset("demo")
        tcfg.steps, tcfg.eval_every, tcfg.save_every = TRAIN_STEPS, TRAIN_STEPS, TRAIN_STEPS
        print(f"training the demo preset for {TRAIN_STEPS} steps into {MODEL_DIR} (once)", file=sys.stderr)
        train(cfg, tcfg, MODEL_DIR, device="cpu")
    metrics = [json.loads(line) for line in (MODEL_DIR / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [m for m in metrics if "val_loss" in m][-1]
    val = ", ".join(f"{k} {v:.2f}" for k, v in last["val_loss"].items())
    note = f"demo preset trained {last['step']} steps (val loss {val})"
    return load_model(MODEL_DIR), load_tokenizer(MODEL_DIR), note


def wide_model() -> MatryoshkaLM:
    torch.manual_seed(0)
    return MatryoshkaLM(ModelConfig(**WIDE)).eval()


def extracted(model: MatryoshkaLM, size: str) -> MatryoshkaLM:
    spec = uniform_spec(model.cfg, size)
    small = MatryoshkaLM(submodel_config(model.cfg, spec))
    small.load_state_dict(slice_state_dict(model.state_dict(), model.cfg, spec))
    return small.eval()


def hf_llama(model: MatryoshkaLM):
    """transformers LlamaForCausalLM holding copies of the full model's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from matryoshka_lm.convert.hf import llama_config, to_hf_names

    hf = LlamaForCausalLM(LlamaConfig(**llama_config(model.cfg, None)))
    state = to_hf_names(model.state_dict())
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state)
    return hf.eval()


# ---------------------------------------------------------------- timing


clock = time.process_time  # CPU seconds of this process (see the module doc)


def decode_seconds(engine: Engine, size: str | None, prompts: list[list[int]], n: int) -> Callable[[], float]:
    """Seconds for n - 1 decode steps after the prefill (the first token comes from the prefill)."""
    spec = None if size is None else uniform_spec(engine.cfg, size)

    def run() -> float:
        steps = engine.token_steps(prompts, spec, n)
        next(steps)
        t0 = clock()
        for _ in steps:
            pass
        return clock() - t0

    return run


def prefill_seconds(model: MatryoshkaLM, size: str, B: int, T: int) -> Callable[[], float]:
    spec = uniform_spec(model.cfg, size)
    idx = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def run() -> float:
        cache = KVCache.allocate(model.cfg, spec, B, T)
        t0 = clock()
        prefill(model, idx, spec, cache)
        return clock() - t0

    return run


def wall(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        t0 = clock()
        fn()
        return clock() - t0

    return run


def goal(ok: bool) -> str:
    return "met" if ok else "**not met**"


# ---------------------------------------------------------------- sections


def per_size_table(name: str, model: MatryoshkaLM, n: int, repeats: int) -> str:
    engine = Engine(model)
    rng = torch.Generator().manual_seed(1)
    one = [torch.randint(0, model.cfg.vocab_size, (16,), generator=rng).tolist()]
    eight = [torch.randint(0, model.cfg.vocab_size, (16,), generator=rng).tolist() for _ in range(8)]
    fns = {}
    for s in SIZES:
        fns[f"{s} b1"] = decode_seconds(engine, s, one, n)
        fns[f"{s} b8"] = decode_seconds(engine, s, eight, n)
        fns[f"{s} prefill"] = prefill_seconds(model, s, 1, 128)
    t = self_timed(fns, repeats)
    rows = []
    for s in SIZES:
        p = count_params(model.cfg, uniform_spec(model.cfg, s))["total"]
        b1, b8, pre = (n - 1) / t[f"{s} b1"], 8 * (n - 1) / t[f"{s} b8"], 128 / t[f"{s} prefill"]
        rows.append([s, f"{p / 1e6:.2f} M", f"{b1:,.0f}", f"{b8:,.0f}", f"{pre:,.0f}"])
    head = ["size", "params", "decode tok/s, batch 1", "decode tok/s, batch 8", "prefill tok/s (1 x 128)"]
    return f"**{name}**\n\n" + md_table(head, rows)


def elastic_vs_extracted(name: str, model: MatryoshkaLM, n: int, repeats: int) -> tuple[list[list[str]], float]:
    """Batch-1 decode of each smaller size: the engine (views taken once), views taken at every call
    (model(x, spec)), and an extracted contiguous copy; rows of a markdown table (cells), worst engine/extracted
    ratio."""
    one = [list(range(1, 17))]
    once, per_call = Engine(model), Engine(model, slice_once=False)
    fns = {}
    for s in ("L", "M", "S"):
        fns[f"{s} once"] = decode_seconds(once, s, one, n)
        fns[f"{s} per call"] = decode_seconds(per_call, s, one, n)
        fns[f"{s} extracted"] = decode_seconds(Engine(extracted(model, s)), None, one, n)
    t = self_timed(fns, repeats)
    rows, worst = [], 9.0
    for s in ("L", "M", "S"):
        r = t[f"{s} extracted"] / t[f"{s} once"]
        worst = min(worst, r)
        rate = {k: (n - 1) / t[f"{s} {k}"] for k in ("once", "per call", "extracted")}
        per_call = f"{rate['per call']:,.0f} ({t[f'{s} extracted'] / t[f'{s} per call']:.2f}x)"
        rows.append([name, s, f"{rate['extracted']:,.0f}", f"{rate['once']:,.0f} (**{r:.2f}x**)", per_call])
    return rows, worst


def layout_rows(model: MatryoshkaLM, size: str, repeats: int, calls: int = 200) -> list[str]:
    """Layer 0's weights at `size`, batch-1 matmul: the prefix view of the full weight (what elastic inference
    reads) vs a contiguous copy of the same slice (what an extracted model reads)."""
    from matryoshka_lm.core import nested

    spec = uniform_spec(model.cfg, size)
    copies = slice_state_dict(model.state_dict(), model.cfg, spec)
    full = dict(model.named_parameters())
    names = ["attn.wq", "attn.wo", "ffn.w_gate", "ffn.w_down"]
    fns = {}
    for name in names + ["head"]:
        key = "tok_emb.weight" if name == "head" else f"layers.0.{name}.weight"
        view_w, copy_w = full[key], copies[key]
        x = torch.randn(1, 1, copy_w.shape[1])

        def loop(w, out=copy_w.shape[0], x=x) -> Callable[[], float]:
            @torch.no_grad()
            def run() -> float:
                t0 = clock()
                for _ in range(calls):
                    nested.linear(x, w, out)
                return (clock() - t0) / calls

            return run

        fns[f"{name} view"], fns[f"{name} copy"] = loop(view_w), loop(copy_w)
    t = self_timed(fns, repeats)
    return [
        f"{n} {tuple(copies['tok_emb.weight' if n == 'head' else f'layers.0.{n}.weight'].shape)}: "
        f"{t[f'{n} view'] * 1e6:.1f} vs {t[f'{n} copy'] * 1e6:.1f} us ({t[f'{n} copy'] / t[f'{n} view']:.2f}x)"
        for n in names + ["head"]
    ]


def vs_transformers(
    model: MatryoshkaLM, n: int, repeats: int, compiled: Engine | None = None
) -> tuple[list[str], dict[str, float], bool]:
    """End-to-end greedy generate, ours (eager, and compiled if given) vs transformers, batch 1 and 8."""
    hf = hf_llama(model)
    engines = {"ours": Engine(model)} | ({"ours compiled": compiled} if compiled else {})
    rng = torch.Generator().manual_seed(2)
    rows, worst, same = [], {k: 9.0 for k in engines}, True
    for B in (1, 8):
        ids = torch.randint(0, model.cfg.vocab_size, (B, 16), generator=rng)
        fns = {k: wall(lambda e=e, ids=ids: e.generate(ids.tolist(), None, n)) for k, e in engines.items()}
        fns["transformers"] = wall(
            lambda ids=ids: hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        )
        with torch.no_grad():
            want = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )[:, 16:].tolist()
        same &= all([c.tokens for c in e.generate(ids.tolist(), None, n)] == want for e in engines.values())
        t = self_timed(fns, repeats)
        parts = [f"transformers {B * n / t['transformers']:,.0f} tok/s"]
        for k in engines:
            worst[k] = min(worst[k], t["transformers"] / t[k])
            parts.append(f"{k} {B * n / t[k]:,.0f} tok/s (**{t['transformers'] / t[k]:.2f}x**)")
        rows.append(f"batch {B}: " + ", ".join(parts))
    return rows, worst, same


def speculative_runs(
    model: MatryoshkaLM, prompts: list[list[int]], n: int, repeats: int, engine: Engine, configs: dict[str, dict]
) -> tuple[dict[str, float], dict[str, SpeculativeStats], bool]:
    """Total seconds over all prompts for the target alone and each speculative config; outputs compared."""
    want = [engine.generate([p], None, n)[0].tokens for p in prompts]
    stats = {k: SpeculativeStats() for k in configs}
    same = True

    def run_spec(key: str) -> float:
        nonlocal same
        t0 = clock()
        for p, w in zip(prompts, want):
            got, s = speculative_decode(model, p, None, engine=engine, max_new_tokens=n, **configs[key])
            same &= got.tokens == w
            for f in ("rounds", "drafted", "accepted"):
                setattr(stats[key], f, getattr(stats[key], f) + getattr(s, f))
            stats[key].gammas += s.gammas
        return clock() - t0

    fns = {"target alone": wall(lambda: [engine.generate([p], None, n) for p in prompts])}
    fns |= {k: (lambda k=k: run_spec(k)) for k in configs}
    return self_timed(fns, repeats), stats, same


def vm_kb(field: str) -> int:
    """VmRSS / VmHWM (peak) of this process from /proc (ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def step_costs(engine: Engine, repeats: int, calls: int = 50) -> dict[str, float]:
    """CPU seconds of one decode step of XL, M and S, and of one XL verification pass over 5 tokens, each after
    40 cached tokens: what speculative decoding trades."""
    model = engine.model

    def loop(size: str, T: int) -> Callable[[], float]:
        runner, spec = engine.runner(uniform_spec(model.cfg, size))  # the module and spec decoding runs
        cache = KVCache.allocate(model.cfg, spec, 1, 64)
        x = torch.randint(0, model.cfg.vocab_size, (1, 40 + T), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            prefill(runner, x[:, :40], spec, cache)

        @torch.no_grad()
        def run() -> float:
            t0 = clock()
            for _ in range(calls):
                if T == 1:
                    engine.decode_step(runner, x[0, 40:], spec, cache, 40)
                else:
                    engine.forward_chunk(runner, x[:, 40:], spec, cache, 40)
            return (clock() - t0) / calls

        return run

    return self_timed(
        {"XL step": loop("XL", 1), "M step": loop("M", 1), "S step": loop("S", 1), "XL verify 5": loop("XL", 5)},
        repeats,
    )


def memory_probe(mode: str) -> dict:
    """Run in a subprocess: peak RSS of serving the wide model at XL only, at all four sizes, or as four
    extracted models."""
    torch.set_num_threads(THREADS)
    base = vm_kb("VmHWM")
    model = wide_model()
    prompt = [list(range(1, 33))]
    if mode == "separate":
        models = {s: extracted(model, s) for s in SIZES}
        del model
        for s in SIZES:
            Engine(models[s]).generate(prompt, None, 32)
    else:
        engine = Engine(model)
        for s in SIZES if mode == "all" else ["XL"]:
            engine.generate(prompt, uniform_spec(model.cfg, s), 32)
    return {"base_kb": base, "peak_kb": vm_kb("VmHWM")}


def memory_section() -> tuple[list[str], float]:
    out = {}
    for mode in ("full", "all", "separate"):
        res = subprocess.run(
            [sys.executable, __file__, "--memory-probe", mode], capture_output=True, text=True, check=True
        )
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    mb = {k: (v["peak_kb"] - v["base_kb"]) / 1024 for k, v in out.items()}
    total = {k: v["peak_kb"] / 1024 for k, v in out.items()}
    ratio = mb["all"] / mb["full"]
    cfg = ModelConfig(**WIDE)
    weights = {s: 4 * count_params(cfg, uniform_spec(cfg, s))["total"] / 2**20 for s in SIZES}
    rows = [
        f"full model alone, XL only: {mb['full']:.0f} MB above the interpreter ({total['full']:.0f} MB peak RSS)",
        (
            f"one process serving XL, L, M, S from the same weights: {mb['all']:.0f} MB ({total['all']:.0f} MB), "
            f"**{ratio:.3f}x** the full model alone"
        ),
        (
            f"for contrast, four extracted models: {mb['separate']:.0f} MB ({total['separate']:.0f} MB); their "
            f"weights alone are {sum(weights.values()):.0f} MB vs {weights['XL']:.0f} MB"
        ),
    ]
    return rows, ratio


# ---------------------------------------------------------------- main


def main(quick: bool = False) -> str:
    torch.set_num_threads(THREADS)
    reps, n = (1, 8) if quick else (5, 64)
    t_start = time.perf_counter()
    demo, tok, demo_note = demo_model()
    wide = wide_model()
    load = os.getloadavg()[0]
    sections = [
        (
            f"## Inference (`benchmarks/bench_inference.py`)\n\nMachine: {machine()}. Load average at the "
            f"start: {load:.1f} on {os.cpu_count()} cores (other jobs share it; hence CPU time below).\n"
        ),
        (
            f"Models: *demo* = {demo_note}, {count_params(demo.cfg, demo.full)['total'] / 1e6:.1f} M params; "
            f"*wide* = random weights, {count_params(wide.cfg, wide.full)['total'] / 1e6:.1f} M params "
            f"(d_model 512, 8 layers, FFN 1536). fp32, greedy, medians of {reps} interleaved repeats, "
            f"{n} new tokens after a 16-token prompt.\n"
        ),
    ]

    # 1. speed per size
    log("per-size speed")
    demo_table = per_size_table("demo", demo, n, reps)
    wide_table = per_size_table("wide", wide, max(16, n // 2), max(1, reps - 2))
    sections.append("### Decode and prefill speed per size (eager)\n\n" + demo_table + "\n\n" + wide_table + "\n")

    # 2. elastic vs extracted
    log("elastic vs extracted")
    rows_d, worst_d = elastic_vs_extracted("demo", demo, n, 2 * reps + 1)
    rows_w, worst_w = elastic_vs_extracted("wide", wide, max(16, n // 2), 2 * reps + 1)
    worst = min(worst_d, worst_w)
    layout = layout_rows(wide, "S", reps)
    sections.append(
        "### Elastic slicing vs a standalone extracted model of the same shape\n\n"
        "Decode tok/s at batch 1: an extracted dense copy of the size's weights; the engine, which "
        "runs the size on views of the full weights taken once per size; and `model(x, spec)`, which "
        "takes the views at every call. Ratios are to the extracted copy.\n\n"
        + md_table(EXTRACTED_HEAD, rows_d + rows_w, "llrrr")
        + f"\n\nGoal >= 0.95x: {goal(worst >= 0.95)} (worst {worst:.2f}x).\n\n"
        "Where the difference comes from, one matmul of the *wide* model's layer 0 at size S (slice view "
        "vs contiguous copy, time per call, copy/view):\n\n"
        + "\n".join(f"- {r}" for r in layout)
        + "\n\n"
        + LAYOUT_NOTE
    )

    # compile once, timed: the graphs every later compiled figure uses
    log("torch.compile")
    compiled, compile_s = compile_engine(demo)

    # 3. vs transformers
    log("vs transformers")
    rows_hf, worst_hf, same_hf = vs_transformers(demo, n, reps, compiled)
    rows_hfw, worst_hfw, same_hfw = vs_transformers(wide, max(16, n // 2), max(1, reps - 2))
    sections.append(
        "### Ours vs Hugging Face transformers `generate` (same weights, full model, greedy)\n\n"
        "End to end (prefill + decode), transformers' default dynamic cache and eager mode; ours eager "
        "and, for the demo model, compiled (graphs compiled beforehand, see below).\n\n"
        + "\n".join(f"- demo, {r}" for r in rows_hf)
        + "\n"
        + "\n".join(f"- wide, {r}" for r in rows_hfw)
        + f"\n\nIdentical greedy tokens: {same_hf and same_hfw}. Goal >= 1.5x: demo eager "
        f"{goal(worst_hf['ours'] >= 1.5)} (worst {worst_hf['ours']:.2f}x), demo compiled "
        f"{goal(worst_hf['ours compiled'] >= 1.5)} (worst {worst_hf['ours compiled']:.2f}x), wide eager "
        f"{goal(worst_hfw['ours'] >= 1.5)} (worst {worst_hfw['ours']:.2f}x).\n"
    )

    # 4. speculative decoding
    log("speculative")
    prompts = [tok.encode(p).ids for p in (PROMPTS[:2] if quick else PROMPTS)]
    n_spec = 16 if quick else 96
    configs = {f"draft {d}": dict(draft=uniform_spec(demo.cfg, d)) for d in ("S", "M", "L")}
    configs["draft S, fixed gamma 4"] = dict(draft=uniform_spec(demo.cfg, "S"), adaptive=False)
    configs["draft S, shared cache"] = dict(draft=uniform_spec(demo.cfg, "S"), share_cache=True)
    configs["draft M, shared cache"] = dict(draft=uniform_spec(demo.cfg, "M"), share_cache=True)
    t_spec, st_spec, same_spec = speculative_runs(demo, prompts, n_spec, max(1, reps - 2), Engine(demo), configs)
    costs = step_costs(Engine(demo), reps)
    sections.append(speculative_table("eager", t_spec, st_spec, same_spec, len(prompts), n_spec, costs))

    # 5. torch.compile
    t_c = compiled_vs_eager(demo, compiled, prompts[0], n, reps)
    c_configs = {"draft S (compiled)": dict(draft=uniform_spec(demo.cfg, "S"))}
    t_cs, st_cs, same_cs = speculative_runs(demo, prompts, n_spec, max(1, reps - 2), compiled, c_configs)
    c_costs = step_costs(compiled, reps)
    sections.append(
        compile_section(compile_s, t_c, n)
        + "\n"
        + speculative_table("compiled", t_cs, st_cs, same_cs, len(prompts), n_spec, c_costs)
    )

    # 6. memory
    log("memory")
    mem_rows, mem_ratio = memory_section()
    sections.append(
        "### Memory: one process serving every size\n\nPeak RSS of a process that loads the *wide* model "
        "and generates 32 tokens (subprocesses; KV caches included, interpreter and torch excluded):\n\n"
        + "\n".join(f"- {r}" for r in mem_rows)
        + f"\n\nGoal <= 1.05x: {goal(mem_ratio <= 1.05)}.\n"
    )
    sections.append(NOTES)
    sections.append(f"_Whole benchmark: {(time.perf_counter() - t_start) / 60:.1f} min._\n")
    body = "\n".join(sections)
    if not quick:
        write_section("inference", body)
    return body


def compile_engine(model: MatryoshkaLM) -> tuple[Engine, float]:
    """A compiled engine with its graphs compiled (decode: XL at batch 1 and 8, S at batch 1; speculative verify
    and catch-up), and the wall-clock seconds that took."""
    compiled = Engine(model, compile=True)
    t0 = time.perf_counter()
    for size, batch in (("XL", 1), ("S", 1), ("XL", 8)):
        decode_seconds(compiled, size, [list(range(1, 17))] * batch, 8)()
        decode_seconds(compiled, size, [list(range(1, 17))] * batch, 8)()
    for prompt in (list(range(1, 17)), list(range(1, 9))):  # verify and catch-up graphs
        speculative_decode(model, prompt, None, uniform_spec(model.cfg, "S"), 24, engine=compiled)
    return compiled, time.perf_counter() - t0


def compiled_vs_eager(
    model: MatryoshkaLM, compiled: Engine, prompt: list[int], n: int, repeats: int
) -> dict[str, float]:
    """Seconds of n - 1 batch-1 decode steps of XL and S, eager and compiled (interleaved medians)."""
    eager = Engine(model)
    return self_timed(
        {
            f"{s} {k}": decode_seconds(e, s, [prompt], n)
            for s in ("XL", "S")
            for k, e in (("eager", eager), ("compiled", compiled))
        },
        repeats,
    )


def compile_only(quick: bool) -> str:
    """The torch.compile comparison alone (`--compile-only`): the demo model if bench_inference trained it
    before, else the demo preset with random weights (decode speed does not depend on the weights)."""
    torch.set_num_threads(THREADS)
    reps, n = (1, 8) if quick else (5, 64)
    if (MODEL_DIR / "model.safetensors").is_file():
        model, tok, _ = demo_model()
        prompt = tok.encode(PROMPTS[0]).ids
    else:
        torch.manual_seed(0)
        model, prompt = MatryoshkaLM(preset("demo")[0]).eval(), [5, 9, 31, 2]
    compiled, compile_s = compile_engine(model)
    return compile_section(compile_s, compiled_vs_eager(model, compiled, prompt, n, reps), n)


def speculative_table(
    kind: str,
    t: dict[str, float],
    stats: dict[str, SpeculativeStats],
    same: bool,
    n_prompts: int,
    n: int,
    costs: dict[str, float],
) -> str:
    base = t["target alone"]
    title = f"### Speculative decoding, {kind} (demo model, target XL, {n_prompts} prompts x {n} tokens, greedy)\n"
    cells = [["XL alone", f"{base:.2f}", "1.00x", "", "1.00", ""]]
    best = 0.0
    for k, s in stats.items():
        best = max(best, base / t[k])
        cells.append([k, f"{t[k]:.2f}", f"**{base / t[k]:.2f}x**", f"{s.acceptance:.0%}", f"{s.tokens_per_round:.2f}",
                      f"{statistics.mean(s.gammas) if s.gammas else 0:.1f}"])  # fmt: skip
    head = ["decoding", "s", "speedup vs XL alone", "acceptance", "tokens per XL pass", "mean gamma"]
    rows = [title, md_table(head, cells)]
    xl = costs["XL step"]
    why = (
        f"What a round costs here, relative to one XL decode step ({xl * 1e3:.2f} ms): an S draft step "
        f"{costs['S step'] / xl:.2f}, an M draft step {costs['M step'] / xl:.2f}, verifying 5 tokens with XL "
        f"{costs['XL verify 5'] / xl:.2f}."
    )
    return (
        "\n".join(rows) + f"\n\nOutput identical to XL alone, token for token, in every run: {same}. "
        f"Goal >= 1.5x: {goal(best >= 1.5)} (best {best:.2f}x). {why}\n"
    )


def compile_section(compile_s: float, t: dict[str, float], n: int) -> str:
    rate = {k: (n - 1) / v for k, v in t.items()}
    return (
        f"### torch.compile (demo model, batch 1)\n\nCompiling the decode and verify graphs took "
        f"{compile_s:.0f} s (wall clock; XL at batch 1 and 8, S at batch 1). Decode: XL eager "
        f"{rate['XL eager']:,.0f} tok/s vs compiled {rate['XL compiled']:,.0f} "
        f"({t['XL eager'] / t['XL compiled']:.2f}x); S eager {rate['S eager']:,.0f} vs compiled "
        f"{rate['S compiled']:,.0f} ({t['S eager'] / t['S compiled']:.2f}x).\n"
    )


LAYOUT_NOTE = """Layout: weights keep the `nn.Linear` (out, in) row-major layout, so a size's output units are a
contiguous block of rows and its input features a contiguous run at the start of each row; BLAS reads such a view
through its leading dimension, with no copy. Two things cost: taking the views (two slice ops per matmul, which
the overhead-bound demo model feels; the engine therefore takes them once per size) and the stride between the
runs, largest for w_down at S, which keeps 1/8 of every row. Storing w_down and wo column-major would make those
runs longer; measured here it sped L, M and S up by 2-7% but slowed XL by 3-4% (MKL's column-major gemv is slower
at full size), so the layout stays as it is (it is also Hugging Face's, so export and import remain renames).
"""


NOTES = """### Notes

- Noise: over the five full runs made while the code took shape (load average 2.6-6.8), single ratios moved by up
  to about 0.1 between runs (e.g. draft S with a shared cache 0.80-1.00x, ours/transformers eager 1.17-1.44x). The
  verdicts held in every run: transformers 1.5x not met eager, met compiled (1.6-3.3x); speculative decoding below
  1x; elastic vs extracted below 0.95x at the wide model's S (0.87-0.91x). The memory goal is met since view models
  are built without touching meta tensors (the first version imported ~70 MB of sympy & co. doing so: 1.59x).
- Threads and clock: every figure uses 1 torch thread and the CPU time of the benchmark process. The 2 cores are
  shared with other jobs: with 2 threads, batch-1 decoding of these small models slowed down by up to 100x under
  load, and wall-clock times were inflated and scattered several-fold.
- Speculative decoding on this CPU: its premise is that the target checks gamma + 1 tokens for about the price of
  one (decoding is memory-bound on a GPU). Here the demo model's 8 MB of weights sit in the CPU cache, so a forward
  costs per-op dispatch overhead plus FLOPs that grow with the tokens: verifying 5 tokens costs well over one step,
  and a draft step of S, with a quarter of XL's parameters, still costs half a step or more (the same number of ops
  per layer, fewer layers). With the measured acceptance rates, expected tokens per unit of time
  (1 + a + ... + a^g) / (g c + v) stays near or below 1 for every gamma, and the measurements agree. torch.compile
  cuts the overhead but not the FLOPs. The implementation is lossless (the tests and the "identical" column show it)
  and the adaptive gamma keeps the loss small; the >= 1.5x goal needs a target whose step is memory-bound (a bigger
  model, or a GPU), which this machine cannot train in the benchmark's time.
- Adaptive gamma measures the draft/verify cost ratio under greedy decoding; under sampling a fixed ratio (the
  parameter ratio) keeps seeded output reproducible. It never picks gamma = 0 (plain decoding), so where drafting
  cannot pay, as here, it settles near gamma = 1-2 and limits the loss instead of avoiding it.
- Zero copy: each size runs on a "view model", a module of the size's shape whose parameters are views of the full
  weights, built uninitialised on the meta device (no allocation, and nothing process-wide patched) the first time
  the size is used. The memory table is the end-to-end check; tests/infer/test_engine.py checks storage pointers and
  allocations op by op.
- Shared cache (MatFormer): the draft reads the target's KV cache instead of its own. It saves the draft's prefill,
  its catch-up step and its cache memory, but the draft then attends to keys/values computed by the full model,
  which changes its predictions; the acceptance columns show the effect. The output is exact either way. It stays
  an option (`share_cache=True`), off by default, since it lowered acceptance more than it saved here.
- transformers: `LlamaForCausalLM.generate` with its default dynamic cache; on small models its per-step Python
  overhead (logits processors, cache objects, stopping criteria) is what the ratio measures. On the wide model the
  matmuls dominate and the two converge.
- torch.compile: plain `torch.compile` of the decode step, one region per size (graphs per batch-1 / batched /
  padded shape), compiled on first use. Steps have static shapes, as in gpt-fast: the cache position is a tensor
  and attention reads the whole cache (its length rounded up to a power of two) through a mask, so one graph
  serves every step and every generation of that cache length. Compiling costs tens of seconds per size here, so
  the CLI compiles only on CUDA unless asked (`--compile`; `--no-compile` turns it off everywhere).
"""


def log(msg: str) -> None:
    print(f"[bench_inference] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny repeats, BENCHMARKS.md untouched")
    ap.add_argument("--memory-probe", choices=["full", "all", "separate"], help=argparse.SUPPRESS)
    ap.add_argument(
        "--compile-only",
        action="store_true",
        help="only the torch.compile decode comparison, printed (BENCHMARKS.md untouched)",
    )
    args = ap.parse_args()
    if args.compile_only:
        print(compile_only(args.quick))
    elif args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
    else:
        print(main(args.quick))
