"""GGUF export: one uniform size of a checkpoint as a llama.cpp / ollama `llama` model file.

Weights map to GGUF's llama tensors (numpy shape (out, in); GGUF lists the dims reversed, ne = [in, out]):

  ours                             GGUF
  tok_emb.weight                   token_embd.weight
  layers.i.attn.w{q,k,v,o}         blk.i.attn_{q,k,v,output}.weight   (q, k: rows permuted, see below)
  layers.i.ffn.w_{gate,up,down}    blk.i.ffn_{gate,up,down}.weight
  layers.i.attn_norm / ffn_norm    blk.i.attn_norm / ffn_norm.weight
  norm.weight, lm_head.weight      output_norm.weight, output.weight  (tied embeddings: no output tensor)

RoPE: our q/k rows are in Hugging Face's rotate-half layout; llama.cpp's llama rotates adjacent pairs, so q and k
rows are permuted exactly as llama.cpp's convert_hf_to_gguf.py does (`permute(w, n_head, n_kv_head)`), and
transformers' GGUF loader undoes it. Permuting output rows keeps every input-feature group whole.

Precision: fp32 or fp16 matrices, or our quantized codes written as GGUF blocks of 32 input features as they are,
with no re-quantization (core/quant.py: code q, fp16 scale s per group of 32; the r-bit model reads t = the top r
bits of q as s * (2^(8-r) t + (2^(8-r) - 1) / 2)):

  int8 -> Q8_0 (34 bytes: fp16 d, 32 int8 qs; x = d * qs):   d = s, qs = q                       exact
  int4 -> Q4_1 (20 bytes: fp16 d, fp16 m, 16 bytes of nibbles; x = d * n + m, n in 0..15):
          n = t + 8, d = 16 s (exact: a power of two), m = s * (16 * -8 + 7.5) = -120.5 s rounded to fp16
          (s has 11 significant bits, 120.5 = 241/2 needs 8 more: m is off by at most 2^-11 |m| <= 0.059 s,
          a uniform shift of every weight in the block by under 6% of one int8 step, 0.37% of one int4 step).

Q4_1's byte j holds weight j of the block in its low nibble and weight j + 16 in its high one. Norm gains stay
F32; the token embedding (and an untied head) stay F32 / F16 unless the checkpoint quantized embeddings too.
Other widths are refused: GGUF's 2- and 3-bit types are 256-weight k-quant super-blocks whose sub-block scales
are quantized again, so no block of that size holds our int2/int3 levels exactly (Q4_1 would, at int4's size);
int5 would fit Q5_1 (not written yet), int6/int7 fit no type.

The tokenizer (a Hugging Face byte-level BPE with GPT-2's pre-tokenizer regex) is written as tokenizer.ggml.model
"gpt2" with pre-tokenizer "gpt-2" (llama.cpp's name for that regex): tokens, token types, merges;
bos = eos = <|endoftext|>, never added automatically (our models see none at the start of a text).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka_lm.config import ModelConfig
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import precision, quant
from matryoshka_lm.core.chat import ChatFormat, read_chat
from matryoshka_lm.core.nested import CODE_BITS, slice_views, submodel_config, top_bits
from matryoshka_lm.core.spec import SubmodelSpec, format_spec, parse_spec, size_names
from matryoshka_lm.data import EOT
from matryoshka_lm.errors import MatryoshkaError

log = logging.getLogger(__name__)

BLOCK = 32  # weights per Q8_0 / Q4_1 block: our quantization groups must be exactly this
GGUF_BITS = (8, 4)
DTYPES = ("f32", "f16")

_LAYER_NAMES = {
    "attn.wq": "attn_q",
    "attn.wk": "attn_k",
    "attn.wv": "attn_v",
    "attn.wo": "attn_output",
    "ffn.w_gate": "ffn_gate",
    "ffn.w_up": "ffn_up",
    "ffn.w_down": "ffn_down",
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {
    "tok_emb.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(name: str) -> str:
    """Our state-dict name -> GGUF's llama tensor name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, i, rest = name.split(".", 2)  # layers.{i}.{module}.weight
    return f"blk.{i}.{_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order that turns rotate-half heads into llama.cpp's adjacent pairs (convert_hf_to_gguf's `permute`):
    within each head, output row r of the GGUF tensor is our row perm[r]."""
    half = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, 2, half).transpose(1, 2).reshape(rows)


# ---------------------------------------------------------------- blocks


def q8_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """int8 codes (rows, n) and fp16-valued scales (rows, n/32) -> Q8_0 bytes (rows, n/32 * 34)."""
    rows, n = codes.shape
    d = _fp16(scales).view(np.uint8).reshape(rows, n // BLOCK, 2)
    qs = codes.to(torch.int8).numpy().view(np.uint8).reshape(rows, n // BLOCK, BLOCK)
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def q4_1_blocks(top: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """4-bit codes t in -8..7 (rows, n) and scales (rows, n/32) -> Q4_1 bytes (rows, n/32 * 20) that read back
    as s * (16 t + 7.5): nibble t + 8, d = 16 s, m = -120.5 s (rounded to fp16; see the module doc)."""
    rows, n = top.shape
    nib = (top.to(torch.int16) + 8).to(torch.uint8).numpy().reshape(rows, n // BLOCK, BLOCK)
    qs = nib[..., : BLOCK // 2] | (nib[..., BLOCK // 2 :] << np.uint8(4))
    d = _fp16(16 * scales).view(np.uint8).reshape(rows, n // BLOCK, 2)
    m = _fp16(-120.5 * scales).view(np.uint8).reshape(rows, n // BLOCK, 2)
    return np.concatenate([d, m, qs], axis=-1).reshape(rows, -1)


def _fp16(x: torch.Tensor) -> np.ndarray:
    h = x.detach().float().cpu().to(torch.float16)
    if not torch.isfinite(h).all():
        raise MatryoshkaError("a quantization scale overflows fp16; this checkpoint cannot be written as GGUF blocks")
    return h.contiguous().numpy()


def quantized_tensor(codes: torch.Tensor, scales: torch.Tensor, bits: int, stored: int) -> tuple[np.ndarray, Any]:
    """Our stored codes (at `stored` bits) read at `bits`, as GGUF block bytes and their GGMLQuantizationType."""
    from gguf import GGMLQuantizationType

    if not torch.equal(scales.float().half().float(), scales.float()):
        raise MatryoshkaError("quantization scales are not fp16 values; GGUF blocks store fp16 scales")
    top = top_bits(codes, bits, stored)  # as quant.dequantize reads them
    if bits == 8:
        return q8_0_blocks(top, scales), GGMLQuantizationType.Q8_0
    return q4_1_blocks(top, scales), GGMLQuantizationType.Q4_1


# ---------------------------------------------------------------- checks


def _check_bits(bits: int | None) -> None:
    if bits is None or bits in GGUF_BITS:
        return
    raise MatryoshkaError(
        f"int{bits} cannot be written as GGUF: no GGUF block type of that size holds our int{bits} levels exactly "
        f"(GGUF's 2- and 3-bit types quantize their block scales again); export int4 (Q4_1) or int8 (Q8_0)"
    )


def _uniform_config(cfg: ModelConfig, spec: SubmodelSpec, size: str) -> ModelConfig:
    """The standalone config of `spec`; GGUF's llama takes one FFN width and one head count for all layers."""
    sub = submodel_config(cfg, spec.shape)
    if len(set(sub.layer_ffn)) > 1 or len(set(sub.layer_heads)) > 1:
        raise MatryoshkaError(
            f"spec {size!r} has per-layer FFN widths {sorted(set(sub.layer_ffn))} / heads "
            f"{sorted(set(sub.layer_heads))}, but GGUF's llama needs one shape per layer for all layers; export a "
            f"uniform size ({', '.join(size_names(cfg))}) or a spec whose layers share one granularity (e.g. "
            f"'M,M,M'), or use `matryoshka export-hf --pad` for a zero-padded Hugging Face folder"
        )
    return sub


def _check_blocks(sliced: dict[str, torch.Tensor], qcfg: quant.QuantConfig, stored_codes: bool) -> None:
    """Every weight to be written as blocks has whole blocks of 32 input features (the error names it)."""
    # a quantized checkpoint has no float weights of its own to fall back on
    instead = "re-quantize the full-precision checkpoint" if stored_codes else "export without --bits / @int for floats"
    if qcfg.group_size != BLOCK:
        what = "one scale per output row" if qcfg.group_size == 0 else f"groups of {qcfg.group_size}"
        raise MatryoshkaError(
            f"this checkpoint is quantized in {what}; GGUF's Q8_0 / Q4_1 blocks hold one scale per {BLOCK} weights, "
            f"so only group_size {BLOCK} exports without re-quantization ({instead})"
        )
    for name, w in sliced.items():
        if quant.is_quantized(name, qcfg) and w.shape[1] % BLOCK:
            raise MatryoshkaError(
                f"{name} has {w.shape[1]} input features at this size, not a multiple of GGUF's {BLOCK}-weight "
                f"blocks; pick a size whose widths are multiples of {BLOCK} ({instead})"
            )


# ---------------------------------------------------------------- tensors


def _float_array(name: str, w: torch.Tensor, dtype: str) -> np.ndarray:
    w = w.detach().float().cpu()
    if w.dim() == 1 or dtype == "f32":  # norm gains stay fp32 (llama.cpp computes norms in fp32 anyway)
        return w.contiguous().numpy()
    return w.to(torch.float16).contiguous().numpy()


def _rope_rows(name: str, sub: ModelConfig) -> torch.Tensor | None:
    if name.endswith("attn.wq.weight"):
        return rope_permutation(sub.layer_heads[0] * sub.head_dim, sub.layer_heads[0])
    if name.endswith("attn.wk.weight"):
        return rope_permutation(sub.layer_kv_heads[0] * sub.head_dim, sub.layer_kv_heads[0])
    return None


def gguf_tensors(
    model: torch.nn.Module, spec: SubmodelSpec, sub: ModelConfig, bits: int | None, dtype: str
) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, array, GGMLQuantizationType or None for plain float) of every tensor of the size."""
    cfg = model.cfg
    sliced = slice_views(model.state_dict(), cfg, spec.shape)
    if bits is None:
        state, scales, stored = sliced, {}, CODE_BITS
    else:
        _check_blocks(sliced, model.precision.quant, model.precision.has_codes)
        codes, stored = precision.codes_of(model)
        qstate = quant.slice_qstate(codes, cfg, spec.shape)
        state = {k: v for k, v in qstate.items() if not k.endswith(quant.SCALE)}
        scales = {k.removesuffix(quant.SCALE): v for k, v in qstate.items() if k.endswith(quant.SCALE)}
    out = []
    for name, w in state.items():
        perm = _rope_rows(name, sub)
        s = scales.get(name)
        if perm is not None:
            w, s = w[perm], (None if s is None else s[perm])
        if s is None:
            out.append((gguf_name(name), _float_array(name, w, dtype), None))
        else:
            out.append((gguf_name(name), *quantized_tensor(w, s, bits, stored)))
    return out


# ---------------------------------------------------------------- tokenizer


def gguf_vocab(ckpt: Path, n_vocab: int) -> dict[str, Any]:
    """Tokens (padded to the embedding's rows with unused [PADi]), token types, merges and the EOT id."""
    from gguf import TokenType

    tok = ck.load_tokenizer(ckpt)
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > n_vocab:
        raise MatryoshkaError(f"the tokenizer has {len(by_id)} tokens but the embedding only {n_vocab} rows")
    special = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        tokens.append(f"[PAD{i}]" if t is None else t)
        types.append(TokenType.UNUSED if t is None else TokenType.CONTROL if t in special else TokenType.NORMAL)
    model = json.loads(tok.to_str()).get("model", {})
    if model.get("type") != "BPE":
        raise MatryoshkaError(f"tokenizer model {model.get('type')!r}: GGUF export supports byte-level BPE only")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]  # "a b" or ["a", "b"]
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise MatryoshkaError(f"the tokenizer has no {EOT} token (the end-of-text token matryoshka-lm uses)")
    return {"tokens": tokens, "types": types, "merges": merges, "eot": eot}


# ---------------------------------------------------------------- writing


def _file_type(bits: int | None, dtype: str) -> int:
    from gguf import LlamaFileType

    if bits == 8:
        return LlamaFileType.MOSTLY_Q8_0
    if bits == 4:
        return LlamaFileType.MOSTLY_Q4_1
    return LlamaFileType.MOSTLY_F16 if dtype == "f16" else LlamaFileType.ALL_F32


def write_gguf(
    path: str | Path,
    sub: ModelConfig,
    tensors: list[tuple[str, np.ndarray, Any]],
    vocab: dict[str, Any],
    meta: dict[str, str],
    file_type: int,
    chat: ChatFormat | None = None,
) -> None:
    """Write the llama metadata, tokenizer and tensors to `path` (not atomic: export_gguf stages it)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(meta["name"])
    w.add_context_length(sub.max_seq_len)
    w.add_embedding_length(sub.d_model)
    w.add_block_count(sub.n_layers)
    w.add_feed_forward_length(sub.layer_ffn[0])
    w.add_head_count(sub.layer_heads[0])
    w.add_head_count_kv(sub.layer_kv_heads[0])
    # head_dim is fixed when the width is sliced, so it is not d_model / heads: say it explicitly
    w.add_key_length(sub.head_dim)
    w.add_value_length(sub.head_dim)
    w.add_rope_dimension_count(sub.head_dim)
    w.add_rope_freq_base(sub.rope_theta)
    w.add_layer_norm_rms_eps(sub.norm_eps)
    w.add_vocab_size(sub.vocab_size)
    w.add_file_type(int(file_type))
    if any(raw is not None for _, _, raw in tensors):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in meta.items():
        if key != "name":
            w.add_string(f"matryoshka.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's split regex, which ByteLevel(use_regex=True) uses
    w.add_token_list(vocab["tokens"])
    w.add_token_types([int(t) for t in vocab["types"]])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["eot"])
    w.add_eos_token_id(chat.stop_ids[0] if chat and chat.stop_ids else vocab["eot"])  # where llama.cpp ends a turn
    if chat is not None and chat.template:
        w.add_chat_template(chat.template)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    for name, array, raw in tensors:
        w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_gguf(
    ckpt: str | Path,
    size: str,
    out: str | Path,
    bits: int | None = None,
    dtype: str = "f32",
    force: bool = False,
) -> Path:
    """Write size `size` of `ckpt` as one GGUF file for llama.cpp / ollama (transformers loads it too).

    Args:
        ckpt: a Matryoshka (or extracted) checkpoint directory, full precision or quantized.
        size: a size name or a spec whose layers share one shape, optionally with @int8 / @int4.
        out: the .gguf file to create (written atomically).
        bits: 8 (Q8_0) or 4 (Q4_1) blocks of our codes; overrides the spec's @int suffix. None: the spec's, else
            the checkpoint's stored width (a quantized checkpoint), else fp32/fp16 weights.
        dtype: "f32" or "f16" for the matrices not written as blocks (norm gains stay fp32).
        force: replace an existing `out`.
    """
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MatryoshkaError("export-gguf needs the gguf package: pip install gguf") from None
    ckpt, out = Path(ckpt), Path(out)
    if dtype not in DTYPES:
        raise MatryoshkaError(f"dtype {dtype!r}: choose f32 or f16")
    if out.is_dir():
        raise MatryoshkaError(f"output {out} is a directory; give a file name such as model.gguf")
    if out.exists() and not force:
        raise MatryoshkaError(f"output {out} already exists; pass --force to replace it")
    cfg, tcfg = ck.read_config(ckpt)
    spec = parse_spec(cfg, size)  # bad specs fail before the weights are read
    bits = spec.bits if bits is None else bits
    _check_bits(bits)
    sub = _uniform_config(cfg, spec, size)
    model = ck.load_model(ckpt)
    if not model.precision.has_codes and tcfg is not None:  # round-to-nearest in the groups its cells were trained with
        model.precision.quant = quant.QuantConfig(group_size=tcfg.quant_group)
    if bits is None:
        bits = model.precision.native_bits  # a quantized checkpoint exports its own codes
        _check_bits(bits)
    if model.precision.has_codes and bits is not None and bits > model.precision.code_bits:
        raise MatryoshkaError(
            f"this checkpoint stores int{model.precision.code_bits} codes; it cannot be exported at int{bits}"
        )
    spec = spec.at_bits(bits)
    tensors = gguf_tensors(model, spec, sub, bits, dtype)
    vocab = gguf_vocab(ckpt, cfg.vocab_size)
    meta = {"name": f"matryoshka-lm {format_spec(spec)}", "spec": format_spec(spec), "source": str(ckpt)}
    chat = read_chat(ckpt)
    ck.atomic_write(out, lambda tmp: write_gguf(tmp, sub, tensors, vocab, meta, _file_type(bits, dtype), chat))
    log.info("exported %s of %s to %s (%d bytes)", format_spec(spec), ckpt, out, out.stat().st_size)
    return out
