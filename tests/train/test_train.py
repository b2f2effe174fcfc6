from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, tiny_train_config
from matryoshka_lm.cli import main
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.spec import uniform_spec
from matryoshka_lm.errors import MatryoshkaError
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


def test_distillation_adds_the_kl_to_the_full_size_to_each_smaller_size():
    """total = sum of CE + distill * KL(full || size) for every size but the full one, whose CE is untouched."""
    torch.manual_seed(0)
    model = MatryoshkaLM(tiny_config())
    specs = [uniform_spec(model.cfg, n) for n in ("XL", "S")]
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    plain, ce = JointLoss(model, 0.0)(x, y, specs, [1.0, 1.0])
    total, ce_kd = JointLoss(model, 0.5)(x, y, specs, [1.0, 1.0])
    with torch.no_grad():
        p_full = torch.log_softmax(model(x, specs[0]).float(), -1).flatten(0, 1)
        p_small = torch.log_softmax(model(x, specs[1]).float(), -1).flatten(0, 1)
        kl = (p_full.exp() * (p_full - p_small)).sum(-1).mean()  # KL(full || small) per token
    assert kl > 1e-4
    torch.testing.assert_close(ce_kd, ce)  # the reported losses stay the plain CE
    torch.testing.assert_close(plain, ce.sum())
    torch.testing.assert_close(total, ce.sum() + 0.5 * kl)
    # the KL pulls only the small size: its gradient changes, the full model's target is detached
    grads = []
    for distill in (0.0, 0.5):
        model.zero_grad()
        JointLoss(model, distill)(x, y, specs, [1.0, 1.0])[0].backward()
        grads.append(model.layers[0].ffn.w_gate.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


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


# ---------------------------------------------------------------- resume with changed settings


def test_resume_with_more_steps_at_a_constant_lr_equals_one_longer_run(tmp_path, corpus_file):
    """With min_lr_ratio=1 the LR after warmup does not depend on the total steps, so 4 steps then a resume to
    6 must be bit-identical to one 6-step run (with a cosine decay they differ by design: see the next test)."""
    cfg = lambda steps: tiny_train_config(steps=steps, warmup_steps=1, min_lr_ratio=1.0)
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(tiny_config(), cfg(6), ref, data=str(corpus_file))
    train(tiny_config(), cfg(4), run, data=str(corpus_file))
    train(tiny_config(), cfg(4), run, data=str(corpus_file), resume=True, changes={"steps": 6})
    a, b = read_metrics(ref), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = ck.load_tensors(ref / ck.WEIGHTS), ck.load_tensors(run / ck.WEIGHTS)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ck.read_config(run)[1].steps == 6


def test_resume_with_more_steps_decays_over_the_new_total(tmp_path, corpus_file):
    out = tmp_path / "run"
    train(tiny_config(), tiny_train_config(steps=4), out, data=str(corpus_file))
    before = read_metrics(out)
    train(
        tiny_config(),
        tiny_train_config(steps=4),
        out,
        data=str(corpus_file),
        resume=True,
        changes={"steps": 6, "save_every": 5, "seed": None},
    )  # None: not given
    after = read_metrics(out)
    assert after[:4] == before
    longer = tiny_train_config(steps=6)
    assert [r["lr"] for r in after[4:]] == [lr_at(4, longer), lr_at(5, longer)]
    assert after[4]["lr"] > lr_at(4, tiny_train_config(steps=4))  # the old schedule would sit at its minimum
    saved = ck.read_config(out)[1]
    assert (saved.steps, saved.save_every) == (6, 5)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("short") / "run"
    train(tiny_config(), tiny_train_config(steps=2), out, data=str(corpus_file))
    return out


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 3, "seed": 1}, "seed (saved 0, given 1)"),
        ({"steps": 3, "batch_size": 8}, "batch_size (saved 4, given 8)"),
        ({"steps": 3, "sizes": ["XL", "M"]}, "sizes (saved None, given ['XL', 'M'])"),
        ({"steps": 3, "max_corpus_chars": 1000}, "max_corpus_chars (saved 60000, given 1000)"),
        ({"steps": 3, "nest_width": False}, "nest_width (saved True, given False)"),
        ({"steps": 3, "seed": 1, "only": "M"}, "only (saved None, given 'M'), seed (saved 0, given 1)"),
    ],
)
def test_resume_refuses_settings_that_cannot_change(short_run, corpus_file, changes, message):
    with pytest.raises(MatryoshkaError) as e:
        train(tiny_config(), tiny_train_config(), short_run, data=str(corpus_file), resume=True, changes=changes)
    text = str(e.value)
    assert message in text and "cannot change mid-run" in text and "\n" not in text
    assert len(read_metrics(short_run)) == 2  # nothing was trained


def test_resume_refuses_other_data_and_unknown_settings(short_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("some other text\n" * 100)
    with pytest.raises(MatryoshkaError, match=r"data \(saved .*pydoc.txt', given '.*other.txt'\)"):
        train(tiny_config(), tiny_train_config(steps=3), short_run, data=str(other), resume=True)
    with pytest.raises(MatryoshkaError, match=r"unknown training settings \['stepz'\]"):
        train(tiny_config(), tiny_train_config(), short_run, resume=True, changes={"stepz": 3})


def test_resume_without_more_steps_says_there_is_nothing_to_do(short_run, corpus_file):
    for changes in ({}, {"steps": 2}, {"steps": 1}):
        with pytest.raises(MatryoshkaError, match="nothing to resume: .* already at step 2 and steps="):
            train(tiny_config(), tiny_train_config(), short_run, data=str(corpus_file), resume=True, changes=changes)


def test_resume_from_python_takes_the_differences_of_tcfg_as_the_changes(short_run, corpus_file):
    """changes=None: whatever the given TrainConfig changes relative to the saved one counts as asked for."""
    with pytest.raises(MatryoshkaError, match=r"seed \(saved 0, given 3\)"):
        train(tiny_config(), tiny_train_config(steps=3, seed=3), short_run, resume=True)
    with pytest.raises(MatryoshkaError, match="nothing to resume"):
        train(tiny_config(), tiny_train_config(steps=2), short_run, data=str(corpus_file), resume=True)


def test_cli_resume_with_more_steps_trains_the_extra_steps(tmp_path, corpus_file, capsys):
    out = tmp_path / "run"
    common = [
        "train",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--data",
        str(corpus_file),
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--max-corpus-chars",
        "60000",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert main(common + ["--steps", "2", "--lr", "0.001"]) == 0
    assert main(common + ["--steps", "3", "--resume", "--save-every", "7"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    saved = ck.read_config(out)[1]
    assert (saved.save_every, saved.lr) == (7, 0.001)  # options not typed again keep the run's values
    assert read_metrics(out)[2]["lr"] == lr_at(2, saved)
    capsys.readouterr()
    assert main(common + ["--steps", "4", "--resume", "--seed", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "seed (saved 0, given 9)" in err and err.count("\n") == 1
    assert main(common + ["--steps", "3", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


# ---------------------------------------------------------------- sampling: all | sandwich | mix


def test_sandwich_and_mix_sample_what_they_say():
    from matryoshka_lm.core.spec import validate_spec
    from matryoshka_lm.train.mixes import step_specs

    cfg = tiny_config()
    names = ["XL", "L", "M", "S"]
    specs = {n: uniform_spec(cfg, n) for n in names}
    sandwich = tiny_train_config(sampling="sandwich", mixes=3)
    drawn = set()
    for step in range(20):
        labels, got, w = step_specs(cfg, sandwich, names, specs, step)
        assert labels == ["XL", "S", "mix0", "mix1", "mix2"] and w == [1.0] * 5
        assert got[0] == specs["XL"] and got[1] == specs["S"]
        for s in got[2:]:
            validate_spec(cfg, s)
            drawn.add((s.width, s.layers))
        assert step_specs(cfg, sandwich, names, specs, step)[1] == got  # seeded by (seed, step)
    uniform = {(s.width, s.layers) for s in specs.values()}
    assert len(drawn - uniform) >= 20  # mostly real per-layer mixes, many different ones
    assert len({len(layers) for _, layers in drawn}) > 1  # depths vary (depth is nested)
    labels, got, w = step_specs(cfg, tiny_train_config(sampling="mix", mixes=2), names, specs, 0)
    assert labels == ["mix0", "mix1"] and w == [1.0, 1.0]
    labels, got, w = step_specs(cfg, tiny_train_config(sampling="mix", mixes=2, distill=1.0), names, specs, 0)
    assert labels[0] == "XL" and w == [0.0, 1.0, 1.0]  # the teacher leads, untrained
    with pytest.raises(MatryoshkaError, match="sampling"):
        tiny_train_config(sampling="sometimes")


def test_sandwich_training_runs_and_logs_its_mixes(tmp_path, corpus_file):
    out = tmp_path / "sw"
    train(
        tiny_config(), tiny_train_config(steps=3, sampling="sandwich", mixes=2, distill=0.5), out, data=str(corpus_file)
    )
    for r in read_metrics(out):
        assert list(r["loss"]) == ["XL", "S", "mix0", "mix1"]
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--steps",
                "1",
                "--sampling",
                "mix",
                "--out",
                str(tmp_path / "m"),
                "--data",
                str(corpus_file),
                "--quiet",
                "--max-corpus-chars",
                "50000",
            ]
        )
        == 0
    )


# ---------------------------------------------------------------- a frozen teacher


def test_a_teacher_is_the_soft_target_of_every_size_and_gets_no_gradient():
    """With a teacher, total = sum over sizes (the full one too) of CE + distill * KL(teacher || size); the teacher
    is neither trained nor part of the module that DDP, the optimizer and checkpoints see."""
    torch.manual_seed(0)
    model, teacher = MatryoshkaLM(tiny_config()), MatryoshkaLM(tiny_config()).requires_grad_(False)
    specs = [uniform_spec(model.cfg, n) for n in ("XL", "S")]
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    loss = JointLoss(model, 0.5, teacher)
    total, ce = loss(x, y, specs, [1.0, 1.0])
    with torch.no_grad():
        t = torch.log_softmax(teacher(x).float(), -1).flatten(0, 1)
        kls = []
        for s in specs:
            p = torch.log_softmax(model(x, s).float(), -1).flatten(0, 1)
            kls.append((t.exp() * (t - p)).sum(-1).mean())
    assert min(kls) > 1e-4
    torch.testing.assert_close(total, ce.sum() + 0.5 * sum(kls))
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.layers[0].ffn.w_gate.weight.grad is not None
    assert not any(k.startswith("teacher") for k in loss.state_dict())


def test_training_from_a_teacher(tmp_path, corpus_file):
    teacher = train(tiny_config(), tiny_train_config(steps=2), tmp_path / "teacher", data=str(corpus_file))
    out = train(
        tiny_config(),
        tiny_train_config(steps=2, distill=1.0, teacher=str(teacher)),
        tmp_path / "student",
        data=str(corpus_file),
        init=teacher,
    )
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert ck.read_config(out)[1].teacher == str(teacher)
    with pytest.raises(MatryoshkaError, match="give distill > 0"):
        tiny_train_config(teacher=str(teacher))
    with pytest.raises(MatryoshkaError, match="another tokenizer"):  # a fresh run trains its own, larger BPE
        train(
            tiny_config(),
            tiny_train_config(steps=1, distill=1.0, teacher=str(teacher), vocab_size=400),
            tmp_path / "other",
            data=str(corpus_file),
        )


def test_a_fresh_student_of_another_shape_learns_from_a_teacher_with_its_tokenizer(tmp_path, corpus_file):
    teacher = train(tiny_config(), tiny_train_config(steps=2), tmp_path / "teacher", data=str(corpus_file))
    small = tiny_config(d_model=16, ffn_dim=32)  # another shape, the same vocabulary
    tcfg = tiny_train_config(steps=2, distill=1.0, teacher=str(teacher), vocab_size=400)  # vocab from the teacher
    out = train(small, tcfg, tmp_path / "student", data=str(corpus_file), tokenizer=teacher)
    assert (out / ck.TOKENIZER).read_text() == (teacher / ck.TOKENIZER).read_text()
    cfg, _ = ck.read_config(out)
    assert (cfg.d_model, cfg.vocab_size) == (16, ck.read_config(teacher)[0].vocab_size)
    with pytest.raises(MatryoshkaError, match="another tokenizer"):  # a resumed run keeps its own
        other = train(tiny_config(), tiny_train_config(steps=1, vocab_size=400), tmp_path / "o", data=str(corpus_file))
        train(
            small,
            tiny_train_config(steps=3, vocab_size=400),
            other,
            data=str(corpus_file),
            resume=True,
            tokenizer=teacher,
        )


def test_a_time_limit_checkpoints_and_stops_and_resume_finishes_the_run(tmp_path, corpus_file):
    tcfg = lambda: tiny_train_config(steps=5, save_every=100)
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny_config(), tcfg(), full, data=str(corpus_file))
    for call in range(1, 6):  # a zero limit: every call trains one step and checkpoints it
        train(tiny_config(), tcfg(), split, data=str(corpus_file), resume=call > 1, time_limit_s=0)
        assert len(read_metrics(split)) == call
    with pytest.raises(MatryoshkaError, match="nothing"):
        train(tiny_config(), tcfg(), split, data=str(corpus_file), resume=True, time_limit_s=0)
    assert [r["loss"] for r in read_metrics(full)] == [r["loss"] for r in read_metrics(split)]
