"""`matryoshka prepare`: tokenize a corpus once into token shards that `train --data` memory-maps."""

from __future__ import annotations

import argparse
import sys

from .options import positive_int, progress


def cmd_prepare(a: argparse.Namespace) -> None:
    from matryoshka_lm.data.prepare import prepare

    with progress("matryoshka_lm.data.prepare"):
        r = prepare(
            a.source,
            a.out,
            tokenizer=a.tokenizer,
            vocab_size=a.vocab_size,
            val_fraction=a.val_fraction,
            workers=a.workers,
            text_field=a.text_field,
            tokenizer_sample_bytes=a.tokenizer_sample_bytes,
            shard_tokens=a.shard_tokens,
        )
    m = r.manifest
    state = "already prepared, nothing to do" if r.up_to_date else "prepared"
    print(
        f"{a.out}: {state}: {m['train_tokens']:,} train tokens in {len(m['shards']['train'])} shards, "
        f"{m['val_tokens']:,} validation tokens ({m['dtype']}, vocabulary {m['tokenizer']['vocab_size']})",
        file=sys.stderr,
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus once into token shards for `train --data`")
    p.add_argument(
        "source",
        nargs="?",
        default="default",
        help="a text file or folder (recursive), .jsonl, .jsonl.gz, .json or .parquet files, or 'default' "
        "(the embedded corpus; the default)",
    )
    p.add_argument("-o", "--out", required=True, help="the data folder to write (shards, manifest.json)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="an existing tokenizer.json (or a checkpoint folder holding one)")
    tok.add_argument("--vocab-size", type=positive_int, default=2048, help="train a BPE of this size (default 2048)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of text held out (default 0.05)")
    p.add_argument("--workers", type=positive_int, help="worker processes (default: the CPU count)")
    p.add_argument("--text-field", default="text", help="the text field of JSON and Parquet records (default text)")
    p.add_argument(
        "--tokenizer-sample-bytes",
        type=positive_int,
        default=50_000_000,
        help="bytes of the corpus the BPE is trained on (default 50 MB)",
    )
    p.add_argument("--shard-tokens", type=positive_int, default=1 << 28, help="tokens per train shard (default 2^28)")
    p.set_defaults(func=cmd_prepare)
