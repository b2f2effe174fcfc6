"""Hugging Face interop: exported folders load in stock transformers with our logits; Llama folders import."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a download: every folder here is local

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _tiny_ckpt import make_checkpoint  # noqa: E402
from _tiny_llama import tiny_llama  # noqa: E402
from matryoshka_lm.cli import main  # noqa: E402
from matryoshka_lm.convert.hf import export_hf  # noqa: E402
from matryoshka_lm.convert.hf_import import default_sizes, import_hf  # noqa: E402
from matryoshka_lm.core import checkpoint as ck  # noqa: E402
from matryoshka_lm.core.spec import parse_spec, uniform_spec  # noqa: E402

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file):
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt", corpus_file)


def hf_logits(folder, x):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("size", ["XL", "M", "S", "L,L,L"])
def test_export_loads_in_transformers_with_our_logits(ckpt, tmp_path, size):
    out = export_hf(ckpt, size, tmp_path / "hf")
    ours = ck.load_model(ckpt)
    x = torch.randint(0, ours.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        want = ours(x, parse_spec(ours.cfg, size))
    assert (hf_logits(out, x) - want).abs().max() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "def f(x):\n    return x + 1"
    assert tok(text)["input_ids"] == ck.load_tokenizer(ckpt).encode(text).ids
    assert tok.eos_token == EOT


@pytest.mark.parametrize("size", ["XL", "M"])
def test_untied_head_exports_with_our_logits(tmp_path, corpus_file, size):
    """A separate lm_head (sliced to the size's width) reaches transformers as its own weight, not the embedding."""
    ckpt = make_checkpoint(tmp_path / "untied", corpus_file, seed=2, tie_embeddings=False)
    out = export_hf(ckpt, size, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ours = ck.load_model(ckpt)
    assert not torch.equal(ours.lm_head.weight, ours.tok_emb.weight)
    x = torch.randint(0, ours.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        want = ours(x, parse_spec(ours.cfg, size))
    assert (hf_logits(out, x) - want).abs().max() <= 1e-4


def test_per_layer_widths_need_pad(ckpt, tmp_path, capsys):
    assert main(["export-hf", str(ckpt), "--size", "S,M,M,L", "-o", str(tmp_path / "hf")]) == 2
    line = error_line(capsys)
    assert "per-layer FFN widths" in line and "--pad" in line and "XL, L, M, S" in line
    assert not (tmp_path / "hf").exists()
    assert main(["export-hf", str(ckpt), "--size", "S,M,M,L", "-o", str(tmp_path / "hf"), "--pad"]) == 0
    ours = ck.load_model(ckpt)
    x = torch.randint(0, ours.cfg.vocab_size, (1, 16))
    with torch.no_grad():
        want = ours(x, parse_spec(ours.cfg, "S,M,M,L"))
    assert (hf_logits(tmp_path / "hf", x) - want).abs().max() <= 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_import_matches_transformers_and_reorder_keeps_logits(ckpt, tmp_path, corpus_file, tie):
    hf = tiny_llama(tmp_path / "llama", ckpt, tie=tie)
    x = torch.randint(0, hf.config.vocab_size, (2, 20))
    with torch.no_grad():
        want = hf(x).logits
    for reorder in (False, True):
        out = import_hf(
            tmp_path / "llama",
            tmp_path / f"ours{reorder}",
            reorder=reorder,
            data=str(corpus_file),
            nest=("heads", "ffn"),
            max_corpus_chars=60_000,
            reorder_batches=2,
            seq_len=32,
        )
        ours = ck.load_model(out)
        with torch.no_grad():
            assert (ours(x) - want).abs().max() <= 1e-4
    moved = ck.load_tensors(tmp_path / "oursTrue" / ck.WEIGHTS)["layers.0.ffn.w_up.weight"]
    kept = ck.load_tensors(tmp_path / "oursFalse" / ck.WEIGHTS)["layers.0.ffn.w_up.weight"]
    assert not torch.equal(moved, kept)  # reordering did reorder


def test_imported_sizes_fit_the_shape_and_train_init_fine_tunes(ckpt, tmp_path, corpus_file):
    """6 heads in 3 GQA groups and 3 layers: default sizes snap to whole groups (1/2 -> 2/3, 3/4 -> 1)."""
    tiny_llama(tmp_path / "llama", ckpt)
    out = import_hf(
        tmp_path / "llama",
        tmp_path / "ours",
        data=str(corpus_file),
        nest=("width", "heads", "ffn", "depth"),
        max_corpus_chars=60_000,
        reorder_batches=1,
        seq_len=32,
    )
    cfg, _ = ck.read_config(out)
    assert cfg.sizes == default_sizes(cfg)
    assert cfg.sizes["L"]["heads"] == "2/3" and cfg.sizes["S"]["depth"] == "1"
    for name in cfg.sizes:
        spec = uniform_spec(cfg, name)
        assert all(l.heads % cfg.group_size == 0 for l in spec.layers)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--init",
                str(out),
                "--out",
                str(run),
                "--data",
                str(corpus_file),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--max-corpus-chars",
                "60000",
                "--lr",
                "1e-4",
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    tuned, _ = ck.read_config(run)
    assert tuned.sizes == cfg.sizes and tuned.d_model == 48


def test_export_import_round_trip(ckpt, tmp_path):
    export_hf(ckpt, "M", tmp_path / "hf")
    back = import_hf(tmp_path / "hf", tmp_path / "back", reorder=False)
    a = ck.load_tensors(back / ck.WEIGHTS)
    full = ck.load_model(ckpt)
    from matryoshka_lm.core.nested import slice_state_dict

    b = slice_state_dict(full.state_dict(), full.cfg, uniform_spec(full.cfg, "M"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_import_sources(ckpt, tmp_path, capsys):
    assert main(["import-hf", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "not a directory" in error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["import-hf", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    assert "not a Llama checkpoint: no config.json" in error_line(capsys)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["import-hf", str(tmp_path / "gpt2"), "-o", str(tmp_path / "o")]) == 2
    assert "model_type 'gpt2'" in error_line(capsys)
    # our own checkpoint format is not a Hugging Face folder either
    assert main(["import-hf", str(ckpt), "-o", str(tmp_path / "o")]) == 2
    assert "not a Llama checkpoint" in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_import_refuses_existing_output(ckpt, tmp_path, capsys):
    tiny_llama(tmp_path / "llama", ckpt)
    (tmp_path / "o").mkdir()
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "llama"), "-o", str(tmp_path / "o"), "--no-reorder"]) == 2
    assert "already exists" in error_line(capsys)
    assert main(["import-hf", str(tmp_path / "llama"), "-o", str(tmp_path / "o"), "--no-reorder", "--force"]) == 0
    assert (tmp_path / "o" / ck.WEIGHTS).is_file()
