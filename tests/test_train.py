from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, tiny_train_config
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import uniform_spec
from matryoshka_lm.train.loop import JointLoss, lr_at, step_sizes, train


def read_metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("size", ["XL", "L", "M", "S"])
def test_every_granularity_sends_gradient_to_the_shared_prefix(size):
    """Each size's loss alone reaches exactly the prefix it reads, and that prefix is shared with XL."""
    torch.manual_seed(0)
    model = MatryoshkaLM(tiny_config())
    spec = uniform_spec(model.cfg, size)
    x = torch.randint(0, 97, (2, 16))
    total, _ = JointLoss(model, 0.0)(x, x, [spec], [1.0])
    total.backward()
    l0 = model.layers[0]
    h = spec.layers[0].heads * model.cfg.head_dim
    f, C = spec.layers[0].ffn, spec.width
    assert l0.ffn.w_gate.weight.grad[:f, :C].abs().sum() > 0
    assert l0.ffn.w_down.weight.grad[:C, :f].abs().sum() > 0
    assert l0.attn.wq.weight.grad[:h, :C].abs().sum() > 0
    assert model.tok_emb.weight.grad[:, :C].abs().sum() > 0
    # nothing outside the prefix moves
    assert l0.ffn.w_gate.weight.grad[f:].abs().sum() == 0
    assert l0.attn.wq.weight.grad[h:].abs().sum() == 0
    assert model.tok_emb.weight.grad[:, C:].abs().sum() == 0
    if spec.depth < model.cfg.n_layers:
        assert model.layers[spec.depth].ffn.w_gate.weight.grad is None


def test_joint_training_lowers_the_loss_at_every_size(tmp_path, corpus_file):
    out = tmp_path / "run"
    tcfg = tiny_train_config(steps=30, eval_every=30, eval_batches=4)
    train(tiny_config(), tcfg, out, data=str(corpus_file))
    m = read_metrics(out)
    first, last = m[0]["loss"], m[-1]["loss"]
    assert set(first) == {"XL", "L", "M", "S"}
    for size in first:
        assert last[size] < first[size] - 0.5, (size, first[size], last[size])
    assert set(m[-1]["val_loss"]) == {"XL", "L", "M", "S"}


def test_kill_and_resume_gives_identical_losses(tmp_path, corpus_file):
    tcfg = lambda: tiny_train_config(steps=8, save_every=4)
    full, halted = tmp_path / "full", tmp_path / "halted"
    train(tiny_config(), tcfg(), full, data=str(corpus_file))
    train(tiny_config(), tcfg(), halted, data=str(corpus_file), halt_after=4)  # "killed" right after step 4's save
    assert len(read_metrics(halted)) == 4
    train(tiny_config(), tcfg(), halted, data=str(corpus_file), resume=True)
    a, b = read_metrics(full), read_metrics(halted)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical
    wa, wb = ck.load_tensors(full / ck.WEIGHTS), ck.load_tensors(halted / ck.WEIGHTS)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_only_mode_trains_a_dense_model_of_that_shape(tmp_path, corpus_file):
    out = tmp_path / "base"
    train(tiny_config(), tiny_train_config(steps=2, only="M"), out, data=str(corpus_file))
    cfg, tcfg = ck.read_config(out)
    spec = uniform_spec(tiny_config(), "M")
    assert (cfg.d_model, cfg.n_layers, cfg.ffn_dim) == (spec.width, spec.depth, spec.layers[0].ffn)
    assert tcfg.only == "M" and list(read_metrics(out)[0]["loss"]) == ["XL"]


def test_distillation_and_size_sampling_run(tmp_path, corpus_file):
    out = tmp_path / "kd"
    train(tiny_config(), tiny_train_config(steps=3, distill=0.5, sample_sizes=2), out, data=str(corpus_file))
    for r in read_metrics(out):
        assert len(r["loss"]) == 2 and "XL" in r["loss"]


def test_size_sampling_is_seeded_and_keeps_the_full_size():
    tcfg = tiny_train_config(sample_sizes=2)
    names, w = ["XL", "L", "M", "S"], [1.0] * 4
    picks = [step_sizes(names, w, tcfg, s)[0] for s in range(20)]
    assert all(p[0] == "XL" and len(p) == 2 for p in picks)
    assert picks == [step_sizes(names, w, tcfg, s)[0] for s in range(20)]
    assert len({p[1] for p in picks}) > 1


def test_lr_schedule_warms_up_then_decays():
    tcfg = tiny_train_config(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, tcfg) == pytest.approx(0.1) and lr_at(9, tcfg) == pytest.approx(1.0)
    assert lr_at(99, tcfg) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(50, tcfg) < lr_at(20, tcfg)


def test_checkpoint_files_are_safetensors_and_json(tmp_path, corpus_file):
    out = tmp_path / "ck"
    train(tiny_config(), tiny_train_config(steps=2), out, data=str(corpus_file))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", "trainer_state.safetensors", "metrics.jsonl"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    model = ck.load_model(out)
    assert model.cfg.vocab_size == ck.load_tokenizer(out).get_vocab_size()
