"""Bit-planes: one resident copy of the int8 codes that every cell reads in place (core/planes.py), and the
kernel that multiplies by a cell's prefix of them (csrc/planes.cpp) against the dequantized fp32 reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from matryoshka_lm.core import nested, planes_ops, quant
from matryoshka_lm.core.plane_layout import dequantize_planes
from matryoshka_lm.core.planes import Planes

SHAPES = [(64, 96, 32), (50, 70, 0), (37, 192, 64), (16, 32, 32), (200, 33, 0)]  # (N, K, group): odd tails too
NATIVE = planes_ops.ensure()
ISAS = [0] + [
    i
    for name, i in planes_ops.ISAS.items()
    if name != "portable" and NATIVE and i <= planes_ops.ISAS[planes_ops.native_isa()]
]


def weight(n: int, k: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)  # rows of different scales
    return quant.quantize(w, group)


@pytest.mark.parametrize("n,k,group", SHAPES)
def test_planes_round_trip_to_the_int8_codes(n, k, group):
    q, s = weight(n, k, group)
    got_q, got_s = Planes(q, s, group).codes()
    assert torch.equal(got_q, q) and torch.equal(got_s, s)


def test_resident_bytes_are_the_codes_and_fp16_scales():
    q, s = weight(1536, 576, 32)
    p = Planes(q, s, 32)
    assert p.nbytes() == q.numel() + 2 * s.numel()  # whole tiles and blocks: no padding here


@pytest.mark.parametrize("bits", list(nested.BIT_WIDTHS))
def test_reference_dequantizes_the_r_bit_weights(bits):
    for n, k, group in SHAPES:
        q, s = weight(n, k, group, seed=bits)
        p = Planes(q, s, group)
        for out, inn in ((n, k), (n // 2 + 1, k // 2 + 3), (1, 1)):
            want = quant.dequantize(q[:out, :inn], s[:out], group, bits)
            assert torch.equal(dequantize_planes(p.planes, p.scales, out, inn, bits), want)


@pytest.mark.skipif(not NATIVE, reason="the C++ kernel did not build here")
@pytest.mark.parametrize("bits", list(nested.BIT_WIDTHS))
@pytest.mark.parametrize("m", [1, 3, 4, 8, 13, 40])  # 13: two calls of the small-batch kernel; 40: dequant + GEMM
def test_kernel_equals_the_reference_at_every_width_prefix_and_isa(bits, m):
    g = torch.Generator().manual_seed(100 * bits + m)
    for n, k, group in SHAPES:
        q, s = weight(n, k, group, seed=m)
        p = Planes(q, s, group)
        for _ in range(3):
            out = int(torch.randint(1, n + 1, (1,), generator=g))
            inn = int(torch.randint(1, k + 1, (1,), generator=g))
            x = torch.randn(m, inn, generator=g)
            ref = x @ quant.dequantize(q[:out, :inn], s[:out], group, bits).T
            for isa in ISAS:
                y = planes_ops.planes_linear(x, p.planes, p.scales, out, bits, isa)
                err = (y - ref).abs().max() / ref.abs().max()
                assert err < 1e-5, (n, k, group, out, inn, isa, float(err))


def test_kernel_keeps_leading_dims_and_dtype():
    q, s = weight(64, 96, 32)
    p = Planes(q, s, 32)
    x = torch.randn(2, 3, 96)
    y = p.linear(x, 40, 4)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y, planes_ops.reference(x, p.planes, p.scales, 40, 4), rtol=1e-5, atol=1e-5)
    assert p.linear(x.bfloat16(), 40, 4).dtype == torch.bfloat16


def test_bad_arguments_are_named():
    q, s = weight(64, 96, 32)
    p = Planes(q, s, 32)
    with pytest.raises(RuntimeError, match="exceeds the stored rows"):
        p.linear(torch.randn(1, 96), 65, 4)
    with pytest.raises(RuntimeError, match="more than stored"):
        p.linear(torch.randn(1, 97), 64, 4)


def test_rows_look_up_the_r_bit_embedding():
    q, s = weight(100, 64, 32)
    p = Planes(q, s, 32)
    idx = torch.tensor([[0, 17, 99], [17, 5, 63]])
    want = quant.dequantize(q, s, 32, 3)[:, :32][idx]
    assert torch.equal(p.rows(idx, 32, 3), want)


def test_compiles_to_one_graph():
    q, s = weight(64, 96, 32)
    p = Planes(q, s, 32)

    def f(x):
        return torch.relu(p.linear(x, 64, 4)) + 1

    x = torch.randn(1, 96)
    explained = torch._dynamo.explain(f)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch.testing.assert_close(torch.compile(f)(x), f(x))


FALLBACK = """
import torch
from matryoshka_lm.core import planes_ops, quant
from matryoshka_lm.core.planes import Planes
assert not planes_ops.ensure() and planes_ops.native_isa() is None
torch.manual_seed(0)
q, s = quant.quantize(torch.randn(48, 80), 0)
p = Planes(q, s, 0)
x = torch.randn(3, 70)
y = p.linear(x, 40, 5)
torch.save({"q": q, "s": s, "x": x, "y": y}, "OUT")
"""


@pytest.mark.skipif(not NATIVE, reason="the C++ kernel did not build here")
def test_the_pure_torch_fallback_gives_the_same_results(tmp_path):
    """Where the extension cannot build (forced here), the same operator runs pure torch: same outputs."""
    out = tmp_path / "fallback.pt"
    env = {**os.environ, "MATRYOSHKA_KERNELS": "torch"}
    subprocess.run([sys.executable, "-c", FALLBACK.replace("OUT", str(out))], check=True, env=env, timeout=120)
    got = torch.load(out)
    p = Planes(got["q"], got["s"], 0)
    y = p.linear(got["x"], 40, 5)
    assert (y - got["y"]).abs().max() / got["y"].abs().max() < 1e-5
