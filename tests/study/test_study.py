"""The study pipeline end to end on the `micro` preset, and the scaling fit on points with known constants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.model import MatryoshkaLM
from matryoshka_lm.core.nested import submodel_config
from matryoshka_lm.core.spec import count_params, format_spec, parse_spec, uniform_spec
from matryoshka_lm.data import eval_batches
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.study.evaluate import fit_scaling, line_through, mixnmatch_specs
from matryoshka_lm.study.presets import PRESETS as STUDY_PRESETS
from matryoshka_lm.study.runner import run_study
from matryoshka_lm.study.sizes import plan as plan_runs
from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split

pytestmark = pytest.mark.slow  # an end-to-end pipeline (still run by `make test`)


@pytest.fixture(scope="module")
def study(tmp_path_factory, corpus_file):
    root = tmp_path_factory.mktemp("study")
    res = run_study("micro", root / "report", work=root / "work", data=str(corpus_file), seed=0)
    return root, res


def test_report_files_and_tables(study):
    root, res = study
    rep = root / "report"
    for f in (
        "README.md",
        "results.json",
        "size_vs_loss.png",
        "ablation_flops_vs_loss.png",
        "consistency.png",
        "scaling.png",
    ):
        assert (rep / f).is_file() and (rep / f).stat().st_size > 500, f
    text = (rep / "README.md").read_text()
    for heading in ("Quality per size", "Consistency", "Which axes to nest", "Mix'n'Match", "Scaling"):
        assert heading in text
    saved = json.loads((rep / "results.json").read_text())
    assert set(saved["matryoshka"]) == {"32", "48"}
    assert set(saved["ablation"]) == set(saved["mixnmatch"]) == {"ffn", "ffn+heads", "all"}
    assert saved["meta"]["seed"] == 0 and saved["meta"]["tokens_per_run"] == 6 * 4 * 32
    assert saved["matryoshka"]["48"]["M"] == pytest.approx(res["matryoshka"][48]["M"])


def log_probs(model: MatryoshkaLM, x: torch.Tensor, spec=None) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(x, spec), -1)


def test_numbers_match_an_independent_evaluation(study):
    """Loss, agreement and KL of a smaller size, recomputed here in one batch over the study's windows."""
    root, res = study
    p, work = STUDY_PRESETS["micro"], root / "work"
    _, _, val = checkpoint_val_split(work / "d32-matryoshka-all")
    x, y = (torch.cat(t) for t in zip(*eval_batches(val, 8, p.seq_len, p.eval_batches)))
    mat = ck.load_model(work / "d32-matryoshka-all")
    full, small = log_probs(mat, x), log_probs(mat, x, uniform_spec(mat.cfg, "M"))
    got = res["matryoshka"][32]["M"]
    assert got["val_loss"] == pytest.approx(F.nll_loss(small.flatten(0, 1), y.flatten()).item(), rel=1e-5)
    assert got["agree"] == pytest.approx((small.argmax(-1) == full.argmax(-1)).double().mean().item())
    assert got["kl"] == pytest.approx((full.exp() * (full - small)).sum(-1).mean().item(), rel=1e-4, abs=1e-7)
    assert 0 < got["agree"] < 1 and got["kl"] > 0  # the check compares a real difference
    base_xl, base_m = (ck.load_model(work / f"d32-baseline-{s}") for s in ("XL", "M"))
    ref, other = log_probs(base_xl, x), log_probs(base_m, x)
    b = res["baseline"][32]["M"]
    assert b["val_loss"] == pytest.approx(F.nll_loss(other.flatten(0, 1), y.flatten()).item(), rel=1e-5)
    assert b["top1_agreement"] == pytest.approx((other.argmax(-1) == ref.argmax(-1)).double().mean().item())
    assert b["kl"] == pytest.approx((ref.exp() * (ref - other)).sum(-1).mean().item(), rel=1e-4, abs=1e-7)
    assert b["agree"] == b["top1_agreement"]  # one agreement per baseline: with the baseline XL, not with itself


def test_params_are_those_of_the_extracted_model(study):
    root, res = study
    for d in res["matryoshka"]:
        mat = ck.load_model(root / "work" / f"d{d}-matryoshka-all")
        for s, point in res["matryoshka"][d].items():
            extracted = MatryoshkaLM(submodel_config(mat.cfg, uniform_spec(mat.cfg, s)))
            assert point["params"] == sum(t.numel() for t in extracted.parameters()), (d, s)
            base = ck.load_model(root / "work" / f"d{d}-baseline-{s}")
            assert res["baseline"][d][s]["params"] == sum(t.numel() for t in base.parameters()), (d, s)


def test_baselines_have_the_shape_of_their_size(study):
    _, res = study
    for d in res["matryoshka"]:
        for s in ("XL", "L", "M", "S"):
            assert res["baseline"][d][s]["non_embedding_params"] == res["matryoshka"][d][s]["non_embedding_params"]


def test_rerun_reuses_runs_and_reproduces_numbers(study, corpus_file):
    root, res = study
    again = run_study("micro", root / "report2", work=root / "work", data=str(corpus_file), seed=0)
    assert again["meta"]["train_seconds"].keys() == res["meta"]["train_seconds"].keys()  # read back from the logs
    assert again["meta"]["wall_seconds"] < res["meta"]["wall_seconds"]  # nothing was retrained
    for d in res["matryoshka"]:
        assert again["matryoshka"][d] == res["matryoshka"][d]
        assert again["baseline"][d] == res["baseline"][d]


def test_every_run_sees_the_same_tokens():
    runs = plan_runs(STUDY_PRESETS["micro"], seed=3)
    tokens = {(t.steps, t.batch_size, t.seq_len, t.seed, t.max_corpus_chars, t.lr) for _, t in runs.values()}
    assert len(tokens) == 1 and len(runs) == 2 * 5 + 2


def test_fit_recovers_known_constants():
    n = np.geomspace(1e4, 1e7, 12)
    a, b, c = 40.0, 0.3, 1.7
    loss = a * n**-b + c + np.random.default_rng(0).normal(0, 1e-4, n.size)
    fit = fit_scaling(n, loss)
    assert fit["b"] == pytest.approx(b, abs=0.01) and fit["c"] == pytest.approx(c, abs=0.01)
    assert fit["a"] == pytest.approx(a, rel=0.1) and fit["b_err"] < 0.01
    with pytest.raises(MatryoshkaError, match="at least 4"):
        fit_scaling(n[:3], loss[:3])


def test_mixnmatch_specs_grow_with_depth():
    cfg = tiny_config()
    specs = mixnmatch_specs(cfg, 5, seed=0)
    assert len(specs) == 5 and len({str(s) for s in specs}) == 5
    smallest, largest = (count_params(cfg, uniform_spec(cfg, n))["total"] for n in ("S", "XL"))
    for s in specs:
        ffn = [l.ffn for l in s.layers]
        assert ffn == sorted(ffn) and len(set(ffn)) > 1
        assert parse_spec(cfg, format_spec(s)) == s
        assert smallest < count_params(cfg, s)["total"] < largest  # a true mix: neither end


def test_line_through_interpolates_in_log_n():
    pts = [(100, 4.0), (10_000, 3.0)]
    assert line_through(pts, 1000) == pytest.approx(3.5)
