"""The CLI as users meet it: --help everywhere; bad input prints one `error:` line and exits non-zero."""
from __future__ import annotations

import pytest

from matryoshka_lm.cli import main

TINY = ["--preset", "tiny", "--quiet", "--device", "cpu", "--max-corpus-chars", "60000"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--steps", "3", "--data", str(corpus_file), "--out", str(out)]) == 0
    return out


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["generate"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: matryoshka" in capsys.readouterr().out


def test_eval_and_generate_work(ckpt, capsys):
    assert main(["eval", str(ckpt), "--batches", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| XL |" in out and "| S |" in out and "unigram" in out
    assert (ckpt / "eval.json").is_file() and (ckpt / "eval.png").stat().st_size > 1000
    assert main(["generate", str(ckpt), "--size", "all", "--prompt", "The", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("[") == 4


def test_unknown_size(ckpt, capsys):
    assert main(["generate", str(ckpt), "--size", "XXL", "--prompt", "a", "--device", "cpu"]) == 2
    assert "unknown size 'XXL'" in error_line(capsys)


def test_untrained_axis_fraction(tmp_path, corpus_file, capsys):
    out = tmp_path / "ffn_only"
    assert main(["train", *TINY, "--steps", "1", "--data", str(corpus_file), "--out", str(out), "--nest", "ffn"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--size", "XL@d32", "--prompt", "a", "--device", "cpu"]) == 2
    assert "not trained with a nested residual width" in error_line(capsys)


def test_fraction_that_does_not_divide(ckpt, capsys):
    assert main(["generate", str(ckpt), "--size", "f7h3", "--prompt", "a", "--device", "cpu"]) == 2
    assert "GQA group" in error_line(capsys)


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in error_line(capsys)


def test_corrupt_weights(ckpt, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    assert main(["eval", str(bad)]) == 2
    assert "corrupt weights" in error_line(capsys)
    (bad / "config.json").write_text("{not json")
    assert main(["eval", str(bad)]) == 2
    assert "corrupt JSON" in error_line(capsys)


def test_empty_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert main(["train", *TINY, "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "empty" in error_line(capsys)


def test_missing_data_and_bad_options(tmp_path, capsys):
    assert main(["train", *TINY, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in error_line(capsys)
    assert main(["train", *TINY, "--only", "XXL", "--out", str(tmp_path / "o2")]) == 2
    assert "unknown size" in error_line(capsys)
    assert main(["train", *TINY, "--nest", "ffn,bogus", "--out", str(tmp_path / "o3")]) == 2
    assert "unknown axes" in error_line(capsys)
    assert main(["train", *TINY, "--steps", "0", "--out", str(tmp_path / "o4")]) == 2
    assert "steps must be positive" in error_line(capsys)


def test_refuses_to_overwrite_a_run(ckpt, capsys):
    assert main(["train", *TINY, "--out", str(ckpt)]) == 2
    assert "not empty" in error_line(capsys)


def test_resume_without_state(tmp_path, capsys):
    assert main(["train", *TINY, "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "cannot resume" in error_line(capsys)
