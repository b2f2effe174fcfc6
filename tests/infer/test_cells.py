"""Cells (size x bits) served from one resident copy of bit-planes: what they compute and what they hold."""

from __future__ import annotations

import pytest
import torch

from _tiny_ckpt import make_checkpoint
from matryoshka_lm.convert.quantize import quantize_checkpoint
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core import precision, quant
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import parse_spec
from matryoshka_lm.infer.engine import Engine

SIX = ("XL@int8", "XL@int4", "XL@int2", "M@int4", "S@int2", "L@int3")


@pytest.fixture(scope="module")
def qdir(tmp_path_factory, corpus_file):
    tmp = tmp_path_factory.mktemp("cells")
    fp = make_checkpoint(tmp / "fp", corpus_file, d_model=64, ffn_dim=128)
    return quantize_checkpoint(fp, tmp / "q", group_size=32, embeddings=True)


def dequantized_model(qdir, bits: int) -> MatryoshkaLM:
    """The cell's reference: a plain fp32 model holding the dequantized r-bit weights."""
    q = ck.read_quant(qdir)
    state = ck.load_tensors(qdir / ck.WEIGHTS)
    cfg, _ = ck.read_config(qdir)
    model = MatryoshkaLM(cfg, init=False)
    model.load_state_dict(quant.dequantize_state(state, q[0], bits, q[1]))
    return model.eval()


def stored_bytes(qdir) -> int:
    state = ck.load_tensors(qdir / ck.WEIGHTS)
    names = [k.removesuffix(quant.SCALE) for k in state if k.endswith(quant.SCALE)]
    return sum(state[n].numel() + 2 * state[n + quant.SCALE].numel() for n in names)  # int8 codes + fp16 scales


def tensor_bytes(modules) -> int:
    """Bytes of every distinct real tensor the modules hold (parameters and buffers, shared ones once)."""
    seen = {}
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.device.type != "meta":
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_six_cells_run_on_one_copy_of_the_codes(qdir):
    """After six cells, the linear weights (token table and head included) are held once: planes within 1.05x
    of the stored codes + scales, and no fp32 copy of any quantized weight."""
    model = ck.load_model(qdir)
    engine = Engine(model)
    prompt = [[5, 17, 42, 7]]
    for cell in SIX:
        engine.generate(prompt, parse_spec(model.cfg, cell), 6)
    held = precision.resident_bytes(model)
    assert held["planes"] <= 1.05 * stored_bytes(qdir)
    quantized = [n for n, _ in model.named_parameters() if quant.is_quantized(n, model.precision.quant)]
    assert quantized and all(dict(model.named_parameters())[n].device.type == "meta" for n in quantized)
    fp32_rest = sum(p.numel() * 4 for n, p in model.named_parameters() if n not in quantized)
    views = list(engine._views.values())
    assert len(views) >= 3  # M, S, L: one view each, every bit width of a size on it
    everything = tensor_bytes([model, *views])
    rope = model.rope_cos.nbytes + model.rope_sin.nbytes
    assert everything <= held["planes"] + fp32_rest + rope + 2 * sum(  # views: norm-weight views only
        p.nbytes for v in views for n, p in v.named_parameters() if p.device.type != "meta"
    )


@pytest.mark.parametrize("cell", SIX)
def test_a_cell_computes_its_dequantized_r_bit_weights(qdir, cell):
    """Logits from the planes equal a plain fp32 model of the dequantized r-bit weights (to fp32 rounding), and
    greedy decoding picks the same tokens."""
    model = ck.load_model(qdir)
    spec = parse_spec(model.cfg, cell)
    ref = dequantized_model(qdir, spec.bits)
    x = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        got, want = model(x, spec), ref(x, spec.shape)
    assert (got - want).abs().max() / want.abs().max() < 1e-5
    prompt = [[5, 17, 42, 7]]
    assert Engine(model).generate(prompt, spec, 8)[0].tokens == Engine(ref).generate(prompt, spec.shape, 8)[0].tokens


def test_a_full_precision_model_builds_its_planes_once_and_after_a_change(qdir):
    fp = dequantized_model(qdir, 8)
    spec = parse_spec(fp.cfg, "M@int4")
    x = torch.randint(0, fp.cfg.vocab_size, (1, 5))
    with torch.no_grad():
        a = fp(x, spec)
        planes = fp.layers[0].ffn.w_up.planes
        assert torch.equal(fp(x, spec), a) and fp.layers[0].ffn.w_up.planes is planes
        fp.layers[0].ffn.w_up.weight.mul_(2)  # weights changed in place: the codes follow
        assert not torch.equal(fp(x, spec), a)


def test_a_view_made_before_the_first_cell_gets_the_planes(qdir):
    """An engine on a full-precision model views M at fp32, then serves M@int4 on that same view: the view takes
    the planes the model builds on its first cell (what a server does when fp32 and int4 requests interleave)."""
    fp = dequantized_model(qdir, 8)
    engine = Engine(fp)
    prompt = [[5, 17, 42, 7]]
    engine.generate(prompt, parse_spec(fp.cfg, "M"), 4)
    got = engine.generate(prompt, parse_spec(fp.cfg, "M@int4"), 8)[0].tokens
    fresh = dequantized_model(qdir, 8)  # the same cell, with no fp32 view before it
    assert got == Engine(fresh).generate(prompt, parse_spec(fresh.cfg, "M@int4"), 8)[0].tokens
    assert got != engine.generate(prompt, parse_spec(fp.cfg, "M"), 8)[0].tokens  # int4 is not the fp32 cell
