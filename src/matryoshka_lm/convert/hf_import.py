"""Import a pretrained Llama as a Matryoshka checkpoint: a Hugging Face folder, a .safetensors file in one, or a
.gguf file (read by transformers' GGUF reader). The names map as hf.py's table says; the checkpoint keeps the
model's tokenizer, its chat format (core/chat.py: template, end-of-turn ids, name) and where it came from."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from matryoshka_lm.config import DEFAULT_SIZES, ModelConfig, load_json
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.chat import ChatFormat, write_chat
from matryoshka_lm.data import EOT, train_split_tokens
from matryoshka_lm.errors import MatryoshkaError

from .extract import check_shapes, staged_dir
from .hf import _check_output, from_hf_names

log = logging.getLogger(__name__)


def read_llama_config(src: Path) -> dict[str, Any]:
    """config.json of a Hugging Face Llama folder, checked for what our model computes identically."""
    if not src.is_dir():
        raise MatryoshkaError(f"{src} is not a directory (expected a Hugging Face Llama checkpoint folder)")
    if not (src / "config.json").is_file():
        raise MatryoshkaError(f"{src} is not a Llama checkpoint: no config.json")
    raw = load_json(src / "config.json")
    if not isinstance(raw, dict) or (
        raw.get("model_type") != "llama" and "LlamaForCausalLM" not in (raw.get("architectures") or [])
    ):
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise MatryoshkaError(
            f"{src} is not a Llama checkpoint (model_type {kind!r}); import-hf reads model_type 'llama'"
        )
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise MatryoshkaError(f"{src}: attention/MLP biases are not supported (our Llama has none)")
    if raw.get("hidden_act", "silu") != "silu":
        raise MatryoshkaError(f"{src}: hidden_act {raw['hidden_act']!r} is not supported (SwiGLU uses silu)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        raise MatryoshkaError(f"{src}: RoPE scaling {rope.get('rope_type') or rope.get('type')!r} is not supported")
    return raw


def read_llama_weights(src: Path) -> dict[str, torch.Tensor]:
    """model.safetensors or its shards (never a pickle), as fp32."""
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [src / f for f in sorted(set(load_json(index).get("weight_map", {}).values()))]
    else:
        other = sorted(p.name for p in src.glob("*.bin")) or sorted(p.name for p in src.glob("*.gguf"))
        hint = f" (found {other[0]}; only safetensors are read, nothing is unpickled)" if other else ""
        raise MatryoshkaError(f"{src} is not a Llama checkpoint: no model.safetensors{hint}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(ck.load_tensors(f))
    return {k: v.float() for k, v in state.items()}


def snap_up(target: Fraction, n: int) -> Fraction:
    """The smallest fraction k/n >= target (at least 1/n): a fraction that divides a dimension of n."""
    return Fraction(max(1, math.ceil(target * n)), n)


def default_sizes(cfg: ModelConfig) -> dict[str, dict[str, str]]:
    """The default granularities, each fraction snapped up to one the model's shape allows
    (heads in whole GQA groups: SmolLM2's 3 groups turn 1/2 into 2/3; 30 layers turn 3/4 into 23/30)."""
    dims = {
        "width": cfg.d_model,
        "heads": min(cfg.layer_kv_heads),
        "ffn": math.gcd(*cfg.layer_ffn),
        "depth": cfg.n_layers,
    }
    sizes: dict[str, dict[str, str]] = {}
    for name, fracs in DEFAULT_SIZES.items():
        size = {a: str(snap_up(Fraction(f), dims[a])) if cfg.nested(a) else "1" for a, f in fracs.items()}
        if size not in sizes.values():  # e.g. heads-only nesting: L, M and S would coincide
            sizes[name] = size
    return sizes


def import_model(src: str | Path, out: str | Path, **kw: Any) -> Path:
    """The one import: `src` a Hugging Face Llama folder, a .safetensors file inside one, or a .gguf file (converted
    to a Hugging Face folder in a temporary directory first, by transformers' GGUF reader). `kw`: import_hf's."""
    src = Path(src)
    if src.is_file() and src.suffix == ".gguf":
        from .from_gguf import hf_from_gguf

        _check_output(out, kw.get("force", False), src)
        with tempfile.TemporaryDirectory() as tmp:
            log.info("reading %s with transformers' GGUF reader", src)
            folder = hf_from_gguf(src, Path(tmp) / "hf")
            return import_hf(folder, out, source_name=str(src), **kw)
    if src.is_file() and src.suffix == ".safetensors":
        if not (src.parent / "config.json").is_file():
            raise MatryoshkaError(f"{src}: a .safetensors file imports with the config.json of its Llama folder")
        return import_hf(src.parent, out, **kw)
    if src.is_file():
        raise MatryoshkaError(f"{src}: import takes a Hugging Face Llama folder, a .safetensors file or a .gguf file")
    return import_hf(src, out, **kw)


def import_hf(
    src: str | Path,
    out: str | Path,
    force: bool = False,
    nest: tuple[str, ...] = ("heads", "ffn"),
    reorder: bool = True,
    data: str | None = None,
    max_corpus_chars: int = 3_000_000,
    reorder_batches: int = 8,
    seq_len: int = 128,
    max_seq_len: int = 8192,
    device: str = "cpu",
    source_name: str | None = None,
) -> Path:
    """Convert a Hugging Face Llama folder into a Matryoshka checkpoint of the full size, ready for
    `matryoshka train --init out` to fine-tune into nested sizes.

    Args:
        src: folder with config.json (model_type llama), model.safetensors (or shards) and tokenizer.json.
        out: the checkpoint directory to create (refused if it exists unless `force`).
        nest: axes the fine-tune will nest (stored in the config with default sizes valid for this shape).
        reorder: permute FFN units / heads / residual features (the nested ones) most-important first,
            measured on `data` (default corpus); the full model's logits do not change.
        max_corpus_chars: how much of the corpus importance is measured on (use the fine-tune's setting).
        reorder_batches, seq_len: windows (of 8 sequences) used to measure importance.
        max_seq_len: cap on the context length (the RoPE table size); HF's max_position_embeddings otherwise.
    """
    from tokenizers import Tokenizer

    from matryoshka_lm.core.model import MatryoshkaLM

    src = Path(src)
    _check_output(out, force, src)
    raw = read_llama_config(src)
    tok_json = _llama_tokenizer(src)
    tok = Tokenizer.from_str(tok_json)
    chat = read_chat_format(src, tok, raw, source_name)
    cfg = _model_config(raw, nest, max_seq_len)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise MatryoshkaError(f"{src}: tokenizer has {tok.get_vocab_size()} tokens, the embedding {cfg.vocab_size}")
    state = from_hf_names(read_llama_weights(src), cfg.n_layers, cfg.tie_embeddings)
    check_shapes(cfg, state, src / "model.safetensors")
    model = MatryoshkaLM(cfg)
    model.load_state_dict(state)
    model.to(device)
    if reorder:
        from .reorder import reorder_model

        reorder_model(
            model,
            train_split_tokens(tok, data, max_corpus_chars),
            seq_len=seq_len,
            n_batches=reorder_batches,
            device=device,
        )
    source = {
        "checkpoint": source_name or str(src),
        "reordered": reorder,
        "reorder_data": data or "default corpus",
        "reorder_max_corpus_chars": max_corpus_chars,
    }
    with staged_dir(out, force, source=src) as tmp:
        (tmp / ck.TOKENIZER).write_text(tok_json)
        ck.save_tensors(tmp / ck.WEIGHTS, model.state_dict(), metadata={"format": "pt"})
        # only the full size is a model yet: the others are slices until a fine-tune trains them
        config = {"model": cfg.to_dict(), "train": None, "trained": [n for n, f in cfg.sizes.items() if _full(f)]}
        ck.write_json(tmp / ck.CONFIG, {**config, "imported_from": source})
        write_chat(tmp, chat)
    return Path(out)


def _full(fractions: dict[str, str]) -> bool:
    return all(str(v) == "1" for v in fractions.values())


def _model_config(raw: dict[str, Any], nest: tuple[str, ...], max_seq_len: int) -> ModelConfig:
    bad = set(nest) - {"width", "heads", "ffn", "depth"}
    if bad:
        raise MatryoshkaError(f"--nest: unknown axes {sorted(bad)}; choose from width, heads, ffn, depth")
    try:
        C, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        rope = raw.get("rope_parameters") or {}
        cfg = ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            d_model=C,
            n_layers=int(raw["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or C // heads),
            ffn_dim=int(raw["intermediate_size"]),
            max_seq_len=min(int(raw.get("max_position_embeddings", 2048)), max_seq_len),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            **{f"nest_{a}": a in nest for a in ("width", "heads", "ffn", "depth")},
        )
    except KeyError as e:
        raise MatryoshkaError(f"not a Llama checkpoint: config.json lacks {e.args[0]!r}") from None
    cfg.sizes = default_sizes(cfg)
    return ModelConfig.from_dict(cfg.to_dict())  # re-validate with the sizes


def _llama_tokenizer(src: Path) -> str:
    """tokenizer.json (the `tokenizers` format); other formats go through transformers if it is installed."""
    path = src / "tokenizer.json"
    if path.is_file():
        text = path.read_text()
    else:
        try:
            from transformers import AutoTokenizer

            text = AutoTokenizer.from_pretrained(str(src)).backend_tokenizer.to_str()
        except Exception as e:  # many failure types (missing files, sentencepiece absent): report any
            raise MatryoshkaError(f"{src}: no tokenizer.json and transformers could not load one ({e})") from None
    if f'"{EOT}"' not in text:
        raise MatryoshkaError(f"{src}: the tokenizer has no {EOT} token, which matryoshka-lm uses between documents")
    return text


def read_chat_format(src: Path, tok, raw: dict[str, Any], source_name: str | None = None) -> ChatFormat:
    """The source's own chat format: its template (chat_template.jinja, or tokenizer_config.json's chat_template),
    the ids that end a turn (generation_config.json's eos_token_id, one or a list, and tokenizer_config's
    eos_token) and its name."""
    tcfg = _json_or_empty(src / "tokenizer_config.json")
    gen = _json_or_empty(src / "generation_config.json")
    jinja = src / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else tcfg.get("chat_template")
    if isinstance(template, list):  # the older list-of-named-templates form: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)

    def token_text(v: Any) -> str:
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    eos = gen.get("eos_token_id", raw.get("eos_token_id"))
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    eos_text = token_text(tcfg.get("eos_token"))
    if eos_text and tok.token_to_id(eos_text) is not None:
        ids.append(tok.token_to_id(eos_text))
    name = source_name or raw.get("_name_or_path") or src.name
    return ChatFormat(
        name=_model_name(str(name)),
        template=template,
        stop_ids=tuple(dict.fromkeys(int(i) for i in ids)),
        bos_token=token_text(tcfg.get("bos_token")),
        eos_token=eos_text,
    )


def _model_name(text: str) -> str | None:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct'; a path -> its last part."""
    name = Path(text).name
    for suffix in (".gguf", ".safetensors"):
        name = name.removesuffix(suffix)
    head, dot, quant = name.rpartition(".")
    return (head if dot and quant[:1] in "QqFf" and quant[1:2].isdigit() else name) or None


def _json_or_empty(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def describe(ckpt: str | Path) -> str:
    """One line about a checkpoint's shape (for the CLI)."""
    cfg, _ = ck.read_config(Path(ckpt))
    return (
        f"{cfg.n_layers} layers, width {cfg.d_model}, heads {cfg.layer_heads[0]}/{cfg.layer_kv_heads[0]} kv, "
        f"ffn {cfg.layer_ffn[0]}, sizes {json.dumps(cfg.sizes)}"
    )
