"""Matryoshka Quantization: the r-bit model is the top r bits of the int8 codes, exactly; the dequantization
formula; round-to-nearest then slicing; quantized checkpoints and cells (size x bits) through the model, the
engine, extraction and the CLI; quantization-aware training."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _tiny_ckpt import make_checkpoint
from conftest import submodel_specs, tiny_config
from matryoshka_lm.cli.main import main
from matryoshka_lm.convert.extract import extract_submodel
from matryoshka_lm.convert.quantize import quantize_checkpoint
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import quant
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.nested import bit_levels, top_bits
from matryoshka_lm.core.spec import format_spec, parse_spec, uniform_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.train.loop import JointLoss

ALL_CODES = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_r_bit_codes_are_bitwise_the_top_bits_of_every_int8_code(bits):
    t = top_bits(ALL_CODES, bits)
    byte = ALL_CODES.view(torch.uint8).to(torch.int32)  # the two's-complement byte
    assert torch.equal((t.to(torch.int32) & ((1 << bits) - 1)), byte >> (8 - bits))
    assert t.min() == -(1 << (bits - 1)) and t.max() == (1 << (bits - 1)) - 1
    # and the narrower widths are the top bits of the wider ones (int2 of int4 == int2 of int8)
    assert torch.equal(top_bits(t << (8 - bits), 2), top_bits(ALL_CODES, 2))


def test_dequantized_weights_equal_the_formula():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.linspace(0.01, 1, 64)
    codes, s = quant.quantize(w, 32)
    assert codes.dtype == torch.int8 and s.shape == (16, 2)
    assert torch.equal(s, s.half().float()), "scales are fp16 values (GGUF stores them so)"
    s_full = s.repeat_interleave(32, dim=1)
    for r in (8, 4, 2):
        k = 8 - r
        t = torch.div(codes.to(torch.int32), 1 << k, rounding_mode="floor")
        expect = s_full * ((1 << k) * t + ((1 << k) - 1) / 2)
        torch.testing.assert_close(quant.dequantize(codes, s, 32, r), expect, rtol=0, atol=0)
    # int8 is round-to-nearest: within half a step of every weight
    assert ((quant.dequantize(codes, s, 32) - w).abs() <= s_full / 2 + 1e-7).all()


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 6]), seed=st.integers(0, 10_000))
def test_slicing_round_to_nearest_int8_is_round_to_nearest_on_the_r_bit_grid(bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 32, generator=g)
    codes, s = quant.quantize(w, 32)
    x = w / s.repeat_interleave(32, dim=1)  # in int8 steps
    levels = bit_levels(torch.arange(-(1 << (bits - 1)), 1 << (bits - 1)), bits)
    nearest = levels[(x[..., None] - levels).abs().argmin(-1)]
    sliced = bit_levels(top_bits(codes, bits), bits)
    # ties (x exactly between two levels) may go either way: compare off them
    margin = (x[..., None] - levels).abs().sort(-1).values
    clear = (margin[..., 1] - margin[..., 0]) > 1e-3
    assert torch.equal(sliced[clear], nearest[clear])


def test_fake_quant_forward_is_the_dequantized_weight_and_its_gradient_passes_straight_through():
    torch.manual_seed(0)
    w = torch.randn(8, 32, requires_grad=True)
    out = quant.fake_quant(w, 4, 32)
    codes, s = quant.quantize(w, 32)
    torch.testing.assert_close(out, quant.dequantize(codes, s, 32, 4))
    g = torch.randn(8, 32)
    out.backward(g)
    torch.testing.assert_close(w.grad, g)


def test_spec_strings_name_a_bit_width_and_bad_ones_are_clear_errors():
    cfg = tiny_config()
    for text in ("M@int4", "S,M,L,XL@int2", "XL@int8", "S,M,M@M@int3"):
        spec = parse_spec(cfg, text)
        assert spec.bits == int(text[-1]) and parse_spec(cfg, format_spec(spec)) == spec
    assert str(parse_spec(cfg, "M@int4")) == "M@int4" and parse_spec(cfg, "M").bits is None
    for bad, words in (("M@int1", "int1"), ("M@int16", "int16"), ("@int4", "empty"), ("M@fp16", "fp16")):
        with pytest.raises(MatryoshkaError, match=words):
            parse_spec(cfg, bad)


def test_weight_bytes_count_codes_scales_and_full_precision_parts():
    cfg = tiny_config(d_model=64, ffn_dim=128)
    spec, qcfg = uniform_spec(cfg, "XL"), quant.QuantConfig(32)
    linear = sum(p.numel() for n, p in MatryoshkaLM(cfg).named_parameters() if quant.is_quantized(n, qcfg))
    fp32 = quant.weight_bytes(cfg, spec, None, qcfg)
    assert fp32 == 4 * sum(p.numel() for p in MatryoshkaLM(cfg).parameters())
    for r in (8, 4, 2):  # r bits per weight + one fp16 scale per 32 weights instead of 32 bits
        assert fp32 - quant.weight_bytes(cfg, spec, r, qcfg) == 4 * linear - (linear * r // 8 + 2 * linear // 32)


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_every_cell_runs_on_the_r_bit_weights(data):
    """model(x, spec@intR) == the model whose weights are the dequantized r-bit codes, run at spec."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = MatryoshkaLM(cfg).eval()
    model.precision.quant = quant.QuantConfig(8)
    spec = data.draw(submodel_specs(cfg))
    bits = data.draw(st.sampled_from([8, 4, 2]))
    ref = MatryoshkaLM(cfg).eval()
    codes = quant.quantize_state(model.state_dict(), model.precision.quant)
    ref.load_state_dict(quant.dequantize_state(codes, model.precision.quant, bits))
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x, spec.at_bits(bits)), ref(x, spec), rtol=0, atol=0)
        engine_model, engine_spec = Engine(model).runner(spec.at_bits(bits))
        torch.testing.assert_close(engine_model(x, engine_spec), ref(x, spec), rtol=1e-5, atol=1e-5)


def test_cells_follow_the_weights_when_they_change():
    torch.manual_seed(0)
    model = MatryoshkaLM(tiny_config()).eval()
    model.precision.quant = quant.QuantConfig(8)
    x = torch.randint(0, 97, (1, 8))
    spec = parse_spec(model.cfg, "M@int4")
    before = model(x, spec)
    with torch.no_grad():
        model.layers[0].ffn.w_up.weight.mul_(3)
    assert not torch.allclose(model(x, spec), before)


@pytest.fixture
def fp_ckpt(tmp_path, corpus_file):
    return make_checkpoint(tmp_path / "fp", corpus_file, d_model=64, ffn_dim=128)


def test_quantized_checkpoint_stores_int8_codes_and_serves_every_cell(fp_ckpt, tmp_path):
    qdir = quantize_checkpoint(fp_ckpt, tmp_path / "q", group_size=32)
    assert json.loads((qdir / ck.CONFIG).read_text())["quant"] == {"group_size": 32, "embeddings": False, "bits": 8}
    stored = ck.load_tensors(qdir / ck.WEIGHTS)
    assert stored["layers.0.ffn.w_up.weight"].dtype == torch.int8
    assert stored["tok_emb.weight"].dtype == torch.float32  # embeddings stay fp32 unless asked
    fp, q = ck.load_model(fp_ckpt), ck.load_model(qdir)
    fp.precision.quant = q.precision.quant
    x = torch.randint(0, fp.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(q(x), fp(x, fp.full.at_bits(8)), rtol=0, atol=0)  # loads at int8
        for cell in ("L@int8", "L@int4", "XL@int2", "S,M,L,XL@int4"):
            spec = parse_spec(q.cfg, cell)
            torch.testing.assert_close(q(x, spec), fp(x, spec), rtol=0, atol=0)
    with pytest.raises(MatryoshkaError, match="already quantized"):
        quantize_checkpoint(qdir, tmp_path / "q2")


def test_extracted_cell_stores_only_its_top_bits_and_equals_the_cell(fp_ckpt, tmp_path):
    qdir = quantize_checkpoint(fp_ckpt, tmp_path / "q", group_size=32)
    out = extract_submodel(qdir, "L@int4", tmp_path / "l4")
    codes = ck.load_tensors(out / ck.WEIGHTS)["layers.0.ffn.w_up.weight"]
    assert codes.min() >= -8 and codes.max() <= 7  # 4-bit codes
    q, ex = ck.load_model(qdir), ck.load_model(out)
    x = torch.randint(0, q.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ex(x), q(x, parse_spec(q.cfg, "L@int4")), rtol=0, atol=0)
        torch.testing.assert_close(ex(x, ex.full.at_bits(2)), q(x, parse_spec(q.cfg, "L@int2")), rtol=0, atol=0)
        with pytest.raises(MatryoshkaError, match="int8 is not available"):
            ex(x, ex.full.at_bits(8))


def test_quantization_aware_step_lowers_the_loss_at_every_bit_width():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = MatryoshkaLM(cfg)
    model.precision.quant = quant.QuantConfig(8)
    specs = [uniform_spec(cfg, n).at_bits(b) for b in (8, 4, 2) for n in ("XL", "S")]
    loss_fn = JointLoss(model, distill=0.0)
    x = torch.randint(0, cfg.vocab_size, (4, 16))
    y = torch.roll(x, -1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = loss_fn(x, y, specs, [1.0] * len(specs))
    before[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    with torch.no_grad():
        after = loss_fn(x, y, specs, [1.0] * len(specs))[1]
        # the training forward (fake quantization) is what the served cell computes
        for spec, loss in zip(specs, after):
            logits = model.eval()(x, spec)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            torch.testing.assert_close(ce, loss, rtol=1e-5, atol=1e-5)
    assert (after < before[1]).all(), (before[1], after)


def test_cli_quantize_then_generate_and_extract_cells(fp_ckpt, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(fp_ckpt), "-o", str(q), "--group-size", "32"]) == 0
    assert "int2" in capsys.readouterr().err
    assert main(["generate", str(q), "--size", "M@int4", "--prompt", "The", "--max-new-tokens", "4"]) == 0
    assert main(["generate", str(q), "--size", "M@int1", "--prompt", "The"]) == 2
    assert "int1" in capsys.readouterr().err
    assert main(["extract", str(q), "--size", "L@int2", "-o", str(tmp_path / "x")]) == 0
    capsys.readouterr()
    assert main(["extract", str(q), "--size", "S,M,L,XL@int2", "-o", str(tmp_path / "y")]) == 2  # S's FFN: 16 units
    assert "cuts quantization groups" in capsys.readouterr().err


def test_cli_eval_reports_every_cell_it_is_given(fp_ckpt, tmp_path, capsys):
    out = tmp_path / "e.json"
    args = [
        "eval",
        str(fp_ckpt),
        "--sizes",
        "XL;XL@int8;XL@int2",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "e.png"),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "XL@int2" in text
    rows = {r["size"]: r for r in json.loads(out.read_text())["sizes"]}
    assert rows["XL@int8"]["val_loss"] != rows["XL@int2"]["val_loss"]
    assert rows["XL"]["bits"] is None and rows["XL@int2"]["bits"] == 2
    assert rows["XL@int2"]["weight_bytes"] < rows["XL@int8"]["weight_bytes"] < rows["XL"]["weight_bytes"]
