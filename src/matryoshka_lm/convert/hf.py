"""Hugging Face interop: export a size as a stock `LlamaForCausalLM` folder (the import is hf_import.py).

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

import logging
from pathlib import Path
from typing import Any

import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.chat import read_chat
from matryoshka_lm.core.nested import kv_heads
from matryoshka_lm.core.spec import count_params, format_spec, size_names
from matryoshka_lm.data import EOT
from matryoshka_lm.errors import MatryoshkaError

from .extract import sliced_checkpoint, staged_dir

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
    chat = read_chat(ckpt)  # an imported model's own template and end-of-turn ids travel with it
    hf_cfg = transformers.LlamaConfig(**llama_config(sub_cfg, eot_id))
    eos = (chat.eos_token if chat and chat.eos_token else None) or EOT
    bos = (chat.bos_token if chat and chat.bos_token else None) or EOT
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, model_max_length=sub_cfg.max_seq_len
    )
    if chat is not None and chat.template:
        fast.chat_template = chat.template
    gen = None
    if chat is not None and chat.stop_ids:
        ids = list(chat.stop_ids)
        gen = transformers.GenerationConfig(bos_token_id=eot_id, eos_token_id=ids[0] if len(ids) == 1 else ids)
    with staged_dir(out, force, source=ckpt) as tmp:
        hf_cfg.save_pretrained(tmp)
        ck.save_tensors(tmp / "model.safetensors", to_hf_names(state), metadata={"format": "pt"})
        fast.save_pretrained(tmp)
        if gen is not None:
            gen.save_pretrained(tmp)
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
