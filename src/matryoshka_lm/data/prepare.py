"""`matryoshka prepare`: source files -> token shards, once, for many training runs.

    prepare()  =  plan (sources, settings, tokenizer)  ->  encode each source file in a worker process into its
                  own part files (a marker records each one done: a rerun resumes)  ->  pack the parts in source
                  order into shards  ->  manifest.json (written last: its presence means complete)

The split is by a hash of each piece of text (a document's section, see corpus.sections), so it depends neither on
the order of the files nor on the number of workers. Memory is bounded: a worker holds one batch of sections."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matryoshka_lm.errors import MatryoshkaError

from .corpus import EOT, MANIFEST, token_counts, train_tokenizer
from .shards import (
    COUNTS,
    FORMAT,
    TOKENIZER,
    ShardWriter,
    dtype_for,
    load_tokenizer_file,
    read_manifest,
    write_counts,
    write_json,
)
from .sources import Source, checksum, doc_pieces, documents, find_sources, sample_documents

log = logging.getLogger(__name__)

WORK = ".prepare"  # parts and markers of an unfinished prepare
BATCH_CHARS = 1 << 20  # text per encode_batch call: what bounds a worker's memory
COPY_TOKENS = 1 << 22
SPLIT_RULE = "a piece (a document's section of 256 lines) is validation when blake2b-64(its UTF-8) < fraction * 2^64"


def is_val(text: str, fraction: float) -> bool:
    """Whether this piece of text is held out: a pure function of the text."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return h < fraction * 2.0**64


@dataclass
class Prepared:
    manifest: dict
    up_to_date: bool  # True: the folder already held this data and nothing was done


@dataclass(frozen=True)
class Job:
    source: Source
    tokenizer: str  # path of tokenizer.json
    parts: str  # folder of the part files
    val_fraction: float
    text_field: str


def part_name(src: Source) -> str:
    return hashlib.blake2b(src.key.encode(), digest_size=8).hexdigest()


_TOKENIZERS: dict[tuple, object] = {}


def encode_source(job: Job) -> dict:
    """Encode one source file into <part>.train.bin / <part>.val.bin, then write its marker <part>.json."""
    key = (job.tokenizer, os.stat(job.tokenizer).st_mtime_ns)
    if key not in _TOKENIZERS:  # once per worker process
        _TOKENIZERS[key] = load_tokenizer_file(Path(job.tokenizer))
    tok = _TOKENIZERS[key]
    eot = tok.token_to_id(EOT)
    dtype = dtype_for(tok.get_vocab_size())
    base = Path(job.parts) / part_name(job.source)
    tmp = {s: base.with_suffix(f".{s}.tmp") for s in ("train", "val")}
    counts = {"documents": 0, "train_tokens": 0, "val_tokens": 0}
    skipped = None
    with open(tmp["train"], "wb") as ft, open(tmp["val"], "wb") as fv:
        out = {"train": ft, "val": fv}
        batch: list[tuple[str, bool]] = []
        size = 0
        try:
            for piece in doc_pieces(documents(job.source, job.text_field)):
                batch.append(piece)
                size += len(piece[0])
                if size >= BATCH_CHARS:
                    _encode_batch(tok, eot, dtype, batch, job.val_fraction, out, counts)
                    batch, size = [], 0
            _encode_batch(tok, eot, dtype, batch, job.val_fraction, out, counts)
        except UnicodeDecodeError:
            skipped = "not UTF-8 text"
    for s in ("train", "val"):
        if skipped:
            tmp[s].write_bytes(b"")
        os.replace(tmp[s], base.with_suffix(f".{s}.bin"))
    if skipped:
        log.warning("skipping %s: %s", job.source.path, skipped)
        counts = {"documents": 0, "train_tokens": 0, "val_tokens": 0, "skipped": skipped}
    record = {**job.source.fingerprint(), "sha256": checksum(job.source), **counts}
    write_json(base.with_suffix(".json"), record)
    return record


def _encode_batch(tok, eot: int, dtype, batch: list[tuple[str, bool]], fraction: float, out, counts) -> None:
    ids: dict[str, list[int]] = {"train": [], "val": []}
    for (text, last), enc in zip(batch, tok.encode_batch([t for t, _ in batch])):
        dest = ids["val" if is_val(text, fraction) else "train"]
        dest.extend(enc.ids)
        if last:
            dest.append(eot)
            counts["documents"] += 1
    for split, toks in ids.items():
        out[split].write(np.asarray(toks, dtype=dtype).tobytes())
        counts[f"{split}_tokens"] += len(toks)


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the workers are the parallelism


def run_jobs(jobs: list[Job], workers: int):
    """Each job's record as it finishes; in worker processes when there are several jobs and workers."""
    if workers <= 1 or len(jobs) <= 1:  # in this process (encode_batch still uses several threads)
        yield from map(encode_source, jobs)
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked tokenizer threads, no torch
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
        yield from pool.imap_unordered(encode_source, jobs)


def make_tokenizer(out: Path, sources: list[Source], settings: dict, tokenizer: str | Path | None):
    """The tokenizer of this data, written to out/tokenizer.json: the given file, or a BPE on a sample."""
    if tokenizer is not None:
        tok = load_tokenizer_file(Path(tokenizer))
    else:
        sample = sample_documents(sources, settings["tokenizer_sample_bytes"], settings["text_field"])
        if not sample:
            raise MatryoshkaError("the source has no text to train a tokenizer on")
        log.info("training a %d-token BPE on %d characters", settings["vocab_size"], sum(map(len, sample)))
        tok = train_tokenizer(sample, settings["vocab_size"])
    (out / TOKENIZER).write_text(tok.to_str())
    return tok


def _settings(source, sources, tokenizer, vocab_size, val_fraction, text_field, sample_bytes, shard_tokens) -> dict:
    if not 0 < val_fraction < 1:
        raise MatryoshkaError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    given = None
    if tokenizer is not None:
        given = hashlib.sha256(load_tokenizer_file(Path(tokenizer)).to_str().encode()).hexdigest()
    return {
        "source": "default" if sources[0].format == "default" else str(Path(source).resolve()),
        "tokenizer": given,
        "vocab_size": None if given else vocab_size,
        "tokenizer_sample_bytes": None if given else sample_bytes,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "shard_tokens": shard_tokens,
    }


def _start(out: Path, plan: dict, sources: list[Source], tokenizer) -> Path:
    """The work folder of this plan: resumed when an unfinished prepare of the same plan left one, else new."""
    work = out / WORK
    try:
        same = read_plan(work) == plan and (out / TOKENIZER).is_file()
    except (OSError, ValueError):
        same = False
    if same:
        log.info("resuming the unfinished prepare in %s", out)
        return work
    shutil.rmtree(work, ignore_errors=True)
    (work / "parts").mkdir(parents=True)
    make_tokenizer(out, sources, plan["settings"], tokenizer)
    write_json(work / "plan.json", plan)  # last: a plan on disk means its tokenizer is there
    return work


def read_plan(work: Path) -> dict:
    return json.loads((work / "plan.json").read_text())


def _done(work: Path, src: Source) -> bool:
    marker = work / "parts" / f"{part_name(src)}.json"
    if not marker.is_file():
        return False
    record = json.loads(marker.read_text())
    return all(record.get(k) == v for k, v in src.fingerprint().items())


def pack(out: Path, work: Path, sources: list[Source], dtype: np.dtype, shard_tokens: int, vocab: int):
    """Copy the part files, in source order, into out/train-NNNNN.bin (shard_tokens each) and out/val-00000.bin,
    counting each split's token ids on the way (so training never rereads the corpus for its unigram baseline)."""
    for old in [*out.glob("train-*.bin"), *out.glob("val-*.bin")]:
        old.unlink()
    writers = {"train": ShardWriter(out, "train", dtype, shard_tokens), "val": ShardWriter(out, "val", dtype, None)}
    counts = np.zeros((2, vocab), np.int64)
    records = []
    for src in sources:
        base = work / "parts" / part_name(src)
        records.append(json.loads(base.with_suffix(".json").read_text()))
        for row, (split, w) in enumerate(writers.items()):
            with open(base.with_suffix(f".{split}.bin"), "rb") as f:
                while block := f.read(COPY_TOKENS * dtype.itemsize):
                    tokens = np.frombuffer(block, dtype=dtype)
                    w.write(tokens)
                    counts[row] += token_counts(tokens, vocab)
    write_counts(out, counts)
    return {split: w.close() for split, w in writers.items()}, records


def prepare(
    source: str | Path | None,
    out: str | Path,
    tokenizer: str | Path | None = None,
    vocab_size: int = 2048,
    val_fraction: float = 0.05,
    workers: int | None = None,
    text_field: str = "text",
    tokenizer_sample_bytes: int = 50_000_000,
    shard_tokens: int = 1 << 28,
    stale: str = "refuse",
) -> Prepared:
    """Tokenize `source` (a file, a folder, or None/'default' for the embedded corpus) into shards in `out`.

    Args:
        tokenizer: a tokenizer.json (or a checkpoint folder holding one); None trains a byte-level BPE of
            `vocab_size` tokens on a sample of about `tokenizer_sample_bytes` bytes of the source.
        val_fraction: the share of pieces of text held out (by a hash of each: see is_val).
        workers: processes encoding source files in parallel (default: the CPU count).
        text_field: the field holding the text in JSON Lines, JSON and Parquet sources.
        shard_tokens: tokens per train shard.
        stale: what a folder prepared from other sources or settings gets: "refuse" (an error), or "replace"
            (deleted and prepared again: for folders this package owns, the cache of data/cache.py).

    A second call with the same source and settings does nothing (up_to_date); an interrupted one resumes from
    the source files it had finished. Another source or settings in a folder already prepared is refused."""
    out = Path(out)
    sources = find_sources(source, exclude=out)
    settings = _settings(
        source, sources, tokenizer, vocab_size, val_fraction, text_field, tokenizer_sample_bytes, shard_tokens
    )
    plan = {"settings": settings, "sources": [s.fingerprint() for s in sources]}
    if (out / MANIFEST).is_file():
        m = read_manifest(out)
        if {"settings": m["settings"], "sources": [_fingerprint(r) for r in m["sources"]]} == plan:
            log.info("%s is up to date: nothing to do", out)
            return Prepared(m, True)
        if stale != "replace":
            raise MatryoshkaError(
                f"{out} already holds data prepared from other sources or settings; pick a new -o or delete it"
            )
        log.warning("%s was prepared from other files or settings: preparing it again", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    work = _start(out, plan, sources, tokenizer)
    tok = load_tokenizer_file(out / TOKENIZER)
    todo = [s for s in sources if not _done(work, s)]
    if len(todo) < len(sources):
        log.info("%d of %d source files already encoded", len(sources) - len(todo), len(sources))
    jobs = [Job(s, str(out / TOKENIZER), str(work / "parts"), val_fraction, text_field) for s in todo]
    for i, r in enumerate(run_jobs(jobs, workers or os.cpu_count() or 1), 1):
        log.info("[%d/%d] %s: %d train + %d val tokens", i, len(jobs), r["path"], r["train_tokens"], r["val_tokens"])
    dtype = dtype_for(tok.get_vocab_size())
    shards, records = pack(out, work, sources, dtype, shard_tokens, tok.get_vocab_size())
    m = manifest(out, settings, tok, dtype, shards, records)
    write_json(out / MANIFEST, m)  # last: the folder is complete
    shutil.rmtree(work)
    log.info(
        "%s: %d train tokens in %d shards, %d val tokens", out, m["train_tokens"], len(shards["train"]), m["val_tokens"]
    )
    return Prepared(m, False)


def _fingerprint(record: dict) -> dict:
    return {k: record[k] for k in ("path", "bytes", "mtime_ns")}


def manifest(out: Path, settings: dict, tok, dtype: np.dtype, shards: dict, records: list) -> dict:
    return {
        "format": FORMAT,
        "settings": settings,
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": hashlib.sha256((out / TOKENIZER).read_bytes()).hexdigest(),
            "vocab_size": tok.get_vocab_size(),
            "eot_id": tok.token_to_id(EOT),
        },
        "dtype": dtype.name,
        "counts": {"file": COUNTS, "rows": ["train", "val"]},
        "split": {"val_fraction": settings["val_fraction"], "rule": SPLIT_RULE},
        "sources": records,
        "shards": shards,
        "train_tokens": sum(s["tokens"] for s in shards["train"]),
        "val_tokens": sum(s["tokens"] for s in shards["val"]),
    }
