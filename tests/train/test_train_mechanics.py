"""The training mechanics the three loops share (train/optim.py, train/steps.py), and finetune_hf on them."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn as nn

from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.train.optim import adamw, lr_at
from matryoshka_lm.train.steps import MetricsLog, optimizer_step


def test_accumulated_micro_steps_equal_one_step_on_the_whole_batch():
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def fresh():
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        return model, adamw(model, 0.1, 0.01)

    whole, opt_w = fresh()
    split, opt_s = fresh()
    loss_of = lambda m, a, b: lambda: ((m(a) - b).pow(2).mean(), (m(a) - b).pow(2).mean().detach())  # noqa: E731
    rep_w, norm_w = optimizer_step(opt_w, whole.parameters(), 0.05, [loss_of(whole, x, y)], 1.0)
    rep_s, norm_s = optimizer_step(
        opt_s, split.parameters(), 0.05, [loss_of(split, x[:4], y[:4]), loss_of(split, x[4:], y[4:])], 1.0
    )
    torch.testing.assert_close(rep_s, rep_w)
    torch.testing.assert_close(norm_s, norm_w)
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b)
        assert a.grad is None  # zeroed for the next step
    assert opt_w.param_groups[0]["lr"] == 0.05


def test_adamw_decays_matrices_only_unless_asked():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    groups = adamw(model, 1e-3, 0.1).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.1), (3, 0.0)]
    assert [len(g["params"]) for g in adamw(model, 1e-3, 0.1, decay_matrices_only=False).param_groups] == [4]


def test_metrics_log_writes_jsonl_and_calls_back_on_the_writer_only(tmp_path):
    seen = []
    MetricsLog(tmp_path / "m.jsonl", lambda s, m: seen.append(s))(1, {"step": 1})
    MetricsLog(tmp_path / "n.jsonl", lambda s, m: seen.append(s), writer=False)(2, {"step": 2})
    assert seen == [1] and json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 1}
    assert not (tmp_path / "n.jsonl").exists()


# ---------------------------------------------------------------- finetune_hf on a tiny local BERT


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(40)]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("bert")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    transformers.BertModel(cfg).save_pretrained(path)
    rng = random.Random(0)
    pairs = path.parent / "pairs.jsonl"
    rows = [{"query": " ".join(rng.sample(words, 4)), "positive": " ".join(rng.sample(words, 4))} for _ in range(30)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, pairs


def reference_finetune(path, cfg):
    """finetune_hf's loop as it was before the shared mechanics: the result must not change."""
    from matryoshka_lm.embed import HFEncoder, default_dims, mrl_contrastive_loss
    from matryoshka_lm.embed.training import load_pairs

    torch.manual_seed(cfg.seed)
    enc = HFEncoder(path, cfg.max_tokens)
    dims = default_dims(enc.dim)
    train_pairs, _ = load_pairs(cfg)
    opt = torch.optim.AdamW(enc.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng, losses = random.Random(cfg.seed), []
    enc.model.train()
    for step in range(cfg.steps):
        batch = rng.sample(train_pairs, cfg.batch_size)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        q, p = enc([a for a, _ in batch]), enc([b for _, b in batch])
        loss = mrl_contrastive_loss(q, p, dims, None, cfg.temperature, cfg.symmetric)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc.model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
    return enc.model.state_dict(), losses


def test_finetune_hf_keeps_its_results_on_the_shared_mechanics(tiny_bert, tmp_path):
    transformers = pytest.importorskip("transformers")
    from matryoshka_lm.embed import EmbedTrainConfig, finetune_hf

    path, pairs = tiny_bert
    cfg = EmbedTrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, pairs=str(pairs), n_eval=0, max_tokens=8)
    losses = []
    finetune_hf(path, tmp_path / "out", cfg, callback=lambda s, m: losses.append(m["loss"]))
    ref_state, ref_losses = reference_finetune(path, cfg)
    assert losses == ref_losses
    tuned = transformers.AutoModel.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in ref_state.items())


def test_finetune_hf_with_fewer_pairs_than_a_batch_is_a_clear_error(tiny_bert, tmp_path):
    from matryoshka_lm.embed import EmbedTrainConfig, finetune_hf

    path, pairs = tiny_bert
    cfg = EmbedTrainConfig(steps=1, batch_size=32, pairs=str(pairs), n_eval=0)
    with pytest.raises(MatryoshkaError, match="30 training pairs, fewer than one batch of 32"):
        finetune_hf(path, tmp_path / "out", cfg)
