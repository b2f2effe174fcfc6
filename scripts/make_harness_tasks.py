"""Build the offline lm-eval tasks in src/matryoshka_lm/eval/harness_tasks/ (deterministic: rerun, same bytes).

The text is held out by every preset trained on the embedded default corpus (Shakespeare + KJV): it lies in the
validation blocks of the `small` preset's split (whole corpus, data.split_tokens) and outside the share of each
document that the `tiny` and `demo` presets read (data.limit_chars). Re-creating a split needs its run's tokenizer,
and BPE training reproduces it exactly (the demo checkpoint's tokenizer.json is what train_tokenizer gives).

    matryoshka_ppl.jsonl    {"text"}: 50 passages (25 per source) for loglikelihood_rolling perplexity
    matryoshka_cloze.jsonl  {"context", "choices", "label"}: 200 items (100 per source): a few lines, then the
                            true next line among 3 distractor lines of similar length from other held-out passages
                            of the same source

Usage: python scripts/make_harness_tasks.py [OUT_DIR]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np

from matryoshka_lm.config import preset
from matryoshka_lm.data import EOT, default_corpus, encode_corpus, limit_chars, train_tokenizer

OUT = Path(__file__).resolve().parents[1] / "src" / "matryoshka_lm" / "eval" / "harness_tasks"
SOURCES = ("shakespeare", "kjv")
N_PPL, N_CLOZE = 25, 100  # per source
PPL_CHARS = (500, 900)  # a passage: whole lines, at least 500 characters, at most 900
CLOZE_CONTEXT = {"shakespeare": 4, "kjv": 2}  # lines of context (KJV lines are whole verses)
SEED = 0


def held_out_blocks(docs: list[str]) -> list[tuple[str, str]]:
    """(source, text) of every validation block of the `small` preset's split (split_tokens, not imported so
    that block and source stay together)."""
    _, tcfg = preset("small")
    tok = train_tokenizer(limit_chars(docs, tcfg.max_corpus_chars), tcfg.vocab_size)
    tokens = encode_corpus(tok, docs)
    every, block = round(1 / tcfg.val_fraction), 2048
    first_kjv = int(np.flatnonzero(tokens == tok.token_to_id(EOT))[0]) + 1  # documents end in EOT
    out = []
    for b in range(every - 1, len(tokens) // block, every):
        ids = tokens[b * block : (b + 1) * block]
        if b * block < first_kjv <= (b + 1) * block:
            continue  # straddles the two documents
        out.append((SOURCES[b * block >= first_kjv], tok.decode(ids.tolist())))
    return out


def seen_by_small_presets(docs: list[str]) -> str:
    """The text the `demo` preset reads (the `tiny` preset reads a prefix of it)."""
    _, tcfg = preset("demo")
    return "\x00".join(limit_chars(docs, tcfg.max_corpus_chars))


def passages(text: str, lo: int, hi: int) -> list[list[str]]:
    """Runs of whole non-blank lines of at least `lo` characters, skipping each block's first and last line
    (cut by the block boundary)."""
    lines = [s.strip() for s in text.split("\n")[1:-1]]
    out, run = [], []
    for line in lines:
        if not line:
            continue
        run.append(line)
        if sum(len(s) + 1 for s in run) >= lo:
            if sum(len(s) + 1 for s in run) <= hi:
                out.append(run)
            run = []
    return out


def interleave(per_source: list[list[dict]]) -> list[dict]:
    """Alternate the sources, so that the first documents (lm-eval's --limit) mix them."""
    return [d for group in zip(*per_source) for d in group]


def ppl_docs(pool: dict[str, list[list[str]]], rng: random.Random) -> list[dict]:
    return interleave([[{"source": s, "text": "\n".join(r)} for r in rng.sample(pool[s], N_PPL)] for s in SOURCES])


def cloze_docs(pool: dict[str, list[list[str]]], rng: random.Random) -> list[dict]:
    per_source = []
    for src in SOURCES:
        docs = []
        k = CLOZE_CONTEXT[src]
        lines = [s for run in pool[src] for s in run]
        for run in rng.sample([r for r in pool[src] if len(r) > k], N_CLOZE):
            i = rng.randrange(len(run) - k)
            context, answer = run[i : i + k], run[i + k]
            near = [s for s in lines if 0.5 * len(answer) <= len(s) <= 2 * len(answer) and s not in run]
            choices = rng.sample(near, 3) + [answer]
            rng.shuffle(choices)
            docs.append(
                {"source": src, "context": "\n".join(context), "choices": choices, "label": choices.index(answer)}
            )
        per_source.append(docs)
    return interleave(per_source)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KB")


def main(out: Path = OUT) -> None:
    docs = default_corpus()
    seen = seen_by_small_presets(docs)
    pool: dict[str, list[list[str]]] = {s: [] for s in SOURCES}
    for src, text in held_out_blocks(docs):
        pool[src] += [run for run in passages(text, *PPL_CHARS) if "\n".join(run) not in seen]
    print({s: len(v) for s, v in pool.items()}, "held-out passages")
    rng = random.Random(SEED)
    # disjoint passages for the two tasks: perplexity from one half, cloze from the other
    halves = {s: (v[0::2], v[1::2]) for s, v in pool.items()}
    write_jsonl(out / "matryoshka_ppl.jsonl", ppl_docs({s: h[0] for s, h in halves.items()}, rng))
    write_jsonl(out / "matryoshka_cloze.jsonl", cloze_docs({s: h[1] for s, h in halves.items()}, rng))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
