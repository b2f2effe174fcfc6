"""The defining invariant: a sliced submodel computes exactly what a standalone dense model of its shape does."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import submodel_specs, tiny_config
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.nested import slice_state_dict, submodel_config
from matryoshka_lm.core.spec import LayerSpec, SubmodelSpec, count_params, full_spec, uniform_spec


def standalone(model: MatryoshkaLM, spec: SubmodelSpec) -> MatryoshkaLM:
    small = MatryoshkaLM(submodel_config(model.cfg, spec))
    small.load_state_dict(slice_state_dict(model.state_dict(), model.cfg, spec))
    return small.eval()


def assert_same_logits(model: MatryoshkaLM, spec: SubmodelSpec, T: int = 16) -> None:
    idx = torch.randint(0, model.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sliced = model(idx, spec)
        dense = standalone(model, spec)(idx)
    assert sliced.shape == dense.shape == (2, T, model.cfg.vocab_size)
    assert (sliced - dense).abs().max().item() <= 1e-5


def one_axis(cfg, axis: str) -> SubmodelSpec:
    full = full_spec(cfg)
    if axis == "ffn":
        return SubmodelSpec(cfg.d_model, tuple(LayerSpec(16, l.heads) for l in full.layers))
    if axis == "heads":
        return SubmodelSpec(cfg.d_model, tuple(LayerSpec(l.ffn, 2) for l in full.layers))
    if axis == "width":
        return SubmodelSpec(20, full.layers)
    return SubmodelSpec(cfg.d_model, full.layers[:2])  # depth


@pytest.mark.parametrize("axis", ["ffn", "heads", "width", "depth"])
def test_each_axis_matches_standalone(tiny_model, axis):
    assert_same_logits(tiny_model, one_axis(tiny_model.cfg, axis))


@pytest.mark.parametrize("size", ["XL", "L", "M", "S"])
def test_named_sizes_match_standalone(tiny_model, size):
    assert_same_logits(tiny_model, uniform_spec(tiny_model.cfg, size))


def test_untied_head_matches_standalone():
    torch.manual_seed(3)
    model = MatryoshkaLM(tiny_config(tie_embeddings=False)).eval()
    assert_same_logits(model, uniform_spec(model.cfg, "M"))


@cache
def shared_model() -> MatryoshkaLM:
    """One model for every hypothesis example (a function-scoped fixture would not be reset between them)."""
    torch.manual_seed(0)
    return MatryoshkaLM(tiny_config()).eval()


@settings(max_examples=15, deadline=None)
@given(submodel_specs(tiny_config()))
def test_any_mix_n_match_matches_standalone(spec):
    assert_same_logits(shared_model(), spec, T=8)


def test_largest_size_is_the_full_model(tiny_model):
    """XL (all fractions 1) is the full spec, so naming it changes nothing."""
    xl = uniform_spec(tiny_model.cfg, "XL")
    assert (xl.width, xl.layers) == (tiny_model.cfg.d_model, full_spec(tiny_model.cfg).layers)
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.equal(tiny_model(idx), tiny_model(idx, xl))


def n_params(model: MatryoshkaLM) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tie", [True, False])
def test_param_count_formula_matches_the_full_model(tie):
    cfg = tiny_config(tie_embeddings=tie)
    assert count_params(cfg, full_spec(cfg))["total"] == n_params(MatryoshkaLM(cfg))


@settings(max_examples=25, deadline=None)
@given(submodel_specs(tiny_config()), st.booleans())
def test_param_count_formula_matches_standalone_model(spec, tie):
    cfg = tiny_config(tie_embeddings=tie)
    assert count_params(cfg, spec)["total"] == n_params(MatryoshkaLM(submodel_config(cfg, spec)))


def test_kv_cached_decoding_matches_full_forward(tiny_model):
    """Prefill + one-token steps through the cache give the same logits as one uncached pass."""
    from matryoshka_lm.core.model import KVCache

    spec = uniform_spec(tiny_model.cfg, "M")
    idx = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        ref = tiny_model(idx, spec)
        cache = KVCache.allocate(tiny_model.cfg, spec, 1, 12)
        steps = [tiny_model(idx[:, :5], spec, cache, 0)]
        steps.append(tiny_model(idx[:, 5:8], spec, cache, 5))  # a multi-token chunk after a cached prefix
        steps += [tiny_model(idx[:, t : t + 1], spec, cache, t) for t in range(8, 12)]
    assert (torch.cat(steps, 1) - ref).abs().max().item() <= 1e-5
