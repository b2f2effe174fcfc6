"""Calibrated nested codes (convert/gptq.py, convert/calibrate.py): the bounded code search is the exhaustive one,
nested GPTQ lowers the layer's output error against round-to-nearest at the narrow widths it weighs, and
`matryoshka quantize --calibrate` writes a checkpoint whose every cell is closer to the fp32 model than RTN's."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny_ckpt import make_checkpoint
from matryoshka_lm.cli import main
from matryoshka_lm.convert import gptq
from matryoshka_lm.convert.calibrate import REPORT, Calibration, calibration_windows, input_hessians
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import quant
from matryoshka_lm.core.spec import parse_spec
from matryoshka_lm.data import read_corpus
from matryoshka_lm.errors import MatryoshkaError

BITS = (8, 6, 4, 3, 2)
BALANCED = {8: 1.0, 6: 0.25, 4: 0.05, 3: 0.02, 2: 0.005}  # every width's error counts about alike (int8 units)


def correlated_layer(n_out: int = 96, n_in: int = 128, n: int = 2048, seed: int = 0):
    """A weight and the Hessian of inputs with unequal, correlated features (what makes GPTQ beat rounding)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    x = torch.randn(n, n_in, generator=g) @ mix * (0.2 + 3 * torch.rand(n_in, generator=g))
    return 0.02 * torch.randn(n_out, n_in, generator=g), x.T @ x


def test_the_bounded_code_search_finds_the_exhaustive_minimum():
    g = torch.Generator().manual_seed(1)
    weights = gptq.DEFAULT_WEIGHTS
    bits = sorted(weights, reverse=True)
    lam, table = torch.tensor([weights[b] for b in bits]), gptq.level_table(bits)
    # trajectories that have drifted apart, as the per-width error feedback makes them
    targets = 60 * torch.randn(1, 500, generator=g) + 8 * torch.randn(len(bits), 500, generator=g)
    k = gptq.best_codes(targets, lam, table)
    every = (lam[:, None, None] * (targets[:, :, None] - table[:, None, :]) ** 2).sum(0)  # (out, 256)
    assert torch.equal(every.gather(1, k[:, None])[:, 0], every.min(1).values)


def test_nested_gptq_lowers_the_output_error_at_every_narrow_width():
    w, h = correlated_layer()
    codes, scales = gptq.nested_gptq(w, h, 32, BALANCED)
    rc, rs = quant.quantize(w, 32)
    ratio = {
        b: gptq.output_error(w, quant.dequantize(codes, scales, 32, b), h)
        / gptq.output_error(w, quant.dequantize(rc, rs, 32, b), h)
        for b in BITS
    }
    assert all(ratio[b] < 0.97 for b in (6, 4, 3)), ratio
    assert ratio[2] < 1.0, ratio
    # the price, paid where it is cheapest: int8's error grows (here ~2.5x), yet stays several times below int6's
    assert ratio[8] < 3.5, ratio
    w8 = gptq.output_error(w, quant.dequantize(codes, scales, 32, 8), h)
    assert w8 < 0.25 * gptq.output_error(w, quant.dequantize(codes, scales, 32, 6), h)


def test_the_default_weights_buy_int4_and_int3_with_int8_and_int6():
    """The default leans on int4 and int3 (what SmolLM2 needed, BENCHMARKS.md): their error falls further than
    under BALANCED, while int8 and int6 pay, int8 still below int6."""
    w, h = correlated_layer()
    err = {}
    for name, weights in (("balanced", BALANCED), ("default", None)):
        codes, scales = gptq.nested_gptq(w, h, 32, weights)
        err[name] = {b: gptq.output_error(w, quant.dequantize(codes, scales, 32, b), h) for b in BITS}
    assert all(err["default"][b] < err["balanced"][b] for b in (4, 3)), err
    assert all(err["default"][b] > err["balanced"][b] for b in (8, 6)), err
    assert err["default"][8] < err["default"][6]


def test_weighting_int8_alone_is_plain_gptq_and_beats_rounding_at_int8():
    w, h = correlated_layer(seed=2)
    codes, scales = gptq.nested_gptq(w, h, 32, {8: 1.0})
    rc, rs = quant.quantize(w, 32)
    ours = gptq.output_error(w, quant.dequantize(codes, scales, 32), h)
    assert ours < 0.8 * gptq.output_error(w, quant.dequantize(rc, rs, 32), h)
    assert codes.dtype == torch.int8 and scales.shape == rs.shape


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, corpus_file):
    """A tiny checkpoint quantized both ways through the CLI (calibrated on its own corpus)."""
    d = tmp_path_factory.mktemp("calibrate")
    ckpt = make_checkpoint(d / "fp32", corpus_file)
    main(["quantize", str(ckpt), "-o", str(d / "rtn")])
    args = ["--calibrate", "64", "--calib-seq-len", "64", "--calib-data", str(corpus_file)]
    main(["quantize", str(ckpt), "-o", str(d / "cal"), *args])
    return ckpt, d / "rtn", d / "cal"


def test_quantize_calibrate_writes_codes_closer_to_fp32_than_rounding(quantized, corpus_file):
    """On held-out windows (the corpus's validation split), the calibrated checkpoint's int4, int3 and int2 cells
    (what the default weights favour) have logits closer to the fp32 model's than the round-to-nearest ones."""
    from matryoshka_lm.data import encode_corpus, split_tokens

    ckpt, rtn, cal = quantized
    report = json.loads((cal / REPORT).read_text())
    assert report["windows"] == 64 and report["tokens"] == 64 * 64
    assert ck.read_quant(cal) == ck.read_quant(rtn)
    fp32, tok = ck.load_model(ckpt).eval(), ck.load_tokenizer(ckpt)
    _, val = split_tokens(encode_corpus(tok, read_corpus(corpus_file)), 0.1)
    x = torch.from_numpy(val[: 8 * 48].astype("int64")).view(8, 48)
    models = {"rtn": ck.load_model(rtn), "cal": ck.load_model(cal)}
    with torch.no_grad():
        ref = fp32(x)
        for b in (4, 3, 2):
            err = {k: (m(x, parse_spec(m.cfg, f"XL@int{b}")) - ref).pow(2).mean().item() for k, m in models.items()}
            assert err["cal"] < err["rtn"], (b, err)


def test_calibration_reads_the_training_split_and_checks_its_settings(quantized, corpus_file):
    ckpt, _, _ = quantized
    model, tok = ck.load_model(ckpt), ck.load_tokenizer(ckpt)
    windows = calibration_windows(tok, Calibration(windows=3, seq_len=40, data=str(corpus_file)), 64)
    assert windows.shape == (3, 40)
    hess = input_hessians(model, windows)
    assert set(hess) == {
        f"layers.{i}.{s}" for i in range(model.cfg.n_layers) for s in ("attn.wq", "attn.wo", "ffn.w_gate", "ffn.w_down")
    }
    assert torch.allclose(hess["layers.0.attn.wq"], hess["layers.0.attn.wq"].T)
    with pytest.raises(MatryoshkaError, match="int8"):
        Calibration(weights={4: 1.0})
    with pytest.raises(MatryoshkaError, match="window"):
        Calibration(windows=0)


def test_bad_calibration_options_are_one_line_errors(quantized, tmp_path, capsys):
    ckpt, _, _ = quantized
    base = ["quantize", str(ckpt), "-o", str(tmp_path / "q"), "--calibrate", "2"]
    assert main([*base, "--calib-weights", "4:1,2:1"]) == 2
    assert "need int8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--calib-weights", "8=1"])
    assert "bits:weight pairs" in capsys.readouterr().err
    assert main([*base, "--calib-data", str(tmp_path / "missing.txt")]) == 2
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("bits", BITS)
def test_nearest_level_is_the_closest_of_the_widths_levels(bits):
    from matryoshka_lm.core import nested

    x = torch.linspace(-140, 140, 2801)
    levels = gptq.level_table([bits])[0].unique()  # the 2^r values an r-bit code can read
    want = levels[(x[:, None] - levels[None, :]).abs().argmin(1)]
    got = nested.nearest_level(x, bits)
    assert len(levels) == 2**bits
    assert torch.equal((x - got).abs(), (x - want).abs())  # ties (x halfway between two levels) either way


def test_the_scale_search_lowers_the_narrow_widths_error_further():
    w, h = correlated_layer(seed=3)
    err = {}
    for name, grid in (("absmax", (1.0,)), ("searched", gptq.SCALE_GRID)):
        codes, scales = gptq.nested_gptq(w, h, 32, scale_grid=grid)
        err[name] = {b: gptq.output_error(w, quant.dequantize(codes, scales, 32, b), h) for b in (4, 3)}
    assert all(err["searched"][b] < err["absmax"][b] for b in (4, 3)), err
