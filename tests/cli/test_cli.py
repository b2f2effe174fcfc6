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
    assert (
        main(["generate", str(ckpt), "--size", "all", "--prompt", "The", "--max-new-tokens", "4", "--device", "cpu"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    # one line per size, largest first, each the size's tag, the prompt, then the continuation
    assert [line.partition(" ")[0] for line in lines] == ["[XL]", "[L]", "[M]", "[S]"], lines
    assert all(line.partition(" ")[2].startswith("The") for line in lines), lines


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


def test_refuses_to_overwrite_a_run(ckpt, capsys):
    assert main(["train", *TINY, "--out", str(ckpt)]) == 2
    assert "not empty" in error_line(capsys)


def test_resume_without_state(tmp_path, capsys):
    assert main(["train", *TINY, "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "cannot resume" in error_line(capsys)


# ---------------------------------------------------------------- counts checked at parse time


def usage_error(capsys, argv: list[str]) -> str:
    """argparse's usage error: exit 2, the last stderr line names the option; no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: matryoshka")
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv, option",
    [
        (["embed", "ck", "f.txt", "-o", "x.npy", "--batch-size", "0"], "--batch-size"),
        (["embed", "ck", "f.txt", "-o", "x.npy", "--dims", "-4"], "--dims"),
        (["train", "--steps", "0"], "--steps"),
        (["train", "--seq-len", "0"], "--seq-len"),
        (["train", "--grad-accum", "-1"], "--grad-accum"),
        (["train", "--save-every", "0"], "--save-every"),
        (["train-embed", "ck", "-o", "o", "--max-tokens", "0"], "--max-tokens"),
        (["search", "idx", "-k", "0"], "-k"),
        (["index", "build", "-o", "o", "--hnsw-dim", "0"], "--hnsw-dim"),
        (["serve", "ck", "--max-batch", "0"], "--max-batch"),
        (["mixnmatch", "ck", "--budget", "params=1M", "--batches", "0"], "--batches"),
    ],
)
def test_counts_must_be_positive(argv, option, capsys):
    line = usage_error(capsys, argv)
    assert line.endswith(f"error: argument {option}: must be a positive integer, got {int(argv[-1])}"), line


@pytest.mark.parametrize(
    "argv, option",
    [
        (["train-embed", "ck", "-o", "o", "--proj-dim", "-1"], "--proj-dim"),
        (["search", "idx", "--hnsw-ef", "-2"], "--hnsw-ef"),
        (["train", "--max-corpus-chars", "-5"], "--max-corpus-chars"),
    ],
)
def test_counts_that_may_be_zero_refuse_negatives(argv, option, capsys):
    line = usage_error(capsys, argv)
    assert line.endswith(f"error: argument {option}: must be 0 or a positive integer, got {int(argv[-1])}"), line


def test_zero_where_zero_means_off():
    from matryoshka_lm.cli.main import build_parser

    p = build_parser()
    assert p.parse_args(["train-embed", "ck", "-o", "o", "--proj-dim", "0"]).proj_dim == 0
    assert p.parse_args(["search", "idx", "--hnsw-ef", "0"]).hnsw_ef == 0
    assert p.parse_args(["embed", "ck", "f", "-o", "x", "--batch-size", "3"]).batch_size == 3


def test_bad_port_and_non_integer(capsys):
    assert usage_error(capsys, ["serve", "ck", "--port", "70000"]).endswith(
        "argument --port: must be a port number in 1..65535, got 70000"
    )
    assert usage_error(capsys, ["embed", "ck", "f", "-o", "x", "--batch-size", "many"]).endswith(
        "argument --batch-size: must be an integer, got 'many'"
    )


# ---------------------------------------------------------------- unexpected errors


@pytest.fixture
def broken_embed(monkeypatch):
    """embed_file failing the way a library bug would: not a MatryoshkaError, a multi-line message."""
    import matryoshka_lm.embed as embed

    def boom(*args, **kwargs):
        raise RuntimeError("boom: tensor shapes disagree\nsecond line of detail")

    monkeypatch.setattr(embed, "embed_file", boom)


def test_unexpected_error_is_one_line(broken_embed, tmp_path, capsys):
    code = main(["embed", "ck", "f.txt", "-o", str(tmp_path / "x.npy"), "--device", "cpu"])
    assert code not in (0, 2)
    assert error_line(capsys) == "error: RuntimeError: boom: tensor shapes disagree (rerun with -v for the traceback)"


def test_verbose_shows_the_traceback(broken_embed, tmp_path):
    with pytest.raises(RuntimeError, match="tensor shapes disagree"):
        main(["-v", "embed", "ck", "f.txt", "-o", str(tmp_path / "x.npy"), "--device", "cpu"])


def test_train_flags_are_train_config_fields():
    """`matryoshka train`'s flags are derived from TrainConfig: each names a field, and parses to the field's value."""
    import dataclasses

    from matryoshka_lm.cli.main import build_parser
    from matryoshka_lm.cli.train import TRAIN_FLAGS
    from matryoshka_lm.config import TrainConfig

    assert set(TRAIN_FLAGS) <= {f.name for f in dataclasses.fields(TrainConfig)}
    a = build_parser().parse_args(["train", "--bits", "8,4", "--size-weights", "1,2", "--sizes", "XL, M", "--fsdp"])
    assert (a.bits, a.size_weights, a.sizes, a.fsdp, a.lr) == ([8, 4], [1.0, 2.0], ["XL", "M"], True, None)


LIST_FLAGS = [
    ["eval", "CKPT", "--sizes"],
    ["harness", "CKPT", "--sizes"],
    ["route", "fit", "CKPT", "--candidates"],
    ["train-embed", "CKPT", "--out", "X", "--sizes"],
    ["train", "--sizes"],
]


@pytest.mark.parametrize("flag", LIST_FLAGS, ids=lambda f: f[0])
def test_a_comma_list_is_sizes_in_every_command(flag):
    """One spec-list rule (core.spec.split_specs) behind every flag that takes sizes: "XL,S" is two sizes; one
    per-layer spec needs the explicit form."""
    from matryoshka_lm.cli.main import build_parser
    from matryoshka_lm.cli.options import spec_list

    parser = build_parser()
    for text, want in (("XL,S", ["XL", "S"]), ("mix:S,M,L,XL", ["mix:S,M,L,XL"]), ("S,M,L,XL;M", ["S,M,L,XL", "M"])):
        a = parser.parse_args([*flag, text])
        got = getattr(a, flag[-1].lstrip("-"))
        assert (got if isinstance(got, list) else spec_list(got)) == want, (flag, text)


def test_eval_sizes_xl_s_evaluates_two_sizes(ckpt, tmp_path, capsys):
    """The reported bug: `eval --sizes XL,S` evaluated one 2-layer Mix'n'Match spec instead of the two sizes."""
    import json

    out = tmp_path / "e.json"
    assert main(["eval", str(ckpt), "--sizes", "XL,S", "--batches", "1", "--json", str(out), "--device", "cpu"]) == 0
    rows = json.loads(out.read_text())["sizes"]
    assert [r["size"] for r in rows] == ["XL", "S"]
    from matryoshka_lm import load_model, parse_spec

    mix = str(parse_spec(load_model(ckpt).cfg, "S,XL,XL,XL"))
    assert main(["eval", str(ckpt), "--sizes", "mix:S,XL,XL,XL", "--batches", "1", "--json", str(out)]) == 0
    assert [r["spec"] for r in json.loads(out.read_text())["sizes"]] == [mix]  # one per-layer spec, explicitly
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--sizes", "XL,Q"]) == 2
    assert "a list separates specs with ','" in error_line(capsys)
