"""The elastify recipe end to end on a tiny random Llama (CPU, seconds): a run split by a time limit continues,
the reordered import keeps the original's full-model loss, speculative decoding stays lossless, and the report is
written from the results. The realistic run is the same code with --preset gpu on SmolLM2."""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a download: every folder here is local

import pytest

pytest.importorskip("transformers")

from _tiny_ckpt import make_checkpoint  # noqa: E402
from _tiny_llama import tiny_llama  # noqa: E402
from matryoshka_lm.cli import main  # noqa: E402
from matryoshka_lm.core import checkpoint as ck  # noqa: E402
from matryoshka_lm.elastify.recipe import PRESETS, run_elastify  # noqa: E402
from matryoshka_lm.errors import MatryoshkaError  # noqa: E402
from matryoshka_lm.train.state import saved_step  # noqa: E402

pytestmark = pytest.mark.slow  # an end-to-end pipeline (still run by `make test`)

PRESET = dataclasses.replace(PRESETS["tiny"], steps=4)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, corpus_file):
    root = tmp_path_factory.mktemp("elastify")
    tiny_llama(root / "llama", make_checkpoint(root / "ckpt", corpus_file))
    return root / "llama"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, llama, corpus_file):
    out = tmp_path_factory.mktemp("elastify") / "run"
    kw = dict(hf=llama, data=str(corpus_file), device="cpu", preset_name="tiny")
    first = run_elastify(out, PRESET, time_limit_s=0, **kw)  # a zero limit: one step, then stop
    assert not first["done"] and saved_step(out / "elastic") == 1
    assert not (out / "eval.json").exists()
    return out, run_elastify(out, PRESET, **kw)


def test_a_split_run_finishes_the_planned_steps(finished):
    out, res = finished
    assert res["done"] and res["plan"]["steps"] == 4
    assert saved_step(out / "elastic") == 4
    steps = [json.loads(line)["step"] for line in (out / "elastic" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    _, tcfg = ck.read_config(out / "elastic")
    assert tcfg.teacher == str(out / "reordered") and tcfg.distill == 1.0


def test_reordering_keeps_the_full_model_and_every_size_is_evaluated(finished):
    out, res = finished
    ev = res["eval"]
    names = list(ev["sizes"])
    assert names[0] == "XL" and len(names) >= 2
    for key in ("loss", "ood_loss"):  # a permutation: the full model's loss does not move
        assert abs(ev[key]["reordered"]["XL"] - ev[key]["original"]["XL"]) < 1e-4
        for model in ("original", "reordered", "elastic"):
            assert set(ev[key][model]) == set(names)
    samples = ev["samples"]["elastic"]
    assert set(samples) == set(names) and all(len(v) == len(PRESET.prompts) for v in samples.values())


def test_speed_compares_sizes_transformers_and_lossless_speculation(finished):
    _, res = finished
    sp = res["speed"]
    assert set(sp["sizes"]) == set(res["eval"]["sizes"])
    for s in sp["sizes"].values():
        assert s["tokens_per_s"] > 0 and 0 < s["roofline_fraction"]
    assert sp["transformers"]["dynamic cache"]["tokens_per_s"] > 0
    drafts = {k: v for k, v in sp["speculative"].items() if isinstance(v, dict)}
    assert set(drafts) == {"width S", "early exit E1 (1 of 3 layers)"}  # the exit is a trained size of its own
    assert all(d["lossless"] for d in drafts.values())
    assert "E1" in res["eval"]["sizes"] and "E1" in res["eval"]["samples"]["elastic"]


def test_the_student_shares_the_teachers_tokens_and_ships_as_int8_under_the_limit(finished, capsys):
    out, res = finished
    ship = out / "ship"
    assert ck.read_quant(ship) is not None and ck.read_quant(ship)[1] == 8
    assert ck.load_tokenizer(ship).to_str() == ck.load_tokenizer(out / "reordered").to_str()
    assert res["student"]["ship_bytes"] <= PRESET.ship_mb * 2**20
    gen = json.loads((out / "generated.json").read_text())
    assert gen["done"] and gen["tokens"] >= PRESET.gen_tokens
    assert (out / "student-data" / "generated.txt").stat().st_size > 0
    card = (ship / "README.md").read_text()
    assert "KL(teacher || size)" in card and "| teacher |" in card and "llama" in card
    # the shipped checkpoint evaluates on the elastic run's held-out split: `matryoshka eval` finds the same loss
    assert main(["eval", str(ship), "--device", "cpu"]) == 0
    rows = json.loads((ship / "eval.json").read_text())["sizes"]
    xl = next(r for r in rows if r["size"] == "XL")
    assert abs(xl["val_loss"] - res["student"]["loss"]["student, int8"]["XL"]) < 1e-4
    capsys.readouterr()
    args = ["generate", str(ship), "--size", "all", "--prompt", "Once upon a time", "--max-new-tokens", "4"]
    assert main([*args, "--device", "cpu"]) == 0  # what `make demo` runs on a shipped model
    printed = capsys.readouterr().out
    assert all(f"[{n}] Once upon a time" in printed for n in res["student"]["sizes"])


def test_the_students_corpus_text_leaves_out_the_held_out_blocks(finished):
    out, _ = finished
    from matryoshka_lm.train.eval_checkpoint import checkpoint_val_split

    _, train, val = checkpoint_val_split(out / "elastic")
    tok = ck.load_tokenizer(out / "elastic")
    text = (out / "student-data" / "corpus-train.txt").read_text()
    held_out = tok.decode(val[:64].tolist())
    assert held_out.strip() and held_out not in text
    assert tok.decode(train[100:164].tolist()) in text


def test_report_has_the_tables_plots_and_command(finished, tmp_path, llama, corpus_file):
    out, res = finished
    text = (out / "report" / "README.md").read_text()
    for part in ("## Loss per size", "## Greedy samples", "## Speed", "original XL", "draft: width", "--preset tiny",
                 "## The small student"):  # fmt: skip
        assert part in text, part
    assert (out / "report" / "losses.png").stat().st_size > 0 and (out / "report" / "speed.png").stat().st_size > 0
    args = ["elastify", "--out", str(out), "--preset", "tiny", "--stages", "report", "--report", str(tmp_path / "r")]
    assert main(args) == 0  # the report is rewritten from the JSON results alone
    assert (tmp_path / "r" / "README.md").read_text() == text


def test_bad_requests_name_the_problem(tmp_path, llama, monkeypatch, capsys):
    with pytest.raises(MatryoshkaError, match="unknown stages"):
        run_elastify(tmp_path / "a", PRESET, hf=llama, stages=("train", "bake"))
    with pytest.raises(MatryoshkaError, match="not prepared"):
        run_elastify(tmp_path / "b", PRESET, hf=llama, stages=("eval",))
    with pytest.raises(MatryoshkaError, match="not both"):
        run_elastify(tmp_path / "c", PRESET, hf=llama, gguf=llama / "x.gguf")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MatryoshkaError, match="only the train stage"):
        run_elastify(tmp_path / "d", PRESET, hf=llama)
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["elastify", "--out", str(tmp_path / "e"), "--preset", "huge"]) != 0
    assert "unknown preset 'huge'" in capsys.readouterr().err
