"""The data path (issue 25): `matryoshka prepare` throughput vs the tokenizer's own ceiling, peak memory of prepare
and of training start-up as the corpus grows, the memory-mapped loader's rate vs a CPU step's need, and the MFU of
the joint step on this CPU.

Corpora: the embedded English (Shakespeare, KJV, Python's pydoc topics) repeated, each ~50 MB file its 256-line
sections shuffled with its own seed, under runs/bench_data/ (cached, as are the tokenizer and the prepared folders
of 1 GB and more; the 100 MB corpus is prepared afresh each run, beside its ceiling).
Writes the `data` section of BENCHMARKS.md and runs/bench_data/results.json.

Run: .venv/bin/python benchmarks/bench_data.py [--sizes 0.1,1,3] [--quick] [--fresh]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine, write_section
from matryoshka_lm.data.corpus import MANIFEST, default_corpus, sample_batch, sections, train_tokenizer
from matryoshka_lm.data.prepare import BATCH_CHARS
from matryoshka_lm.data.shards import open_prepared, read_manifest
from matryoshka_lm.report import md_table

OUT = ROOT / "runs" / "bench_data"
POOL = OUT / "text"  # the ~50 MB files; each corpus folder hard-links the first n of them
TOK = OUT / "tokenizer" / "tokenizer.json"
FILE_CHARS = 50_000_000
CLI = [sys.executable, "-m", "matryoshka_lm.cli"]
THREADS = {"RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}  # the ceiling's 2 threads
OLD_LIMIT_GB = 12.0  # the in-memory text path is killed past this
MB = 1 << 20
# the peak of a process tree, sampled; ru_maxrss of the command's biggest process, written by this wrapper
WRAP = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[2:]).returncode; "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)"
)


def label(gb: float) -> str:
    return f"{gb * 1000:.0f}MB" if gb < 1 else f"{gb:g}GB"


def units() -> list[str]:
    """The 256-line sections of every embedded document, each ending in a newline (so any order joins cleanly)."""
    import pydoc_data.topics

    docs = default_corpus() + ["\n\n".join(pydoc_data.topics.topics.values())]
    return [s if s.endswith("\n") else s + "\n" for d in docs for s in sections(d)]


def pool_file(i: int, pieces: list[str]) -> Path:
    path = POOL / f"part-{i:03d}.txt"
    if path.is_file():
        return path
    rng, n, tmp = random.Random(i), 0, path.with_suffix(".part")
    with open(tmp, "w") as f:
        while n < FILE_CHARS:
            order = pieces[:]
            rng.shuffle(order)
            for p in order:
                f.write(p)
                n += len(p)
                if n >= FILE_CHARS:
                    break
    os.replace(tmp, path)
    return path


def corpus(gb: float) -> Path:
    """A folder of ~gb GB of text: hard links to the first pool files (generated once)."""
    n = max(1, round(gb * 1e9 / FILE_CHARS))
    folder = OUT / f"text-{label(gb)}"
    POOL.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = None
    for i in range(n):
        if not (POOL / f"part-{i:03d}.txt").is_file():
            pieces = pieces or units()
            print(f"writing {POOL}/part-{i:03d}.txt", file=sys.stderr, flush=True)
        link = folder / f"part-{i:03d}.txt"
        if not link.exists():
            os.link(pool_file(i, pieces), link)
    return folder


def tokenizer() -> Path:
    """One 8192-token BPE trained once on 20 MB of the corpus: fixed, so its training is in no measurement."""
    if not TOK.is_file():
        TOK.parent.mkdir(parents=True, exist_ok=True)
        text = (corpus(0.1) / "part-000.txt").read_text()[:20_000_000]
        print("training the 8192-token BPE on 20 MB ...", file=sys.stderr, flush=True)
        TOK.write_text(train_tokenizer([text], 8192).to_str())
    return TOK


def _rss_kb(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed + shared) resident kB of a process, 0 once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0, 0
    v = {k: int(rest.split()[0]) for k, _, rest in (ln.partition(":") for ln in lines) if k.startswith("Rss")}
    return v.get("RssAnon", 0), v.get("RssFile", 0) + v.get("RssShmem", 0)


def measured(cmd: list[str], name: str, limit_gb: float | None = None, env: dict | None = None) -> dict:
    """Run cmd, sampling every 0.2 s the resident memory summed over it and its descendants: peak sum (all, and
    anonymous only), ru_maxrss of its biggest process, wall seconds; killed once the sum passes limit_gb."""
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    maxrss = OUT / "logs" / f"{name}.maxrss"
    log = open(OUT / "logs" / f"{name}.log", "w")
    t0 = time.perf_counter()
    p = psutil.Popen([sys.executable, "-c", WRAP, str(maxrss), *cmd], stdout=log, stderr=subprocess.STDOUT,
                     env={**os.environ, **(env or {})})  # fmt: skip
    peak, peak_anon, killed = 0, 0, False
    while p.poll() is None:
        try:
            kids = p.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        rss = [_rss_kb(k.pid) for k in kids]  # the wrapper itself (a bare interpreter) is not counted
        peak, peak_anon = max(peak, sum(a + f for a, f in rss)), max(peak_anon, sum(a for a, _ in rss))
        if limit_gb is not None and peak > limit_gb * MB:
            for k in reversed(kids):
                k.kill()
            killed = True
            break
        time.sleep(0.2)
    rc = p.wait()
    log.close()
    if rc and not killed:
        raise SystemExit(f"{name} failed ({rc}); see {OUT / 'logs' / (name + '.log')}")
    return {
        "seconds": time.perf_counter() - t0,
        "peak_mb": peak / 1024,
        "peak_anon_mb": peak_anon / 1024,
        "maxrss_mb": int(maxrss.read_text()) / 1024 if maxrss.is_file() and not killed else None,
        "killed": killed,
        "load": os.getloadavg()[0],
    }


def ceiling_probe(src: Path) -> None:
    """(In a subprocess with THREADS set.) Seconds of Tokenizer.encode_batch alone over the corpus, in batches of
    the sections prepare encodes together; the text is already in memory, the ids are not kept."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOK))
    tokens, secs, chars = 0, 0.0, 0
    for f in sorted(src.glob("*.txt")):
        batch, size = [], 0
        for s in [*sections(f.read_text()), None]:
            if s is not None:
                batch.append(s)
                size += len(s)
            if batch and (size >= BATCH_CHARS or s is None):
                t = time.perf_counter()
                enc = tok.encode_batch(batch)
                secs += time.perf_counter() - t
                tokens, chars = tokens + sum(len(e) for e in enc), chars + size
                batch, size = [], 0
    print(json.dumps({"tokens": tokens, "seconds": secs, "chars": chars, "tokens_per_s": tokens / secs}))


def ceiling(src: Path) -> dict:
    cmd = [sys.executable, __file__, "--ceiling", str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **THREADS})
    if r.returncode:
        raise SystemExit(f"ceiling probe failed: {r.stderr}")
    return {**json.loads(r.stdout), "load": os.getloadavg()[0]}


def run_prepare(gb: float, fresh: bool) -> dict:
    """`matryoshka prepare` of the corpus with the fixed tokenizer and 2 workers (cached for 1 GB and more)."""
    name = label(gb)
    out, cache = OUT / f"prep-{name}", OUT / f"prepare-{name}.json"
    if not fresh and (out / MANIFEST).is_file() and cache.is_file():
        return {**json.loads(cache.read_text()), "cached": True}
    src = corpus(gb)
    shutil.rmtree(out, ignore_errors=True)
    print(f"prepare {name} ...", file=sys.stderr, flush=True)
    cmd = [*CLI, "prepare", str(src), "-o", str(out), "--tokenizer", str(tokenizer()), "--workers", "2"]
    r = measured(cmd, f"prepare-{name}", env=THREADS)
    m = read_manifest(out)
    tokens = m["train_tokens"] + m["val_tokens"]
    r.update(tokens=tokens, bytes=sum(s["bytes"] for s in m["sources"]), files=len(m["sources"]))
    r["tokens_per_s"] = tokens / r["seconds"]
    cache.write_text(json.dumps(r, indent=1))
    return {**r, "cached": False}


def startup(gb: float, old: bool = False) -> dict:
    """Peak memory of `train --preset tiny --steps 1`: on the prepared shards, or (old) on the text folder read and
    encoded in memory (the same tokenizer given, the whole corpus), killed past OLD_LIMIT_GB."""
    out = OUT / "train-tmp"
    shutil.rmtree(out, ignore_errors=True)
    data = corpus(gb) if old else OUT / f"prep-{label(gb)}"
    cmd = [*CLI, "train", "--preset", "tiny", "--data", str(data), "--steps", "1", "--quiet", "--out", str(out)]
    if old:
        cmd += ["--max-corpus-chars", "0", "--tokenizer", str(TOK.parent)]
    print(f"train start-up {label(gb)} ({'text' if old else 'prepared'}) ...", file=sys.stderr, flush=True)
    r = measured(cmd, f"train-{label(gb)}{'-text' if old else ''}", OLD_LIMIT_GB if old else None)
    shutil.rmtree(out, ignore_errors=True)
    return r


def loader_rate(gb: float, batch: int, seq_len: int, seconds: float = 3.0) -> float:
    """Windows per second that sample_batch draws from the memory-mapped train shards (page cache warm)."""
    _, train, _, _ = open_prepared(OUT / f"prep-{label(gb)}")
    sample_batch(train, batch, seq_len, 0, 0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += 1
        sample_batch(train, batch, seq_len, 0, n)
    return n * batch / (time.perf_counter() - t0)


def per_step(rows: list[dict], tokens_per_step: int) -> list[dict]:
    """Each step's own seconds and FLOP/s from metrics.jsonl, whose tokens_per_s / flops_per_s are since step 1."""
    steps, prev_t, prev_f = [], 0.0, 0.0
    for r in rows:
        t = tokens_per_step * r["step"] / r["tokens_per_s"]
        f = r["flops_per_s"] * t
        steps.append({"step": r["step"], "seconds": t - prev_t, "flops_per_s": (f - prev_f) / (t - prev_t),
                      "peak": r["flops_per_s"] / r["mfu"]})  # fmt: skip
        prev_t, prev_f = t, f
    return steps


def mfu(name: str, data: Path | None) -> dict:
    """3 joint steps of the preset through train(): the median of steps 2..3 (step 1 warms up)."""
    from matryoshka_lm.config import preset
    from matryoshka_lm.train.loop import train

    cfg, tcfg = preset(name)
    tcfg = dataclasses.replace(tcfg, steps=3, eval_batches=1)
    out = OUT / "mfu" / name
    shutil.rmtree(out, ignore_errors=True)
    print(f"mfu {name} ...", file=sys.stderr, flush=True)
    train(cfg, tcfg, out, data=str(data) if data else None)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    later = per_step([r for r in rows if "tokens_per_s" in r], tcfg.batch_size * tcfg.seq_len)[1:]
    med = {k: statistics.median(s[k] for s in later) for k in ("seconds", "flops_per_s", "peak")}
    return {**med, "mfu": med["flops_per_s"] / med["peak"], "tokens_per_step": tcfg.batch_size * tcfg.seq_len,
            "batch_size": tcfg.batch_size, "seq_len": tcfg.seq_len, "data": str(data or "default corpus"),
            "steps": later, "load": os.getloadavg()[0]}  # fmt: skip


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def throughput_part(res: dict) -> list[str]:
    c, p0 = res["ceiling"], res["prepare"][0]
    share = p0["tokens_per_s"] / c["tokens_per_s"]
    rows = [[f"{label(gb)}{' (cached)' if p['cached'] else ''}", p["files"], f"{p['bytes'] / 1e6:,.0f}",
             f"{p['tokens']:,}", f"{p['seconds']:.0f}", f"{p['tokens_per_s']:,.0f}",
             f"{p['tokens_per_s'] / c['tokens_per_s']:.0%}", f"{p['load']:.1f}"]
            for gb, p in zip(res["sizes"], res["prepare"])]  # fmt: skip
    head = ["corpus", "files", "MB", "tokens", "prepare s", "prepare tok/s", "vs ceiling", "load 1 min"]
    return [
        "### prepare throughput vs the tokenizer's own ceiling",
        "",
        f"Ceiling: `Tokenizer.encode_batch` alone on the {label(res['sizes'][0])} corpus, text already in memory, in "
        f"the ~1 MB batches of sections prepare encodes, 2 threads ({', '.join(f'{k}={v}' for k, v in THREADS.items())}"
        f"), measured before and after its prepare: {c['runs'][0]:,.0f} and {c['runs'][1]:,.0f} tok/s, mean "
        f"**{c['tokens_per_s']:,.0f} tok/s** ({c['tokens']:,} tokens). prepare: the CLI end to end (start, 2 worker "
        "processes, checksums, packing, manifest), `--tokenizer` the same file, `--workers 2`.",
        "",
        md_table(head, rows),
        "",
        f"- prepare >= 80% of the ceiling ({label(res['sizes'][0])}, same run): {share:.0%}: {verdict(share >= 0.8)}",
    ]


def memory_part(res: dict) -> list[str]:
    mb = lambda r: "did not survive" if r is None or r["killed"] else f"{r['peak_mb']:,.0f} ({r['peak_anon_mb']:,.0f})"
    rows = []
    for gb, p, s in zip(res["sizes"], res["prepare"], res["startup"]):
        old = res["old"].get(label(gb))
        old_cells = ["not run", ""] if old is None else [mb(old), f"{old['seconds']:.0f}"]
        rows.append([label(gb), mb(p), f"{p['maxrss_mb']:,.0f}", mb(s), f"{s['seconds']:.0f}", *old_cells])
    peaks = {k: [r["peak_mb"] for r in res[k]] for k in ("prepare", "startup")}
    anon = {k: [r["peak_anon_mb"] for r in res[k]] for k in ("prepare", "startup")}
    under = all(v <= 1024 for k in peaks for v in peaks[k])
    grow = {k: peaks[k][-1] - peaks[k][0] for k in peaks}
    grow_anon = {k: anon[k][-1] - anon[k][0] for k in anon}
    flat = all(g <= 100 for g in grow.values())
    head = ["corpus", "prepare peak MB (anon)", "prepare biggest process MB", "train start-up MB (anon)",
            "start-up s", "old text path start-up MB (anon)", "old s"]  # fmt: skip
    return [
        "### Peak memory (resident, MB)",
        "",
        "Summed over the command's processes (prepare: the CLI and its 2 workers), sampled every 0.2 s; (anon): "
        "anonymous memory only, the rest being file pages (the memory-mapped shards); biggest process: its "
        "ru_maxrss. Training start-up: `train --preset tiny --data DIR --steps 1` (the model takes the 8192-token "
        "tokenizer). Old path: `train --data TEXT_FOLDER --max-corpus-chars 0 --tokenizer` the same tokenizer "
        f"(train has no --vocab-size; a BPE trained in the run would add its own memory), killed past "
        f"{OLD_LIMIT_GB:.0f} GB.",
        "",
        md_table(head, rows),
        "",
        f"- <= 1 GB at every size: {verdict(under)} (largest {max(max(v) for v in peaks.values()):,.0f} MB)",
        f"- flat in corpus size ({label(res['sizes'][0])} -> {label(res['sizes'][-1])}, at most +100 MB): "
        f"prepare {grow['prepare']:+,.0f} MB, start-up {grow['startup']:+,.0f} MB: {verdict(flat)}; anonymous only: "
        f"prepare {grow_anon['prepare']:+,.0f} MB, start-up {grow_anon['startup']:+,.0f} MB",
    ]


def speed_part(res: dict) -> list[str]:
    small = res["mfu"]["small"]
    need = small["batch_size"] / small["seconds"]
    rows = [[label(gb), f"{w:,.0f}", f"{w / need:,.0f}x"] for gb, w in zip(res["sizes"], res["loader"])]
    worst = min(res["loader"]) / need
    mrows = [[n, f"{r['batch_size']} x {r['seq_len']}", f"{r['seconds']:.2f}",
              f"{r['tokens_per_step'] / r['seconds']:,.0f}", f"{r['flops_per_s'] / 1e9:.1f}", f"{r['mfu']:.1%}",
              r["data"].replace(str(ROOT) + "/", "")] for n, r in res["mfu"].items()]  # fmt: skip
    return [
        "### Loader rate vs a CPU step's need",
        "",
        f"`sample_batch` over `open_prepared`'s memory-mapped train shards (page cache warm), the `small` preset's "
        f"batch of {small['batch_size']} x {small['seq_len']}; a `small` joint step takes {small['seconds']:.2f} s "
        f"here, so it needs {need:,.1f} windows/s.",
        "",
        md_table(["prepared corpus", "windows/s", "vs the step's need"], rows),
        "",
        f"- >= 100x the CPU step's need: {worst:,.0f}x at the slowest: {verdict(worst >= 100)}",
        "",
        "### MFU of the joint step on this CPU",
        "",
        f"3 steps of each preset through `train()`, fp32, every size jointly; per-step seconds and FLOP/s derived "
        f"from metrics.jsonl (its figures are since step 1), median of steps 2..3, against the run's measured fp32 "
        f"matmul peak (`machine.peak_flops`: {statistics.median(r['peak'] for r in res['mfu'].values()) / 1e9:.1f} "
        "GFLOP/s, median over the runs).",
        "",
        md_table(["preset", "batch", "s/step", "tokens/s", "GFLOP/s", "MFU", "data"], mrows),
    ]


def section(res: dict) -> str:
    loads = ", ".join(f"{x:.1f}" for x in res["load_start"])
    return "\n".join(
        [
            "## Data path: prepare, memory, loader, MFU (`benchmarks/bench_data.py`, issue 25)",
            "",
            f"Machine: {res['machine']}. Load average (1, 5, 15 min) at the start: {loads}; at the end: "
            f"{', '.join(f'{x:.1f}' for x in res['load_end'])} (another job may share the 2 cores). Total "
            f"{res['seconds'] / 60:.1f} min. The corpora are repeated text: the embedded ~10 MB of English "
            "(Shakespeare, KJV, Python's pydoc topics) in ~50 MB files, each its 256-line sections shuffled with its "
            "own seed. One 8192-token BPE, trained once on 20 MB of it.",
            "",
            *throughput_part(res),
            "",
            *memory_part(res),
            "",
            *speed_part(res),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1,1,3", help="corpus sizes in GB (default 0.1,1,3)")
    ap.add_argument("--quick", action="store_true", help="the 100 MB corpus only")
    ap.add_argument("--fresh", action="store_true", help="prepare every size again (not only the smallest)")
    ap.add_argument("--ceiling", type=Path, help=argparse.SUPPRESS)  # the ceiling's subprocess
    a = ap.parse_args()
    if a.ceiling:
        return ceiling_probe(a.ceiling)
    sizes = [0.1] if a.quick else sorted(float(s) for s in a.sizes.split(","))
    t0, res = time.perf_counter(), {"machine": machine(), "sizes": sizes, "load_start": os.getloadavg()}
    tokenizer()
    for gb in sizes:
        corpus(gb)
    runs = [ceiling(corpus(sizes[0]))]
    res["prepare"] = [run_prepare(sizes[0], fresh=True)]
    runs.append(ceiling(corpus(sizes[0])))
    res["ceiling"] = {**runs[0], "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
                      "runs": [r["tokens_per_s"] for r in runs]}  # fmt: skip
    res["prepare"] += [run_prepare(gb, a.fresh) for gb in sizes[1:]]
    res["startup"] = [startup(gb) for gb in sizes]
    res["old"] = {label(gb): startup(gb, old=True) for gb in sizes if gb <= 1}
    from matryoshka_lm.config import preset

    _, small = preset("small")
    res["loader"] = [loader_rate(gb, small.batch_size, small.seq_len) for gb in sizes]
    res["mfu"] = {n: mfu(n, OUT / f"prep-{label(sizes[0])}" if n == "small" else None)
                  for n in ("tiny", "demo", "memory", "small")}  # fmt: skip
    res["load_end"], res["seconds"] = os.getloadavg(), time.perf_counter() - t0
    (OUT / "results.json").write_text(json.dumps(res, indent=1))
    body = section(res)
    write_section("data", body)
    print(body)


if __name__ == "__main__":
    main()
