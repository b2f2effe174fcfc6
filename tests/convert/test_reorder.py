"""Importance reordering: a pure permutation (the full model's logits do not change), most important first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from matryoshka_lm.convert.reorder import (
    Permutation,
    importance_order,
    measure_importance,
    permute_state,
    reorder_model,
)
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import uniform_spec
from matryoshka_lm.data import eval_batches
from matryoshka_lm.errors import MatryoshkaError


def random_model(seed: int = 0, **kw) -> MatryoshkaLM:
    """Weights with spread (and non-unit norms), so importance differs between units and norms get permuted."""
    torch.manual_seed(seed)
    model = MatryoshkaLM(tiny_config(n_heads=6, n_kv_heads=3, head_dim=8, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
            if name.endswith("w_up.weight"):  # units of very different strength
                p.mul_(torch.rand(p.shape[0], 1) * 2)
    return model


def tokens(n: int = 4000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 97, n).astype(np.uint16)


@pytest.mark.parametrize("axes", [("ffn",), ("heads",), ("width",), ("width", "heads", "ffn")])
def test_reordering_leaves_full_logits_unchanged(axes):
    model = random_model()
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        before = model(x)
    w_before = {k: v.clone() for k, v in model.state_dict().items()}
    perm = reorder_model(model, tokens(), axes=axes, seq_len=32, batch=4, n_batches=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=2e-5)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, w_before[k])]
    assert changed, "the permutation was the identity"
    if "width" not in axes:
        assert not any("norm" in k or "emb" in k for k in changed)
    assert (perm.width is not None) == ("width" in axes)


def test_after_reordering_importance_is_descending():
    model = random_model(1)
    reorder_model(model, tokens(), axes=("width", "heads", "ffn"), seq_len=32, batch=4, n_batches=2)
    imp = measure_importance(model, tokens(), seq_len=32, batch=4, n_batches=2)
    g = model.cfg.group_size
    for f, h in zip(imp.ffn, imp.heads):
        assert torch.all(f[:-1] >= f[1:] - 1e-9)
        groups = h.view(-1, g)
        assert torch.all(groups.sum(1)[:-1] >= groups.sum(1)[1:] - 1e-9)
        assert torch.all(groups[:, :-1] >= groups[:, 1:] - 1e-9)
    assert torch.all(imp.width[:-1] >= imp.width[1:] - 1e-9)


def test_heads_move_as_whole_gqa_groups():
    model = random_model()
    imp = measure_importance(model, tokens(), seq_len=32, batch=4, n_batches=1)
    order = importance_order(imp, model.cfg, ("heads",)).heads
    g = model.cfg.group_size
    for o in order:  # each block of g query heads comes from one old group
        assert all(len(set((b // g).tolist())) == 1 for b in o.view(-1, g))
    within = Permutation(heads=[torch.tensor([1, 0, 4, 5, 2, 3])] + [torch.arange(6)] * 3)  # allowed
    permute_state(model.state_dict(), model.cfg, within)
    across = Permutation(heads=[torch.tensor([0, 2, 1, 3, 4, 5])] + [torch.arange(6)] * 3)  # groups 0 and 1 mixed
    with pytest.raises(MatryoshkaError, match="whole GQA groups"):
        permute_state(model.state_dict(), model.cfg, across)


def reference_importance(model: MatryoshkaLM, x: torch.Tensor):
    """The module doc's scores from the weights alone: an explicit Llama forward (softmax attention written out,
    not the model's code path), returning (ffn, heads, width, logits) summed over every token of `x`."""
    cfg, w = model.cfg, {k: v.double() for k, v in model.state_dict().items()}
    hd, g, T = cfg.head_dim, cfg.group_size, x.shape[1]
    cos, sin = model.rope_cos[:T].double(), model.rope_sin[:T].double()

    def norm(h, weight):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    def rope(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-t2, t1], -1) * sin

    h = w["tok_emb.weight"][x]
    ffn, heads, width = [], [], torch.zeros(cfg.d_model, dtype=torch.float64)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        width += h.pow(2).sum((0, 1))
        a = norm(h, w[p + "attn_norm.weight"])
        split = lambda t: t.unflatten(-1, (-1, hd)).transpose(1, 2)  # (B, n, T, hd)
        q, k, v = (split(a @ w[p + f"attn.{n}.weight"].T) for n in ("wq", "wk", "wv"))
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # query head j reads kv j // g
        att = (q @ k.transpose(-1, -2) / hd**0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        y = att @ v  # (B, h, T, hd)
        wo = w[p + "attn.wo.weight"].unflatten(1, (-1, hd))  # (C, h, hd)
        contrib = torch.einsum("bhtd,chd->bhtc", y, wo)
        heads.append(contrib.norm(dim=-1).sum((0, 2)))
        h = h + contrib.sum(1)
        b = norm(h, w[p + "ffn_norm.weight"])
        act = torch.nn.functional.silu(b @ w[p + "ffn.w_gate.weight"].T) * (b @ w[p + "ffn.w_up.weight"].T)
        ffn.append(act.abs().sum((0, 1)) * w[p + "ffn.w_down.weight"].norm(dim=0))
        h = h + act @ w[p + "ffn.w_down.weight"].T
    width += h.pow(2).sum((0, 1))
    logits = norm(h, w["norm.weight"]) @ w["tok_emb.weight"].T
    return ffn, heads, width, logits


def test_importance_equals_the_formulas_computed_from_the_weights():
    model = random_model(2)
    toks = tokens()
    imp = measure_importance(model, toks, seq_len=16, batch=3, n_batches=2)
    x = torch.cat([b for b, _ in eval_batches(toks, 3, 16, 2)])
    ffn, heads, width, logits = reference_importance(model, x)
    with torch.no_grad():  # the reference forward is the model's forward
        torch.testing.assert_close(logits.float(), model(x), rtol=0, atol=1e-5)
    for got, want in zip(imp.ffn + imp.heads, ffn + heads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(imp.width, width, rtol=1e-5, atol=1e-5)


def kl_from_full(model: MatryoshkaLM, size: str, x: torch.Tensor) -> float:
    with torch.no_grad():
        full = F.log_softmax(model(x), -1)
        small = F.log_softmax(model(x, uniform_spec(model.cfg, size)), -1)
    return float((full.exp() * (full - small)).sum(-1).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_reordered_prefixes_are_closer_to_the_full_model(seed):
    """Before any fine-tuning, keeping the most important FFN units loses less than keeping the first ones."""
    model = random_model(seed, nest_width=False, nest_heads=False, nest_depth=False)
    x = torch.from_numpy(tokens(2 * 32, seed=9).astype(np.int64)).view(2, 32)
    naive = {s: kl_from_full(model, s, x) for s in ("L", "M")}
    reorder_model(model, tokens(), seq_len=32, batch=4, n_batches=4)
    for s in ("L", "M"):
        assert kl_from_full(model, s, x) < naive[s]


def test_unknown_axis():
    model = random_model()
    imp = measure_importance(model, tokens(), seq_len=32, batch=2, n_batches=1)
    with pytest.raises(MatryoshkaError, match="cannot reorder"):
        importance_order(imp, model.cfg, ("depth",))
