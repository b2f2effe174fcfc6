"""The recipe study (study/recipes.py, run by study/runner.py): equal-FLOPs plans, parallel training, the report
end to end on `recipes-micro`, and the FLOPs count it rests on (train/plan.py)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, tiny_train_config
from matryoshka_lm.cli.main import main
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import flops_per_token
from matryoshka_lm.eval.texts import ood_text
from matryoshka_lm.study.presets import PRESETS as RECIPE_PRESETS
from matryoshka_lm.study.presets import RECIPES
from matryoshka_lm.study.recipes import plan as plan_recipe_runs
from matryoshka_lm.study.runs import train_all
from matryoshka_lm.train.plan import run_flops, size_plan, step_flops, step_submodels, steps_for_flops

pytestmark = pytest.mark.slow  # an end-to-end pipeline (still run by `make test`)


def test_every_recipe_gets_todays_flops_budget():
    p = RECIPE_PRESETS["cpu-recipes"]
    runs = plan_recipe_runs(p, seed=0)
    assert len(runs) == len(p.scales) * (len(RECIPES) + 4)
    for d in p.scales:
        cfg, today = runs[f"d{d}-recipe-all"]
        budget = run_flops(cfg, today)
        plan = size_plan(cfg, today)
        assert today.steps == p.steps and budget == pytest.approx(p.steps * step_flops(cfg, today, plan, 0))
        for r in RECIPES:
            _, t = runs[f"d{d}-recipe-{r}"]
            spent = run_flops(cfg, t)
            last = step_flops(cfg, t, size_plan(cfg, t), t.steps - 1)
            assert budget <= spent < budget + last, r  # the first step count that reaches the budget
            assert t.warmup_steps == max(1, t.steps // 10) and t.eval_every == t.steps
        assert runs[f"d{d}-recipe-mix"][1].steps > 2 * p.steps  # 2 random mixes a step are cheaper than 4 sizes
        for s in ("XL", "S"):
            assert runs[f"d{d}-baseline-{s}"][1].only == s and runs[f"d{d}-baseline-{s}"][1].steps == p.steps


def test_a_distillation_teacher_costs_one_forward_and_trained_specs_three():
    cfg = tiny_config()
    tcfg = tiny_train_config(sampling="mix", mixes=2, distill=1.0)
    plan = size_plan(cfg, tcfg)
    _, specs, weights = step_submodels(cfg, tcfg, plan, 3)
    assert weights == [0.0, 1.0, 1.0]
    f = [flops_per_token(cfg, s, tcfg.seq_len) for s in specs]
    tokens = tcfg.batch_size * tcfg.seq_len
    assert step_flops(cfg, tcfg, plan, 3) == tokens * (f[0] + 3 * f[1] + 3 * f[2])
    assert steps_for_flops(cfg, tcfg, 0.5 * step_flops(cfg, tcfg, plan, 0)) == 1


def test_the_teacher_runs_without_autograd():
    """Under "mix" with distillation the full size is a weight-0 teacher: its forward builds no autograd graph,
    the mixes' forwards do, and the teacher still shapes the loss (the KL of each mix to it)."""
    from matryoshka_lm.core.model import MatryoshkaLM
    from matryoshka_lm.train.loop import JointLoss

    cfg = tiny_config()
    torch.manual_seed(0)
    model = MatryoshkaLM(cfg)
    tcfg = tiny_train_config(sampling="mix", mixes=2, distill=1.0)
    _, specs, weights = step_submodels(cfg, tcfg, size_plan(cfg, tcfg), 0)
    grad_on = []
    model.layers[0].register_forward_hook(lambda *a: grad_on.append(torch.is_grad_enabled()))
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    total, ce = JointLoss(model, 1.0)(x, x, specs, weights)
    assert grad_on == [False, True, True]
    assert total.item() > ce[1:].sum().item() + 1e-6  # CE of the mixes plus their KL to the teacher
    plain, _ = JointLoss(model, 0.0)(x, x, specs, weights)
    torch.testing.assert_close(plain, ce[1:].sum())  # without distillation the teacher adds nothing


def test_runs_trained_in_parallel_equal_runs_trained_in_process(tmp_path, corpus_file):
    runs = plan_recipe_runs(RECIPE_PRESETS["recipes-micro"], seed=0)
    pick = {k: runs[k] for k in ("d32-recipe-sandwich", "d32-baseline-M")}
    train_all(pick, tmp_path / "serial", str(corpus_file), "cpu", jobs=1)
    train_all(pick, tmp_path / "parallel", str(corpus_file), "cpu", jobs=2)
    for name in pick:
        a = ck.load_model(tmp_path / "serial" / name).state_dict()
        b = ck.load_model(tmp_path / "parallel" / name).state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    seen = []
    train_all(pick, tmp_path / "parallel", str(corpus_file), "cpu", on_run=lambda n, s: seen.append(s), jobs=2)
    assert seen == ["cached", "cached"]  # finished runs are reused


def test_the_out_of_domain_text_is_python_documentation():
    text = ood_text()
    assert len(text) > 300_000 and "def " in text and "KING" not in text


def test_recipe_study_end_to_end(tmp_path, corpus_file, capsys):
    out = tmp_path / "report"
    args = ["study", "--preset", "recipes-micro", "-o", str(out), "--work", str(tmp_path / "work")]
    assert main([*args, "--data", str(corpus_file), "--jobs", "2"]) in (0, None)
    res = json.loads((out / "results.json").read_text())
    p = RECIPE_PRESETS["recipes-micro"]
    assert set(res["recipes"]) == {str(d) for d in p.scales}
    for d in map(str, p.scales):
        for r in p.recipes:
            rec = res["recipes"][d][r]
            assert set(rec["sizes"]) == {"XL", "L", "M", "S"} and len(rec["mixnmatch"]) == p.mixnmatch
            for v in rec["sizes"].values():
                assert set(v) == {"in_domain", "out_of_domain"}
                assert v["in_domain"]["val_loss"] != v["out_of_domain"]["val_loss"]
    f = res["flops"]  # a baseline costs its own shape's FLOPs; every recipe about today's budget
    assert f["d32-baseline-S"] < f["d32-baseline-M"] < f["d32-baseline-XL"] < f["d32-recipe-all"]
    assert all(f[f"d48-recipe-{r}"] >= f["d48-recipe-all"] for r in p.recipes)
    assert res["best"] in p.recipes and {r["recipe"] for r in res["summary"]} == set(p.recipes)
    text = (out / "README.md").read_text()
    for heading in ("## Headline", "out of domain", "FLOPs per token vs loss", "ordering of sizes"):
        assert heading in text
    assert (out / "flops_vs_loss.png").stat().st_size > 10_000 and (out / "delta_vs_baseline.png").is_file()
    top = max(p.scales)  # lm-eval ran every size of every model at the largest scale, through our model class
    for r in p.recipes:
        sizes = res["harness"][f"d{top}-recipe-{r}"]
        assert set(sizes) == {"XL", "L", "M", "S"}
        assert all(0 < v["matryoshka_ppl"] < 20 and 0 <= v["matryoshka_cloze"] <= 1 for v in sizes.values())
    assert set(res["harness"][f"d{top}-baseline-S"]) == {"XL"}  # a baseline is one dense model
    assert "bits/byte" in text
    assert main(["study", "--preset", "cpu-small", "--jobs", "2", "-o", str(tmp_path / "x")]) not in (0, None)
    assert "--jobs applies to the recipe study presets" in capsys.readouterr().err
