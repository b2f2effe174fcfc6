"""Peak resident memory of training start-up on prepared shards of ~100 MB, 1 GB and 3 GB of text.

Start-up reads the manifest, the token counts `prepare` wrote, and the windows of step 1; no more of the corpus.
The 100 MB folder is a real `matryoshka prepare` (bench_data's corpus and tokenizer); the larger ones repeat its
train shards as separate files (distinct pages, so nothing is shared in the page cache) with the manifest and counts
scaled to match: start-up reads no token it does not train on, so the content does not change what it holds, and
preparing 3 GB again takes ~45 minutes on 2 cores. Writes the `data-startup` section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_data import OUT, label, run_prepare, startup, verdict
from common import machine, write_section
from matryoshka_lm.data.corpus import MANIFEST
from matryoshka_lm.data.shards import COUNTS, read_manifest, write_counts, write_json
from matryoshka_lm.report import md_table

SIZES = (0.1, 1.0, 3.0)


def tiled(gb: float) -> Path:
    """OUT/prep-<gb>: the 100 MB prepared folder's train shards repeated round(gb / 0.1) times."""
    base, folder = OUT / f"prep-{label(SIZES[0])}", OUT / f"prep-{label(gb)}"
    if (folder / MANIFEST).is_file() and read_manifest(folder).get("tiled_from") == base.name:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    m, times = read_manifest(base), round(gb / SIZES[0])
    shards = []
    for _ in range(times):
        for s in m["shards"]["train"]:
            name = f"train-{len(shards):05d}.bin"
            shutil.copyfile(base / s["file"], folder / name)
            shards.append({**s, "file": name})
    for f in [m["tokenizer"]["file"], *(s["file"] for s in m["shards"]["val"])]:
        shutil.copyfile(base / f, folder / f)
    counts = np.load(base / COUNTS, allow_pickle=False)
    counts[0] *= times
    write_counts(folder, counts)
    tokens = sum(s["tokens"] for s in shards)
    write_json(folder / MANIFEST, {**m, "shards": {**m["shards"], "train": shards}, "train_tokens": tokens,
                                   "tiled_from": base.name})  # fmt: skip
    return folder


def section(res: dict) -> str:
    rows = [[label(gb), f"{r['train_tokens'] / 1e6:,.0f} M", f"{r['peak_mb']:,.0f}", f"{r['peak_anon_mb']:,.0f}",
             f"{r['seconds']:.0f}"] for gb, r in zip(SIZES, res["startup"])]  # fmt: skip
    peak = [r["peak_mb"] for r in res["startup"]]
    return "\n".join([
        "## Training start-up memory on prepared shards (`benchmarks/bench_startup.py`)",
        "",
        "`train --preset tiny --data DIR --steps 1` (8192-token tokenizer), resident memory summed over its "
        "processes, sampled every 0.2 s; (anon): anonymous memory only. 100 MB: a real `prepare` of bench_data's "
        "corpus; 1 GB and 3 GB: its train shards repeated as separate files, manifest and counts scaled (start-up "
        "reads no token it does not train on, so the content changes nothing it holds). The unigram baseline comes "
        "from the token counts `prepare` writes (`counts.npy`): before, start-up counted the whole memory-mapped "
        "train stream, and every page of it stayed resident (621 MB / 1.13 GB / 2.09 GB at these sizes).",
        "",
        md_table(["corpus", "train tokens", "peak MB", "anon MB", "seconds"], rows),
        "",
        f"- <= 1 GB at every size: {verdict(max(peak) <= 1024)} (largest {max(peak):,.0f} MB)",
        f"- flat in corpus size (at most +100 MB from 100 MB to 3 GB): {peak[-1] - peak[0]:+,.0f} MB, "
        f"{verdict(peak[-1] - peak[0] <= 100)}",
        "",
        f"Machine: {machine()}; load average {res['load']:.1f} at the end. Reproduce: `.venv/bin/python "
        "benchmarks/bench_startup.py` (after `bench_data.py --quick` or on its own: it prepares the 100 MB corpus).",
    ])  # fmt: skip


def main() -> None:
    run_prepare(SIZES[0], fresh=False)
    res = {"startup": []}
    for gb in SIZES:
        if gb != SIZES[0]:
            tiled(gb)
        r = startup(gb)
        r["train_tokens"] = read_manifest(OUT / f"prep-{label(gb)}")["train_tokens"]
        res["startup"].append(r)
    res["load"] = os.getloadavg()[0]
    (OUT / "startup.json").write_text(json.dumps(res, indent=1))
    write_section("data-startup", section(res))
    print(section(res))


if __name__ == "__main__":
    main()
