"""The data path (issue 25): `matryoshka prepare` throughput vs the tokenizer's own ceiling, peak memory of prepare
and of training start-up as the corpus grows, the memory-mapped loader's rate vs a CPU step's need, and the MFU of
the joint step on this CPU.

Corpora: the embedded English repeated, in ~50 MB files under runs/bench_data/ (cached, as are the tokenizer and
the prepared folders of 1 GB and more; the smallest corpus is prepared afresh each run, beside its ceiling).
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
from matryoshka_lm.config import preset
from matryoshka_lm.data.corpus import MANIFEST, default_corpus, sample_batch, sections, train_tokenizer
from matryoshka_lm.data.prepare import BATCH_CHARS
from matryoshka_lm.data.shards import open_prepared, read_manifest
from matryoshka_lm.report import md_table
from matryoshka_lm.train.loop import train

OUT = ROOT / "runs" / "bench_data"
POOL = OUT / "text"  # the ~50 MB files; each corpus folder hard-links the first n of them
TOK = OUT / "tokenizer" / "tokenizer.json"
FILE_CHARS = 50_000_000
CLI = [sys.executable, "-m", "matryoshka_lm.cli"]
THREADS = {"RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}  # the ceiling's 2 threads
ONE_THREAD = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
OLD_LIMIT_GB = 12.0  # the in-memory text path is killed past this
KB_PER_GB = 1 << 20
# runs the measured command and writes the ru_maxrss of its biggest process (the tree's sum is sampled outside)
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


def write_pool_file(path: Path, seed: int, pieces: list[str]) -> None:
    """FILE_CHARS of the sections, shuffled with `seed` on every pass over them."""
    rng, n, tmp = random.Random(seed), 0, path.with_suffix(".part")
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


def corpus(gb: float) -> Path:
    """A folder of ~gb GB of text: hard links to the first pool files (each generated once)."""
    folder, pieces = OUT / f"text-{label(gb)}", None
    for d in (POOL, folder):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(max(1, round(gb * 1e9 / FILE_CHARS))):
        name = f"part-{i:03d}.txt"
        if not (POOL / name).is_file():
            print(f"writing {POOL / name}", file=sys.stderr, flush=True)
            write_pool_file(POOL / name, i, pieces := pieces or units())
        if not (folder / name).exists():
            os.link(POOL / name, folder / name)
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
    (maxrss := OUT / "logs" / f"{name}.maxrss").unlink(missing_ok=True)
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
        if limit_gb is not None and peak > limit_gb * KB_PER_GB:
            for k in reversed(kids):
                k.kill()
            killed = True
            break
        time.sleep(0.2)
    rc = p.wait()
    log.close()
    if rc and not killed:
        raise SystemExit(f"{name} failed ({rc}); see {OUT / 'logs' / (name + '.log')}")
    return {"seconds": time.perf_counter() - t0, "peak_mb": peak / 1024, "peak_anon_mb": peak_anon / 1024,
            "maxrss_mb": int(maxrss.read_text()) / 1024 if maxrss.is_file() and not killed else None,
            "killed": killed, "load": os.getloadavg()[0]}  # fmt: skip


def ceiling_probe(files: list[Path]) -> None:
    """(A subprocess.) Seconds of Tokenizer.encode_batch alone over the files, in the batches of sections prepare
    encodes together; the text is already in memory and the ids are not kept."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOK))
    tokens, secs = 0, 0.0
    for f in files:
        batch, size = [], 0
        for s in [*sections(f.read_text()), None]:
            if s is not None:
                batch.append(s)
                size += len(s)
            if batch and (size >= BATCH_CHARS or s is None):
                t = time.perf_counter()
                enc = tok.encode_batch(batch)
                secs += time.perf_counter() - t
                tokens += sum(len(e) for e in enc)
                batch, size = [], 0
    print(json.dumps({"tokens": tokens, "seconds": secs}))


def ceiling(src: Path, processes: int = 0) -> dict:
    """encode_batch's tokens/s on the corpus: one process with THREADS (processes=0), or the files split over that
    many concurrent single-threaded processes (prepare's layout; the tokens over the slowest one's seconds)."""
    files = sorted(src.glob("*.txt"))
    groups = [files[i::processes] for i in range(processes)] if processes else [files]
    env = {**os.environ, **(ONE_THREAD if processes else THREADS)}
    cmd = [sys.executable, __file__, "--ceiling"]
    procs = [subprocess.Popen([*cmd, *map(str, g)], stdout=subprocess.PIPE, env=env) for g in groups]
    outs = [json.loads(p.communicate()[0]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("ceiling probe failed")
    tokens, secs = sum(o["tokens"] for o in outs), max(o["seconds"] for o in outs)
    return {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs, "load": os.getloadavg()[0]}


def run_prepare(gb: float, fresh: bool) -> dict:
    """`matryoshka prepare` of the corpus with the fixed tokenizer and 2 workers (cached unless fresh)."""
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
    encoded in memory (the whole corpus, the same tokenizer given), killed past OLD_LIMIT_GB."""
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
    """Windows per second that sample_batch draws from the memory-mapped train shards."""
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
    c, cp, p0, first = res["ceiling"], res["ceiling_processes"], res["prepare"][0], label(res["sizes"][0])
    share = p0["tokens_per_s"] / c["tokens_per_s"]
    rows = [[f"{label(gb)}{' (cached)' if p['cached'] else ''}", p["files"], f"{p['bytes'] / 1e6:,.0f}",
             f"{p['tokens']:,}", f"{p['seconds']:.0f}", f"{p['tokens_per_s']:,.0f}",
             f"{p['tokens_per_s'] / c['tokens_per_s']:.0%}", f"{p['load']:.1f}"]
            for gb, p in zip(res["sizes"], res["prepare"])]  # fmt: skip
    head = ["corpus", "files", "MB", "tokens", "prepare s", "prepare tok/s", "vs ceiling", "load (1 min)"]
    return [
        "### prepare throughput vs the tokenizer's own ceiling",
        "",
        f"Ceiling: `Tokenizer.encode_batch` alone on the {first} corpus (text already in memory, the ~1 MB batches "
        f"of sections prepare encodes), one process with {', '.join(f'{k}={v}' for k, v in THREADS.items())}, run "
        f"before and after prepare: {c['runs'][0]:,.0f} and {c['runs'][1]:,.0f} tok/s, mean **{c['tokens_per_s']:,.0f}"
        f" tok/s** ({c['tokens']:,} tokens). The same split over 2 single-threaded processes, as prepare's workers "
        f"run: {cp['tokens_per_s']:,.0f} tok/s. prepare: the CLI end to end (start, 2 worker processes, checksums, "
        "packing, manifest), `--tokenizer` the same file, `--workers 2`; larger sizes are read against the "
        f"{first} ceiling (same text, other load).",
        "",
        md_table(head, rows),
        "",
        f"- prepare >= 80% of the ceiling ({first}, same run): {share:.0%}: {verdict(share >= 0.8)} "
        f"({p0['tokens_per_s'] / cp['tokens_per_s']:.0%} of the 2-process ceiling)",
    ]


def memory_part(res: dict) -> list[str]:
    def mb(r: dict) -> str:
        return f"did not survive (killed at {r['peak_mb'] / 1024:.1f} GB)" if r["killed"] else \
            f"{r['peak_mb']:,.0f} ({r['peak_anon_mb']:,.0f})"  # fmt: skip

    rows = []
    for gb, p, s in zip(res["sizes"], res["prepare"], res["startup"]):
        old = res["old"].get(label(gb))
        old_cells = ["not run", ""] if old is None else [mb(old), f"{old['seconds']:.0f}"]
        rows.append([label(gb), mb(p), f"{p['maxrss_mb']:,.0f}", mb(s), f"{s['seconds']:.0f}", *old_cells])
    peak = {k: [r["peak_mb"] for r in res[k]] for k in ("prepare", "startup")}
    grow = {k: v[-1] - v[0] for k, v in peak.items()}
    grow_anon = {k: res[k][-1]["peak_anon_mb"] - res[k][0]["peak_anon_mb"] for k in peak}
    largest = max(max(v) for v in peak.values())
    head = ["corpus", "prepare MB (anon)", "prepare biggest process MB", "train start-up MB (anon)", "start-up s",
            "old text path start-up MB (anon)", "old s"]  # fmt: skip
    return [
        "### Peak memory (resident, MB)",
        "",
        "Summed over the command's processes (prepare: the CLI and its 2 workers), sampled every 0.2 s; (anon): "
        "anonymous memory only, the rest being file pages (libraries, the memory-mapped shards); biggest process: "
        "its ru_maxrss. Training start-up: `train --preset tiny --data DIR --steps 1` (the model takes the "
        "8192-token tokenizer). Old path: `train --data TEXT_FOLDER --max-corpus-chars 0 --tokenizer` the same "
        f"tokenizer (train has no --vocab-size; a BPE trained in the run would add its own), killed past "
        f"{OLD_LIMIT_GB:.0f} GB.",
        "",
        md_table(head, rows),
        "",
        f"- <= 1 GB at every size: {verdict(largest <= 1024)} (largest {largest:,.0f} MB)",
        f"- flat in corpus size ({label(res['sizes'][0])} -> {label(res['sizes'][-1])}, at most +100 MB): prepare "
        f"{grow['prepare']:+,.0f} MB, start-up {grow['startup']:+,.0f} MB: {verdict(max(grow.values()) <= 100)}; "
        f"anonymous memory only: prepare {grow_anon['prepare']:+,.0f} MB, start-up {grow_anon['startup']:+,.0f} MB",
    ]


def speed_part(res: dict) -> list[str]:
    small = res["mfu"]["small"]
    need = small["batch_size"] / small["seconds"]
    rows = [[label(gb), f"{w:,.0f}", f"{w / need:,.0f}x"] for gb, w in zip(res["sizes"], res["loader"])]
    worst = min(res["loader"]) / need
    mrows = [[n, f"{r['batch_size']} x {r['seq_len']}", f"{r['seconds']:.2f}",
              f"{r['tokens_per_step'] / r['seconds']:,.0f}", f"{r['flops_per_s'] / 1e9:.1f}", f"{r['mfu']:.1%}",
              r["data"].replace(str(ROOT) + "/", "")] for n, r in res["mfu"].items()]  # fmt: skip
    peak = statistics.median(r["peak"] for r in res["mfu"].values())
    return [
        "### Loader rate vs a CPU step's need",
        "",
        f"`sample_batch` over `open_prepared`'s memory-mapped train shards (page cache as the run left it), the "
        f"`small` preset's batch of {small['batch_size']} x {small['seq_len']}; a `small` joint step takes "
        f"{small['seconds']:.2f} s here (below), so it needs {need:,.1f} windows/s.",
        "",
        md_table(["prepared corpus", "windows/s", "vs the step's need"], rows),
        "",
        f"- >= 100x the CPU step's need: {worst:,.0f}x at the slowest: {verdict(worst >= 100)}",
        "",
        "### MFU of the joint step on this CPU",
        "",
        "3 steps of each preset through `train()`, fp32, all its sizes jointly; each step's seconds and FLOP/s "
        "derived from metrics.jsonl (whose figures run from step 1), median of steps 2..3, against the run's "
        f"measured fp32 matmul peak (`machine.peak_flops`, median over the runs {peak / 1e9:.1f} GFLOP/s).",
        "",
        md_table(["preset", "batch", "s/step", "tokens/s", "GFLOP/s", "MFU", "data"], mrows, "lrrrrrl"),
    ]


def section(res: dict) -> str:
    loads = [", ".join(f"{x:.1f}" for x in res[k]) for k in ("load_start", "load_end")]
    return "\n".join([
        "## Data path: prepare, memory, loader, MFU (`benchmarks/bench_data.py`, issue 25)",
        "",
        f"Machine: {res['machine']}. Load average (1, 5, 15 min): {loads[0]} at the start, {loads[1]} at the end "
        f"(another job may share the 2 cores). Total {res['seconds'] / 60:.1f} min. The corpora are repeated text: "
        "the embedded ~10 MB of English (Shakespeare, KJV, Python's pydoc topics) in ~50 MB files, each its 256-line "
        "sections shuffled with its own seed. One 8192-token BPE, trained once on 20 MB of it.",
        "",
        *throughput_part(res), "", *memory_part(res), "", *speed_part(res),
    ])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1,1,3", help="corpus sizes in GB (default 0.1,1,3)")
    ap.add_argument("--quick", action="store_true", help="the 100 MB corpus only")
    ap.add_argument("--fresh", action="store_true", help="prepare every size again (not only the smallest)")
    ap.add_argument("--ceiling", type=Path, nargs="+", help=argparse.SUPPRESS)  # the ceiling's subprocess
    a = ap.parse_args()
    if a.ceiling:
        return ceiling_probe(a.ceiling)
    sizes = [0.1] if a.quick else sorted(float(s) for s in a.sizes.split(","))
    t0, res = time.perf_counter(), {"machine": machine(), "sizes": sizes, "load_start": os.getloadavg()}
    first = corpus(sizes[0])
    tokenizer()
    runs = [ceiling(first)]  # the ceiling brackets the smallest prepare: a change of load shows as their spread
    res["prepare"] = [run_prepare(sizes[0], fresh=True)]
    runs.append(ceiling(first))
    res["ceiling"] = {**runs[0], "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
                      "runs": [r["tokens_per_s"] for r in runs]}  # fmt: skip
    res["ceiling_processes"] = ceiling(first, processes=2)
    res["prepare"] += [run_prepare(gb, a.fresh) for gb in sizes[1:]]
    res["startup"] = [startup(gb) for gb in sizes]
    res["old"] = {label(gb): startup(gb, old=True) for gb in sizes if gb <= 1}
    small = preset("small")[1]
    res["loader"] = [loader_rate(gb, small.batch_size, small.seq_len) for gb in sizes]
    res["mfu"] = {n: mfu(n, OUT / f"prep-{label(sizes[0])}" if n == "small" else None)
                  for n in ("tiny", "demo", "memory", "small")}  # fmt: skip
    res["load_end"], res["seconds"] = os.getloadavg(), time.perf_counter() - t0
    (OUT / "results.json").write_text(json.dumps(res, indent=1))
    write_section("data", section(res))
    print(section(res))


if __name__ == "__main__":
    main()
