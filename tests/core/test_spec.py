from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import submodel_specs, tiny_config
from matryoshka_lm.config import ModelConfig, preset
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import (
    LayerSpec,
    count_params,
    flops_per_token,
    format_spec,
    parse_spec,
    size_names,
    uniform_spec,
)
from matryoshka_lm.errors import MatryoshkaError


def test_default_sizes_span_halvings_of_non_embedding_params():
    cfg, _ = preset("demo")
    full = count_params(cfg, uniform_spec(cfg, "XL"))["non_embedding"]
    ratios = [count_params(cfg, uniform_spec(cfg, s))["non_embedding"] / full for s in ("XL", "L", "M", "S")]
    for got, want in zip(ratios, (1, 1 / 2, 1 / 4, 1 / 8)):
        assert want / 1.35 <= got <= want * 1.35, ratios


def test_ffn_only_uses_matformer_fractions():
    cfg = tiny_config(nest_width=False, nest_heads=False, nest_depth=False)
    assert [uniform_spec(cfg, s).layers[0].ffn for s in ("XL", "L", "M", "S")] == [64, 32, 16, 8]
    assert all(uniform_spec(cfg, s).width == 32 and uniform_spec(cfg, s).depth == 4 for s in cfg.sizes)


def test_size_names_largest_first():
    assert size_names(tiny_config()) == ["XL", "L", "M", "S"]


def test_parse_mix_n_match_and_round_trip():
    cfg = tiny_config()
    spec = parse_spec(cfg, "S,M,L,XL")
    assert spec.depth == 4 and spec.width == 32  # widest listed size
    assert [l.ffn for l in spec.layers] == [8, 16, 32, 64]
    assert parse_spec(cfg, format_spec(spec)) == spec
    explicit = parse_spec(cfg, "f16h2,f32h4@d24")
    assert explicit.width == 24 and explicit.layers == (LayerSpec(16, 2), LayerSpec(32, 4))
    assert parse_spec(cfg, "M@S").width == uniform_spec(cfg, "S").width
    assert parse_spec(cfg, "f16h2,f16h2,f16h2,f16h2@d24") == uniform_spec(cfg, "M")  # recognised as the named size


@st.composite
def named_mixes(draw, cfg: ModelConfig) -> tuple[list[str], str | None]:
    """A Mix'n'Match string by its structure: one size name per layer, maybe '@<size>' (smallest sizes first, so
    failures shrink towards S). Depth 2 and up: a single bare name is the trained size itself, not a mix."""
    names = size_names(cfg)[::-1]
    layers = draw(st.lists(st.sampled_from(names), min_size=2, max_size=cfg.n_layers))
    return layers, draw(st.none() | st.sampled_from(names))


@settings(max_examples=30, deadline=None)
@given(named_mixes(tiny_config()))
def test_named_mix_takes_each_layer_from_its_size(mix):
    cfg = tiny_config()
    layers, at = mix
    spec = parse_spec(cfg, ",".join(layers) + (f"@{at}" if at else ""))
    # tiny_config has the same shape in every layer, so a size's granularity is that of its first layer
    assert spec.layers == tuple(uniform_spec(cfg, n).layers[0] for n in layers)
    assert spec.width == (uniform_spec(cfg, at).width if at else max(uniform_spec(cfg, n).width for n in layers))
    assert parse_spec(cfg, format_spec(spec)) == spec


@settings(max_examples=30, deadline=None)
@given(submodel_specs(tiny_config()))
def test_any_spec_round_trips_through_its_string(spec):
    back = parse_spec(tiny_config(), format_spec(spec))
    assert (back.width, back.layers) == (spec.width, spec.layers)


@pytest.mark.parametrize("text", ["XL", "S", "S,M,L,XL", "f8h2,f64h4,f16h2@d16"])
@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_matches_torch_flop_counter(text, tie):
    """FlopCounterMode counts matmuls only, at 2 FLOPs per multiply-accumulate: aten.mm for every linear layer (the
    LM head included; the embedding lookup is no matmul, norms and SwiGLU's products are not counted) and, with
    the MATH attention kernel (the CPU flash kernel is not counted at all), aten.bmm for the attention scores and
    the weighted values, computed densely over all T x T query-key pairs, the causally masked half included."""
    cfg = tiny_config(tie_embeddings=tie)
    spec, T = parse_spec(cfg, text), 16
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        MatryoshkaLM(cfg).eval()(torch.zeros(1, T, dtype=torch.long), spec)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(counts) == {"aten.mm", "aten.bmm"}
    weights = flops_per_token(cfg, spec, context=0)  # context 0: the weight matmuls alone
    assert counts["aten.mm"] == T * weights
    # ours counts causal attention, each query over context/2 keys on average: over T queries with context T that
    # is exactly half of the dense T x T products the kernel computes
    assert counts["aten.bmm"] == 2 * T * (flops_per_token(cfg, spec, context=T) - weights)


@pytest.mark.parametrize(
    "text, words",
    [
        ("XXL", "unknown size"),
        ("S,XXL", "bad layer 1"),
        ("", "empty"),
        ("f16h3", "GQA group"),
        ("f999h2", "outside"),
        ("M,M,M,M,M", "model has 4"),
        ("M@d999", "width 999"),
        ("M@q", "bad width"),
    ],
)
def test_parse_errors_name_the_problem(text, words):
    with pytest.raises(MatryoshkaError, match=words):
        parse_spec(tiny_config(), text)


def test_fraction_that_does_not_divide_is_an_error():
    cfg = tiny_config(sizes={"XL": {}, "odd": {"ffn": "1/3"}})
    with pytest.raises(MatryoshkaError, match="does not divide"):
        uniform_spec(cfg, "odd")


def test_spec_on_an_axis_that_was_not_nested_is_an_error():
    cfg = tiny_config(nest_width=False)
    with pytest.raises(MatryoshkaError, match="not trained with a nested residual width"):
        parse_spec(cfg, "XL@d16")


def test_config_validation():
    with pytest.raises(MatryoshkaError, match="multiple of n_kv_heads"):
        ModelConfig(n_heads=6, n_kv_heads=4)
    with pytest.raises(MatryoshkaError, match="entries"):
        ModelConfig(n_layers=2, ffn_dim=[64, 64, 64])
