"""The defining invariant: a sliced submodel computes exactly what a standalone dense model of its shape does."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import tiny_config
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


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_random_mix_n_match_matches_standalone(seed):
    torch.manual_seed(0)
    model = MatryoshkaLM(tiny_config()).eval()
    rng = random.Random(seed)
    depth = rng.randint(1, 4)
    layers = tuple(LayerSpec(rng.choice([8, 16, 32, 64]), rng.choice([2, 4])) for _ in range(depth))
    spec = SubmodelSpec(rng.choice([8, 16, 24, 32]), layers)
    assert_same_logits(model, spec, T=8)


def test_full_spec_is_plain_forward(tiny_model):
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.equal(tiny_model(idx), tiny_model(idx, full_spec(tiny_model.cfg)))


def test_param_count_formula_matches_standalone_model(tiny_model):
    spec = SubmodelSpec(24, (LayerSpec(8, 2), LayerSpec(64, 4), LayerSpec(16, 2)))
    n = sum(p.numel() for p in standalone(tiny_model, spec).parameters())
    assert count_params(tiny_model.cfg, spec)["total"] == n
    full = sum(p.numel() for p in tiny_model.parameters())
    assert count_params(tiny_model.cfg, full_spec(tiny_model.cfg))["total"] == full


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
        steps += [tiny_model(idx[:, t:t + 1], spec, cache, t) for t in range(8, 12)]
    assert (torch.cat(steps, 1) - ref).abs().max().item() <= 1e-5
