"""Peak resident memory of `train --data TEXT` through the token-shard cache on ~100 MB, 1 GB and 3 GB of real text.

Each size runs `train --preset tiny --steps 1 --prepare-text always` twice on a fresh cache: the first run prepares
the text into the cache inside the training command (2 worker processes, bench_data's fixed 8192-token tokenizer
given with --tokenizer so no BPE training is measured), the second finds it up to date and starts at once. The text
is bench_data's: the embedded corpus's 256-line sections shuffled into 50 MB files (real English, repeated in varied
order). Memory is summed over the command's processes every 0.2 s (bench_data.measured). Writes the `data-cache`
section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_data import CLI, OUT, TOK, corpus, label, measured, tokenizer, verdict
from common import machine, write_section
from matryoshka_lm.data.cache import CACHE_ENV
from matryoshka_lm.report import md_table

SIZES = (0.1, 1.0, 3.0)


def run_twice(gb: float) -> dict:
    cache, out = OUT / f"cache-{label(gb)}", OUT / "train-tmp"
    shutil.rmtree(cache, ignore_errors=True)
    text = corpus(gb)
    cmd = [*CLI, "train", "--preset", "tiny", "--data", str(text), "--steps", "1", "--quiet", "--out", str(out),
           "--prepare-text", "always", "--max-corpus-chars", "0", "--tokenizer", str(TOK.parent)]  # fmt: skip
    res = {"bytes": sum(f.stat().st_size for f in text.iterdir())}
    for run in ("first", "second"):
        shutil.rmtree(out, ignore_errors=True)
        print(f"train --data {label(gb)} of text ({run} run) ...", file=sys.stderr, flush=True)
        res[run] = measured(cmd, f"cache-{label(gb)}-{run}", env={CACHE_ENV: str(cache)})
    (folder,) = [p for p in (cache / "prepared").iterdir() if p.is_dir()]
    res["tokens"] = json.loads((folder / "manifest.json").read_text())["train_tokens"]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache)
    return res


def section(res: dict) -> str:
    rows = [[label(gb), f"{r['bytes'] / 1e6:,.0f}", f"{r['tokens'] / 1e6:,.0f} M", f"{r['first']['peak_mb']:,.0f}",
             f"{r['first']['seconds']:.0f}", f"{r['second']['peak_mb']:,.0f}", f"{r['second']['seconds']:.1f}"]
            for gb, r in zip(SIZES, res["runs"])]  # fmt: skip
    first = [r["first"]["peak_mb"] for r in res["runs"]]
    second = [r["second"]["peak_mb"] for r in res["runs"]]
    return "\n".join([
        "## `train --data TEXT` through the cache (`benchmarks/bench_train_cache.py`)",
        "",
        "`train --preset tiny --steps 1 --prepare-text always --data TEXT` twice on a fresh cache: the first run "
        "prepares the text inside the training command (2 workers, the fixed 8192-token tokenizer given), the second "
        "finds the cache folder up to date. Resident memory summed over the command's processes, sampled every 0.2 s. "
        "The text: the embedded corpus's sections shuffled into 50 MB files (real English, repeated in varied order).",
        "",
        md_table(["text", "MB", "train tokens", "first: peak MB", "first: s", "second: peak MB", "second: s"], rows),
        "",
        f"- <= 1 GB at every size, both runs: {verdict(max(first + second) <= 1024)} "
        f"(largest {max(first + second):,.0f} MB)",
        f"- flat in corpus size (first run, 100 MB -> 3 GB): {first[-1] - first[0]:+,.0f} MB; second run "
        f"{second[-1] - second[0]:+,.0f} MB",
        "",
        f"Machine: {machine()}; load average {res['load']:.1f} at the end. Reproduce: `.venv/bin/python "
        "benchmarks/bench_train_cache.py` (writes up to 3 GB of text under runs/bench_data).",
    ])  # fmt: skip


def main() -> None:
    tokenizer()
    res = {"runs": [run_twice(gb) for gb in SIZES], "load": os.getloadavg()[0]}
    (OUT / "train_cache.json").write_text(json.dumps(res, indent=1))
    write_section("data-cache", section(res))
    print(section(res))


if __name__ == "__main__":
    main()
