"""Hugging Face interop: export a size as a stock `LlamaForCausalLM` folder; import a Llama checkpoint as ours.

Our weights are Llama's under other names (RoPE already in Hugging Face's rotate-half layout, RMSNorm in fp32
as LlamaRMSNorm computes it), so both directions are renames plus a config translation:

  ours                         transformers
  tok_emb.weight               model.embed_tokens.weight
  layers.i.attn.w{q,k,v,o}     model.layers.i.self_attn.{q,k,v,o}_proj
  layers.i.ffn.w_{gate,up,down}  model.layers.i.mlp.{gate,up,down}_proj
  layers.i.attn_norm / ffn_norm  model.layers.i.input_layernorm / post_attention_layernorm
  norm.weight, lm_head.weight  model.norm.weight, lm_head.weight

Per-layer widths: the stock LlamaConfig takes one `intermediate_size` and one head count for all layers
(transformers 5.x; only other architectures such as Gemma 3n take a list), so a Mix'n'Match spec whose layers
differ exports only with `pad=True`: every layer zero-padded to the widest (zero FFN units and zero GQA groups
add exactly nothing, so the logits are unchanged; the parameter count is the widest layer's).
"""

from __future__ import annotations

import json
import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from matryoshka_lm.config import DEFAULT_SIZES, ModelConfig, load_json
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.nested import kv_heads
from matryoshka_lm.core.spec import count_params, format_spec, size_names
from matryoshka_lm.data import EOT
from matryoshka_lm.errors import MatryoshkaError

from .extract import check_shapes, sliced_checkpoint, staged_dir

log = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "ffn.w_gate": "mlp.gate_proj",
    "ffn.w_up": "mlp.up_proj",
    "ffn.w_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def to_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k in _TOP_NAMES:
            out[_TOP_NAMES[k]] = v
            continue
        _, i, rest = k.split(".", 2)  # layers.{i}.{module}.weight
        out[f"model.layers.{i}.{_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"] = v
    return out


def from_hf_names(state: dict[str, torch.Tensor], n_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """HF Llama names -> ours; missing weights raise a clear error naming the first few."""
    want = {v: k for k, v in _TOP_NAMES.items() if not (tied and k == "lm_head.weight")}
    for i in range(n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            want[f"model.layers.{i}.{theirs}.weight"] = f"layers.{i}.{ours}.weight"
    missing = sorted(k for k in want if k not in state)
    if missing:
        more = "..." if len(missing) > 3 else ""
        raise MatryoshkaError(f"not a Llama checkpoint: weights {missing[:3]}{more} missing")
    return {ours: state[theirs] for theirs, ours in want.items()}


# ---------------------------------------------------------------- export


def pad_layers(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Zero-pad every layer to the widest FFN and head count: identical logits, one width for all layers.

    Padded FFN units have zero gate/up rows and down columns (silu(0) * 0 = 0). Padded heads come as whole GQA
    groups with zero q/k/v rows and zero o columns: their attention output is a mean of zero values, times zero.
    """
    F_max, H_max = max(cfg.layer_ffn), max(cfg.layer_heads)
    hd, g = cfg.head_dim, cfg.group_size
    s = dict(state)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        for name in ("ffn.w_gate", "ffn.w_up"):
            s[p + name + ".weight"] = _pad(s[p + name + ".weight"], 0, F_max)
        s[p + "ffn.w_down.weight"] = _pad(s[p + "ffn.w_down.weight"], 1, F_max)
        s[p + "attn.wq.weight"] = _pad(s[p + "attn.wq.weight"], 0, H_max * hd)
        for name in ("attn.wk", "attn.wv"):
            s[p + name + ".weight"] = _pad(s[p + name + ".weight"], 0, kv_heads(H_max, g) * hd)
        s[p + "attn.wo.weight"] = _pad(s[p + "attn.wo.weight"], 1, H_max * hd)
    d = cfg.to_dict()
    d.update(ffn_dim=F_max, n_heads=H_max, n_kv_heads=kv_heads(H_max, g))
    return ModelConfig.from_dict(d), s


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def llama_config(cfg: ModelConfig, eot_id: int | None) -> dict[str, Any]:
    """The transformers LlamaConfig keyword arguments for a standalone (uniform-per-layer) config."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.layer_ffn[0],
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.layer_heads[0],
        num_key_value_heads=cfg.layer_kv_heads[0],
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )


def export_hf(ckpt: str | Path, size: str, out: str | Path, force: bool = False, pad: bool = False) -> Path:
    """Write size `size` of `ckpt` as a Hugging Face Llama folder (config.json, model.safetensors, tokenizer).

    Args:
        ckpt: a Matryoshka (or extracted) checkpoint directory.
        size: size name or Mix'n'Match spec.
        out: the folder to create; AutoModelForCausalLM / AutoTokenizer.from_pretrained(out) load it offline.
        force: replace an existing `out`.
        pad: export a spec whose layers differ by zero-padding each layer to the widest (same logits).
    """
    try:
        import transformers
        from tokenizers import Tokenizer
    except ImportError:
        raise MatryoshkaError("export-hf needs the transformers package: pip install transformers") from None
    ckpt = Path(ckpt)
    _check_output(out, force, ckpt)
    cfg, spec, sub_cfg, state = sliced_checkpoint(ckpt, size)
    ffn, heads = sub_cfg.layer_ffn, sub_cfg.layer_heads
    if len(set(ffn)) > 1 or len(set(heads)) > 1:
        if not pad:
            raise MatryoshkaError(
                f"spec {size!r} has per-layer FFN widths {sorted(set(ffn))} / heads {sorted(set(heads))}, which the "
                f"stock transformers Llama cannot express (one intermediate_size and head count for all layers); "
                f"export-hf takes the sizes {', '.join(size_names(cfg))} and specs whose layers share one granularity "
                f"(any depth and width, e.g. 'M,M,M'); pass --pad to zero-pad to the widest layer (same logits, more "
                f"parameters), or use `matryoshka extract` for a standalone matryoshka checkpoint"
            )
        sub_cfg, state = pad_layers(sub_cfg, state)
    tok_json = _read_tokenizer(ckpt)
    tok = Tokenizer.from_str(tok_json)
    eot_id = tok.token_to_id(EOT)
    hf_cfg = transformers.LlamaConfig(**llama_config(sub_cfg, eot_id))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, model_max_length=sub_cfg.max_seq_len
    )
    with staged_dir(out, force, source=ckpt) as tmp:
        hf_cfg.save_pretrained(tmp)
        ck.save_tensors(tmp / "model.safetensors", to_hf_names(state), metadata={"format": "pt"})
        fast.save_pretrained(tmp)
        ck.write_json(
            tmp / "matryoshka.json",
            {
                "checkpoint": str(ckpt),
                "spec": format_spec(spec),
                "padded": pad,
                "params": count_params(cfg, spec)["total"],
            },
        )
    log.info("exported %s of %s to %s", format_spec(spec), ckpt, out)
    return Path(out)


def _check_output(out: str | Path, force: bool, source: Path) -> None:
    """Fail fast, before any heavy work (staged_dir checks again when it writes)."""
    out = Path(out)
    if out.resolve() == source.resolve():
        raise MatryoshkaError(f"output {out} is the input; pick another output directory")
    if out.exists() and not force:
        raise MatryoshkaError(f"output {out} already exists; pass --force to replace it")


def _read_tokenizer(ckpt: Path) -> str:
    path = ckpt / ck.TOKENIZER
    if not path.is_file():
        raise MatryoshkaError(f"missing tokenizer {path}")
    return path.read_text()


# ---------------------------------------------------------------- import


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
            model, _train_tokens(tok, data, max_corpus_chars), seq_len=seq_len, n_batches=reorder_batches, device=device
        )
    source = {
        "checkpoint": str(src),
        "reordered": reorder,
        "reorder_data": data or "default corpus",
        "reorder_max_corpus_chars": max_corpus_chars,
    }
    with staged_dir(out, force, source=src) as tmp:
        (tmp / ck.TOKENIZER).write_text(tok_json)
        ck.save_tensors(tmp / ck.WEIGHTS, model.state_dict(), metadata={"format": "pt"})
        ck.write_json(tmp / ck.CONFIG, {"model": cfg.to_dict(), "train": None, "imported_from": source})
    return Path(out)


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


def _train_tokens(tok, data: str | None, max_corpus_chars: int):
    """The training split of the corpus the fine-tune will read (importance never sees validation tokens)."""
    from matryoshka_lm.config import TrainConfig
    from matryoshka_lm.data import encode_corpus, limit_chars, read_corpus, split_tokens

    docs = limit_chars(read_corpus(data), max_corpus_chars)
    train, _ = split_tokens(encode_corpus(tok, docs), TrainConfig().val_fraction)
    return train


def describe(ckpt: str | Path) -> str:
    """One line about a checkpoint's shape (for the CLI)."""
    cfg, _ = ck.read_config(Path(ckpt))
    return (
        f"{cfg.n_layers} layers, width {cfg.d_model}, heads {cfg.layer_heads[0]}/{cfg.layer_kv_heads[0]} kv, "
        f"ffn {cfg.layer_ffn[0]}, sizes {json.dumps(cfg.sizes)}"
    )
