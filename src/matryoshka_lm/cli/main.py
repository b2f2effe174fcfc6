"""`matryoshka` command line: one subcommand per library function. Errors print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from matryoshka_lm.errors import MatryoshkaError


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cmd_train(a: argparse.Namespace) -> None:
    from tqdm import tqdm

    from matryoshka_lm.config import preset
    from matryoshka_lm.train.loop import train

    model_cfg, tcfg = preset(a.preset)
    overrides = {"steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "grad_accum": a.grad_accum,
                 "lr": a.lr, "seed": a.seed, "only": a.only, "distill": a.distill, "sample_sizes": a.sample_sizes,
                 "max_corpus_chars": a.max_corpus_chars, "fsdp": a.fsdp or None, "dtype": a.dtype,
                 "sizes": a.sizes.split(",") if a.sizes else None, "save_every": a.save_every}
    for k, v in overrides.items():
        if v is not None:
            setattr(tcfg, k, v)
    tcfg.__post_init__()
    if a.nest is not None:
        axes = {x.strip() for x in a.nest.split(",") if x.strip()}
        bad = axes - {"width", "heads", "ffn", "depth"}
        if bad:
            raise MatryoshkaError(f"--nest: unknown axes {sorted(bad)}; choose from width, heads, ffn, depth")
        for axis in ("width", "heads", "ffn", "depth"):
            setattr(model_cfg, f"nest_{axis}", axis in axes)
    out = Path(a.out or f"runs/{a.preset}")
    bar = tqdm(total=tcfg.steps, desc="train", unit="step", disable=a.quiet, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 10)

    def on_step(step: int, m: dict) -> None:
        if bar.n == 0 and step > 1:
            bar.update(step - 1)
        loss = " ".join(f"{n}={v:.3f}" for n, v in m["loss"].items())
        bar.set_postfix_str(f"{loss} tok/s={m['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        if "val_loss" in m:
            val = " ".join(f"{n}={v:.3f}" for n, v in m["val_loss"].items())
            bar.write(f"step {step}: val {val}")

    try:
        train(model_cfg, tcfg, out, data=a.data, resume=a.resume, init=a.init, device=_device(a.device),
              callback=on_step)
    finally:
        bar.close()
    if not a.quiet:
        print(f"checkpoint written to {out}", file=sys.stderr)


def cmd_eval(a: argparse.Namespace) -> None:
    from matryoshka_lm.train.eval_checkpoint import evaluate_checkpoint

    rows, text = evaluate_checkpoint(a.ckpt, sizes=a.sizes, data=a.data, n_batches=a.batches,
                                     json_path=a.json, plot_path=a.plot, device=_device(a.device))
    print(text)


def cmd_generate(a: argparse.Namespace) -> None:
    from matryoshka_lm.core.checkpoint import load_model, load_tokenizer
    from matryoshka_lm.data import EOT
    from matryoshka_lm.infer.engine import Engine
    from matryoshka_lm.infer.sampling import Sampling
    from matryoshka_lm.core.spec import parse_spec, size_names
    from matryoshka_lm.infer.speculative import SpeculativeStats, check_draft, speculative_decode, speculative_stream

    device = _device(a.device)
    model = load_model(a.ckpt, device)
    tok = load_tokenizer(a.ckpt)
    if not a.prompt:
        raise MatryoshkaError("empty prompt")
    ids = tok.encode(a.prompt).ids
    sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed)
    # compiling costs tens of seconds per size on CPU, more than a CLI run gains; on CUDA it pays at once
    engine = Engine(model, compile=device.startswith("cuda") if a.compile is None else a.compile)
    eot = tok.token_to_id(EOT)
    stops = dict(stop_tokens=[] if eot is None else [eot], stop_strings=a.stop or [], decode=tok.decode)
    draft = parse_spec(model.cfg, a.draft) if a.draft else None
    sizes = size_names(model.cfg) if a.size == "all" else [a.size]
    specs = [parse_spec(model.cfg, size) for size in sizes]
    engine.check_prompts([ids], a.max_new_tokens)  # fail before any output
    for spec in specs if draft is not None else []:
        check_draft(model.cfg, spec, draft)
    if draft is not None and not 1 <= a.gamma <= 8:
        raise MatryoshkaError(f"--gamma must be in 1..8, got {a.gamma}")
    for size, spec in zip(sizes, specs):
        print(f"[{size}] {a.prompt}" if len(sizes) > 1 else a.prompt, end="", flush=True)
        stats = SpeculativeStats()
        if draft is None:
            pieces = (engine.stream(ids, spec, a.max_new_tokens, sampling, **stops) if a.stream else
                      [engine.generate([ids], spec, a.max_new_tokens, sampling, **stops)[0].text])
        elif a.stream:
            pieces = speculative_stream(model, ids, spec, draft, a.max_new_tokens, sampling, engine=engine,
                                        stats=stats, gamma=a.gamma, **stops)
        else:
            done, stats = speculative_decode(model, ids, spec, draft, a.max_new_tokens, sampling, gamma=a.gamma,
                                             engine=engine, **stops)
            pieces = [done.text]
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        if draft is not None:
            print(f"speculative: draft {draft} for {size}: {stats.acceptance:.0%} of {stats.drafted} drafted tokens "
                  f"accepted, {stats.tokens_per_round:.2f} tokens per target pass", file=sys.stderr)


def cmd_extract(a: argparse.Namespace) -> None:
    from matryoshka_lm.convert.extract import extract_submodel

    out = extract_submodel(a.ckpt, a.size, a.out, force=a.force)
    print(f"wrote {out}", file=sys.stderr)


def cmd_export_hf(a: argparse.Namespace) -> None:
    from matryoshka_lm.convert.hf import export_hf

    out = export_hf(a.ckpt, a.size, a.out, force=a.force, pad=a.pad)
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)", file=sys.stderr)


def cmd_import_hf(a: argparse.Namespace) -> None:
    from matryoshka_lm.convert.hf import describe, import_hf

    nest = tuple(x.strip() for x in a.nest.split(",") if x.strip())
    out = import_hf(a.src, a.out, force=a.force, nest=nest, reorder=not a.no_reorder, data=a.data,
                    max_corpus_chars=a.max_corpus_chars, reorder_batches=a.reorder_batches,
                    device=_device(a.device))
    print(f"wrote {out}: {describe(out)}", file=sys.stderr)


def cmd_mixnmatch(a: argparse.Namespace) -> None:
    from matryoshka_lm.study.mixnmatch import run_mixnmatch

    best, table = run_mixnmatch(a.ckpt, a.budget, n_batches=a.batches, max_evals=a.max_evals, plot_path=a.plot,
                                json_path=a.json, latency_tokens=a.latency_tokens, device=_device(a.device))
    print(table)
    print(f"\nbest for {a.budget}: {best.text}")


def cmd_study(a: argparse.Namespace) -> None:
    from matryoshka_lm.study.study import run_study

    res = run_study(a.preset, a.out, work=a.work, data=a.data, seed=a.seed, device=_device(a.device),
                    on_run=lambda name, state: print(f"[study] {name}: {state}", file=sys.stderr, flush=True))
    print(f"report written to {a.out}/README.md ({res['meta']['wall_seconds'] / 60:.1f} min)")


def _int_list(text: str | None, what: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MatryoshkaError(f"{what} must be comma-separated integers, got {text!r}") from None


def _spec_list(text: str | None) -> list[str] | None:
    """Sizes or Mix'n'Match specs: comma-separated, or ';'-separated when the specs contain commas."""
    if not text:
        return None
    return [s.strip() for s in text.split(";" if ";" in text else ",") if s.strip()]


def cmd_train_embed(a: argparse.Namespace) -> None:
    from matryoshka_lm.embed.model import EmbedTrainConfig, train_embedding

    cfg = EmbedTrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, temperature=a.temperature,
                           dims=_int_list(a.dims, "--dims"), mrl=not a.no_mrl, sizes=_spec_list(a.sizes),
                           depths=_int_list(a.depths, "--depths"), proj_dim=a.proj_dim, max_tokens=a.max_tokens,
                           pairs=a.pairs, data=a.data, max_corpus_chars=a.max_corpus_chars, n_eval=a.n_eval,
                           seed=a.seed)

    def on_step(step: int, m: dict) -> None:
        if not a.quiet and (step % 10 == 0 or step == cfg.steps):
            print(f"step {step}/{cfg.steps} loss {m['loss']:.4f} lr {m['lr']:.2e}", file=sys.stderr)

    from matryoshka_lm.embed.hf_encoder import finetune_hf, is_hf_encoder

    if is_hf_encoder(a.ckpt):
        finetune_hf(a.ckpt, a.out, cfg, device=_device(a.device), callback=on_step)
        print(f"fine-tuned encoder written to {a.out}", file=sys.stderr)
        return
    meta = train_embedding(a.ckpt, a.out, cfg, device=_device(a.device), callback=on_step)
    full = meta["sizes"][0]
    for name, rec in (("before", meta["recall_before"]), ("after", meta["recall_after"])):
        if rec:
            row = "  ".join(f"{m}:{r['r@10']:.3f}" for m, r in rec[full].items())
            print(f"recall@10 by dims {name} training ({full}): {row}", file=sys.stderr)
    print(f"embedding checkpoint written to {a.out}", file=sys.stderr)


def cmd_embed(a: argparse.Namespace) -> None:
    from matryoshka_lm.embed.model import embed_file

    vecs = embed_file(a.ckpt, a.file, a.out, size=a.size, dims=a.dims, batch_size=a.batch_size,
                      device=_device(a.device))
    print(f"wrote {a.out}: {vecs.shape[0]} x {vecs.shape[1]} unit vectors", file=sys.stderr)


def cmd_index_build(a: argparse.Namespace) -> None:
    from matryoshka_lm.embed.retrieval import build_index, index_texts

    if a.vectors:
        if a.ckpt or a.file:
            raise MatryoshkaError("give either CKPT FILE or --vectors, not both")
        import numpy as np

        from matryoshka_lm.embed.model import read_texts

        try:
            vecs = np.load(a.vectors, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise MatryoshkaError(f"cannot read vectors {a.vectors}: {e}") from None
        out = build_index(vecs, a.out, _int_list(a.dims, "--dims"), read_texts(a.texts) if a.texts else None,
                          force=a.force, hnsw_dim=a.hnsw_dim)
    else:
        if not (a.ckpt and a.file):
            raise MatryoshkaError("index build needs CKPT FILE (an embedding checkpoint and a text file) or --vectors")
        out = index_texts(a.ckpt, a.file, a.out, size=a.size, batch_size=a.batch_size, force=a.force,
                          device=_device(a.device), hnsw_dim=a.hnsw_dim)
    print(f"index written to {out}", file=sys.stderr)


def cmd_search(a: argparse.Namespace) -> None:
    from matryoshka_lm.embed.retrieval import search_texts

    queries = list(a.query) or None
    if a.queries:
        from matryoshka_lm.embed.model import read_texts

        queries = (queries or []) + read_texts(a.queries)
    vectors = None
    if a.vectors:
        import numpy as np

        try:
            vectors = np.load(a.vectors, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise MatryoshkaError(f"cannot read vectors {a.vectors}: {e}") from None
    results = search_texts(a.index, queries, vectors, ckpt=a.ckpt, size=a.size, dims=a.dims, k=a.k,
                           funnel=_int_list(a.funnel, "--funnel"), shortlist=_int_list(a.shortlist, "--shortlist"),
                           exact=a.exact, device=_device(a.device), hnsw_ef=a.hnsw_ef)
    if a.json:
        print(json.dumps(results))
        return
    for qi, hits in enumerate(results):
        if len(results) > 1:
            print(f"# query {qi}" + (f": {queries[qi]}" if queries else ""))
        for rank, h in enumerate(hits, 1):
            print(f"{rank}\t{h['id']}\t{h['score']:.4f}" + (f"\t{h['text']}" if "text" in h else ""))


def cmd_serve(a: argparse.Namespace) -> None:
    import os

    from matryoshka_lm.serve.app import serve

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    serve(a.ckpt, host=a.host, port=a.port, api_key=a.api_key or os.environ.get("MATRYOSHKA_API_KEY"),
          device=_device(a.device), name=a.name, max_batch=a.max_batch, compile=a.compile)


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server: every size of one checkpoint, per request")
    sv.add_argument("ckpt")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MATRYOSHKA_API_KEY, else none)")
    sv.add_argument("--name", help="model name in ids NAME:SIZE (default: the checkpoint folder's name)")
    sv.add_argument("--max-batch", type=int, default=16, help="rows per generation batch")
    sv.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="torch.compile the decode step (pays off on CUDA)")
    sv.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 suits a small shared CPU)")
    sv.add_argument("--device", default="auto")
    sv.set_defaults(func=cmd_serve)


def cmd_export_embed(a: argparse.Namespace) -> None:
    from matryoshka_lm.embed.hf_encoder import export_embedding

    out = export_embedding(a.ckpt, a.out, size=a.size, force=a.force)
    print(f"wrote {out} (load with sentence_transformers.SentenceTransformer, or AutoModel + mean pooling)",
          file=sys.stderr)


def _add_embedding_parsers(sub) -> None:
    te = sub.add_parser("train-embed",
                        help="MRL-train a Matryoshka embedding (nested dims, optionally sizes) from a checkpoint")
    te.add_argument("ckpt", help="LM checkpoint to start from (its tokenizer is kept), or a Hugging Face encoder "
                    "folder ('minilm' = all-MiniLM-L6-v2 from the [embed] extra)")
    te.add_argument("-o", "--out", required=True, help="embedding checkpoint directory to write")
    te.add_argument("--pairs",
                    help="JSONL of {\"query\": ..., \"positive\": ...} (default: two halves of corpus passages)")
    te.add_argument("--data", help="corpus for self-supervised pairs (default: the embedded corpus)")
    te.add_argument("--dims", help="nested dims, e.g. 12,24,48,96,192 (default: D/16,D/8,D/4,D/2,D)")
    te.add_argument("--sizes", help="extra sizes/specs trained jointly (2D Matryoshka), e.g. M,S")
    te.add_argument("--depths", help="extra depths trained jointly: the full model cut to this many layers, e.g. 2,3")
    te.add_argument("--no-mrl", action="store_true", help="baseline: the contrastive loss at the full dims only")
    te.add_argument("--proj-dim", type=int, default=0, help="add a linear projection to this many dims (default none)")
    te.add_argument("--steps", type=int, default=200)
    te.add_argument("--batch-size", type=int, default=32, help="pairs per step (in-batch negatives)")
    te.add_argument("--lr", type=float, default=5e-4)
    te.add_argument("--temperature", type=float, default=0.05)
    te.add_argument("--max-tokens", type=int, default=64, help="tokens kept per text")
    te.add_argument("--max-corpus-chars", type=int, default=2_000_000)
    te.add_argument("--n-eval", type=int, default=500, help="held-out pairs for recall@k")
    te.add_argument("--seed", type=int, default=0)
    te.add_argument("--device", default="auto")
    te.add_argument("--quiet", action="store_true")
    te.set_defaults(func=cmd_train_embed)

    em = sub.add_parser("embed", help="embed each line of a file: L2-normalized vectors to a .npy")
    em.add_argument("ckpt", help="embedding checkpoint (from train-embed) or a Hugging Face encoder folder")
    em.add_argument("file", help="text file, one text per non-blank line (or .jsonl of {\"text\": ...})")
    em.add_argument("-o", "--out", required=True, help="output .npy, shape (texts, dims), float32")
    em.add_argument("--size", help="size or Mix'n'Match spec (default: the full model)")
    em.add_argument("--dims", type=int, help="truncate to these many dims, then normalize (a trained dim)")
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--device", default="auto")
    em.set_defaults(func=cmd_embed)

    ee = sub.add_parser("export-embed", help="write one size of an embedding checkpoint as a sentence-transformers "
                        "folder (config.json: is_matryoshka, matryoshka_dimensions)")
    ee.add_argument("ckpt", help="embedding checkpoint (from train-embed)")
    ee.add_argument("-o", "--out", required=True, help="new folder")
    ee.add_argument("--size", help="size or spec whose layers share one granularity (default: the full model)")
    ee.add_argument("--force", action="store_true", help="replace --out if it exists")
    ee.set_defaults(func=cmd_export_embed)

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
    ib.add_argument("--hnsw-dim", type=int, help="also store an HNSW graph over this prefix (a fast first stage)")
    ib.add_argument("--batch-size", type=int, default=64)
    ib.add_argument("--force", action="store_true", help="replace an existing index")
    ib.add_argument("--device", default="auto")
    ib.set_defaults(func=cmd_index_build)

    se = sub.add_parser("search", help="search an index: funnel (shortlist at low dims, re-rank at more) or exact")
    se.add_argument("index", help="index directory")
    se.add_argument("query", nargs="*", help="query texts")
    se.add_argument("--queries", help="file of query texts, one per line")
    se.add_argument("--vectors", help=".npy of query vectors instead of texts")
    se.add_argument("--ckpt", help="embedding checkpoint for the queries (default: the index's)")
    se.add_argument("--size", help="query-side size (default: the index's); smaller = cross-size retrieval")
    se.add_argument("--dims", type=int, help="query dims (default: the most the size and index share)")
    se.add_argument("-k", type=int, default=10, help="results per query")
    se.add_argument("--funnel", help="stage dims, e.g. 24,96,384 (default: about D/8 then D)")
    se.add_argument("--shortlist", help="candidates kept after each stage but the last, e.g. 2000,200")
    se.add_argument("--exact", action="store_true", help="exhaustive search at the query dims")
    se.add_argument("--hnsw-ef", type=int, default=0,
                    help="first funnel stage on the index's HNSW graph with this efSearch (0: flat scan)")
    se.add_argument("--json", action="store_true", help="print results as JSON")
    se.add_argument("--device", default="auto")
    se.set_defaults(func=cmd_search)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="matryoshka", description="Train, evaluate and run nested (Matryoshka) LMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a Matryoshka model (all sizes jointly) or a dense baseline (--only)")
    t.add_argument("--preset", default="demo", help="tiny | demo | small (default: demo)")
    t.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    t.add_argument("--out", help="checkpoint directory (default: runs/PRESET)")
    t.add_argument("--data", help="text file or folder (default: embedded Shakespeare + KJV corpus)")
    t.add_argument("--only", help="baseline mode: train one dense model with this size's shape, e.g. M")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--init", help="start from this checkpoint's weights and tokenizer")
    t.add_argument("--sizes", help="comma-separated sizes to train jointly (default: all)")
    t.add_argument("--sample-sizes", type=int, help="train the full size plus a random subset: this many sizes per step")
    t.add_argument("--distill", type=float, help="weight of self-distillation from the full size (default 0)")
    t.add_argument("--nest", help="axes to nest, comma-separated: width,heads,ffn,depth (default: all)")
    t.add_argument("--batch-size", type=int, help="global sequences per step")
    t.add_argument("--seq-len", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--save-every", type=int)
    t.add_argument("--max-corpus-chars", type=int, help="use only this many characters of the corpus")
    t.add_argument("--dtype", choices=["auto", "fp32", "bf16"])
    t.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard under torchrun")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="per-size table: params, FLOPs/token, val loss, perplexity, agreement")
    e.add_argument("ckpt")
    e.add_argument("--sizes", help="comma-separated sizes or Mix'n'Match specs; ';' separates specs with commas")
    e.add_argument("--data", help="evaluate on this text instead of the checkpoint's validation split")
    e.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's eval_batches)")
    e.add_argument("--json", help="write the table as JSON here (default CKPT/eval.json)")
    e.add_argument("--plot", help="write params-vs-loss PNG here (default CKPT/eval.png)")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="sample text at one size (or --size all)")
    g.add_argument("ckpt")
    g.add_argument("--size", default="XL", help="size name, Mix'n'Match spec, or 'all'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this much probability")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop at this string (repeatable); <|endoftext|> always stops")
    g.add_argument("--draft", help="speculative decoding: this smaller size or spec drafts, --size verifies")
    g.add_argument("--gamma", type=int, default=4, help="draft tokens per verification (start value; adapts)")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default: on for CUDA, off for CPU)")
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("extract", help="write one size as a standalone dense checkpoint (only its weights)")
    x.add_argument("ckpt")
    x.add_argument("--size", required=True, help="size name or Mix'n'Match spec, e.g. M or S,M,M,L")
    x.add_argument("-o", "--out", required=True, help="new checkpoint directory")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.set_defaults(func=cmd_extract)

    h = sub.add_parser("export-hf", help="write one size as a Hugging Face Llama folder (transformers loads it)")
    h.add_argument("ckpt")
    h.add_argument("--size", required=True, help="size name or a spec whose layers share one granularity")
    h.add_argument("-o", "--out", required=True, help="new folder")
    h.add_argument("--pad", action="store_true",
                   help="export per-layer specs zero-padded to the widest layer (same logits, more parameters)")
    h.add_argument("--force", action="store_true", help="replace --out if it exists")
    h.set_defaults(func=cmd_export_hf)

    i = sub.add_parser("import-hf", help="convert a Hugging Face Llama folder into a checkpoint for train --init")
    i.add_argument("src", help="folder with config.json, model.safetensors and tokenizer.json")
    i.add_argument("-o", "--out", required=True, help="new checkpoint directory")
    i.add_argument("--nest", default="heads,ffn", help="axes the fine-tune will nest (default heads,ffn)")
    i.add_argument("--no-reorder", action="store_true", help="keep the original order of neurons and heads")
    i.add_argument("--data", help="corpus for measuring importance (default: the embedded corpus)")
    i.add_argument("--max-corpus-chars", type=int, default=3_000_000,
                   help="characters of the corpus to read (match the fine-tune's setting; default 3000000)")
    i.add_argument("--reorder-batches", type=int, default=8, help="batches of 8 x 128 tokens for importance")
    i.add_argument("--force", action="store_true", help="replace --out if it exists")
    i.add_argument("--device", default="auto")
    i.set_defaults(func=cmd_import_hf)

    m = sub.add_parser("mixnmatch", help="search per-layer granularities for the best submodel under a budget")
    m.add_argument("ckpt")
    m.add_argument("--budget", required=True, help="params=5M | flops=1.5G | latency=3ms (measured here)")
    m.add_argument("--batches", type=int, default=4, help="validation batches of 8 sequences per candidate")
    m.add_argument("--max-evals", type=int, default=24, help="Mix'n'Match candidates to evaluate (plus the sizes)")
    m.add_argument("--latency-tokens", type=int, default=128, help="sequence length timed for latency budgets")
    m.add_argument("--plot", help="PNG path (default CKPT/mixnmatch.png)")
    m.add_argument("--json", help="JSON path (default CKPT/mixnmatch.json)")
    m.add_argument("--device", default="auto")
    m.set_defaults(func=cmd_mixnmatch)

    st = sub.add_parser("study", help="Matryoshka vs independently trained baselines, axis ablation, scaling fits")
    st.add_argument("--preset", default="cpu-small", help="micro | cpu-small | gpu-medium (default: cpu-small)")
    st.add_argument("-o", "--out", default="report", help="report folder (default: report)")
    st.add_argument("--work", help="where the runs' checkpoints go (default: runs/study-PRESET); finished runs are reused")
    st.add_argument("--data", help="text file or folder (default: the embedded corpus)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--device", default="auto")
    st.set_defaults(func=cmd_study)
    _add_embedding_parsers(sub)
    _add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except MatryoshkaError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
