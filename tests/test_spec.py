from __future__ import annotations

import pytest

from conftest import tiny_config
from matryoshka_lm.config import ModelConfig, preset
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.core.spec import LayerSpec, count_params, format_spec, parse_spec, size_names, uniform_spec


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


@pytest.mark.parametrize("text, words", [
    ("XXL", "unknown size"), ("S,XXL", "bad layer 1"), ("", "empty"), ("f16h3", "GQA group"), ("f999h2", "outside"),
    ("M,M,M,M,M", "model has 4"), ("M@d999", "width 999"), ("M@q", "bad width"),
])
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
