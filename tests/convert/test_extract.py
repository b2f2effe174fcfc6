"""Extraction: a standalone dense checkpoint that holds exactly a spec's weights and computes its logits."""

from __future__ import annotations

import pytest
import torch

from _tiny_ckpt import make_checkpoint
from matryoshka_lm.cli import main
from matryoshka_lm.convert import extract as ex
from matryoshka_lm.core import checkpoint as ck
from matryoshka_lm.core.spec import count_params, parse_spec

SPECS = ["M", "S", "S,M,M,L", "f8h2,f64h4,f16h2@d16"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file):
    return make_checkpoint(tmp_path_factory.mktemp("extract") / "ckpt", corpus_file)


@pytest.mark.parametrize("size", SPECS)
def test_extracted_equals_elastic_and_holds_only_the_slice(ckpt, tmp_path, size):
    full = ck.load_model(ckpt)
    spec = parse_spec(full.cfg, size)
    out = ex.extract_submodel(ckpt, size, tmp_path / "sub")
    small = ck.load_model(out)
    n = sum(p.numel() for p in small.parameters())
    assert n == count_params(full.cfg, spec)["total"]
    # the file is the parameters in fp32 plus a small header: it shrinks with the spec
    size_bytes = (out / ck.WEIGHTS).stat().st_size
    assert 0 <= size_bytes - 4 * n < 16_384
    assert size_bytes < (ckpt / ck.WEIGHTS).stat().st_size
    x = torch.randint(0, full.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(small(x), full(x, spec), rtol=0, atol=1e-5)
    assert (out / ck.TOKENIZER).read_text() == (ckpt / ck.TOKENIZER).read_text()


def test_refuses_existing_output_unless_forced(ckpt, tmp_path, capsys):
    out = tmp_path / "sub"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["extract", str(ckpt), "--size", "M", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--force" in err[0]
    assert (out / "keep.txt").exists()
    assert main(["extract", str(ckpt), "--size", "S", "-o", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / ck.WEIGHTS).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no temp or backup left behind


def test_failure_leaves_nothing(ckpt, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex.ck, "save_tensors", boom)
    with pytest.raises(RuntimeError):
        ex.extract_submodel(ckpt, "M", tmp_path / "sub")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "size, msg",
    [
        ("XXL", "unknown size 'XXL'"),
        ("S,M,Q", "bad layer 2 'Q'"),
        ("f7h3", "GQA group"),
        ("S,S,S,S,S", "lists 5 layers"),
    ],
)
def test_bad_spec_is_one_error_line(ckpt, tmp_path, capsys, size, msg):
    assert main(["extract", str(ckpt), "--size", size, "-o", str(tmp_path / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert not (tmp_path / "sub").exists()


def test_output_cannot_be_the_input(ckpt, capsys):
    assert main(["extract", str(ckpt), "--size", "M", "-o", str(ckpt), "--force"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert ck.read_config(ckpt)[0].n_layers == 4
