"""`matryoshka train-embed | embed | export-embed | index build | search`: Matryoshka embeddings and retrieval."""

from __future__ import annotations

import argparse
import json
import sys

from matryoshka_lm.errors import MatryoshkaError

from .options import int_list, nonnegative_int, pick_device, positive_int, spec_list


def cmd_train_embed(a: argparse.Namespace) -> None:
    from matryoshka_lm.embed import EmbedTrainConfig, finetune_hf, is_hf_encoder, train_embedding

    cfg = EmbedTrainConfig(
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        temperature=a.temperature,
        dims=int_list(a.dims, "--dims"),
        mrl=not a.no_mrl,
        sizes=spec_list(a.sizes),
        depths=int_list(a.depths, "--depths"),
        proj_dim=a.proj_dim,
        max_tokens=a.max_tokens,
        pairs=a.pairs,
        data=a.data,
        max_corpus_chars=a.max_corpus_chars,
        n_eval=a.n_eval,
        seed=a.seed,
    )

    def on_step(step: int, m: dict) -> None:
        if not a.quiet and (step % 10 == 0 or step == cfg.steps):
            print(f"step {step}/{cfg.steps} loss {m['loss']:.4f} lr {m['lr']:.2e}", file=sys.stderr)

    if is_hf_encoder(a.ckpt):
        finetune_hf(a.ckpt, a.out, cfg, device=pick_device(a.device), callback=on_step)
        print(f"fine-tuned encoder written to {a.out}", file=sys.stderr)
        return
    meta = train_embedding(a.ckpt, a.out, cfg, device=pick_device(a.device), callback=on_step)
    full = meta["sizes"][0]
    for name, rec in (("before", meta["recall_before"]), ("after", meta["recall_after"])):
        if rec:
            row = "  ".join(f"{m}:{r['r@10']:.3f}" for m, r in rec[full].items())
            print(f"recall@10 by dims {name} training ({full}): {row}", file=sys.stderr)
    print(f"embedding checkpoint written to {a.out}", file=sys.stderr)


def cmd_embed(a: argparse.Namespace) -> None:
    from matryoshka_lm.embed import embed_file

    vecs = embed_file(
        a.ckpt, a.file, a.out, size=a.size, dims=a.dims, batch_size=a.batch_size, device=pick_device(a.device)
    )
    print(f"wrote {a.out}: {vecs.shape[0]} x {vecs.shape[1]} unit vectors", file=sys.stderr)


def cmd_export_embed(a: argparse.Namespace) -> None:
    from matryoshka_lm.embed import export_embedding

    out = export_embedding(a.ckpt, a.out, size=a.size, force=a.force)
    print(
        f"wrote {out} (load with sentence_transformers.SentenceTransformer, or AutoModel + mean pooling)",
        file=sys.stderr,
    )


def _load_vectors(path: str):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MatryoshkaError(f"cannot read vectors {path}: {e}") from None


def cmd_index_build(a: argparse.Namespace) -> None:
    from matryoshka_lm.embed import build_index, index_texts, read_texts

    if a.vectors:
        if a.ckpt or a.file:
            raise MatryoshkaError("give either CKPT FILE or --vectors, not both")
        out = build_index(
            _load_vectors(a.vectors),
            a.out,
            int_list(a.dims, "--dims"),
            read_texts(a.texts) if a.texts else None,
            force=a.force,
            hnsw_dim=a.hnsw_dim,
        )
    else:
        if not (a.ckpt and a.file):
            raise MatryoshkaError("index build needs CKPT FILE (an embedding checkpoint and a text file) or --vectors")
        out = index_texts(
            a.ckpt,
            a.file,
            a.out,
            size=a.size,
            batch_size=a.batch_size,
            force=a.force,
            device=pick_device(a.device),
            hnsw_dim=a.hnsw_dim,
        )
    print(f"index written to {out}", file=sys.stderr)


def cmd_search(a: argparse.Namespace) -> None:
    from matryoshka_lm.embed import read_texts, search_texts

    queries = list(a.query) or None
    if a.queries:
        queries = (queries or []) + read_texts(a.queries)
    vectors = _load_vectors(a.vectors) if a.vectors else None
    results = search_texts(
        a.index,
        queries,
        vectors,
        ckpt=a.ckpt,
        size=a.size,
        dims=a.dims,
        k=a.k,
        funnel=int_list(a.funnel, "--funnel"),
        shortlist=int_list(a.shortlist, "--shortlist"),
        exact=a.exact,
        device=pick_device(a.device),
        hnsw_ef=a.hnsw_ef,
    )
    if a.json:
        print(json.dumps(results))
        return
    for qi, hits in enumerate(results):
        if len(results) > 1:
            print(f"# query {qi}" + (f": {queries[qi]}" if queries else ""))
        for rank, h in enumerate(hits, 1):
            print(f"{rank}\t{h['id']}\t{h['score']:.4f}" + (f"\t{h['text']}" if "text" in h else ""))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_train_embed(sub)
    _add_embed(sub)
    _add_index(sub)
    _add_search(sub)


def _add_train_embed(sub: argparse._SubParsersAction) -> None:
    te = sub.add_parser(
        "train-embed", help="MRL-train a Matryoshka embedding (nested dims, optionally sizes) from a checkpoint"
    )
    te.add_argument(
        "ckpt",
        help="LM checkpoint to start from (its tokenizer is kept), or a Hugging Face encoder "
        "folder ('minilm' = all-MiniLM-L6-v2 from the [embed] extra)",
    )
    te.add_argument("-o", "--out", required=True, help="embedding checkpoint directory to write")
    te.add_argument("--pairs", help='JSONL of {"query": ..., "positive": ...} (default: two halves of corpus passages)')
    te.add_argument("--data", help="corpus for self-supervised pairs (default: the embedded corpus)")
    te.add_argument("--dims", help="nested dims, e.g. 12,24,48,96,192 (default: D/16,D/8,D/4,D/2,D)")
    te.add_argument(
        "--sizes", help='extra sizes/specs trained jointly (2D Matryoshka), e.g. M,S (a per-layer spec: "mix:S,M,L,XL")'
    )
    te.add_argument("--depths", help="extra depths trained jointly: the full model cut to this many layers, e.g. 2,3")
    te.add_argument("--no-mrl", action="store_true", help="baseline: the contrastive loss at the full dims only")
    te.add_argument(
        "--proj-dim", type=nonnegative_int, default=0, help="add a linear projection to this many dims (default none)"
    )
    te.add_argument("--steps", type=positive_int, default=200)
    te.add_argument("--batch-size", type=positive_int, default=32, help="pairs per step (in-batch negatives)")
    te.add_argument("--lr", type=float, default=5e-4)
    te.add_argument("--temperature", type=float, default=0.05)
    te.add_argument("--max-tokens", type=positive_int, default=64, help="tokens kept per text")
    te.add_argument("--max-corpus-chars", type=nonnegative_int, default=2_000_000)
    te.add_argument("--n-eval", type=nonnegative_int, default=500, help="held-out pairs for recall@k")
    te.add_argument("--seed", type=int, default=0)
    te.add_argument("--device", default="auto")
    te.add_argument("--quiet", action="store_true")
    te.set_defaults(func=cmd_train_embed)


def _add_embed(sub: argparse._SubParsersAction) -> None:
    em = sub.add_parser("embed", help="embed each line of a file: L2-normalized vectors to a .npy")
    em.add_argument("ckpt", help="embedding checkpoint (from train-embed) or a Hugging Face encoder folder")
    em.add_argument("file", help='text file, one text per non-blank line (or .jsonl of {"text": ...})')
    em.add_argument("-o", "--out", required=True, help="output .npy, shape (texts, dims), float32")
    em.add_argument("--size", help="size or Mix'n'Match spec (default: the full model)")
    em.add_argument("--dims", type=positive_int, help="truncate to these many dims, then normalize (a trained dim)")
    em.add_argument("--batch-size", type=positive_int, default=64)
    em.add_argument("--device", default="auto")
    em.set_defaults(func=cmd_embed)

    ee = sub.add_parser(
        "export-embed",
        help="write one size of an embedding checkpoint as a sentence-transformers "
        "folder (config.json: is_matryoshka, matryoshka_dimensions)",
    )
    ee.add_argument("ckpt", help="embedding checkpoint (from train-embed)")
    ee.add_argument("-o", "--out", required=True, help="new folder")
    ee.add_argument("--size", help="size or spec whose layers share one granularity (default: the full model)")
    ee.add_argument("--force", action="store_true", help="replace --out if it exists")
    ee.set_defaults(func=cmd_export_embed)


def _add_index(sub: argparse._SubParsersAction) -> None:
    ix = sub.add_parser("index", help="build a FAISS index of Matryoshka embeddings")
    ixs = ix.add_subparsers(dest="index_command", required=True)
    ib = ixs.add_parser("build", help="embed a text file (or take --vectors) and write an index directory")
    ib.add_argument("ckpt", nargs="?", help="embedding checkpoint")
    ib.add_argument("file", nargs="?", help="text file, one text per non-blank line")
    ib.add_argument("-o", "--out", required=True, help="index directory to write")
    ib.add_argument("--size", help="size that embeds the corpus (default: the full model)")
    ib.add_argument("--vectors", help="index this .npy instead of embedding texts")
    ib.add_argument("--texts", help="with --vectors: the texts of the rows, one per line")
    ib.add_argument("--dims", help="with --vectors: the Matryoshka dims the vectors were trained at")
    ib.add_argument(
        "--hnsw-dim", type=positive_int, help="also store an HNSW graph over this prefix (a fast first stage)"
    )
    ib.add_argument("--batch-size", type=positive_int, default=64)
    ib.add_argument("--force", action="store_true", help="replace an existing index")
    ib.add_argument("--device", default="auto")
    ib.set_defaults(func=cmd_index_build)


def _add_search(sub: argparse._SubParsersAction) -> None:
    se = sub.add_parser("search", help="search an index: funnel (shortlist at low dims, re-rank at more) or exact")
    se.add_argument("index", help="index directory")
    se.add_argument("query", nargs="*", help="query texts")
    se.add_argument("--queries", help="file of query texts, one per line")
    se.add_argument("--vectors", help=".npy of query vectors instead of texts")
    se.add_argument("--ckpt", help="embedding checkpoint for the queries (default: the index's)")
    se.add_argument("--size", help="query-side size (default: the index's); smaller = cross-size retrieval")
    se.add_argument("--dims", type=positive_int, help="query dims (default: the most the size and index share)")
    se.add_argument("-k", type=positive_int, default=10, help="results per query")
    se.add_argument("--funnel", help="stage dims, e.g. 24,96,384 (default: about D/8 then D)")
    se.add_argument("--shortlist", help="candidates kept after each stage but the last, e.g. 2000,200")
    se.add_argument("--exact", action="store_true", help="exhaustive search at the query dims")
    se.add_argument(
        "--hnsw-ef",
        type=nonnegative_int,
        default=0,
        help="first funnel stage on the index's HNSW graph with this efSearch (0: flat scan)",
    )
    se.add_argument("--json", action="store_true", help="print results as JSON")
    se.add_argument("--device", default="auto")
    se.set_defaults(func=cmd_search)
